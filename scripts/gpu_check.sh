#!/usr/bin/env bash
# GPU check, one CUDA device, no network, under 8 minutes on one H100:
#   0. precision: one SGD step of a tied student in float32, bf16 (sdpa), bf16 with flash-attention (where
#      installed) and fp16 against a float32 full-logits reference; share of weights one AdamW step at lr 2e-5
#      changes (JSON lines with "passed"; the CUDA version of tests/test_precision.py)
#   1. bf16 distil_logits.py (and distil_hidden.py) on small random models with packing: peak memory, tokens/s
#   2. DeepSpeed ZeRO-3 with the sharded teacher on one GPU
#   3. packing under flash_attention_2: a packed batch gives the losses of the same rows padded (tests/test_packing_attention.py)
#   4. the loss benchmark on CUDA
# Every step runs even when an earlier one fails; the script then exits 1 and names the failed steps. Each step's
# whole output is in its log.
# Results go to $OUT (or ./gpu_check_results): results.jsonl, the logs and the benchmark's table.
# Wheels for packages the GPU machine lacks may be placed in .whl/ (see the device notes); they are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR="${OUT:-gpu_check_results}"
mkdir -p "$RESULTS_DIR" /tmp/gpu_check
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RESULTS_DIR/device.txt"

failed=()
# step NAME LOG PATTERN COMMAND...: run COMMAND with its output in LOG, show the lines matching PATTERN, record a failure.
step() {
    local name=$1 log=$2 pattern=$3 status=0
    shift 3
    echo "--- $name"
    "$@" > "$log" 2>&1 || status=$?
    grep -E "$pattern" "$log" | tail -30 || true
    if [ "$status" -ne 0 ]; then
        echo "FAILED: $name (exit $status; see $log)"
        failed+=("$name")
    fi
}

zero3() {
    python3 - <<'PY' > /tmp/gpu_check/zero3.json
import json; a = json.load(open("/tmp/gpu_check/assets.json"))
print(json.dumps({"dataset": {"name": a["train"], "eval_size": 0, "num_samples": 2000},
                  "models": {"teacher": a["teacher"], "student": a["student"]},
                  "tokenizer": {"max_length": 2048},
                  "training": {"output_dir": "/tmp/gpu_check/out_zero3", "max_steps": 20, "per_device_train_batch_size": 4,
                               "gradient_accumulation_steps": 1, "bf16": True, "packing": True, "save_strategy": "no",
                               "eval_strategy": "no", "overwrite_output_dir": True, "logging_steps": 10}}))
PY
    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml --num_processes 1 distil_logits.py \
        --config /tmp/gpu_check/zero3.json
}

step "precision checks and bf16 runs (gpu_check.py)" "$RESULTS_DIR/runs.log" '^\{|Error|error' \
    python3 scripts/gpu_check.py --results "$RESULTS_DIR/results.jsonl"
step "ZeRO-3, sharded teacher, 1 GPU" "$RESULTS_DIR/zero3.log" 'teacher on rank|train_runtime|Error' zero3
step "packing under flash_attention_2: packed batch vs padded rows" "$RESULTS_DIR/packing_check.log" \
    'passed|failed|skipped|SKIPPED|Error' python3 -m pytest -q -rs tests/test_packing_attention.py
if [ -f bench/loss_bench.py ]; then
    step "loss benchmark on CUDA" "$RESULTS_DIR/loss_bench.log" '.' \
        python3 bench/loss_bench.py --output "$RESULTS_DIR/loss_bench"
fi
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'gpu_check: %d step(s) failed:\n' "${#failed[@]}"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: every step passed"
