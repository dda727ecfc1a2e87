"""Every example in the package's docstrings runs and prints what it says (the docs match the code)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dfm

MODULES = sorted(m.name for m in pkgutil.walk_packages(dfm.__path__, "dfm.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
