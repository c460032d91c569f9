"""Host memory the teacher adds to each rank of a 2-process DeepSpeed ZeRO-3 run on the CPU (gloo), while it loads and
over the first training steps, with the shipped live-parameter caps and with lower ones.

    python bench/zero3_memory.py                          # this tree; ~3 min on 2 cores; writes bench/output/zero3_memory.json
    python bench/zero3_memory.py --caps 1e9,1e8,2e7       # stage3_max_live_parameters = stage3_max_reuse_distance = each value
    python bench/zero3_memory.py --float32                # training.bf16: false, so the teacher loads in float32
    python bench/zero3_memory.py --tree /tmp/old_checkout # the same measurement on another checkout (before/after)

Builds a Qwen2 teacher of about 190M parameters (hidden 1024, 17 blocks: ~720 MiB in float32) and a tiny student that
share the demo's tokenizer, then runs `accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml
--num_processes 2 distil_logits.py` for `--steps` optimizer steps through a driver that wraps the teacher's
`load_causal_lm` and `place_teacher`: once with distillation.alpha 0 (no teacher loaded: plain SFT), and once with
alpha 0.5 per `--caps` value (`1e9` is deepspeed_configs/zero3.json as shipped; any other value is written into a copy
of it as both stage3_max_live_parameters and stage3_max_reuse_distance). Each rank reports:
- the peak of its anonymous memory (RssAnon, sampled every 5 ms) while the teacher loads and over the whole run, and
  its peak resident memory (VmHWM);
- the most teacher parameters gathered at once (ds_status AVAILABLE or INFLIGHT, counted at every submodule's forward
  entry and exit): what the caps bound.
What the teacher adds is the difference from the SFT run. RssAnon leaves out the page cache of the memory-mapped
safetensors file that rank 0 reads the checkpoint from; VmHWM counts it. The teacher is loaded in bf16 (training.bf16),
so the whole teacher gathered is 0.5x its float32 size, unless --float32.

Targets: loading adds at most 0.65x the teacher's float32 size (issue 11: a half shard plus one gathered layer at a
time; the whole teacher on every process would add at least 1x); issue 18 asks what the caps do during training.
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
peak = {"anon": start["RssAnon"], "train": 0.0, "phase": "setup"}
def sample():
    while True:
        anon = status()["RssAnon"]
        peak["anon"] = max(peak["anon"], anon)
        if peak["phase"] == "train":
            peak["train"] = max(peak["train"], anon)
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

# The most teacher parameters gathered at once, counted at every submodule's forward entry and exit. Patched in every
# module that imported place_teacher, wherever the trainer calls it from.
import distributed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
original_place = distributed.place_teacher
report["teacher_live_peak"] = 0
def place_teacher(teacher, trainer):
    placed = original_place(teacher, trainer)
    parameters = list(teacher.parameters())
    def count(*_):
        live = sum(p.ds_numel for p in parameters if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        report["teacher_live_peak"] = max(report["teacher_live_peak"], live)
    for module in teacher.modules():
        module.register_forward_pre_hook(count)
        module.register_forward_hook(count)
    return placed
for module in list(sys.modules.values()):
    if getattr(module, "place_teacher", None) is original_place:
        module.place_teacher = place_teacher

import transformers
original_train = transformers.Trainer.train
def train(self, *args, **kwargs):
    report["anon_train_start"] = status()["RssAnon"]
    peak["phase"] = "train"
    try:
        return original_train(self, *args, **kwargs)
    finally:
        peak["phase"] = "done"
transformers.Trainer.train = train
try:
    distil_logits.run_cli(distil_logits.main, distil_logits.config)
finally:
    report.update(hwm_end=status()["VmHWM"], anon_peak_run=peak["anon"], anon_peak_train=peak["train"],
                  anon_start=start["RssAnon"])
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


def deepspeed_files(folder: str, caps: float) -> str:
    """The accelerate config to launch with: the shipped one, or a copy whose zero3.json sets both live-parameter caps
    to `caps`. Returns its path."""
    shipped = os.path.join(ROOT, "deepspeed_configs", "accelerate_zero3.yaml")
    with open(os.path.join(ROOT, "deepspeed_configs", "zero3.json")) as handle:
        zero3 = json.load(handle)
    stage3 = zero3["zero_optimization"]
    if stage3["stage3_max_live_parameters"] == caps and stage3["stage3_max_reuse_distance"] == caps:
        return shipped
    stage3.update(stage3_max_live_parameters=caps, stage3_max_reuse_distance=caps)
    json_path, yaml_path = os.path.join(folder, "zero3.json"), os.path.join(folder, "accelerate_zero3.yaml")
    with open(json_path, "w") as handle:
        json.dump(zero3, handle, indent=2)
    with open(shipped) as handle:
        text = handle.read()
    with open(yaml_path, "w") as handle:
        handle.write(text.replace("deepspeed_configs/zero3.json", json_path))
    return yaml_path


def launch(tree: str, assets: dict, folder: str, alpha: float, steps: int, caps: float = 1e9,
           bf16: bool = True) -> list[dict]:
    """`steps` optimizer steps of a 2-process ZeRO-3 run; each rank's memory report."""
    run_folder = tempfile.mkdtemp(dir=folder)
    overrides = {
        "dataset": {"name": assets["data"], "eval_size": 0, "seed": 0},
        "models": {"teacher": assets["teacher"], "student": assets["student"]},
        "tokenizer": {"max_length": 64},
        "model_config": {"use_flash_attention": False},
        "distillation": {"alpha": alpha},
        "training": {"output_dir": os.path.join(run_folder, "out"), "max_steps": steps, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "activation_checkpointing": False,
                     "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0,
                     "bf16": bf16},
    }
    config_path, driver = os.path.join(run_folder, "config.json"), os.path.join(run_folder, "driver.py")
    with open(config_path, "w") as handle:
        json.dump(overrides, handle)
    with open(driver, "w") as handle:
        handle.write(DRIVER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", deepspeed_files(run_folder, caps),
               "--num_processes", "2", driver, "--config", config_path]
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
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the trace is complete from the 2nd)")
    parser.add_argument("--float32", action="store_true", help="training.bf16: false (the teacher loads in float32)")
    parser.add_argument("--caps", default="1e9,2e7",
                        help="comma-separated stage3_max_live_parameters = stage3_max_reuse_distance values (1e9: shipped)")
    args = parser.parse_args()
    caps = [float(value) for value in args.caps.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        assets_file = os.path.join(args.assets or folder, "assets.json")
        if os.path.isfile(assets_file):
            assets = json.load(open(assets_file))
        else:
            assets = build_assets(args.assets or folder)
            with open(assets_file, "w") as handle:
                json.dump(assets, handle)
        bf16 = not args.float32
        without_teacher = launch(args.tree, assets, folder, alpha=0.0, steps=args.steps, bf16=bf16)
        with_teacher = {cap: launch(args.tree, assets, folder, alpha=0.5, steps=args.steps, caps=cap, bf16=bf16)
                        for cap in caps}
    parameters = assets["teacher_parameters"]
    teacher_mib = parameters * 4 / 2**20
    print(f"teacher: {parameters:,} parameters, {teacher_mib:.0f} MiB in float32 (loaded in "
          f"{'float32' if args.float32 else 'bf16'}); {args.steps} "
          f"optimizer steps; tree {args.tree}")
    print("| caps | rank | loading adds | peak anonymous, SFT | peak anonymous, KD | teacher adds (peak) | / teacher f32 "
          "| teacher parameters gathered at once | peak RSS (VmHWM), SFT / KD |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cap, runs in with_teacher.items():
        for rank, (a, b) in enumerate(zip(without_teacher, runs)):
            added = b["anon_peak_run"] - a["anon_peak_run"]
            b["teacher_adds_mib"], b["teacher_adds_ratio"] = added, added / teacher_mib
            loading = b["anon_after"] - b["anon_before"]
            b["loading_adds_ratio"] = loading / teacher_mib
            print(f"| {cap:.0e} | {rank} | {loading:.0f} MiB ({loading / teacher_mib:.2f}x) | {a['anon_peak_run']:.0f} MiB | "
                  f"{b['anon_peak_run']:.0f} MiB | {added:.0f} MiB | {added / teacher_mib:.2f}x | "
                  f"{b['teacher_live_peak'] / 1e6:.1f}M ({b['teacher_live_peak'] / parameters:.2f}) | "
                  f"{a['hwm_end']:.0f} / {b['hwm_end']:.0f} MiB |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"date": datetime.date.today().isoformat(), "tree": args.tree, "teacher_mib": teacher_mib,
                   "teacher_parameters": parameters, "steps": args.steps, "float32": args.float32,
                   "without_teacher": without_teacher,
                   "with_teacher": {f"{cap:.0e}": runs for cap, runs in with_teacher.items()}}, handle, indent=2)


if __name__ == "__main__":
    main()
