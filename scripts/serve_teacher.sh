#!/usr/bin/env bash
# Serves a teacher with vLLM's OpenAI-compatible server, in its own environment, for training with
# teacher_server.url (served_teacher.py is the client):
#   bash scripts/serve_teacher.sh MODEL [vLLM args...]                       # http://127.0.0.1:8000
#   PORT=8001 bash scripts/serve_teacher.sh Qwen/Qwen2.5-7B-Instruct --tensor-parallel-size 2
#   SERVE_TEACHER_INSTALL_ONLY=1 bash scripts/serve_teacher.sh               # build .venv-vllm and stop
# The first run builds .venv-vllm (a separate virtualenv: vLLM pins its own torch and transformers, which must never
# enter the training .venv); later runs reuse it. `vllm` is installed where CUDA exists (nvidia-smi lists a GPU),
# `vllm-cpu` elsewhere, each at the exact version below. What it always passes unless you pass your own:
#   --logprobs-mode raw_logprobs   the training needs the model's own log-softmax, not after sampling processors
#   --max-logprobs 256             the server refuses prompt_logprobs above it; teacher_server.top_k must fit
# and always: --middleware serve_teacher_gzip.GZipFast (gzip level 1 for clients that ask for it, see that file).
# Environment: HOST (default 127.0.0.1; 0.0.0.0 serves other machines), PORT (default 8000), PYTHON (the
# interpreter that creates the env, default python3), VLLM_VENV (default .venv-vllm), VLLM_DEVICE (cpu or cuda,
# default: detected), TORCH_INDEX_URL (a PyTorch wheel index for the env's torch, as in setup.sh),
# VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU; default 4 here, vLLM's own default is sized for a large host).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "serve_teacher: error: $*" >&2; exit 1; }

VLLM_VERSION=0.32.0      # vllm (CUDA) and vllm-cpu are released together under the same version
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
if [ -z "${VLLM_DEVICE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        VLLM_DEVICE=cuda
    else
        VLLM_DEVICE=cpu
    fi
fi
case "$VLLM_DEVICE" in
    cuda) PACKAGE=vllm ;;
    cpu) PACKAGE=vllm-cpu ;;
    *) fail "VLLM_DEVICE=$VLLM_DEVICE; use cpu or cuda (or leave it unset to detect)" ;;
esac

VENV_PYTHON="$VLLM_VENV/bin/python"
installed() {
    [ -x "$VENV_PYTHON" ] && "$VENV_PYTHON" - "$PACKAGE" "$VLLM_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as metadata, importlib.util, sys
mismatched = [name for name in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(name)]
sys.exit(0 if metadata.version(sys.argv[1]) == sys.argv[2] and importlib.util.find_spec("vllm") and not mismatched else 1)
PY
}

if installed; then
    echo "serve_teacher: $PACKAGE $VLLM_VERSION already installed in $VLLM_VENV"
else
    start=$SECONDS
    if ! { [ -x "$VENV_PYTHON" ] && "$VENV_PYTHON" -m pip --version >/dev/null 2>&1; }; then
        PYTHON="${PYTHON:-python3}"
        command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; install Python 3 (Debian/Ubuntu: sudo apt-get install python3 python3-venv)"
        "$PYTHON" -c "import venv, ensurepip" 2>/dev/null \
            || fail "$PYTHON cannot create a virtualenv (no ensurepip); on Debian/Ubuntu run: sudo apt-get install python3-venv"
        echo "serve_teacher: creating $VLLM_VENV with $PYTHON"
        "$PYTHON" -m venv "$VLLM_VENV"
    fi
    pip_install() { PIP_ROOT_USER_ACTION=ignore "$VENV_PYTHON" -m pip install --disable-pip-version-check -q "$@"; }
    echo "serve_teacher: installing $PACKAGE==$VLLM_VERSION into $VLLM_VENV (a few minutes, several GB)"
    # vLLM pins torch exactly; an extra index (the CPU-only build, say) supplies a build of that same version.
    # vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's own CPU index holds: when the package index alone cannot
    # resolve it (pip installs nothing then), it is tried again with that index.
    if ! pip_install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$PACKAGE==$VLLM_VERSION"; then
        [ "$PACKAGE" = vllm-cpu ] && [ -z "${TORCH_INDEX_URL:-}" ] || fail "pip could not install $PACKAGE==$VLLM_VERSION (see above)"
        echo "serve_teacher: retrying with PyTorch's CPU wheel index for torch 2.13.0+cpu"
        pip_install --extra-index-url https://download.pytorch.org/whl/cpu "$PACKAGE==$VLLM_VERSION"
    fi
    # vLLM's torchvision/torchaudio/torchcodec requirements resolve to wheels built for another torch (vllm 0.32.0
    # pins torchaudio 2.11.0 next to torch 2.13.0): importing vllm then fails in their native extensions. A text model
    # needs none of them.
    PIP_ROOT_USER_ACTION=ignore "$VENV_PYTHON" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    installed || fail "$PACKAGE==$VLLM_VERSION did not install into $VLLM_VENV (see pip's output above)"
    "$VENV_PYTHON" -c "import vllm" || fail "vllm does not import in $VLLM_VENV (see the error above); rm -rf $VLLM_VENV and run again"
    echo "serve_teacher: installed $PACKAGE $VLLM_VERSION in $((SECONDS - start)) s"
fi
[ "${SERVE_TEACHER_INSTALL_ONLY:-0}" = 1 ] && exit 0

[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || fail "usage: bash scripts/serve_teacher.sh MODEL [vLLM args...] (MODEL: a hub name or a local folder)"
MODEL="$1"
shift

# Host, port and the two logprob flags: the user's own (in any of vLLM's spellings) win over ours.
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
given=" $* "
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --host) HOST="${args[$((i + 1))]:-$HOST}" ;;
        --host=*) HOST="${args[$i]#--host=}" ;;
        --port) PORT="${args[$((i + 1))]:-$PORT}" ;;
        --port=*) PORT="${args[$i]#--port=}" ;;
    esac
done
extra=(--host "$HOST" --port "$PORT")
case "$given" in *" --logprobs-mode"*) ;; *) extra+=(--logprobs-mode raw_logprobs) ;; esac
case "$given" in *" --max-logprobs"*) ;; *) extra+=(--max-logprobs 256) ;; esac
# gzip for clients that ask for it (served_teacher.py does): the JSON of prompt log-probabilities shrinks about fourfold.
extra+=(--middleware serve_teacher_gzip.GZipFast)
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
if [ "$VLLM_DEVICE" = cpu ]; then
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
fi

shown_host="$HOST"
[ "$HOST" = 0.0.0.0 ] && shown_host="$(hostname)"
echo "serve_teacher: serving $MODEL at http://$shown_host:$PORT (teacher_server.url; ready when GET /v1/models answers)"
# `python -m` rather than the `vllm` console script: on vllm-cpu that script looks up the distribution named `vllm`
# and fails; the module runs under both packages.
exec "$VENV_PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" "${extra[@]}" "$@"
