#!/usr/bin/env bash
# Install what dfm, its quick start and its tests need on a Debian/Ubuntu machine: Debian's Fashion-MNIST package
# (the built-in data set), torch (kept if a supported one is installed, e.g. your CUDA build), and dfm itself with
# the extras the tests use. Safe to run again. CI runs it too (.ci/run), then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
# torch first, so that installing dfm does not pull another build: 2.4 to 2.13 are supported.
if ! python -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(not (2, 4) <= v < (2, 14))' 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test,eval,vae,video,serve,finetune]"
