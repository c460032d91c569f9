"""Host memory the teacher adds to each rank of a 2-process DeepSpeed ZeRO-3 run on the CPU (gloo).

    python bench/zero3_memory.py                          # this tree; ~3 min on 2 cores; writes bench/output/zero3_memory.json
    python bench/zero3_memory.py --tree /tmp/old_checkout # the same measurement on another checkout (before/after)

Builds a Qwen2 teacher of about 190M parameters (hidden 1024, 17 blocks: ~740 MiB in float32) and a tiny student that
share the demo's tokenizer, then runs `accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml
--num_processes 2 distil_logits.py` for one optimizer step through a driver that wraps the teacher's
`load_causal_lm`, once with distillation.alpha 0.5 and once with alpha 0 (no teacher loaded): each rank reports the
peak of its anonymous memory over the whole run (RssAnon, sampled every 5 ms) and its peak resident memory (VmHWM).
What the teacher adds is the difference between the two runs. RssAnon leaves out the page cache of the
memory-mapped safetensors file that rank 0 reads the checkpoint from; VmHWM counts it.

Target (issue 11): the teacher adds at most 0.65x its float32 size to a rank's peak anonymous memory (a half shard
plus one gathered layer at a time). Loading it whole on every process adds at least 1x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DRIVER = r'''
import json, os, sys, threading, time
sys.path.insert(0, os.getcwd())
import distil_logits

def status():
    values = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            values[key] = int(value.split()[0]) / 1024
    return values

start = status()
peak = {"anon": start["RssAnon"], "loading": 0.0}
def sample():
    while True:
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
report = {"rank": int(os.environ.get("RANK", "0"))}
original = distil_logits.load_causal_lm
def load_causal_lm(name, config, trainable=True):
    if trainable:
        return original(name, config, trainable)
    before = status()
    model = original(name, config, trainable)
    after = status()
    report.update(anon_before=before["RssAnon"],
                  anon_after=after["RssAnon"], hwm_before=before["VmHWM"], hwm_after=after["VmHWM"])
    return model
distil_logits.load_causal_lm = load_causal_lm
try:
    distil_logits.run_cli(distil_logits.main, distil_logits.config)
finally:
    report.update(hwm_end=status()["VmHWM"], anon_peak_run=peak["anon"], anon_start=start["RssAnon"])
    with open(os.path.join(os.environ["ZERO3_MEMORY_DIR"], f"rank{report['rank']}.json"), "w") as handle:
        json.dump(report, handle)
'''


def build_assets(folder: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
    from demo_data import make_conversations, render_chatml, train_tokenizer, write_jsonl

    rows = make_conversations(64, seed=0)
    tokenizer_dir = os.path.join(folder, "tokenizer")
    train_tokenizer([render_chatml(row["conversations"]) for row in rows], tokenizer_dir, vocab_size=512)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    paths = {}
    for name, hidden, layers in (("teacher", 1024, 17), ("student", 64, 2)):
        model_config = Qwen2Config(vocab_size=(vocab + 63) // 64 * 64, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=layers, num_attention_heads=16 if hidden >= 1024 else 4,
                                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                                   eos_token_id=0, pad_token_id=0, bos_token_id=None)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config)
        paths[name] = os.path.join(folder, name)
        paths[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(paths[name])
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(paths[name])
        del model
    paths["data"] = os.path.join(folder, "chat.jsonl")
    write_jsonl(rows, paths["data"])
    return paths


def launch(tree: str, assets: dict, folder: str, alpha: float) -> list[dict]:
    """One optimizer step of a 2-process ZeRO-3 run; each rank's memory report."""
    run_folder = tempfile.mkdtemp(dir=folder)
    overrides = {
        "dataset": {"name": assets["data"], "eval_size": 0, "seed": 0},
        "models": {"teacher": assets["teacher"], "student": assets["student"]},
        "tokenizer": {"max_length": 64},
        "model_config": {"use_flash_attention": False},
        "distillation": {"alpha": alpha},
        "training": {"output_dir": os.path.join(run_folder, "out"), "max_steps": 1, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "activation_checkpointing": False,
                     "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0},
    }
    config_path, driver = os.path.join(run_folder, "config.json"), os.path.join(run_folder, "driver.py")
    with open(config_path, "w") as handle:
        json.dump(overrides, handle)
    with open(driver, "w") as handle:
        handle.write(DRIVER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "deepspeed_configs", "accelerate_zero3.yaml"), "--num_processes", "2", driver,
               "--config", config_path]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                 "ZERO3_MEMORY_DIR": run_folder})
    log = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"the run failed:\n{log[-4000:]}")
    for line in log.splitlines():
        if line.startswith(("memory on rank", "teacher on rank")):
            print(line)
    return [json.load(open(os.path.join(run_folder, f"rank{rank}.json"))) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=ROOT, help="checkout whose distil_logits.py to run (default: this one)")
    parser.add_argument("--output", default=os.path.join(HERE, "output", "zero3_memory.json"))
    parser.add_argument("--assets", help="folder to keep the built models in and reuse on the next run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        assets_file = os.path.join(args.assets or folder, "assets.json")
        if os.path.isfile(assets_file):
            assets = json.load(open(assets_file))
        else:
            assets = build_assets(args.assets or folder)
            with open(assets_file, "w") as handle:
                json.dump(assets, handle)
        with_teacher = launch(args.tree, assets, folder, alpha=0.5)
        without_teacher = launch(args.tree, assets, folder, alpha=0.0)
    teacher_mib = assets["teacher_parameters"] * 4 / 2**20
    print(f"teacher: {assets['teacher_parameters']:,} parameters, {teacher_mib:.0f} MiB in float32; tree {args.tree}")
    print("| rank | peak anonymous, alpha 0 (no teacher) | peak anonymous, alpha 0.5 | teacher adds | / teacher size "
          "| peak RSS (VmHWM), alpha 0 | peak RSS, alpha 0.5 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rank, (a, b) in enumerate(zip(without_teacher, with_teacher)):
        added = b["anon_peak_run"] - a["anon_peak_run"]
        b["teacher_adds_mib"], b["teacher_adds_ratio"] = added, added / teacher_mib
        print(f"| {rank} | {a['anon_peak_run']:.0f} MiB | {b['anon_peak_run']:.0f} MiB | {added:.0f} MiB | "
              f"{added / teacher_mib:.2f}x | {a['hwm_end']:.0f} MiB | {b['hwm_end']:.0f} MiB |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"date": datetime.date.today().isoformat(), "tree": args.tree, "teacher_mib": teacher_mib,
                   "teacher_parameters": assets["teacher_parameters"], "with_teacher": with_teacher,
                   "without_teacher": without_teacher}, handle, indent=2)


if __name__ == "__main__":
    main()
