#!/usr/bin/env bash
# Install what dfm, its quick start and its tests need on a Debian/Ubuntu machine, into a Python environment that
# the README's commands find as .venv/:
#   - with no virtual environment active: creates .venv/ in the repository with `python3 -m venv` (the system's)
#     (Debian and Ubuntu refuse `pip install` into the system Python, PEP 668) and installs into it;
#   - with a virtual (or conda) environment active: installs into that one and makes .venv a link to it, so that
#     .venv/bin/dfm and .venv/bin/python are the active environment's.
# Debian packages, with apt-get (through sudo when not root), only those that are missing: dataset-fashion-mnist
# (the built-in data set), python3 and python3-venv (for .venv/). Then torch 2.13 unless the environment holds a
# supported torch (2.4 to 2.13, e.g. your CUDA build), and dfm itself, editable, with the extras the tests use.
# Safe to run again. CI runs it too (.ci/run), then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

fashion_mnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
active="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"  # the environment the user activated, if any

new_venv=0  # no environment active and no working .venv/ yet: create one
if [ -z "$active" ] && ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version > /dev/null 2>&1; }; then
  new_venv=1
fi

# The packages to install from Debian.
packages=()
[ -f "$fashion_mnist" ] || packages+=(dataset-fashion-mnist)
if [ "$new_venv" = 1 ]; then
  if ! command -v python3 > /dev/null; then
    packages+=(python3 python3-venv)
  elif ! python3 -c 'import ensurepip' 2> /dev/null; then  # Debian ships ensurepip (needed by venv) separately
    packages+=(python3-venv)
  fi
fi
if [ ${#packages[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  echo "setup.sh: installing ${packages[*]} with apt-get" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" > /dev/null
fi

# The environment to install into, reachable as .venv/ either way.
if [ -n "$active" ]; then
  python="$active/bin/python"
  if [ "$(readlink -f .venv 2> /dev/null)" != "$(readlink -f "$active")" ]; then
    if [ -e .venv ] && [ ! -L .venv ]; then
      echo "setup.sh: the environment $active is active, but .venv/ in $(pwd) is another one; deactivate it" \
        "(to use .venv/) or remove .venv/ (to install into $active and link .venv to it)" >&2
      exit 1
    fi
    ln -sfn "$active" .venv
    echo "setup.sh: installing into the active environment $active; .venv links to it" >&2
  fi
else
  python=.venv/bin/python
  if [ "$new_venv" = 1 ]; then
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "setup.sh: dfm needs Python 3.10 or later; $(command -v python3) is $(python3 --version 2>&1)" >&2
      exit 1
    fi
    echo "setup.sh: creating .venv/ with $(command -v python3) ($(python3 --version 2>&1))" >&2
    if [ -L .venv ]; then rm .venv; fi  # a link to an environment that is gone
    python3 -m venv --clear .venv
  fi
fi

# torch first, so that installing dfm does not pull another build: 2.4 to 2.13 are supported.
if ! "$python" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(not (2, 4) <= v < (2, 14))' 2> /dev/null; then
  "$python" -m pip install -q torch==2.13.0
fi
"$python" -m pip install -q -e ".[test,eval,vae,video,serve,finetune]"
echo "setup.sh: done; run .venv/bin/dfm and .venv/bin/python, or activate the environment: . .venv/bin/activate" >&2
