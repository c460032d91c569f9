"""Cross-tokenizer hidden-state KD on a second task (not the demo's): does distil_hidden.py at its defaults end at or
below plain SFT when the student has its own tokenizer and chat template?

    python bench/cross_tokenizer_hidden.py                       # SFT vs hidden KD (defaults), seeds 0 and 1
    python bench/cross_tokenizer_hidden.py --diagnose            # + alignment and loss-scale measurements
    python bench/cross_tokenizer_hidden.py --variants sft hidden hidden:positions=aligned,teacher_norm=none
    python bench/cross_tokenizer_hidden.py --variants sft:template=own hidden:template=own  # the student's own template

The task: short deterministic replies (spell a word backwards, add two numbers, the day or month after another, a
plural, count letters) with a few phrasings each, some system turns and some two-exchange rows.
- Teacher: Mistral-style (hidden 128, 4 blocks), ChatML, a byte-level BPE with Qwen2's pre-tokenizer (single digits),
  trained on 3000 rows.
- Student: Llama-style (hidden 48, 3 blocks), its own byte-level BPE (Llama-3's split: up to 3 digits per token),
  trained on 1000 other rows, with a Llama-3-style template (<|start_header_id|>role<|end_header_id|>\\n\\n ...
  <|eot_id|>). It learns from 240 rows for 20 epochs (batch 32, lr 7e-3), as SFT (distil_logits.py, alpha 0) and with
  distil_hidden.py.
- Held-out CE: the student's own per-token cross-entropy on the assistant tokens of 300 held-out rows (one student
  tokenizer for every row, so the numbers compare directly).
- Control (variants sft_same, hidden_same): the same Llama student on the teacher's tokenizer and ChatML; its CE is
  per teacher-tokenizer token, so compare it with its own SFT row only.
Everything is cached under bench/output/xtok_hidden (delete it to rebuild).
"""

import argparse
import json
import os
import random
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
import distil_hidden  # noqa: E402
import distil_logits  # noqa: E402
from data import CHATML_TEMPLATE, tokenize_row  # noqa: E402
from losses import causal_lm_loss  # noqa: E402

OUT = os.path.join(ROOT, "bench", "output", "xtok_hidden")
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3's pre-tokenizer split (numbers in groups of up to 3 digits), unlike Qwen2's single digits.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")

task = {
    "teacher_rows": 3000, "student_rows": 240, "eval_rows": 300, "tokenizer_rows": 1000,
    "teacher": {"hidden_size": 128, "num_hidden_layers": 4, "epochs": 8, "vocab": 512},
    "student": {"hidden_size": 48, "num_hidden_layers": 3, "epochs": 20, "vocab": 400},
}

WORDS = sorted({w.lower() for answers in demo_data._QUESTIONS.values() for w in answers if w.isalpha() and len(w) <= 9})
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PLURALS = {"mouse": "mice", "goose": "geese", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "box": "boxes",
           "city": "cities", "baby": "babies", "bus": "buses", "fox": "foxes", "cactus": "cacti", "ox": "oxen",
           "sheep": "sheep", "fish": "fish", "deer": "deer", "potato": "potatoes", "hero": "heroes", "shelf": "shelves"}


def exchange(rng: random.Random) -> tuple[str, str]:
    """One (question, reply) pair: deterministic content, one of a few phrasings."""
    kind = rng.randrange(5)
    if kind == 0:
        word = rng.choice(WORDS)
        return (f"Spell {word} backwards.",
                rng.choice(["{w} backwards is {r}.", "That gives {r}.", "Backwards: {r}."]).format(w=word, r=word[::-1]))
    if kind == 1:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return (f"What is {a} plus {b}?",
                rng.choice(["{a} plus {b} is {c}.", "The sum is {c}.", "It makes {c}."]).format(a=a, b=b, c=a + b))
    if kind == 2:
        names = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(names))
        after = names[(i + 1) % len(names)]
        return (f"What comes after {names[i]}?",
                rng.choice(["{n} comes after {d}.", "After {d} comes {n}.", "It is {n}."]).format(n=after, d=names[i]))
    if kind == 3:
        noun = rng.choice(sorted(PLURALS))
        return (f"What is the plural of {noun}?",
                rng.choice(["The plural of {n} is {p}.", "It is {p}.", "{P}."]).format(
                    n=noun, p=PLURALS[noun], P=PLURALS[noun].capitalize()))
    word = rng.choice(WORDS)
    return (f"How many letters are in {word}?",
            rng.choice(["{w} has {k} letters.", "There are {k} letters.", "{k} letters."]).format(w=word, k=len(word)))


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        if rng.random() < 0.3:
            turns.append({"from": "system", "value": rng.choice(["You are a helpful assistant.", "Answer briefly."])})
        for _ in range(2 if rng.random() < 0.3 else 1):
            question, reply = exchange(rng)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        rows.append({"conversations": turns})
    return rows


def render_llama3(conversations: list[dict]) -> str:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{roles[t['from']]}<|end_header_id|>\n\n{t['value']}<|eot_id|>" for t in conversations)


def train_llama3_tokenizer(texts: list[str], out_dir: str, vocab_size: int) -> None:
    """A byte-level BPE with Llama-3's split regex and specials, saved with the Llama-3-style template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                            bos_token="<|begin_of_text|>", extra_special_tokens=LLAMA3_SPECIALS[2:],
                            chat_template=LLAMA3_TEMPLATE).save_pretrained(out_dir)


def model_folder(path: str, tokenizer_dir: str, kind: str, hidden_size: int, num_hidden_layers: int, seed: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config({"mistral": MistralConfig, "llama": LlamaConfig}[kind](
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)  # the config must not make transformers rebuild the tokenizer
    sample = "<|im_start|>user\nWhat is 123 plus 45?<|im_end|>"
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"], f"{path}: tokenizer changed on reload"
    return path


def build() -> dict:
    paths = {name: os.path.join(OUT, name) for name in ("teacher_tokenizer", "student_tokenizer", "teacher",
                                                         "teacher_init", "student_init", "student_same_init")}
    paths.update(train=os.path.join(OUT, "train.jsonl"), student=os.path.join(OUT, "student.jsonl"),
                 eval=os.path.join(OUT, "eval.jsonl"))
    done = os.path.join(OUT, "done.json")
    if os.path.isfile(done) and json.load(open(done)) == task:
        return paths
    os.makedirs(OUT, exist_ok=True)
    teacher_rows = make_rows(task["teacher_rows"], seed=0)
    demo_data.write_jsonl(teacher_rows, paths["train"])
    demo_data.write_jsonl(teacher_rows[: task["student_rows"]], paths["student"])  # the student's subset
    demo_data.write_jsonl(make_rows(task["eval_rows"], seed=1_000_003), paths["eval"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in teacher_rows],
                              paths["teacher_tokenizer"], task["teacher"]["vocab"])
    train_llama3_tokenizer([render_llama3(r["conversations"]) for r in make_rows(task["tokenizer_rows"], seed=77)],
                           paths["student_tokenizer"], task["student"]["vocab"])
    model_folder(paths["teacher_init"], paths["teacher_tokenizer"], "mistral", task["teacher"]["hidden_size"],
                 task["teacher"]["num_hidden_layers"], seed=1)
    model_folder(paths["student_init"], paths["student_tokenizer"], "llama", task["student"]["hidden_size"],
                 task["student"]["num_hidden_layers"], seed=3)
    # The control: the same Llama student on the teacher's tokenizer and ChatML (hidden states compared position by
    # position).
    model_folder(paths["student_same_init"], paths["teacher_tokenizer"], "llama", task["student"]["hidden_size"],
                 task["student"]["num_hidden_layers"], seed=3)
    config = demo.run_config("xtok-teacher", paths["teacher_init"], paths["teacher_init"], paths["train"],
                             paths["eval"], task["teacher_rows"], task["teacher"]["epochs"], 32, 3e-3, paths["teacher"],
                             alpha=0.0)
    config["training"]["eval_strategy"] = "no"
    distil_logits.main(config)
    json.dump(task, open(done, "w"))
    return paths


def heldout_ce(model_dir: str, eval_path: str, max_length: int = 128) -> float:
    """Per-token CE of a saved model on the assistant tokens of the held-out rows, rendered with its own template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(eval_path):
            encoded = tokenize_row(json.loads(line), tokenizer, "sharegpt", max_length)
            labels = torch.tensor([encoded["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += causal_lm_loss(model(torch.tensor([encoded["input_ids"]])).logits, labels).item() * tokens
            count += tokens
    return total / count


def student_config(paths: dict, name: str, seed: int, script, same: bool = False, **distillation) -> dict:
    student = paths["student_same_init" if same else "student_init"]
    config = demo.run_config(name, paths["teacher"], student, paths["student"], paths["eval"], task["student_rows"],
                             task["student"]["epochs"], 32, 7e-3, os.path.join(OUT, "runs", f"{name}-seed{seed}"),
                             script=script, **distillation)
    config["dataset"]["seed"] = seed
    config["training"].update(seed=seed, eval_strategy="no", logging_steps=8)
    return config


def parse_variant(text: str) -> tuple[str, dict]:
    """'sft', 'hidden' or 'hidden:key=value,key=value' (distillation keys; numbers and None parsed); 'sft_same' and
    'hidden_same' train the control student on the teacher's tokenizer and template."""
    name, _, overrides = text.partition(":")
    values = {}
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = None if value == "None" else value
    return name, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["sft", "hidden"])
    parser.add_argument("--diagnose", action="store_true", help="print alignment and loss-scale measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = build()
    results = {}
    for seed in args.seeds:
        for variant in args.variants:
            name, overrides = parse_variant(variant)
            start = time.time()
            label = variant.replace(":", "-").replace(",", "-").replace("=", "")
            same = name.endswith("_same")
            # template=own: the student renders with its own (Llama-3-style) template, the scripts' default; chatml:
            # with ChatML, the earlier default, now refused on this student's tokenizer (no <|im_start|> token).
            template = {"own": None, "chatml": CHATML_TEMPLATE}.get(overrides.pop("template", "default"), "default")
            if name.startswith("sft"):
                config = student_config(paths, label, seed, distil_logits, same, alpha=0.0, **overrides)
                if template != "default":
                    config["tokenizer"]["chat_template"] = template
                trainer = distil_logits.main(config)
            else:
                config = student_config(paths, label, seed, distil_hidden, same, **overrides)
                if template != "default":
                    config["tokenizer"]["chat_template"] = template
                if args.diagnose:
                    import hidden_diagnostics
                    trainer = hidden_diagnostics.run_with_diagnostics(config)
                else:
                    trainer = distil_hidden.main(config)
            ce = heldout_ce(config["training"]["output_dir"], paths["eval"])
            results.setdefault(variant, {})[seed] = ce
            print(f"RESULT seed {seed} {variant}: held-out CE {ce:.4f} ({time.time() - start:.0f} s)", flush=True)
            del trainer
    print("\n| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("| --- |" + " --- |" * (len(args.seeds) + 1))
    for variant, by_seed in results.items():
        values = [by_seed[s] for s in args.seeds]
        print(f"| {variant} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {sum(values) / len(values):.4f} |")
    json.dump(results, open(os.path.join(OUT, "results.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
