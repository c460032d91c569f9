#!/usr/bin/env bash
# Serves the student with vLLM for on-policy sampling (on_policy.engine: vllm, on_policy.vllm_url; docs/on-policy.md):
#   bash scripts/serve_student.sh STUDENT [vLLM args...]                  # http://127.0.0.1:8000
#   PORT=8001 bash scripts/serve_student.sh ./results/sft --gpu-memory-utilization 0.3
# It is scripts/serve_teacher.sh (same environment .venv-vllm, same HOST/PORT/VLLM_* variables) plus what the weight
# sync needs: VLLM_SERVER_DEV_MODE=1 (the /collective_rpc and /reset_prefix_cache endpoints: serve on 127.0.0.1 or a
# trusted network only), the worker extension scripts/vllm_weight_sync.py, and --generation-config vllm (no sampling
# defaults from the checkpoint's generation_config.json; the trainer sends every sampling field anyway).
# distil_logits.py runs this itself when on_policy.vllm_url is null.
set -euo pipefail
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { echo "usage: bash scripts/serve_student.sh STUDENT [vLLM args...]" >&2; exit 1; }
export VLLM_SERVER_DEV_MODE=1
MODEL="$1"
shift
exec bash "$(dirname "$0")/serve_teacher.sh" "$MODEL" --worker-extension-cls vllm_weight_sync.WeightSyncExtension \
    --generation-config vllm "$@"
