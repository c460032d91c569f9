#!/usr/bin/env bash
# Installs the pinned requirements into a Python environment and makes `.venv/bin/python` the interpreter to use:
#   - a virtualenv ($VIRTUAL_ENV) or a conda env other than base ($CONDA_PREFIX) is active: install into it, and
#     make .venv a symlink to it;
#   - none is active: install into the project's own .venv, created with `python3 -m venv` when missing (a system
#     Python such as Debian's or Ubuntu's is "externally managed", PEP 668, and refuses pip installs).
# Idempotent: a second run installs nothing new. On a machine without CUDA it installs torch without flash-attn
# and says so; with CUDA it installs flash-attn too. It never calls `python`, which stock Debian/Ubuntu lack.
#   TORCH_INDEX_URL=<a PyTorch wheel index>  bash setup.sh   # pick a specific torch build (e.g. the CPU-only one)
#   PYTHON=python3.12  bash setup.sh                         # the interpreter that creates .venv (default python3)
set -euo pipefail
cd "$(dirname "$0")"
fail() { echo "setup: error: $*" >&2; exit 1; }

# Conda's base env is active in every shell of a default conda install, chosen or not: installing a pinned torch
# into it would change the user's conda itself, so base counts as "no env" and gets a .venv of its own.
active_env=""
if [ -n "${VIRTUAL_ENV:-}" ]; then
    active_env="$VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-}" != base ] && [ ! -d "$CONDA_PREFIX/condabin" ]; then
    active_env="$CONDA_PREFIX"
fi

if [ -n "$active_env" ]; then
    [ -x "$active_env/bin/python" ] || fail "the active env $active_env has no bin/python (conda: conda install python=3.11)"
    active_env="$(cd "$active_env" && pwd -P)"
    if [ -d .venv ] && [ ! -L .venv ]; then
        # A .venv made by an earlier run with no env active: deleting it (torch and all) is the user's call.
        [ "$(cd .venv && pwd -P)" = "$active_env" ] \
            || fail ".venv is a separate virtualenv, but $active_env is active; rm -rf .venv to install into the active env, or deactivate it to use .venv"
    else
        ln -sfn "$active_env" .venv
    fi
    echo "setup: installing into the active env $active_env (.venv points to it)"
else
    if [ -L .venv ] && [ ! -x .venv/bin/python ]; then
        rm .venv    # a link to an env that no longer exists
    fi
    if [ -L .venv ]; then
        echo "setup: no env active, installing into the env .venv points to, $(cd .venv && pwd -P)"
    elif [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
        echo "setup: no env active, installing into .venv"
    else
        PYTHON="${PYTHON:-python3}"
        command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; install Python 3 (Debian/Ubuntu: sudo apt-get install python3 python3-venv)"
        # Debian and Ubuntu ship venv without ensurepip; `python3 -m venv` would then leave a .venv without pip.
        "$PYTHON" -c "import venv, ensurepip" 2>/dev/null \
            || fail "$PYTHON cannot create a virtualenv (no ensurepip); on Debian/Ubuntu run: sudo apt-get install python3-venv"
        echo "setup: no env active, creating .venv with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
        "$PYTHON" -m venv .venv    # also repairs a half-made .venv (one without pip)
    fi
fi

PYTHON=.venv/bin/python
"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip (conda: conda install pip)"
# The env var (not --root-user-action) because pip before 22.1, still in older conda envs, rejects the option.
pip_install() { PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

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
echo "setup: done; run Python with .venv/bin/python"
