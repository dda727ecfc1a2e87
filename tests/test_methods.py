"""The method registry: every method's settings, legacy configs, and a new method added in one place."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dfm.config import RunConfig
from dfm.generate import Generator
from dfm.methods import DFM, Method, get_method, method_names, register_method
from dfm.objective import DFMObjective
from dfm.presets import get_preset, with_method
from dfm.resolve import apply_overrides, resolve
from dfm.run import DataSpec


def test_builtin_methods_and_unknown_name():
    assert method_names()[:4] == ("dfm", "fm", "cascade", "pyramidal")
    assert get_method("cascade").unused_parameters and not get_method("cascade").supports_fsdp
    with pytest.raises(ValueError, match=r"method.name='cascad': choose one of dfm, fm, cascade, pyramidal"):
        apply_overrides(get_preset("quickstart"), ["method.name=cascad"])


def test_options_are_typed_filled_and_checked():
    cfg = with_method(get_preset("quickstart"), "cascade")
    assert cfg.method.options == {"stage1_fraction": 0.8, "switch_step": None, "cond_loc": 1.5, "cond_scale": 1.0,
                                  "cond_noise": 0.025}  # fmt: skip
    cfg = apply_overrides(cfg, ["method.options.cond_noise=0.05", "method.options.switch_step=7"])
    assert cfg.method.options["cond_noise"] == 0.05 and cfg.method.options["switch_step"] == 7
    cascade = get_method("cascade")
    assert cascade.objective(cfg.method, cascade.decomposition(cfg.method), 100).switch_step == 7
    with pytest.raises(ValueError, match="cannot parse method.options.switch_step='x' as int"):
        apply_overrides(cfg, ["method.options.switch_step=x"])
    with pytest.raises(ValueError, match=r"a setting of method cascade: method.options.cond_noise"):
        apply_overrides(get_preset("quickstart"), ["method.cond_noise=0.05"])
    with pytest.raises(ValueError, match="unknown setting method.options.windows of method dfm; its options: none"):
        apply_overrides(get_preset("quickstart"), ["method.options.windows=0.5"])
    pyr = with_method(get_preset("quickstart"), "pyramidal")
    pyr = apply_overrides(pyr, ["method.options.windows=0.4", "method.options.gamma=0.25"])
    assert pyr.method.options == {"windows": (0.4,), "gamma": (0.25,), "time": "uniform", "shares": None}
    shared = apply_overrides(pyr, ["method.options.shares=0.3,0.7"])
    pyramidal = get_method("pyramidal")
    assert pyramidal.objective(shared.method, pyramidal.decomposition(shared.method)).shares == (0.3, 0.7)
    with pytest.raises(ValueError, match=r"method.options.shares=0.5,0.6 needs 2 positive shares .* sum to 1"):
        apply_overrides(pyr, ["method.options.shares=0.5,0.6"])
    data = pyr.to_dict()
    data["method"]["options"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"method.options \['bogus'\] are not settings of method pyramidal"):
        resolve(RunConfig.from_dict(data))
    data["method"]["options"] = {"windows": "wide"}
    with pytest.raises(ValueError, match="method.options.windows='wide' must be of type"):
        resolve(RunConfig.from_dict(data))


def test_options_round_trip_through_json(tmp_path):
    cfg = apply_overrides(with_method(get_preset("quickstart"), "pyramidal"), ["method.options.windows=0.3"])
    cfg.save(tmp_path / "config.json")
    assert resolve(RunConfig.load(tmp_path / "config.json")) == cfg


# -- a fifth method, defined in one place (what a user's plug-in module would hold)
@dataclasses.dataclass
class EchoOptions:
    scale: float = 1.0  #: multiplies the DFM loss


class _ScaledObjective(DFMObjective):
    def __init__(self, *args, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def loss(self, *args, **kwargs):
        out = super().loss(*args, **kwargs)
        out.loss = out.loss * self.scale
        return out


class ScaledDFM(DFM):
    name = "test-scaled-dfm"
    description = "DFM with its loss multiplied by a constant (a test method)"
    Options = EchoOptions

    def objective(self, m, decomposition, total_steps=None):
        return _ScaledObjective(decomposition, stage_probs=m.stage_probs, scale=self.options(m).scale)


def test_a_new_method_is_one_class(tmp_path):
    register_method(ScaledDFM())
    try:
        cfg = get_preset("quickstart")
        cfg = apply_overrides(cfg, ["method.name=test-scaled-dfm", "method.options.scale=3.0",
                                    "method.data_std=0.5,0.2", "sampler.steps=2,2"])  # fmt: skip
        assert "test-scaled-dfm" in method_names() and cfg.method.options == {"scale": 3.0}
        method = get_method("test-scaled-dfm")
        decomposition = method.decomposition(cfg.method)
        objective = method.objective(cfg.method, decomposition)
        assert isinstance(objective, _ScaledObjective) and objective.scale == 3.0
        model = method.velocity_model(method.network(cfg, (1, 32, 32), 10), cfg.method)
        x, y = torch.randn(4, 1, 32, 32), torch.arange(4)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        plain = DFMObjective(decomposition, stage_probs=(0.5, 0.5)).loss(model, x, y, generator=g())
        scaled = objective.loss(model, x, y, generator=g())
        torch.testing.assert_close(scaled.loss, 3.0 * plain.loss)
        out = Generator(model.network, cfg, DataSpec((1, 32, 32), 10)).generate([0, 1], [0, 1])
        assert out.images.shape == (2, 1, 32, 32) and len(out.previews) == 2
    finally:
        from dfm import methods

        methods._REGISTRY.pop("test-scaled-dfm", None)


def test_register_refuses_a_method_without_name_or_dataclass_options():
    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="needs a name"):
        register_method(Nameless())

    class BadOptions(Method):
        name = "bad"
        Options = dict

    with pytest.raises(TypeError, match="Options must be a dataclass"):
        register_method(BadOptions())


# -- one entry point, no import cycles inside the package
def test_python_m_dfm_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dfm", "presets"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "quickstart" in done.stdout


def test_no_module_level_import_cycles():
    """Module-level imports of dfm modules form no cycle (what lets every internal import sit at the top)."""
    import ast
    from pathlib import Path

    import dfm

    root = Path(dfm.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                deps.add(owner(f"{base}.{node.module}" if node.module else base))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dfm":
                deps.add(owner(node.module))
            elif isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "dfm"}
        graph[name] = deps - {name}

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for dep in graph.get(node, ()):
            assert dep not in path, "import cycle: " + " -> ".join([*path[path.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*path, dep], done)
        done.add(node)

    done: set[str] = set()
    for name in graph:
        visit(name, [name], done)
    assert "dfm.training.trainer" in graph and "dfm.cli" in graph["dfm.__main__"]
    assert graph["dfm.config"] == set()  # the config is plain data at the bottom: it imports nothing of dfm
    assert "dfm.resolve" in graph["dfm.presets"] and "dfm.methods" in graph["dfm.resolve"]


@pytest.mark.parametrize("method", ["dfm", "fm", "cascade", "pyramidal"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_network_evaluations_count_the_sampler_calls(method, solver):
    """What the bench reports as nfe (and serve's progress bar counts to) is the number of forward calls."""
    cfg = with_method(
        apply_overrides(get_preset("quickstart"), [f"sampler.solver={solver}", "sampler.steps=3,2"]), method
    )
    cfg.method.data_std = (0.6,) if method == "fm" else (0.6, 0.2)
    model = get_method(method).network(cfg, (1, 32, 32), 10).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    gen = Generator(model, cfg, DataSpec((1, 32, 32), 10))
    gen.generate([0], [0])
    expected = gen.network_evaluations()
    assert len(calls) == expected
    assert expected == {"euler": 5, "heun": 8 if method == "cascade" else 9}[solver]  # each cascade model ends clean
