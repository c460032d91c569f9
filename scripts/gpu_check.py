"""GPU check: bf16 runs of the distillation scripts on small random models, with packing, on one CUDA device.

    bash scripts/gpu_check.sh            # everything below, results in gpu_check_results/ (or $OUT)

Needs nothing from the network: the data, tokenizer and models are made locally. For each run it prints peak GPU
memory (torch.cuda.max_memory_allocated) and training tokens per second, and appends a JSON line to the results file.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--results", required=True)
    parser.add_argument("--only", default=None, help="logits | hidden")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the script without a GPU")
    args = parser.parse_args()
    assert torch.cuda.is_available() or args.allow_cpu, "no CUDA device"
    assets_file = os.path.join(args.work, "assets.json")
    if not os.path.isfile(assets_file):
        os.makedirs(args.work, exist_ok=True)
        json.dump(build_assets(args.work), open(assets_file, "w"))
    assets = json.load(open(assets_file))
    results = []
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


if __name__ == "__main__":
    main()
