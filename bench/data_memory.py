"""Peak memory and preparation time of a plain SFT run (alpha 0) against the number of conversations.

    python bench/data_memory.py                                 # 6,000 and 60,000 rows; ~10 min on 2 busy cores
    python bench/data_memory.py --rows 100000 --num-proc 1,2    # preparation time of 100,000 rows, 1 and 2 processes
    python bench/data_memory.py --tree /tmp/old_checkout        # the same on another checkout (before/after)

Synthetic ShareGPT rows (a user turn of 40-80 words and an assistant turn of 120-240 words drawn from a fixed word
list, about 400 tokens per row with a BPE tokenizer trained on them), a tiny Qwen2 student, and `distil_logits.main`
with distillation.alpha 0, tokenizer.max_length 512, 3 optimizer steps of batch 2 and no evaluation, each run in a fresh
process with a fresh datasets cache. Each run reports its peak resident memory (VmHWM of the whole process, read at
its end) and the wall time of `prepare_datasets` (load the JSON lines, shuffle, tokenize, drop, split). Target
(issue 11): 60,000 rows peak at most 250 MiB above 6,000 rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DRIVER = r'''
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import data
import distil_logits
if os.environ.get("BENCH_NUM_PROC") and hasattr(data, "tokenization_processes"):
    processes = int(os.environ["BENCH_NUM_PROC"])
    data.tokenization_processes = lambda rows: processes if processes > 1 else None
report = {}
original = distil_logits.prepare_datasets
def prepare_datasets(*args, **kwargs):
    start = time.time()
    result = original(*args, **kwargs)
    report["prepare_s"] = time.time() - start
    return result
distil_logits.prepare_datasets = prepare_datasets
import common
distil_logits.main(common.deep_merge(distil_logits.config, json.load(open(sys.argv[1]))))
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        report["peak_rss_mib"] = int(line.split()[1]) / 1024
json.dump(report, open(sys.argv[2], "w"))
'''

WORDS = ("the a model learns from its teacher every token counts when the student copies distribution over words "
         "data memory arrow cache table column row batch process rank gradient step loss value cherry octopus shark "
         "river mountain garden window yellow quickly slowly because although meanwhile therefore however seven "
         "eleven hundred thousand small large bright dark early late simple complex careful honest").split()


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(40, 80))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(120, 240))) + "."
        rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return rows


def build_assets(folder: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
    from demo_data import render_chatml, train_tokenizer

    tokenizer_dir = os.path.join(folder, "student")
    train_tokenizer([render_chatml(row["conversations"]) for row in make_rows(500, seed=1)], tokenizer_dir, vocab_size=512)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0,
        bos_token_id=None))
    model.save_pretrained(tokenizer_dir)
    return {"student": tokenizer_dir}


def run(tree: str, assets: dict, rows: int, folder: str, num_proc: int | None) -> dict:
    data_path = os.path.join(folder, f"chat-{rows}.jsonl")
    if not os.path.isfile(data_path):
        with open(data_path, "w") as handle:
            for row in make_rows(rows, seed=0):
                handle.write(json.dumps(row) + "\n")
    run_folder = tempfile.mkdtemp(dir=folder)
    config = {
        "dataset": {"name": data_path, "eval_size": 0, "seed": 0},
        "models": {"teacher": assets["student"], "student": assets["student"]},
        "tokenizer": {"max_length": 512},
        "model_config": {"use_flash_attention": False},
        "distillation": {"alpha": 0.0},
        "training": {"output_dir": os.path.join(run_folder, "out"), "max_steps": 3, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "activation_checkpointing": False,
                     "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0},
    }
    config_path, report_path = os.path.join(run_folder, "config.json"), os.path.join(run_folder, "report.json")
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    driver = os.path.join(folder, "driver.py")
    with open(driver, "w") as handle:
        handle.write(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": os.path.join(run_folder, "datasets_cache"), "BENCH_NUM_PROC": str(num_proc or "")}
    result = subprocess.run([sys.executable, driver, config_path, report_path], cwd=tree, capture_output=True,
                            text=True, timeout=3600, env=env)
    if result.returncode != 0:
        sys.exit(f"the run on {rows} rows failed:\n{(result.stdout + result.stderr)[-4000:]}")
    report = json.load(open(report_path))
    report.update(rows=rows, num_proc=num_proc)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=ROOT, help="checkout whose distil_logits.py to run (default: this one)")
    parser.add_argument("--rows", default="6000,60000", help="comma-separated numbers of conversations")
    parser.add_argument("--num-proc", default="", help="comma-separated tokenization processes to force (default: the code's choice)")
    parser.add_argument("--output", default=os.path.join(HERE, "output", "data_memory.json"))
    args = parser.parse_args()
    reports = []
    with tempfile.TemporaryDirectory() as folder:
        assets = build_assets(folder)
        for rows in [int(value) for value in args.rows.split(",")]:
            for num_proc in [int(value) for value in args.num_proc.split(",")] if args.num_proc else [None]:
                reports.append(run(args.tree, assets, rows, folder, num_proc))
                report = reports[-1]
                print(f"| {rows:,} | {num_proc or 'default'} | {report['peak_rss_mib']:.0f} MiB | "
                      f"{report['prepare_s']:.1f} s |", flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"date": datetime.date.today().isoformat(), "tree": args.tree, "runs": reports}, handle, indent=2)


if __name__ == "__main__":
    main()
