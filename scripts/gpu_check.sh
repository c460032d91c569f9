#!/usr/bin/env bash
# GPU check, one CUDA device, no network, under 8 minutes on one H100:
#   0. precision: one SGD step of a tied student in float32, bf16 (sdpa) and bf16 with flash-attention (where
#      installed) against a float32 full-logits reference; share of weights one AdamW step at lr 2e-5 changes
#      (JSON lines with "passed"; the CUDA version of tests/test_precision.py)
#   1. bf16 distil_logits.py (and distil_hidden.py) on small random models with packing: peak memory, tokens/s
#   2. DeepSpeed ZeRO-3 with the sharded teacher on one GPU
#   3. the loss benchmark on CUDA
#   4. packing under flash_attention_2: a packed batch gives the losses of the same rows padded (tests/test_packing_attention.py)
# Results go to $OUT (or ./gpu_check_results): results.jsonl and the benchmark's table.
# Wheels for packages the GPU machine lacks may be placed in .whl/ (see the device notes); they are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR="${OUT:-gpu_check_results}"
mkdir -p "$RESULTS_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RESULTS_DIR/device.txt"
python3 scripts/gpu_check.py --results "$RESULTS_DIR/results.jsonl" 2>&1 | tee "$RESULTS_DIR/runs.log" | grep -E '^\{|Error|error' || true
echo "--- ZeRO-3, sharded teacher, 1 GPU"
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
    --config /tmp/gpu_check/zero3.json 2>&1 | tee "$RESULTS_DIR/zero3.log" | grep -E "teacher on rank|train_runtime|Error" || true
echo "--- packing under flash_attention_2: packed batch vs padded rows"
python3 -m pytest -q -rs tests/test_packing_attention.py 2>&1 | tee "$RESULTS_DIR/packing_check.log" | tail -3 || true
if [ -f bench/loss_bench.py ]; then
    echo "--- loss benchmark on CUDA"
    python3 bench/loss_bench.py --output "$RESULTS_DIR/loss_bench" 2>&1 | tee "$RESULTS_DIR/loss_bench.log" | tail -30
fi
