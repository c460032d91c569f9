"""distil_dpo.py on the demo task, against continued SFT and distil_logits.py KD: from one SFT student (the demo's),
the same number of optimizer steps of each method, then
- the held-out CE on the demo's 400 held-out answers (nats per token);
- the reverse KL(student || teacher) per token on the student's own samples (one completion per held-out prompt at
  temperature 1, scored over the whole vocabulary: examples/demo.py's sampled_reverse_kl);
- on held-out pairs (teacher sample chosen, SFT student sample rejected): each answer's summed log-probability and the
  preference accuracy against the SFT start ((c - c_sft) > (r - r_sft));
- seconds per optimizer step (median over the steps after the first), and plain DPO in distil_dpo.py against TRL's
  DPOTrainer at equal settings (same start, pairs, batch, steps, optimizer settings, beta, stored reference).

    python bench/preference_task.py                      # builds examples/.cache first if it is missing (~2 min)
    python bench/preference_task.py --only train         # the runs (each skipped when its folder holds a finished run)
    python bench/preference_task.py --only evaluate      # the measurements, into bench/output/preference_task.{md,json}

The questions it answers: does the teacher term keep the chosen answers' likelihood up where DPO alone pulls it down,
and how do the preference methods compare with the two methods a user already has, at the same number of steps?
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")  # as examples/demo.py, so that the SFT start is the demo's

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import distil_dpo  # noqa: E402
import distil_logits  # noqa: E402
from common import load_tokenizer  # noqa: E402
from data import CHATML_TEMPLATE  # noqa: E402
from preference_data import PairCollator, read_pairs, tokenize_pair  # noqa: E402
from preference_loss import sequence_log_probs  # noqa: E402

# name -> (table label, script, settings). Every run starts from the SFT student and trains --steps optimizer steps.
RUNS = {
    "sft": ("continued SFT (distil_logits.py, alpha 0)", "logits", {"alpha": 0.0}),
    "kd": ("logit KD (distil_logits.py, alpha 0.9, forward KL, T 1)", "logits",
           {"alpha": 0.9, "divergence": "forward_kl", "temperature": 1.0}),
    "dpo": ("DPO (distil_dpo.py dpo_kd, alpha 0, beta 0.1)", "dpo", {"method": "dpo_kd", "alpha": 0.0}),
    "dpo_kd": ("dpo_kd (alpha 1, forward KL, T 1, beta 0.1)", "dpo", {"method": "dpo_kd", "alpha": 1.0}),
    "distillm2": ("distillm2 (adaptive skew from 0.1, m 1 to 1.5: the defaults)", "dpo", {"method": "distillm2"}),
    "distillm2_fixed": ("distillm2 (skew 0.1 fixed, m = 1)", "dpo",
                        {"method": "distillm2", "adaptive_skew": False, "gradual_mix": False}),
    "trl_dpo": ("DPO (TRL DPOTrainer, beta 0.1, precomputed reference)", "trl", {}),
}


class StepTimer(TrainerCallback):
    """Wall time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        """Median over the steps after the first (which also pays for warm-up)."""
        return statistics.median(b - a for a, b in zip(self.ends[1:], self.ends[2:]))


def with_timer(trainer_class, timer: StepTimer):
    class Timed(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(timer)
    return Timed


def sft_student(paths: dict, out: str) -> str:
    """The demo's SFT student (alpha 0, 300 rows, 20 epochs, batch 32, lr 7e-3), trained once."""
    if os.path.isfile(os.path.join(out, "distillation_config.json")):
        return out
    from demo import demo, run_config

    config = run_config("pref-sft", teacher=paths["teacher"], student=paths["student_init"], data=paths["train"],
                        eval_data=paths["eval"], rows=demo["student_rows"], epochs=demo["student"]["epochs"], batch=32,
                        learning_rate=7e-3, output_dir=out, alpha=0.0)
    config["training"]["eval_strategy"] = "no"
    distil_logits.main(config)
    return out


def training_settings(args, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_ratio=0.0, weight_decay=0.0,
                lr_scheduler_type="constant", activation_checkpointing=False, logging_steps=10, eval_strategy="no",
                save_strategy="no", overwrite_output_dir=True, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
                seed=42)


def preference_config(args, paths: dict, start: str, output_dir: str, method: str, **preference) -> dict:
    config = copy.deepcopy(distil_dpo.config)
    config["dataset"].update(name=paths["train"], num_samples=args.prompts, eval_size=args.held_out, seed=1)
    config["models"].update(teacher=paths["teacher"], student=start)
    config["tokenizer"]["max_length"] = 128
    config["model_config"]["use_flash_attention"] = False
    config["preference"].update(method=method, **preference)
    config["pairs"].update(max_new_tokens=args.max_new_tokens, batch_size=32)
    config["training"].update(training_settings(args, output_dir))
    return config


def logits_config(args, paths: dict, start: str, output_dir: str, **distillation) -> dict:
    """Continued SFT or KD on the dataset's own answers: as many rows per step as the preference runs have pairs."""
    from demo import run_config

    config = run_config(f"pref-{os.path.basename(output_dir)}", paths["teacher"], start, paths["train"], paths["eval"],
                        args.prompts, 1, args.batch, args.learning_rate, output_dir, **distillation)
    config["training"].update(training_settings(args, output_dir))
    return config


def split_pairs(pairs: list[dict], held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out) as distil_dpo splits them (its eval split: same seed and size), re-run on indices."""
    import datasets

    indices = datasets.Dataset.from_dict({"index": list(range(len(pairs)))})
    split = indices.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return [pairs[i] for i in split["train"]["index"]], [pairs[i] for i in split["test"]["index"]]


def train_trl_dpo(args, start: str, train_pairs: list[dict], output_dir: str, timer: StepTimer) -> None:
    """TRL's DPOTrainer at the settings of the distil_dpo.py DPO run."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(start, CHATML_TEMPLATE)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    settings = training_settings(args, output_dir)
    for key in ("activation_checkpointing", "overwrite_output_dir", "warmup_ratio"):  # not TrainingArguments in transformers 5
        settings.pop(key)
    dpo_args = DPOConfig(**settings, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=128,
                         report_to="none", gradient_checkpointing=False, warmup_steps=0)
    trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=datasets.Dataset.from_list(train_pairs),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "distillation_config.json"), "w") as handle:  # marks the run finished
        json.dump({"trl_dpo": vars(args)}, handle)


def train(args, paths: dict, start: str) -> None:
    timings_path = os.path.join(args.out, "seconds_per_step.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    pairs_file = os.path.join(args.out, "dpo", "pairs.jsonl")
    for name, (label, script, settings) in RUNS.items():
        output_dir = os.path.join(args.out, name)
        if os.path.isfile(os.path.join(output_dir, "distillation_config.json")) and name in timings:
            print(f"{name}: already trained in {output_dir}")
            continue
        print(f"training {name}: {label}")
        timer = StepTimer()
        if script == "dpo":
            config = preference_config(args, paths, start, output_dir, **settings)
            os.makedirs(output_dir, exist_ok=True)
            if name != "dpo":  # the same settings: every run reuses the pairs the first one built
                shutil.copy(pairs_file, os.path.join(output_dir, "pairs.jsonl"))
            original = distil_dpo.PreferenceTrainer
            distil_dpo.PreferenceTrainer = with_timer(original, timer)
            try:
                distil_dpo.main(config)
            finally:
                distil_dpo.PreferenceTrainer = original
        elif script == "logits":
            original = distil_logits.LogitsTrainer
            distil_logits.LogitsTrainer = with_timer(original, timer)
            try:
                distil_logits.main(logits_config(args, paths, start, output_dir, **settings))
            finally:
                distil_logits.LogitsTrainer = original
        else:
            train_pairs, _ = split_pairs(read_pairs(pairs_file)[1], args.held_out, 1)
            train_trl_dpo(args, start, train_pairs, output_dir, timer)
        timings[name] = timer.seconds_per_step()
        with open(timings_path, "w") as handle:
            json.dump(timings, handle, indent=2)


def answer_log_probs(model_dir: str, pairs: list[dict]) -> torch.Tensor:
    """(pairs, 2): summed log-probabilities of the chosen and the rejected answer under a saved model."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir, CHATML_TEMPLATE)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = PairCollator(tokenizer.pad_token_id)([tokenize_pair(pair, tokenizer, 128) for pair in pairs])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    summed = sequence_log_probs(logits, batch["labels"])
    return torch.stack(summed.chunk(2), 1)


def evaluate(args, paths: dict, start: str) -> None:
    from demo import heldout_cross_entropy, sampled_reverse_kl

    timings = json.load(open(os.path.join(args.out, "seconds_per_step.json")))
    _, held_out = split_pairs(read_pairs(os.path.join(args.out, "dpo", "pairs.jsonl"))[1], args.held_out, 1)
    reference = answer_log_probs(start, held_out)
    folders = {"SFT start": start, **{RUNS[name][0]: os.path.join(args.out, name) for name in RUNS}}
    numbers = {}
    for label, folder in folders.items():
        log_probs = answer_log_probs(folder, held_out)
        sampled = sampled_reverse_kl(folder, paths["teacher"], paths["eval"], args.sample_prompts, args.max_new_tokens)
        name = os.path.basename(folder) if label != "SFT start" else None
        numbers[label] = {
            "eval_ce": heldout_cross_entropy(folder, paths["eval"]), **sampled,
            "chosen_log_p": log_probs[:, 0].mean().item(), "rejected_log_p": log_probs[:, 1].mean().item(),
            "preference_accuracy": None if name is None else
            ((log_probs[:, 0] - reference[:, 0]) > (log_probs[:, 1] - reference[:, 1])).float().mean().item(),
            "seconds_per_step": timings.get(name)}
        print(label, numbers[label])
    lines = ["| student | held-out CE | reverse KL on own samples | valid answers | held-out chosen log p | "
             "held-out rejected log p | preference accuracy | s/step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in numbers.items():
        accuracy = "-" if row["preference_accuracy"] is None else f"{row['preference_accuracy']:.2f}"
        step = "-" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.3f}"
        lines.append(f"| {label} | {row['eval_ce']:.4f} | {row['reverse_kl_on_own_samples']:.4f} | "
                     f"{100 * row['valid_answer_share']:.1f}% | {row['chosen_log_p']:.2f} | {row['rejected_log_p']:.2f} | "
                     f"{accuracy} | {step} |")
    ours, trl = timings["dpo"], timings["trl_dpo"]
    lines += ["", f"Plain DPO, seconds per optimizer step (median after the first): distil_dpo.py {ours:.3f}, TRL "
                  f"DPOTrainer {trl:.3f} (ratio {ours / trl:.2f})."]
    report = {"args": vars(args), "held_out_pairs": len(held_out), "results": numbers}
    print("\n".join(lines))
    output = os.path.join(HERE, "output")
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "preference_task.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(output, "preference_task.json"), "w") as handle:
        json.dump(report, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/preference_task")
    parser.add_argument("--only", choices=["train", "evaluate"], default=None)
    parser.add_argument("--prompts", type=int, default=288)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--sample-prompts", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only spin-wait on a busy machine (examples/demo.py)
    from demo import build

    paths = build(False)
    start = sft_student(paths, os.path.join(args.out, "sft_start"))
    if args.only != "evaluate":
        train(args, paths, start)
    if args.only != "train":
        evaluate(args, paths, start)


if __name__ == "__main__":
    main()
