"""Hidden-state KD across tokenizers against plain SFT on three tasks, seed by seed: does distil_hidden.py at its
defaults end at or below SFT's held-out CE (same student, rendering, rows and steps)?

    python bench/hidden_across_tokenizers.py --task real        # SFT vs hidden KD at the defaults, seeds 0 and 1
    python bench/hidden_across_tokenizers.py --task xtok
    python bench/hidden_across_tokenizers.py --task demo_b
    python bench/hidden_across_tokenizers.py --task real --variants sft hidden hidden:alpha_schedule=constant
    python bench/hidden_across_tokenizers.py --table            # every result recorded so far, all tasks, and the
                                                                # summary over seeds (mean ratio, 95% interval)

Tasks (each with a student on a tokenizer other than its teacher's; one task per invocation keeps a run short):
- real: SmolLM2-135M-Instruct (examples/real_teacher.py, 49,152-token BPE, ChatML) teaching the small random Llama
  (192 x 4) on its own 2,048-token BPE; 30 steps of 8 rows of the teacher's answers, lr 2e-3, as in that example.
  Held-out CE per teacher-tokenizer token of the same assistant text (the example's unit).
- xtok: bench/cross_tokenizer_hidden.py's task: a Mistral-style teacher (128 x 4) on ChatML and a Qwen2-split BPE, a
  Llama student (48 x 3) on its own Llama-3-split BPE and a Llama-3-style template; 240 rows, `--epochs` epochs of
  batch 32, lr 7e-3. Held-out CE per student token (one student tokenizer and template for every row).
- demo_b: examples/demo.py's tokenizer-B row: the demo's Qwen2-style teacher (128 x 4, 512-token BPE) and the Llama
  student (48 x 3) on tokenizer B (384 tokens, trained on other rows), both ChatML; 300 rows, `--epochs` epochs of
  batch 32, lr 7e-3. Held-out CE per teacher-tokenizer token (the demo's unit).
- xtok_same: the control with one tokenizer: xtok's Llama student on the teacher's tokenizer and ChatML.

Variants: `sft` (distil_logits.py, alpha 0), `hidden` (distil_hidden.py at its defaults), or `hidden:key=value,...`
(distillation keys, values read as JSON). `sft:lr_scale=1.03` is SFT at 1.03 times the task's learning rate: a change
that should neither help nor hurt, so its ratio to SFT measures how far one seed's result moves by chance (the noise
floor against which a per-seed ratio of hidden KD is read). The seed sets the data order and the projections' initialisation; the
students' initial weights are the task's. Results accumulate in bench/output/hidden_xtok/results.json.
"""

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), HERE]

import torch  # noqa: E402

import distil_hidden  # noqa: E402
import distil_logits  # noqa: E402
from data import CHATML_TEMPLATE, tokenize_row  # noqa: E402

OUT = os.path.join(ROOT, "bench", "output", "hidden_xtok")
TASKS = ("real", "xtok", "demo_b", "xtok_same")


def teacher_token_count(teacher_dir: str, eval_path: str, max_length: int) -> int:
    """Assistant tokens of the held-out rows in the teacher's tokenizer (ChatML): the unit of the real and demo_b
    tasks, whose students' total nats are divided by it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    count = 0
    for line in open(eval_path, encoding="utf-8"):
        labels = tokenize_row(json.loads(line), tokenizer, "sharegpt", max_length)["labels"]
        count += sum(1 for label in labels[1:] if label != -100)
    return count


def task_setup(task: str, epochs: int | None):
    """(config builder (name, script, seed, distillation) -> config, held-out CE of a saved student) for a task."""
    if task == "real":
        import real_teacher

        paths = real_teacher.build(False, False)
        settings = real_teacher.real
        teacher_tokens = teacher_token_count(paths["teacher"], paths["eval"], 4 * settings["max_length"])

        def make(name, script, seed, distillation):
            config = real_teacher.run_config(f"hx-{name}", paths, paths["small_b"], os.path.join(OUT, "runs", name),
                                             settings["steps"], settings["batch"], settings["learning_rate"]["small"],
                                             script=script, **distillation)
            config["dataset"]["seed"] = seed
            config["training"]["seed"] = seed
            return config

        return make, lambda folder: real_teacher.heldout_nats(folder, paths["eval"])[0] / teacher_tokens
    if task in ("xtok", "xtok_same"):
        import cross_tokenizer_hidden as xtok

        paths = xtok.build()
        if epochs:
            xtok.task["student"]["epochs"] = epochs

        def make(name, script, seed, distillation):
            config = xtok.student_config(paths, name, seed, script, task == "xtok_same", **distillation)
            config["training"]["output_dir"] = os.path.join(OUT, "runs", name)
            return config

        return make, lambda folder: xtok.heldout_ce(folder, paths["eval"])
    if task == "demo_b":
        import demo

        paths = demo.build(False)
        teacher_tokens = teacher_token_count(paths["teacher"], paths["eval"], 128)

        def make(name, script, seed, distillation):
            config = demo.run_config(f"hx-{name}", paths["teacher"], paths["llama_b_init"], paths["train"],
                                     paths["eval"], demo.demo["student_rows"], epochs or demo.demo["student"]["epochs"],
                                     32, 7e-3, os.path.join(OUT, "runs", name), script=script, **distillation)
            config["dataset"]["seed"] = seed
            config["training"].update(seed=seed, eval_strategy="no", logging_steps=10)
            return config

        return make, lambda folder: demo.heldout_nats(folder, paths["eval"])[0] / teacher_tokens
    raise SystemExit(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def parse_variant(text: str) -> tuple[str, dict]:
    """'sft', 'hidden' or 'hidden:key=value,...' -> (name, distillation overrides)."""
    name, _, overrides = text.partition(":")
    values = {}
    for item in filter(None, re.split(r",(?=\w+=)", overrides)):  # commas inside a value (a layer map) stay
        key, value = item.split("=", 1)
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    if name not in ("sft", "hidden") or (name == "sft" and set(values) - {"lr_scale"}):
        raise SystemExit(f"unknown variant {text!r}: sft, sft:lr_scale=x, hidden or hidden:key=value,...")
    return name, values


def print_table(results: dict) -> None:
    """One row per variant, one column per task and seed: held-out CE and, for hidden-state KD, its ratio to SFT of the
    same task and seed (below 1: better than SFT)."""
    columns = sorted({tuple(key.split("|")[0::2]) for key in results}, key=lambda c: (TASKS.index(c[0].split("@")[0]), c))
    variants = list(dict.fromkeys(key.split("|")[1] for key in results))
    print("\n| variant | " + " | ".join(f"{task} seed {seed}" for task, seed in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for variant in variants:
        cells = []
        for task, seed in columns:
            ce, sft = results.get(f"{task}|{variant}|{seed}"), results.get(f"{task}|sft|{seed}")
            cells.append("" if ce is None else f"{ce:.4f}" if variant == "sft" or not sft else f"{ce:.4f} ({ce / sft:.4f})")
        print(f"| {variant} | " + " | ".join(cells) + " |")


T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # two-sided, by df


def print_summary(results: dict, variants=("hidden", "sft:lr_scale=1.03")) -> None:
    """Per task and variant, over the seeds that have both it and SFT: the mean ratio to SFT of the same seed, its 95%
    interval (Student t over seeds), the range and how many seeds end above SFT. `sft:lr_scale=1.03` is the noise
    floor: SFT against SFT, moved only by a 3% larger learning rate."""
    import statistics

    print("\n| task | variant | seeds | mean ratio to SFT | 95% interval | range | seeds above SFT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    tasks = sorted({key.split("|")[0] for key in results}, key=lambda t: (TASKS.index(t.split("@")[0]), t))
    for task in tasks:
        for variant in variants:
            seeds = sorted(int(key.split("|")[2]) for key in results
                           if key.startswith(f"{task}|{variant}|") and f"{task}|sft|{key.split('|')[2]}" in results)
            ratios = [results[f"{task}|{variant}|{seed}"] / results[f"{task}|sft|{seed}"] for seed in seeds]
            if len(ratios) < 2:
                continue
            mean = statistics.mean(ratios)
            half = T_95.get(len(ratios) - 1, 2.0) * statistics.stdev(ratios) / len(ratios) ** 0.5
            above = sum(ratio > 1 for ratio in ratios)
            print(f"| {task} | {variant} | {seeds[0]}-{seeds[-1]} | {mean:.4f} | {mean - half:.4f} to {mean + half:.4f} | "
                  f"{min(ratios):.4f} to {max(ratios):.4f} | {above} of {len(ratios)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["sft", "hidden"])
    parser.add_argument("--epochs", type=int, default=None, help="xtok/demo_b: student epochs (default: the task's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print every recorded result and exit")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    record_path = os.path.join(OUT, "results.json")
    results = json.load(open(record_path)) if os.path.isfile(record_path) else {}
    if args.table or args.task is None:
        print_table(results)
        print_summary(results)
        return
    torch.set_num_threads(args.threads)
    make, heldout = task_setup(args.task, args.epochs)
    task = args.task if args.epochs is None else f"{args.task}@{args.epochs}ep"
    for seed in args.seeds:
        for variant in args.variants:
            name, overrides = parse_variant(variant)
            label = f"{task}-{variant}-seed{seed}".replace(":", "-").replace(",", "-").replace("=", "")
            start = time.time()
            if name == "sft":
                config = make(label, distil_logits, seed, {"alpha": 0.0})
                config["training"]["learning_rate"] *= overrides.get("lr_scale", 1.0)
                distil_logits.main(config)
            else:
                config = make(label, distil_hidden, seed, overrides)
                distil_hidden.main(config)
            ce = heldout(config["training"]["output_dir"])
            sft = results.get(f"{task}|sft|{seed}")
            results[f"{task}|{variant}|{seed}"] = ce
            json.dump(results, open(record_path, "w"), indent=1)
            ratio = f", {ce / sft:.4f}x SFT" if sft and name != "sft" else ""
            print(f"RESULT {task} seed {seed} {variant}: held-out CE {ce:.4f}{ratio} ({time.time() - start:.0f} s)",
                  flush=True)
    print_table({key: value for key, value in results.items() if key.startswith(f"{task}|")})


if __name__ == "__main__":
    main()
