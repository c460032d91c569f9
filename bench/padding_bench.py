"""Padding efficiency of the training batches: real tokens / processed positions over one epoch of the trainer's own
dataloader, with TRL's packing on (config["training"]["packing"] = True) and off.

    python bench/padding_bench.py              # ~1 min on 2 CPU cores; writes bench/output/padding_bench.md and .json

The data and tokenizer are the CPU demo's (examples/demo_data.py: 4000 ShareGPT rows, a 512-token BPE, max_length
128, 32 rows per batch). The trainer is distil_logits.py's LogitsTrainer built as distil_logits.main builds it (SFT,
no teacher: the batches do not depend on the teacher), on a tiny student made from config.

Packing is TRL's best-fit-decreasing packing, which also turns on padding-free batches: the packed rows of a batch are
concatenated into one sequence with position_ids restarting at each conversation, so no position is padding. Two other
numbers say what packing costs elsewhere: the tokens cut off by packing (bfd truncates a row longer than max_length),
and the attention work with PyTorch's sdpa, which masks the concatenated sequence densely ((B * L)^2 scores) where
flash-attention's variable-length kernel computes only each conversation's own (sum of length^2); and the measured
speed of a training step of the demo's student (Qwen2 64 x 2 layers, sdpa) on these batches.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import torch  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import demo_data  # noqa: E402
import distil_logits  # noqa: E402

OUTPUT = os.path.join(HERE, "output")
CACHE = os.path.join(OUTPUT, "padding_cache")

config = {
    "rows": 4000,  # demo conversations (the demo teacher's training set size)
    "tokenizer_vocab": 512,  # the demo's BPE tokenizer size
    "max_length": 128,  # the demo's tokenizer.max_length: also the packed sequence length
    "batch_size": 32,  # per_device_train_batch_size: rows (packed rows when packing) per batch
    "seed": 0,
    "target": 0.95,  # padding efficiency to reach with packing
    "timed_steps": 5,  # training steps of the demo student timed per setting (after one warm-up step)
    "threads": 1,  # torch threads for the timed steps: 1 is steady on a machine shared with other jobs
}


def build_assets(settings: dict) -> dict:
    """Demo rows and tokenizer, cached under bench/output/padding_cache."""
    paths = {"train": os.path.join(CACHE, "train.jsonl"), "tokenizer": os.path.join(CACHE, "tokenizer")}
    key = {k: settings[k] for k in ("rows", "tokenizer_vocab", "seed")}
    done = os.path.join(CACHE, "done.json")
    if os.path.isfile(done) and json.load(open(done)) == key:
        return paths
    rows = demo_data.make_conversations(settings["rows"], seed=settings["seed"])
    demo_data.write_jsonl(rows, paths["train"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], paths["tokenizer"],
                              settings["tokenizer_vocab"])
    json.dump(key, open(done, "w"))
    return paths


def epoch_statistics(paths: dict, settings: dict, packing: bool) -> dict:
    """Build the trainer as distil_logits.main does and walk one epoch of its training dataloader."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    run = copy.deepcopy(distil_logits.config)
    run["dataset"].update(name=paths["train"], eval_size=0, seed=settings["seed"])
    run["tokenizer"]["max_length"] = settings["max_length"]
    run["distillation"]["alpha"] = 0.0
    run["training"].update(
        output_dir=os.path.join(CACHE, "unused"), per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=1, packing=packing, eval_strategy="no", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=settings["seed"],
        bf16=torch.cuda.is_available(),  # bf16 autocast on a GPU; float32 on the CPU, as the recorded numbers were
    )
    tokenizer = common.load_tokenizer(paths["tokenizer"], data.CHATML_TEMPLATE)
    train_dataset, _, _ = data.prepare_datasets(run["dataset"], tokenizer, settings["max_length"])
    torch.manual_seed(settings["seed"])
    student = AutoModelForCausalLM.from_config(Qwen2Config(  # examples/demo.py's student
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0,
        bos_token_id=None,
    ), attn_implementation="sdpa")
    args = common.build_sft_config(run, max_length=settings["max_length"], eval_strategy="no")
    trainer = distil_logits.LogitsTrainer(model=student, distillation=run["distillation"], vocab_size=len(tokenizer),
                                          args=args, train_dataset=train_dataset, processing_class=tokenizer)
    rows_tokens = sum(len(ids) for ids in train_dataset["input_ids"])
    dataset_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # after TRL's packing, if any
    batches = real = processed = counted = attention = attention_per_row = 0
    step_times, step_tokens = [], 0
    for batch in trainer.get_train_dataloader():
        if batches <= settings["timed_steps"]:
            student.zero_grad(set_to_none=True)
            begin = time.perf_counter()
            trainer.training_step(student, batch, (batch["labels"][:, 1:] != -100).sum())
            if batches > 0:  # the first step is a warm-up
                step_times.append(time.perf_counter() - begin)
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        batches += 1
        processed += batch["input_ids"].numel()
        counted += int((batch["labels"][:, 1:] != -100).sum())
        if "attention_mask" in batch:  # padded rows
            lengths = batch["attention_mask"].sum(1).tolist()
            real += sum(lengths)
            attention += batch["input_ids"].shape[0] * batch["input_ids"].shape[1] ** 2
        else:  # padding-free: one concatenated sequence, position_ids restart at each conversation
            boundaries = batch["cu_seq_lens_q"].tolist()
            lengths = [b - a for a, b in zip(boundaries, boundaries[1:])]
            real += sum(lengths)
            attention += batch["input_ids"].shape[1] ** 2
        attention_per_row += sum(length**2 for length in lengths)
    return {"packing": packing, "batches": batches, "real_tokens": real, "processed_positions": processed,
            "efficiency": real / processed, "counted_labels": counted, "tokens_before_packing": rows_tokens,
            "tokens_after_packing": dataset_tokens, "truncated_tokens": rows_tokens - dataset_tokens,
            "sdpa_attention_scores": attention, "per_conversation_attention_scores": attention_per_row,
            "step_times_s": step_times, "step_tokens_per_s": step_tokens / sum(step_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    settings = dict(config)
    started = time.time()
    os.makedirs(args.output, exist_ok=True)
    common.print_rank0 = lambda *a: None  # the dataset summary would interleave with the table
    torch.set_num_threads(settings["threads"])
    paths = build_assets(settings)
    results = [epoch_statistics(paths, settings, packing) for packing in (True, False)]

    lines = [
        "# Padding efficiency of the training batches (one epoch of LogitsTrainer's dataloader)",
        "",
        f"`python bench/padding_bench.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.time() - started:.0f} s. Demo data: {settings['rows']} rows, {settings['tokenizer_vocab']}-token BPE, "
        f"max_length {settings['max_length']}, {settings['batch_size']} rows (packed rows with packing) per batch; "
        f"torch {torch.__version__}. Step speed: LogitsTrainer.training_step (SFT) of the demo student on the first "
        f"{settings['timed_steps']} batches after one warm-up, {settings['threads']} thread(s), real tokens / s.",
        "",
        "| packing | batches | real tokens | processed positions | real / processed | tokens cut by packing | "
        "counted labels | sdpa attention scores / per-conversation | student step tok/s (sdpa) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {'on (bfd, padding-free)' if r['packing'] else 'off (padded per batch)'} | {r['batches']} | "
            f"{r['real_tokens']} | {r['processed_positions']} | {r['efficiency']:.4f} | {r['truncated_tokens']} | "
            f"{r['counted_labels']} | {r['sdpa_attention_scores'] / r['per_conversation_attention_scores']:.1f} | "
            f"{r['step_tokens_per_s']:.0f} |"
        )
    packed = results[0]
    verdict = "PASS" if packed["efficiency"] >= settings["target"] else "FAIL"
    lines += ["", f"{verdict} padding efficiency with packing >= {settings['target']}: {packed['efficiency']:.4f}"]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(args.output, "padding_bench.md"), "w") as handle:
        handle.write(report)
    with open(os.path.join(args.output, "padding_bench.json"), "w") as handle:
        json.dump({"settings": settings, "results": results}, handle, indent=2)
    print(report)


if __name__ == "__main__":
    main()
