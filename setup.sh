#!/usr/bin/env bash
# Installs the pinned requirements into the active Python (use a virtualenv or conda env of your choice).
# Idempotent: a second run installs nothing new. On a machine without CUDA it installs torch without flash-attn
# and says so; with CUDA it installs flash-attn too.
#   TORCH_INDEX_URL=<a PyTorch wheel index>  bash setup.sh   # pick a specific torch build (e.g. the CPU-only one)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q "$@"; }

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    echo "setup: torch 2.13.0 already installed"
else
    echo "setup: installing torch 2.13.0"
    pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
fi
pip_install -r requirements.txt

if command -v nvidia-smi >/dev/null 2>&1 && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
        echo "setup: flash-attn already installed"
    else
        echo "setup: CUDA found, installing flash-attn (compiles if no wheel matches; can take a while)"
        pip_install ninja packaging
        pip_install --no-build-isolation flash-attn==2.8.3.post2
    fi
else
    echo "setup: no CUDA device, skipping flash-attn (training uses sdpa attention)"
fi
echo "setup: done"
