"""A second task for cross-tokenizer logit distillation (distillation.cross_tokenizer): a Llama-style student with its
own byte-level BPE and a Llama-3-style chat template learns from a Qwen2-style teacher on ChatML, and its held-out
cross-entropy (per student token, over the assistant tokens) is compared with plain SFT over several seeds.

    python bench/cross_tokenizer_task.py                                   # SFT, uld, hybrid; seeds 0 and 1
    python bench/cross_tokenizer_task.py --methods hybrid --temperature 1 --alpha 0.9 --max-piece-tokens 4

Data: examples/demo_data.py's task drawn with other seeds than the demo's (train 11, eval 12). The teacher (cached in
bench/.cross_cache) trains on 4000 rows; every student on the same `--rows` rows for `--epochs` epochs.
"""

import argparse
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

import demo  # noqa: E402
import demo_data  # noqa: E402
import distil_logits  # noqa: E402
from data import tokenize_row  # noqa: E402
from losses import causal_lm_loss  # noqa: E402

CACHE = os.path.join(HERE, ".cross_cache")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_tokenizer(texts: list[str], out_dir: str, vocab_size: int) -> None:
    """A byte-level BPE with Llama-3's special tokens and template (demo_data.train_tokenizer's recipe otherwise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer, decoder = demo_data._qwen2_pipeline()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoder
    tokenizer.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                            bos_token="<|begin_of_text|>", unk_token="<|end_of_text|>",
                            extra_special_tokens=LLAMA3_SPECIALS[2:], chat_template=LLAMA3_TEMPLATE).save_pretrained(out_dir)


def build() -> dict:
    paths = {name: os.path.join(CACHE, name) for name in ("tokenizer", "teacher", "student_tokenizer", "student_init")}
    paths.update(train=os.path.join(CACHE, "train.jsonl"), eval=os.path.join(CACHE, "eval.jsonl"))
    if os.path.isdir(paths["student_init"]):
        return paths
    train_rows = demo_data.make_conversations(4000, seed=11)
    demo_data.write_jsonl(train_rows, paths["train"])
    demo_data.write_jsonl(demo_data.make_conversations(300, seed=12), paths["eval"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in train_rows], paths["tokenizer"], 512)
    from transformers import AutoTokenizer

    student_tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])  # only to render with the Llama-3 template
    student_tokenizer.chat_template = LLAMA3_TEMPLATE
    other_rows = demo_data.make_conversations(1000, seed=13)
    texts = ["<|begin_of_text|>" + "".join(f"<|start_header_id|>{demo_data.SHAREGPT_ROLES[t['from']]}<|end_header_id|>\n\n"
                                           f"{t['value']}<|eot_id|>" for t in r["conversations"]) for r in other_rows]
    llama3_tokenizer(texts, paths["student_tokenizer"], 400)
    teacher_init = demo.model_folder(os.path.join(CACHE, "teacher_init"), paths["tokenizer"], 128, 4, 512, seed=21)
    demo.model_folder(paths["student_init"] + ".tmp", paths["student_tokenizer"], 48, 3,
                      len(AutoTokenizer.from_pretrained(paths["student_tokenizer"])), seed=22, kind="llama")
    config = demo.run_config("cross-teacher", teacher_init, teacher_init, paths["train"], paths["eval"], 4000, 2, 32, 3e-3,
                             paths["teacher"], alpha=0.0)
    config["training"]["eval_strategy"] = "no"
    distil_logits.main(config)
    os.rename(paths["student_init"] + ".tmp", paths["student_init"])
    return paths


def heldout_ce(model_dir: str, eval_path: str) -> float:
    """Per-token cross-entropy of a saved student on the assistant tokens of the held-out rows (its own template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count = 0
    with torch.no_grad():
        for line in open(eval_path):
            row = tokenize_row(json.loads(line), tokenizer, "sharegpt", 128)
            labels = torch.tensor([row["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += causal_lm_loss(model(torch.tensor([row["input_ids"]])).logits, labels).item() * tokens
            count += tokens
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sft,uld,hybrid")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=None, help="default: distil_logits.config's")
    parser.add_argument("--temperature", type=float, default=None, help="default: distil_logits.config's")
    parser.add_argument("--matched", type=float, default=None, help="hybrid_matched_weight (default: the config's)")
    parser.add_argument("--unmatched", type=float, default=None, help="hybrid_unmatched_weight (default: the config's)")
    parser.add_argument("--max-piece-tokens", type=int, default=None,
                        help="cross_tokenizer_max_piece_tokens (default: the config's)")
    parser.add_argument("--out", default=os.path.join(CACHE, "results.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = build()
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            settings = {"alpha": 0.0} if method == "sft" else {"cross_tokenizer": method}
            for key, value in (("alpha", args.alpha), ("temperature", args.temperature),
                               ("hybrid_matched_weight", args.matched), ("hybrid_unmatched_weight", args.unmatched),
                               ("cross_tokenizer_max_piece_tokens", args.max_piece_tokens)):
                if value is not None and method != "sft":
                    settings[key] = value
            config = demo.run_config(f"cross-{method}", paths["teacher"], paths["student_init"], paths["train"],
                                     paths["eval"], args.rows, args.epochs, 32, 7e-3,
                                     os.path.join(CACHE, "runs", f"{method}-{seed}"), **settings)
            config["tokenizer"].update(chat_template=None, teacher_chat_template=None)  # each model's own template
            config["training"].update(eval_strategy="no", seed=seed, logging_steps=20)
            config["dataset"]["seed"] = seed
            start = time.time()
            trainer = distil_logits.main(config)
            shares = [log["aligned_share"] for log in trainer.state.log_history if "aligned_share" in log]
            result = {"method": method, "seed": seed, "settings": settings,
                      "heldout_ce": heldout_ce(config["training"]["output_dir"], paths["eval"]),
                      "aligned_share": sum(shares) / len(shares) if shares else None, "seconds": time.time() - start}
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
