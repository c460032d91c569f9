"""End to end: tokens per second of a distil_logits.py training step (teacher + student, chunked loss) against a plain
SFT step (alpha = 0, no teacher) of the same student, next to the ratio the FLOPs allow.

    python bench/e2e_bench.py                  # ~30 s on one CPU core; writes bench/output/e2e_bench.md and .json
    python bench/e2e_bench.py --steps 10       # more timed steps per configuration
    python bench/e2e_bench.py --threads 2      # both cores (steady only when no other job runs)
    python bench/e2e_bench.py --baseline-rev HEAD~3      # also time the loss as of a git revision

Tiny Qwen2 models built from config (random weights: speed does not depend on them), the demo's data and tokenizer
(examples/demo_data.py), and the output heads sized to a real vocabulary. The steps are LogitsTrainer.training_step
(forward + backward, as distil_logits.main runs them; the optimizer step is left out: it is the same for SFT and KD).
SFT and KD steps alternate on the same batches, so other jobs on the machine slow both alike. With --baseline-rev, the
same steps also run with losses.chunked_distillation_loss taken from that git revision (before/after a change).

Ideal ratio (SFT tok/s over KD tok/s) from FLOPs, with 2 FLOPs per parameter per token forward and 6 forward + backward:

    ideal = 1 + F_teacher_forward / F_student_forward_backward
    F_teacher_forward          = 2 P_t N + 2 V H_t N_c + A_t
    F_student_forward_backward = 6 P_s N + 6 V H_s N_c + 3 A_s
    A = 4 L H S^2 B   (attention scores and values, forward, dense over the padded batch: sdpa with a mask)

P = backbone parameters (decoder layers and final norm, not the embedding lookup), N = tokens in the padded batch
(B rows of length S), N_c = positions whose next-token label counts (the output heads run only there, in both SFT and
KD, because the loss is chunked over counted positions), V = output-head rows, H = hidden size, L = layers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), HERE]

import torch  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import demo_data  # noqa: E402
import losses  # noqa: E402
import distil_logits  # noqa: E402
from teacher_signal import InProcessTeacher  # noqa: E402

OUTPUT = os.path.join(HERE, "output")
CACHE = os.path.join(OUTPUT, "e2e_cache")

config = {
    # --- data ---
    "rows": 2000,  # demo conversations to make (examples/demo_data.py); only the first batches are used
    "tokenizer_vocab": 512,  # the demo's BPE tokenizer (ids only; the heads below are sized to a real vocabulary)
    "max_length": 128,  # tokens per row (the demo's); demo rows are 30-90 tokens
    "batch_size": 32,  # rows per step, padded to the longest row of the batch as distil_logits.py does
    # --- models: Qwen2 from config, random weights ---
    "vocab": 32768,  # output-head rows of both models
    "teacher": {"hidden_size": 256, "num_hidden_layers": 4},
    "student": {"hidden_size": 128, "num_hidden_layers": 2},
    # --- distillation: distil_logits.config's defaults except as set here ---
    "alpha": 0.5,  # KD weight (1 - alpha on CE); the SFT step uses alpha = 0 and loads no teacher
    "temperature": 2.0,
    # --- timing ---
    "warmup_steps": 2,  # untimed steps per configuration first
    "steps": 6,  # timed steps per configuration (the configurations alternate step by step)
    "seed": 0,
    # One thread by default: with two on a 2-core machine that other jobs share, a thread descheduled mid-operation
    # stalls the other at every parallel region, and step times of these small models varied 10x (0.2 s to 2.6 s).
    "threads": 1,
}


def build_assets(settings: dict) -> dict:
    """Demo data and tokenizer, and random-weight teacher and student folders, cached under bench/output/e2e_cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    key = {k: settings[k] for k in ("rows", "tokenizer_vocab", "vocab", "teacher", "student", "seed")}
    paths = {name: os.path.join(CACHE, name) for name in ("tokenizer", "teacher", "student")}
    paths["train"] = os.path.join(CACHE, "train.jsonl")
    done = os.path.join(CACHE, "done.json")
    if os.path.isfile(done) and json.load(open(done)) == key:
        return paths
    rows = demo_data.make_conversations(settings["rows"], seed=settings["seed"])
    demo_data.write_jsonl(rows, paths["train"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], paths["tokenizer"],
                              settings["tokenizer_vocab"])
    for seed, name in enumerate(("teacher", "student"), start=1):
        size = settings[name]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=settings["vocab"], hidden_size=size["hidden_size"], intermediate_size=4 * size["hidden_size"],
            num_hidden_layers=size["num_hidden_layers"], num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None,
        ))
        model.save_pretrained(paths[name])
        AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(paths[name])
    json.dump(key, open(done, "w"))
    return paths


def run_config(paths: dict, settings: dict, alpha: float) -> dict:
    """distil_logits.config pointed at the bench's files."""
    run = copy.deepcopy(distil_logits.config)
    run["dataset"].update(name=paths["train"], eval_size=0, seed=settings["seed"])
    run["models"].update(teacher=paths["teacher"], student=paths["student"])
    run["tokenizer"]["max_length"] = settings["max_length"]
    run["model_config"]["use_flash_attention"] = False
    run["distillation"].update(alpha=alpha, temperature=settings["temperature"])
    run["training"].update(
        output_dir=os.path.join(CACHE, "unused"), per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=1, activation_checkpointing=False, eval_strategy="no", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=settings["seed"],
        bf16=torch.cuda.is_available(),  # bf16 autocast on a GPU; float32 on the CPU, as the recorded numbers were
    )
    return run


def make_trainer(run: dict, train_dataset, tokenizer, vocab_size: int):
    """A LogitsTrainer built as distil_logits.main builds it (without training)."""
    use_teacher = run["distillation"]["alpha"] > 0
    student = common.load_causal_lm(run["models"]["student"], run)
    teacher = common.load_causal_lm(run["models"]["teacher"], run, trainable=False) if use_teacher else None
    args = common.build_sft_config(run, max_length=run["tokenizer"]["max_length"], eval_strategy="no")
    return distil_logits.LogitsTrainer(model=student, distillation=run["distillation"],
                                       teacher_signal=None if teacher is None else InProcessTeacher(teacher),
                                       vocab_size=vocab_size, args=args, train_dataset=train_dataset,
                                       processing_class=tokenizer)


@contextlib.contextmanager
def loss_implementation(function):
    """Swap losses.chunked_distillation_loss (which the patched student forward calls) for `function`."""
    original = losses.chunked_distillation_loss
    losses.chunked_distillation_loss = function or original
    try:
        yield
    finally:
        losses.chunked_distillation_loss = original


def backbone_parameters(model) -> int:
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def flops(model, batch: dict) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one step of `model` on `batch` (see the module docstring)."""
    model_config = model.config
    rows, length = batch["input_ids"].shape
    tokens, counted = rows * length, int((batch["labels"][:, 1:] != -100).sum())
    head = model.get_output_embeddings().weight.numel()
    attention = 4 * model_config.num_hidden_layers * model_config.hidden_size * length**2 * rows
    parameters = backbone_parameters(model)
    return (2 * parameters * tokens + 2 * head * counted + attention,
            6 * parameters * tokens + 6 * head * counted + 3 * attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"timed steps per configuration (default {config['steps']})")
    parser.add_argument("--threads", type=int, help=f"torch threads (default {config['threads']})")
    parser.add_argument("--baseline-rev", help="also time the chunked loss as of this git revision")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    settings = dict(config)
    if args.steps:
        settings["steps"] = args.steps
    if args.threads:
        settings["threads"] = args.threads
    torch.set_num_threads(settings["threads"])
    started, load_before = time.time(), os.getloadavg()
    os.makedirs(args.output, exist_ok=True)
    common.print_rank0 = lambda *a: None  # keep the dataset and tokenizer summaries out of the table output
    paths = build_assets(settings)

    tokenizer = common.load_tokenizer(paths["student"], data.CHATML_TEMPLATE)
    kd_run, sft_run = run_config(paths, settings, settings["alpha"]), run_config(paths, settings, 0.0)
    train_dataset, _, _ = data.prepare_datasets(kd_run["dataset"], tokenizer, settings["max_length"])
    # KD over the whole head, as with a tokenizer that fills it (the demo's tokenizer only supplies the ids).
    vocab_size = settings["vocab"]
    trainers = {"sft": make_trainer(sft_run, train_dataset, tokenizer, vocab_size),
                "kd": make_trainer(kd_run, train_dataset, tokenizer, vocab_size)}
    implementations = {"losses.py": None}
    if args.baseline_rev:
        from loss_bench import module_at_revision

        revision = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
        implementations[f"loss@{revision}"] = module_at_revision(revision).chunked_distillation_loss
    dataloader = iter(trainers["sft"].get_train_dataloader())
    total = settings["warmup_steps"] + settings["steps"]
    batches = [next(dataloader) for _ in range(total)]

    times = {(mode, name): [] for name in implementations for mode in trainers}
    for index, batch in enumerate(batches):
        num_items = (batch["labels"][:, 1:] != -100).sum()
        for (mode, name), measured in times.items():
            trainer = trainers[mode]
            trainer.model.zero_grad(set_to_none=True)
            with loss_implementation(implementations[name]):
                begin = time.perf_counter()
                trainer.training_step(trainer.model, batch, num_items)
                elapsed = time.perf_counter() - begin
            if index >= settings["warmup_steps"]:
                measured.append(elapsed)
    timed = batches[settings["warmup_steps"]:]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded_tokens = sum(b["input_ids"].numel() for b in timed)
    counted_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)

    student, teacher = trainers["kd"].model, trainers["kd"].teacher
    teacher_forward = sum(flops(teacher, b)[0] for b in timed)
    student_step = sum(flops(student, b)[1] for b in timed)
    ideal = 1 + teacher_forward / student_step
    naive = 1 + (2 * sum(p.numel() for p in teacher.parameters()) * padded_tokens) / (
        6 * sum(p.numel() for p in student.parameters()) * padded_tokens)

    rows = []
    for name in implementations:
        sft, kd = statistics.median(times[("sft", name)]), statistics.median(times[("kd", name)])
        per_step = real_tokens / len(timed)
        measured = sft and kd / sft
        rows.append((name, per_step / sft, per_step / kd, measured, ideal, measured / ideal))
    steps_text = f"{settings['steps']} timed steps after {settings['warmup_steps']} warm-up"
    lines = [
        "# End to end: KD step vs SFT step",
        "",
        f"`python bench/e2e_bench.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s; "
        f"{torch.get_num_threads()} threads, load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after.",
        f"Teacher Qwen2 {settings['teacher']['hidden_size']} x {settings['teacher']['num_hidden_layers']} layers "
        f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters), student "
        f"{settings['student']['hidden_size']} x {settings['student']['num_hidden_layers']} layers "
        f"({sum(p.numel() for p in student.parameters()) / 1e6:.1f} M), vocabulary {settings['vocab']}, float32. "
        f"Batches: {settings['batch_size']} demo rows padded per batch, {real_tokens / len(timed):.0f} real tokens "
        f"per step on average ({padded_tokens / len(timed):.0f} with padding, {counted_tokens / len(timed):.0f} with a "
        f"counted label); {steps_text}, median step time; tok/s = real tokens / s. KD: alpha {settings['alpha']}, "
        f"temperature {settings['temperature']}, forward_kl, loss_memory_mb "
        f"{distil_logits.config['distillation']['loss_memory_mb']}.",
        "",
        "| loss implementation | SFT tok/s | KD tok/s | measured SFT/KD | ideal (FLOPs) | measured / ideal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {sft:.0f} | {kd:.0f} | {measured:.2f} | {ideal_:.2f} | {over:.2f} |"
              for name, sft, kd, measured, ideal_, over in rows]
    lines += ["", f"Ideal = 1 + teacher forward FLOPs / student forward+backward FLOPs = 1 + {teacher_forward:.3g} / "
              f"{student_step:.3g} (heads at counted positions only, attention included; see bench/e2e_bench.py). "
              f"With all parameters at every token instead (2 P_t N / 6 P_s N): {naive:.2f}.",
              "", "Step times (s): " + "; ".join(f"{mode} {name}: " + " ".join(f"{t:.2f}" for t in values)
                                                for (mode, name), values in times.items())]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(args.output, "e2e_bench.md"), "w") as handle:
        handle.write(report)
    with open(os.path.join(args.output, "e2e_bench.json"), "w") as handle:
        json.dump({"settings": settings, "times_s": {f"{m} {n}": v for (m, n), v in times.items()},
                   "real_tokens": real_tokens, "padded_tokens": padded_tokens, "counted_tokens": counted_tokens,
                   "teacher_forward_flops": teacher_forward, "student_step_flops": student_step, "ideal": ideal,
                   "naive_ideal": naive}, handle, indent=2)
    print(report)


if __name__ == "__main__":
    main()
