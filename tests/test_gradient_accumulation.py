"""DeepSpeed with bf16 accumulates gradients in float32 (`data_types.grad_accum_dtype: fp32` in every shipped
deepspeed_configs/zero*.json): without it DeepSpeed 0.19.8 sums the micro-batches' gradients in the model's dtype,
bf16, rounding the running sum at every micro-step.

The check isolates the accumulation from bf16's other rounding: one row repeated in 8 micro-batches. The loss of each
is normalised by the step's 8x larger token count, a power of two, so each micro-batch's bf16 gradient is exactly
1/8 of the gradient of the same row in one micro-batch, and 8 of them summed in float32 give that gradient exactly.
A float32 reference run could not tell the two apart: measured against one (SFT, 8 different rows), the bf16
run's update is off by 9.6e-3 with float32 accumulation and 1.3e-2 without (worst tensor, relative), bf16's
compute error dominating both."""

import json
import os

import torch
from conftest import CONVERSATIONS, ROOT, tiny_config
from safetensors.torch import load_file

ZERO_CONFIGS = ["zero1", "zero2", "zero3", "zero3_offload_all", "zero3_offload_params"]


def test_every_shipped_deepspeed_config_accumulates_in_float32():
    for name in ZERO_CONFIGS:
        with open(os.path.join(ROOT, "deepspeed_configs", f"{name}.json")) as handle:
            assert json.load(handle).get("data_types") == {"grad_accum_dtype": "fp32"}, name


def test_zero3_bf16_sums_8_micro_batches_in_float32(assets, tmp_path):
    """One SGD step (lr 0.5, no clipping) under the shipped ZeRO-3 config with bf16, 1 process: 8 accumulated
    micro-batches of one row against 1 micro-batch of it. Float32 master weights after the step, read from the
    checkpoint: equal (measured: bit-identical); bf16 accumulation differs by 8.7e-3 of the update."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_multiprocess import launch

    rows = tmp_path / "one_row.jsonl"
    rows.write_text((json.dumps(CONVERSATIONS[1]) + "\n") * 8)

    def weights_after_one_step(accumulation: int) -> dict:
        output_dir = tmp_path / f"accumulate_{accumulation}"
        config = tiny_config(assets, str(output_dir))
        config["dataset"].update(name=str(rows), eval_size=0)
        config["training"].update(max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                                  optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0,
                                  lr_scheduler_type="constant", save_strategy="steps", save_steps=1,
                                  eval_strategy="no", bf16=True)
        path = tmp_path / f"accumulate_{accumulation}.json"
        path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                                 "distillation", "training")}))
        log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "1"], str(path))
        assert "DistributedType.DEEPSPEED" in log
        checkpoint = output_dir / "checkpoint-1"
        # DeepSpeed names the optimizer states after the precision it trained in.
        assert any(name.startswith("bf16_") for name in os.listdir(checkpoint / "global_step1"))
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))

    one, eight = weights_after_one_step(1), weights_after_one_step(8)
    # DeepSpeed starts its float32 master weights from the bf16 copy of the float32 checkpoint.
    start = {name: value.to(torch.bfloat16).float()
             for name, value in load_file(os.path.join(assets["student"], "model.safetensors")).items()}
    worst = max(((eight[name] - one[name]).abs().max() / (one[name] - start[name]).abs().max()).item() for name in one)
    assert worst < 1e-6, f"8 accumulated micro-batches differ from 1 by {worst:.2e} of the update"
