"""GPU check: precision checks, then bf16 runs of the distillation scripts on small random models, with packing, on
one CUDA device.

    bash scripts/gpu_check.sh            # everything below, results in gpu_check_results/ (or $OUT)
    python scripts/gpu_check.py --only precision --allow-cpu --results /tmp/precision.jsonl   # CPU smoke test

Needs nothing from the network: the data, tokenizer and models are made locally. The precision checks (the CUDA
version of tests/test_precision.py) train a student whose head is tied to its embeddings for one step and compare
with a float32 full-logits reference: plain SGD in float32 (sdpa), in bf16 (sdpa), in bf16 with flash_attention_2
where flash-attn is installed, and in fp16 (CUDA only); and the share of matrix weights one AdamW step at lr 2e-5 in
bf16 changes. For each training run it prints peak GPU memory (torch.cuda.max_memory_allocated) and training tokens per
second. Every result is a JSON line in the results file; a precision check has "passed", and the script exits 1
when one has not.
"""

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import torch  # noqa: E402

import demo_data  # noqa: E402


def build_assets(folder: str) -> dict:
    """Data, a 32k byte-level BPE tokenizer, a Qwen2-style teacher (1024 x 8) and student (512 x 4), random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    paths = {"train": os.path.join(folder, "train.jsonl"), "tokenizer": os.path.join(folder, "tokenizer")}
    rows = demo_data.make_conversations(4000, seed=0)
    demo_data.write_jsonl(rows, paths["train"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], paths["tokenizer"], 4096)
    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    shapes = {"teacher": (Qwen2Config, 1024, 8), "student": (Qwen2Config, 512, 4), "student_llama": (LlamaConfig, 384, 3)}
    for name, (config_class, hidden, layers) in shapes.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_class(
            vocab_size=32768, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
            eos_token_id=0, pad_token_id=0, bos_token_id=None))
        paths[name] = os.path.join(folder, name)
        model.save_pretrained(paths[name])
        AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(paths[name])
    paths["vocab"] = vocab
    return paths


def run(script: str, assets: dict, output_dir: str, steps: int = 30) -> dict:
    module = __import__(script)
    config = copy.deepcopy(module.config)
    config["dataset"].update(name=assets["train"], eval_size=0, num_samples=2000)
    config["models"].update(teacher=assets["teacher"], student=assets.get("student_for_" + script, assets["student"]))
    config["tokenizer"]["max_length"] = 2048
    config["training"].update(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, bf16=True, packing=True, logging_steps=10,
                              save_strategy="no", eval_strategy="no", report_to="none", overwrite_output_dir=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer = module.main(config)
    seconds = time.time() - start
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    steps_fraction = trainer.state.global_step / max(len(trainer.get_train_dataloader()), 1)
    runtime = next(log["train_runtime"] for log in trainer.state.log_history if "train_runtime" in log)
    return {"script": script, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "train_tokens_per_s": tokens * steps_fraction / runtime, "seconds": seconds,
            "final_logs": [log for log in trainer.state.log_history if "loss" in log][-1:]}


def build_precision_assets(folder: str) -> dict:
    """64 conversations, a 1024-token BPE, a Qwen2 teacher (256 x 4) and a tied Qwen2 student (128 x 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    paths = {"train": os.path.join(folder, "train.jsonl"), "tokenizer": os.path.join(folder, "tokenizer")}
    rows = demo_data.make_conversations(64, seed=1)
    demo_data.write_jsonl(rows, paths["train"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], paths["tokenizer"], 1024)
    vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    for name, hidden, layers, tied in (("teacher", 256, 4, False), ("student", 128, 2, True)):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tied,
            eos_token_id=0, pad_token_id=0, bos_token_id=None))
        paths[name] = os.path.join(folder, name)
        model.save_pretrained(paths[name])
        AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(paths[name])
    return paths


def one_step(assets: dict, output_dir: str, **training):
    """distil_logits.main for one optimizer step over 8 rows in one batch (the whole dataset), no clipping."""
    import distil_logits

    config = copy.deepcopy(distil_logits.config)
    config["dataset"].update(name=assets["train"], eval_size=0, num_samples=8, seed=0)
    config["models"].update(teacher=assets["teacher"], student=assets["student"])
    config["tokenizer"]["max_length"] = 512
    config["model_config"]["use_flash_attention"] = training.pop("flash_attention", False)
    config["training"].update(output_dir=output_dir, max_steps=1, per_device_train_batch_size=8,
                              gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_ratio=0.0,
                              max_grad_norm=0.0, activation_checkpointing=False, save_strategy="no",
                              eval_strategy="no", report_to="none", overwrite_output_dir=True, dataloader_num_workers=0)
    config["training"].update(training)
    return distil_logits.main(config), config


def sgd_update_error(trainer, config: dict, assets: dict) -> float:
    """Worst relative difference between the trainer's SGD update and one computed from float32 full logits with
    losses.logit_distillation_loss + losses.causal_lm_loss and autograd (float32 rounding of the weights allowed)."""
    from transformers import AutoModelForCausalLM

    from data import next_token_mask
    from losses import causal_lm_loss, logit_distillation_loss

    device = trainer.args.device
    batch = {key: value.to(device) for key, value in trainer.data_collator(list(trainer.train_dataset)).items()}
    labels = batch.pop("labels")
    student = AutoModelForCausalLM.from_pretrained(assets["student"], attn_implementation="sdpa").to(device)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], attn_implementation="sdpa").to(device).eval()
    student_logits = student(**batch, use_cache=False).logits
    with torch.no_grad():
        teacher_logits = teacher(**batch, use_cache=False).logits
    distillation, count = config["distillation"], next_token_mask(labels).sum()
    kd = logit_distillation_loss(student_logits, teacher_logits, labels, distillation["divergence"],
                                 distillation["temperature"], trainer.vocab_size, count)
    loss = distillation["alpha"] * kd + (1 - distillation["alpha"]) * causal_lm_loss(student_logits, labels, count)
    loss.backward()
    got, lr, worst = dict(trainer.model.named_parameters()), config["training"]["learning_rate"], 0.0
    for name, parameter in student.named_parameters():
        want_update = -lr * parameter.grad
        got_update = got[name].detach().float() - parameter.detach()
        rounding = torch.finfo(torch.float32).eps * (parameter.detach() + want_update).abs()
        excess = ((got_update - want_update).abs() - rounding).clamp(min=0)
        worst = max(worst, (excess.max() / want_update.abs().max()).item())
    return worst


def precision_checks(folder: str) -> list[dict]:
    """The checks of tests/test_precision.py on this device, with a tied student (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    assets = build_precision_assets(folder)
    # Windows: half to twice the error measured on an H200 on 2026-12-04 (bash scripts/gpu_check.sh; torch 2.11+cu130):
    # bf16 1.057e-2 (1.28e-2 on the CPU), fp16 1.176e-3. fp16 keeps 3 more mantissa bits than bf16.
    runs = [("sgd_float32_sdpa", {"bf16": False}, (0.0, 1e-4)), ("sgd_bf16_sdpa", {"bf16": True}, (5e-3, 2.6e-2))]
    if torch.cuda.is_available():  # fp16 is refused on the CPU (accelerate does not autocast it there)
        runs.append(("sgd_fp16_sdpa", {"bf16": False, "fp16": True}, (5e-4, 2.4e-3)))
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            runs.append(("sgd_bf16_flash_attention_2", {"bf16": True, "flash_attention": True}, (1e-4, 5e-2)))
    except ImportError:
        print("flash-attn is not installed: no flash-attention precision check", flush=True)
    results = []
    for name, settings, (low, high) in runs:
        trainer, config = one_step(assets, os.path.join(folder, name), optim="sgd", learning_rate=0.5,
                                   weight_decay=0.0, **settings)
        student = trainer.model
        error = sgd_update_error(trainer, config, assets)
        results.append({"check": name, "attention": student.config._attn_implementation,
                        "tied": student.get_output_embeddings().weight is student.get_input_embeddings().weight,
                        "mixed_precision": trainer.accelerator.mixed_precision,
                        "update_error": error, "expected": [low, high], "passed": low <= error < high})
    before = {name: p.detach().clone() for name, p in AutoModelForCausalLM.from_pretrained(assets["student"]).named_parameters()}
    trainer, _ = one_step(assets, os.path.join(folder, "adamw_bf16"), learning_rate=2e-5, bf16=True)
    after = dict(trainer.model.named_parameters())
    matrices = [name for name, value in before.items() if value.ndim >= 2]
    changed = sum((after[name].detach().cpu() != before[name]).sum().item() for name in matrices)
    fraction = changed / sum(before[name].numel() for name in matrices)
    results.append({"check": "adamw_lr2e-5_bf16_fraction_changed", "fraction": fraction, "expected": [0.99, 1.0],
                    "passed": fraction >= 0.99})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--results", required=True)
    parser.add_argument("--only", default=None, help="precision | logits | hidden")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the script without a GPU")
    args = parser.parse_args()
    assert torch.cuda.is_available() or args.allow_cpu, "no CUDA device"
    results = []
    if args.only in (None, "precision"):
        results += precision_checks(os.path.join(args.work, "precision"))
    assets_file = os.path.join(args.work, "assets.json")
    if args.only != "precision" and not os.path.isfile(assets_file):
        os.makedirs(args.work, exist_ok=True)
        json.dump(build_assets(args.work), open(assets_file, "w"))
    assets = json.load(open(assets_file)) if args.only != "precision" else None
    if args.only in (None, "logits"):
        results.append(run("distil_logits", assets, os.path.join(args.work, "out_logits"), args.steps))
    if args.only in (None, "hidden") and os.path.isfile(os.path.join(ROOT, "distil_hidden.py")):
        assets["student_for_distil_hidden"] = assets["student_llama"]
        results.append(run("distil_hidden", assets, os.path.join(args.work, "out_hidden"), args.steps))
    with open(args.results, "a") as handle:
        for result in results:
            result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            print(json.dumps(result), flush=True)
            handle.write(json.dumps(result) + "\n")
    failed = [result["check"] for result in results if result.get("passed") is False]
    if failed:
        sys.exit(f"gpu_check.py: failed checks: {', '.join(failed)}")


if __name__ == "__main__":
    main()
