"""distil_dpo.py on the demo task: from one SFT student, the same number of steps of plain DPO (dpo_kd, alpha 0),
dpo_kd (alpha 1) and distillm2 on the same pairs (teacher sample chosen, SFT student sample rejected, built once),
then on held-out pairs: the summed log-probability of the chosen (teacher) and rejected (student) answers, the
preference accuracy against the SFT start ((c - c_sft) > (r - r_sft)), and the held-out CE on the demo's answers.

    python bench/preference_task.py --cache examples/.cache        # after `python examples/demo.py` built the cache

The question it answers: does the teacher term keep the chosen answers' likelihood up where DPO alone pulls it down?
"""

import argparse
import copy
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import distil_dpo  # noqa: E402
import distil_logits  # noqa: E402
from common import load_tokenizer  # noqa: E402
from data import CHATML_TEMPLATE  # noqa: E402
from preference_data import PairCollator, read_pairs, tokenize_pair  # noqa: E402
from preference_loss import sequence_log_probs  # noqa: E402


def sft_student(cache: str, out: str) -> str:
    """The demo's SFT student (alpha 0, 300 rows, 20 epochs), trained once."""
    if os.path.isfile(os.path.join(out, "distillation_config.json")):
        return out
    from demo import demo, run_config

    config = run_config("pref-sft", teacher=os.path.join(cache, "teacher"), student=os.path.join(cache, "student_init"),
                        data=os.path.join(cache, "train.jsonl"), eval_data=os.path.join(cache, "eval.jsonl"),
                        rows=demo["student_rows"], epochs=demo["student"]["epochs"], batch=32, learning_rate=7e-3,
                        output_dir=out, alpha=0.0)
    config["training"]["eval_strategy"] = "no"
    distil_logits.main(config)
    return out


def preference_config(args, name: str, start: str, method: str, **preference) -> dict:
    config = copy.deepcopy(distil_dpo.config)
    config["dataset"].update(name=os.path.join(args.cache, "train.jsonl"), num_samples=args.prompts, eval_size=args.held_out,
                             seed=1)
    config["models"].update(teacher=os.path.join(args.cache, "teacher"), student=start)
    config["tokenizer"]["max_length"] = 128
    config["model_config"]["use_flash_attention"] = False
    config["preference"].update(method=method, **preference)
    config["pairs"].update(max_new_tokens=args.max_new_tokens, batch_size=32)
    config["training"].update(
        output_dir=os.path.join(args.out, name), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_ratio=0.0, weight_decay=0.0,
        lr_scheduler_type="constant", activation_checkpointing=False, logging_steps=10, eval_strategy="no",
        save_strategy="no", overwrite_output_dir=True, disable_tqdm=True, dataloader_num_workers=0, bf16=False)
    return config


def held_out_pairs(config: dict, pairs: list[dict]) -> list[dict]:
    """The pairs distil_dpo held out (its eval split: same seed and size), by re-running its split on indices."""
    import datasets

    indices = datasets.Dataset.from_dict({"index": list(range(len(pairs)))})
    split = indices.train_test_split(test_size=config["dataset"]["eval_size"], seed=config["dataset"]["seed"], shuffle=True)
    return [pairs[i] for i in split["test"]["index"]]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(HERE), "examples", ".cache"))
    parser.add_argument("--out", default="/tmp/preference_task")
    parser.add_argument("--prompts", type=int, default=288)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only spin-wait on a busy machine (examples/demo.py)
    from demo import heldout_cross_entropy

    start = sft_student(args.cache, os.path.join(args.out, "sft"))
    runs = {"DPO (dpo_kd, alpha 0)": ("dpo", "dpo_kd", {"alpha": 0.0}),
            "dpo_kd (alpha 1, forward KL)": ("dpo_kd", "dpo_kd", {"alpha": 1.0}),
            "distillm2": ("distillm2", "distillm2", {})}
    results, seconds, pairs_file = {}, {}, None
    for label, (name, method, preference) in runs.items():
        config = preference_config(args, name, start, method, **preference)
        os.makedirs(config["training"]["output_dir"], exist_ok=True)
        if pairs_file:  # the same settings: every run reuses the pairs the first one built
            shutil.copy(pairs_file, os.path.join(config["training"]["output_dir"], "pairs.jsonl"))
        began = time.time()
        distil_dpo.main(config)
        seconds[label] = time.time() - began
        pairs_file = os.path.join(config["training"]["output_dir"], "pairs.jsonl")
        results[label] = config
    _, pairs = read_pairs(pairs_file)
    held_out = held_out_pairs(config, pairs)
    reference = answer_log_probs(start, held_out)
    rows = {"SFT start": (start, reference)}
    rows.update({label: (config["training"]["output_dir"], answer_log_probs(config["training"]["output_dir"], held_out))
                 for label, config in results.items()})
    lines = ["| student | held-out chosen log p | held-out rejected log p | preference accuracy | held-out CE |",
             "| --- | --- | --- | --- | --- |"]
    numbers = {}
    for label, (folder, log_probs) in rows.items():
        accuracy = ((log_probs[:, 0] - reference[:, 0]) > (log_probs[:, 1] - reference[:, 1])).float().mean().item()
        cross_entropy = heldout_cross_entropy(folder, os.path.join(args.cache, "eval.jsonl"))
        numbers[label] = {"chosen": log_probs[:, 0].mean().item(), "rejected": log_probs[:, 1].mean().item(),
                          "accuracy": accuracy, "cross_entropy": cross_entropy, "seconds": seconds.get(label)}
        lines.append(f"| {label} | {numbers[label]['chosen']:.2f} | {numbers[label]['rejected']:.2f} | "
                     f"{'-' if label == 'SFT start' else f'{accuracy:.2f}'} | {cross_entropy:.4f} |")
    report = {"args": vars(args), "held_out_pairs": len(held_out), "results": numbers}
    print("\n".join(lines))
    print(json.dumps(report, indent=2))
    output = os.path.join(HERE, "output")
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "preference_task.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(output, "preference_task.json"), "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
