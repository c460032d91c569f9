"""Offline CPU demo: distil a tiny teacher into a smaller student with distil_logits.py and compare with plain SFT.
With --full also offline, hidden-state, cross-tokenizer and on-policy distillation.

    python examples/demo.py            # teacher, SFT student, KD student (~2 min on 2 CPU cores, teacher cached after)
    python examples/demo.py --full     # every row (~5.5 min with the cached teacher)
    python examples/demo.py --rebuild  # rebuild the cached data, tokenizer and teacher
    python examples/demo.py --on-policy-only   # the SFT student, then only on-policy vs off-policy (~2 min cached)
    python examples/demo.py --preference-only  # the SFT student, then only the preference row (distil_dpo.py)

What it does, all offline:
1. Makes a ShareGPT dataset of questions whose answers are sampled from a fixed distribution per question
   (examples/demo_data.py), so a teacher's soft next-token distribution carries information a one-hot label lacks.
2. Trains a byte-level BPE tokenizer and a small Qwen2-style teacher on the full training set (plain SFT, via
   distil_logits.main with alpha = 0). Cached in examples/.cache, with a second tokenizer and the untrained students.
3. Trains a smaller student, from the same initial weights and on the same small subset, twice: SFT only
   (alpha = 0) and with logit distillation from the teacher (alpha, temperature below). This is the default run.
4. --full also: trains the KD student again from an offline top-k capture of the teacher; trains a Llama-style
   student (another architecture, hidden size and depth) on the same rows and epochs, SFT only and with hidden-state
   distillation (distil_hidden.py, shared tokenizer); then the same pair again with the student on a second tokenizer
   (trained on other rows, another vocabulary size), where hidden states are compared only at aligned character
   offsets, and that student with logit KD across tokenizers (uld and hybrid); continues the SFT student for a few
   steps with on-policy reverse KL (the student samples, the teacher scores) and as many with off-policy KD on the
   dataset's answers, and measures both on the student's own samples; continues the SFT student for as many steps
   with DistiLLM-2's contrastive loss (distil_dpo.py) on pairs it builds from the training prompts (the teacher's
   sample chosen, the SFT student's rejected).
5. Prints the held-out cross-entropy of the teacher, the untrained student and every trained student as a markdown
   table, and writes it to examples/output/demo_results.md (demo_results_full.md with --full), with the loss curves
   (demo_curves.png) and the numbers (demo_results.json). Cross-entropies of the tokenizer-B students are per
   teacher-tokenizer token, so every row compares.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import time

START = time.time()  # before the heavy imports, so that the reported total is what a user waits
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# AVX2 kernels even on an AVX-512 CPU, so that both print the README's numbers: AVX-512 matrix kernels round
# differently, which after hundreds of steps moves the third decimal (teacher 1.2018 with AVX-512, 1.2050 with AVX2 on
# the same machine, as on an AVX2-only one; no slower). Set these yourself to choose otherwise, before torch is imported.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import demo_data  # noqa: E402
import distil_dpo  # noqa: E402
import distil_hidden  # noqa: E402
import distil_logits  # noqa: E402
from data import tokenize_row  # noqa: E402
from losses import causal_lm_loss  # noqa: E402

CACHE = os.path.join(HERE, ".cache")
OUTPUT = os.path.join(HERE, "output")

demo = {
    "train_rows": 4000,  # rows the teacher learns from
    "eval_rows": 400,  # held-out rows, same for every model
    "student_rows": 300,  # the limited subset every student learns from
    "vocab_size": 512,  # BPE tokenizer size
    "teacher": {"hidden_size": 128, "num_hidden_layers": 4, "epochs": 2},
    "student": {"hidden_size": 64, "num_hidden_layers": 2, "epochs": 20},
    "kd": {"alpha": 0.9, "temperature": 1.0, "divergence": "forward_kl"},
    "offline_top_k": 64,  # offline KD: the same student and settings, taught from a capture of the teacher's top-k
    # hidden-state distillation: a Llama-style student, trained for as many epochs on the same student_rows
    "hidden_student": {"hidden_size": 48, "num_hidden_layers": 3},
    "hidden": {"alpha": 0.5, "loss": "mse", "layer_map": "uniform"},
    "tokenizer_b": {"vocab_size": 384, "rows": 1000, "seed": 7},  # the second student tokenizer: other rows and size
    # on-policy: from the SFT student, the same number of steps of on-policy reverse KL and of off-policy KD (same
    # divergence and temperature, only on_policy.fraction differs), then measured on the student's own samples
    "on_policy": {"steps": 60, "batch": 32, "learning_rate": 1e-3, "max_new_tokens": 16, "eval_prompts": 200,
                  "distillation": {"alpha": 1.0, "divergence": "reverse_kl", "temperature": 1.0}},
}
# Preference distillation (distil_dpo.py, distillm2 at its defaults: adaptive skew, rising mix) from the SFT student:
# pairs built from `prompts` training prompts (teacher sample chosen, SFT student sample rejected, max_new_tokens
# each), then `steps` optimizer steps of `batch` pairs (bench/preference_task.py's settings). Outside `demo`, whose
# every key is part of the cached build's identity.
PREFERENCE = {"prompts": 256, "steps": 60, "batch": 8, "learning_rate": 1e-3, "max_new_tokens": 16}
# Logit KD across tokenizers (distil_logits.py, distillation.cross_tokenizer) for the tokenizer-B student, at the
# script's defaults (alpha 0.5, T 2, forward KL), evaluated once at the end to keep the demo short. Outside `demo`,
# whose every key is part of the cached build's identity.
CROSS_TOKENIZER_ROWS = ("uld", "hybrid")
PHASE_SECONDS: dict[str, float] = {}  # where the demo's time goes, printed at the end
BUILD = "build (data, tokenizers, teacher)"


def model_folder(path: str, tokenizer_dir: str, hidden_size: int, num_hidden_layers: int, vocab: int, seed: int,
                 kind: str = "qwen2") -> str:
    """A randomly initialised Qwen2-style (or Llama-style) model saved with a demo tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config({"qwen2": Qwen2Config, "llama": LlamaConfig}[kind](
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    ))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def run_config(name: str, teacher: str, student: str, data: str, eval_data: str, rows: int, epochs: int,
               batch: int, learning_rate: float, output_dir: str, script=distil_logits, **distillation) -> dict:
    """distil_logits.config (or `script`'s config) pointed at local files, sized for a 2-core CPU."""
    config = copy.deepcopy(script.config)
    config["project_name"] = name
    config["dataset"].update(name=data, eval_name=eval_data, num_samples=rows, seed=0)
    config["models"].update(teacher=teacher, student=student)
    config["tokenizer"]["max_length"] = 128
    config["model_config"]["use_flash_attention"] = False
    config["distillation"].update(distillation)
    config["training"].update(
        output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=learning_rate, weight_decay=0.0, warmup_ratio=0.05,
        activation_checkpointing=False, logging_steps=10, eval_strategy="steps", eval_steps=0.1, save_strategy="no",
        overwrite_output_dir=True, disable_tqdm=True, dataloader_num_workers=0,
        bf16=torch.cuda.is_available(),  # bf16 autocast on a GPU; float32 on the CPU, where bf16 is slower
    )
    return config


def five_evaluations(config: dict) -> dict:
    """Evaluate at 20%, 40%, ... of training instead of every epoch: with a teacher in the loop an evaluation costs
    about as much as an epoch of training."""
    config["training"].update(eval_strategy="steps", eval_steps=0.2)
    return config


def heldout_cross_entropy(model_dir: str, eval_path: str, max_length: int = 128) -> float:
    """Per-token cross-entropy of a saved model on the assistant tokens of the held-out rows."""
    total, count = heldout_nats(model_dir, eval_path, max_length)
    return total / count


def heldout_nats(model_dir: str, eval_path: str, max_length: int = 128) -> tuple[float, int]:
    """(total nats, number of tokens) of a saved model on the assistant tokens of the held-out rows. The total is the
    negative log-likelihood of the assistant text itself, so it compares across tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in open(eval_path)]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            encoded = tokenize_row(row, tokenizer, "sharegpt", max_length)
            input_ids = torch.tensor([encoded["input_ids"]])
            labels = torch.tensor([encoded["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += causal_lm_loss(model(input_ids).logits, labels).item() * tokens
            count += tokens
    return total, count


def sampled_reverse_kl(student_dir: str, teacher_dir: str, eval_path: str, prompts: int, max_new_tokens: int,
                       seed: int = 0) -> dict:
    """Sample one completion per held-out prompt from the student (temperature 1, the whole vocabulary) and return the
    reverse KL(student || teacher) per sampled token (the full-vocabulary divergence at each sampled position, what
    on-policy training minimises and what a user of the student meets) and the share of completions that are valid
    answers of the demo task (demo_data.extract_answer finds exactly one answer of the question asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import on_policy
    from data import CHATML_TEMPLATE, to_messages
    from losses import token_divergence

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.chat_template = CHATML_TEMPLATE
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    stop_ids = sorted({on_policy.end_of_turn_id(tokenizer), tokenizer.eos_token_id})
    rows = [json.loads(line) for line in open(eval_path)][:prompts]
    kl_sum, tokens, valid = 0.0, 0, 0
    for start in range(0, len(rows), 50):
        batch_rows = rows[start:start + 50]
        prompt_ids = [tokenize_row(row, tokenizer, "sharegpt", 128, with_prompt=True)["prompt_ids"] for row in batch_rows]
        width = max(map(len, prompt_ids))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        completions = on_policy.sample_completions(
            student, ids, mask, {"sampling_temperature": 1.0, "top_p": 1.0}, stop_ids, tokenizer.pad_token_id, len(tokenizer),
            seed + start, max_new_tokens)
        batch = on_policy.label_completions(prompt_ids, completions, set(stop_ids), 128, tokenizer.pad_token_id)
        with torch.no_grad():
            counted = batch["labels"][:, 1:] != -100
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            log_q = student(**inputs).logits[:, :-1][counted].float().log_softmax(-1)
            log_p = teacher(**inputs).logits[:, :-1][counted][:, :len(tokenizer)].float().log_softmax(-1)
        kl_sum += token_divergence(log_q[:, :len(tokenizer)], log_p, "reverse_kl").sum().item()
        tokens += int(counted.sum())
        for row, completion, length in zip(batch_rows, completions, batch["completion_lengths"].tolist()):
            question = [m for m in to_messages(row, "sharegpt") if m["role"] == "user"][-1]["content"]
            reply = tokenizer.decode(completion[:length], skip_special_tokens=True)
            valid += demo_data.extract_answer(question, reply) is not None
    return {"reverse_kl_on_own_samples": kl_sum / tokens, "valid_answer_share": valid / len(rows),
            "mean_completion_tokens": tokens / len(rows)}


def on_policy_comparison(paths: dict, sft_dir: str) -> dict:
    """From the SFT student: demo["on_policy"]["steps"] steps of on-policy reverse KL and as many of off-policy KD on
    the dataset's answers; held-out CE and the sampled metrics of the start and of both students."""
    settings = demo["on_policy"]
    results = {"teacher (reference)": {"eval_ce": heldout_cross_entropy(paths["teacher"], paths["eval"]),
                                       **sampled_reverse_kl(paths["teacher"], paths["teacher"], paths["eval"],
                                                            settings["eval_prompts"], settings["max_new_tokens"])},
               "SFT start": {"eval_ce": heldout_cross_entropy(sft_dir, paths["eval"]),
                             **sampled_reverse_kl(sft_dir, paths["teacher"], paths["eval"], settings["eval_prompts"],
                                                  settings["max_new_tokens"])}}
    for name, fraction in (("off-policy KD", 0.0), ("on-policy reverse KL", 1.0)):
        output_dir = os.path.join(OUTPUT, "on_policy" if fraction else "off_policy")
        config = run_config(f"demo-{'on' if fraction else 'off'}-policy", paths["teacher"], sft_dir, paths["train"],
                            paths["eval"], demo["student_rows"], 1, settings["batch"], settings["learning_rate"],
                            output_dir, **settings["distillation"])
        config["training"].update(max_steps=settings["steps"], eval_strategy="no", warmup_ratio=0.0,
                                  lr_scheduler_type="constant", logging_steps=5)
        config["on_policy"].update(fraction=fraction, max_new_tokens=settings["max_new_tokens"])
        trainer = timed(distil_logits.main)(config)
        speeds = [log for log in trainer.state.log_history if "sampling_tokens_per_second" in log]
        results[name] = {"eval_ce": heldout_cross_entropy(output_dir, paths["eval"]),
                         **sampled_reverse_kl(output_dir, paths["teacher"], paths["eval"], settings["eval_prompts"],
                                              settings["max_new_tokens"])}
        if speeds:
            results[name].update(sampling_tokens_per_second=speeds[-1]["sampling_tokens_per_second"],
                                 training_tokens_per_second=speeds[-1]["training_tokens_per_second"])
    return results


def preference_row(paths: dict, sft_dir: str) -> tuple[str, float]:
    """From the SFT student: PREFERENCE["steps"] steps of distillm2 (distil_dpo.py) on pairs built from the training
    prompts. Returns the table row's name and its held-out CE."""
    output_dir = os.path.join(OUTPUT, "distillm2")
    config = copy.deepcopy(distil_dpo.config)
    config["project_name"] = "demo-distillm2"
    config["dataset"].update(name=paths["train"], num_samples=PREFERENCE["prompts"], eval_size=0, seed=1)
    config["models"].update(teacher=paths["teacher"], student=sft_dir)
    config["tokenizer"]["max_length"] = 128
    config["model_config"]["use_flash_attention"] = False
    config["preference"]["method"] = "distillm2"
    config["pairs"].update(max_new_tokens=PREFERENCE["max_new_tokens"], batch_size=32)
    config["training"].update(
        output_dir=output_dir, max_steps=PREFERENCE["steps"], per_device_train_batch_size=PREFERENCE["batch"],
        gradient_accumulation_steps=1, learning_rate=PREFERENCE["learning_rate"], warmup_ratio=0.0, weight_decay=0.0,
        lr_scheduler_type="constant", activation_checkpointing=False, logging_steps=10, eval_strategy="no",
        save_strategy="no", overwrite_output_dir=True, disable_tqdm=True, dataloader_num_workers=0,
        bf16=torch.cuda.is_available())
    # The SFT student is retrained by every demo run: pairs it sampled before are not its pairs any more.
    shutil.rmtree(output_dir, ignore_errors=True)
    timed(distil_dpo.main)(config)
    name = (f"student, SFT then {PREFERENCE['steps']} steps of DistiLLM-2 (distil_dpo.py distillm2) on "
            f"{PREFERENCE['prompts']} prompts' teacher/student pairs")
    return name, heldout_cross_entropy(output_dir, paths["eval"])


def on_policy_lines(results: dict) -> list[str]:
    """The on-policy comparison as markdown: one sentence on what was compared, then the table."""
    settings = demo["on_policy"]
    distillation = settings["distillation"]
    lines = [f"On-policy: from the SFT student, {settings['steps']} more steps of off-policy KD (the dataset's answers) "
             f"and as many of on-policy KD (the student's own samples), both {distillation['divergence']}, "
             f"T {distillation['temperature']}, alpha {distillation['alpha']}; sampled metrics on "
             f"{settings['eval_prompts']} held-out prompts, temperature 1:", "",
             "| student | held-out CE | reverse KL on own samples (nats/token) | valid answers | tokens/completion |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['eval_ce']:.4f} | {row['reverse_kl_on_own_samples']:.4f} | "
                     f"{100 * row['valid_answer_share']:.1f}% | {row['mean_completion_tokens']:.2f} |")
    return lines


def build(rebuild: bool) -> dict:
    """Data, tokenizers, teacher and the untrained students, cached under examples/.cache."""
    paths = {name: os.path.join(CACHE, name)
             for name in ("tokenizer", "teacher", "student_init", "tokenizer_b", "llama_init", "llama_b_init")}
    paths.update(train=os.path.join(CACHE, "train.jsonl"), eval=os.path.join(CACHE, "eval.jsonl"))
    done = os.path.join(CACHE, "done.json")
    if not rebuild and os.path.isfile(done) and json.load(open(done)) == demo:
        print(f"using the cached data, tokenizer and teacher in {CACHE} (--rebuild to make them again)")
        return paths
    shutil.rmtree(CACHE, ignore_errors=True)
    start = time.time()
    train_rows = demo_data.make_conversations(demo["train_rows"], seed=0)
    demo_data.write_jsonl(train_rows, paths["train"])
    demo_data.write_jsonl(demo_data.make_conversations(demo["eval_rows"], seed=1_000_003), paths["eval"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in train_rows], paths["tokenizer"],
                              demo["vocab_size"])
    teacher_init = model_folder(os.path.join(CACHE, "teacher_init"), paths["tokenizer"], vocab=demo["vocab_size"],
                                seed=1, hidden_size=demo["teacher"]["hidden_size"],
                                num_hidden_layers=demo["teacher"]["num_hidden_layers"])
    model_folder(paths["student_init"], paths["tokenizer"], vocab=demo["vocab_size"], seed=2,
                 hidden_size=demo["student"]["hidden_size"], num_hidden_layers=demo["student"]["num_hidden_layers"])
    # The hidden-state students: Llama-style, one on the teacher's tokenizer and one on a second tokenizer.
    rows_b = demo_data.make_conversations(demo["tokenizer_b"]["rows"], seed=demo["tokenizer_b"]["seed"])
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows_b], paths["tokenizer_b"],
                              demo["tokenizer_b"]["vocab_size"])
    for name, tokenizer_dir, vocab in (("llama_init", paths["tokenizer"], demo["vocab_size"]),
                                       ("llama_b_init", paths["tokenizer_b"], demo["tokenizer_b"]["vocab_size"])):
        model_folder(paths[name], tokenizer_dir, vocab=vocab, seed=3, kind="llama", **demo["hidden_student"])
    print("training the teacher on all training rows (plain SFT, alpha = 0)")
    teacher_config = run_config("demo-teacher", teacher_init, teacher_init, paths["train"], paths["eval"],
                                demo["train_rows"], demo["teacher"]["epochs"], 32, 3e-3, paths["teacher"], alpha=0.0)
    teacher_config["training"]["eval_strategy"] = "no"  # measured once, after training
    timed(distil_logits.main)(teacher_config)
    json.dump(demo, open(done, "w"))
    PHASE_SECONDS[BUILD] = time.time() - start
    print(f"built data, tokenizer and teacher in {PHASE_SECONDS[BUILD]:.0f} s")
    return paths


def eval_curve(trainer) -> list[tuple[float, float]]:
    return [(log["epoch"], log["eval_ce_loss"]) for log in trainer.state.log_history if "eval_ce_loss" in log]


def plot(curves: dict, lines: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axis.plot(*zip(*curve), marker="o", label=name)
    for (name, value), style in zip(lines.items(), (":", "--")):
        axis.axhline(value, linestyle=style, color="gray", label=f"{name} ({value:.3f})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("held-out cross-entropy (nats/token)")
    axis.set_title(f"Students trained on {demo['student_rows']} rows")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def timed(function):
    """Wrap a script's main so that the demo can report where its time goes."""
    def run(config: dict):
        start = time.time()
        result = function(config)
        PHASE_SECONDS[config["project_name"] + (f" ({config['offline']['mode']})" if config.get("offline", {}).get("mode") else "")] = time.time() - start
        return result
    return run


def full_rows(paths: dict, student_setup: dict, kd, kd_cross_entropy: float) -> dict:
    """--full: the same KD from an offline capture, the Llama students (SFT and hidden-state KD on both tokenizers,
    logit KD across tokenizers) and on-policy vs off-policy KD. Returns their table rows, summary lines, curves and
    the offline and on-policy details for the JSON."""
    top_k = demo["offline_top_k"]
    print(f"capturing the teacher's top-{top_k} once, then training the same KD student from it")
    capture_dir = os.path.join(OUTPUT, "capture")
    shutil.rmtree(capture_dir, ignore_errors=True)
    offline_config = five_evaluations(run_config("demo-kd-offline", output_dir=os.path.join(OUTPUT, "kd_offline"),
                                                 **demo["kd"], **student_setup))
    offline_config["offline"].update(mode="capture", capture_dir=capture_dir, top_k=top_k)
    manifest = timed(distil_logits.main)(offline_config)
    offline_config["offline"]["mode"] = "train"
    kd_offline = timed(distil_logits.main)(offline_config)

    llama_setup = dict(student_setup, student=paths["llama_init"])
    print(f"training a Llama-style student {demo['hidden_student']} on the same rows: SFT, then hidden-state KD "
          f"({demo['hidden']})")
    llama_sft = timed(distil_logits.main)(five_evaluations(run_config(
        "demo-llama-sft", output_dir=os.path.join(OUTPUT, "llama_sft"), alpha=0.0, **llama_setup)))
    llama_hidden = timed(distil_hidden.main)(five_evaluations(run_config(
        "demo-llama-hidden", output_dir=os.path.join(OUTPUT, "llama_hidden"), script=distil_hidden, **demo["hidden"],
        **llama_setup)))
    b_setup = dict(student_setup, student=paths["llama_b_init"])
    print(f"the same two runs with the Llama student on tokenizer B ({demo['tokenizer_b']})")
    timed(distil_logits.main)(five_evaluations(run_config(
        "demo-llama-b-sft", output_dir=os.path.join(OUTPUT, "llama_b_sft"), alpha=0.0, **b_setup)))
    timed(distil_hidden.main)(five_evaluations(run_config(
        "demo-llama-b-hidden", output_dir=os.path.join(OUTPUT, "llama_b_hidden"), script=distil_hidden,
        **demo["hidden"], **b_setup)))
    for method in CROSS_TOKENIZER_ROWS:
        print(f"the Llama student on tokenizer B with logit KD across tokenizers ({method})")
        cross_config = run_config(f"demo-llama-b-{method}", output_dir=os.path.join(OUTPUT, f"llama_b_{method}"),
                                  cross_tokenizer=method, **b_setup)
        cross_config["training"]["eval_strategy"] = "no"
        timed(distil_logits.main)(cross_config)
    print(f"continuing the SFT student for {demo['on_policy']['steps']} steps: on-policy reverse KL vs off-policy KD")
    on_policy_results = on_policy_comparison(paths, os.path.join(OUTPUT, "sft"))
    print(f"continuing the SFT student for {PREFERENCE['steps']} steps of DistiLLM-2 (distil_dpo.py) on built pairs")
    preference_name, preference_ce = preference_row(paths, os.path.join(OUTPUT, "sft"))

    evaluation_start = time.time()
    llama, hidden = demo["hidden_student"], demo["hidden"]
    offline_row = f"student, logit KD from a top-{top_k} capture (teacher not loaded)"
    llama_sft_row = f"Llama student ({llama['hidden_size']} x {llama['num_hidden_layers']}), SFT"
    llama_hidden_row = (f"Llama student, hidden-state KD ({hidden['loss']} on {distil_hidden.resolved_teacher_norm(distil_hidden.config['distillation']['teacher_norm'], True)}"
                        f"-normalised teacher states, {hidden['layer_map']} layer map, alpha {hidden['alpha']})")
    b_sft_row, b_hidden_row = "Llama student on tokenizer B, SFT *", "Llama student on tokenizer B, hidden-state KD *"
    cross_rows = {method: f"Llama student on tokenizer B, logit KD across tokenizers (`{method}`) *"
                  for method in CROSS_TOKENIZER_ROWS}
    rows = {offline_row: heldout_cross_entropy(os.path.join(OUTPUT, "kd_offline"), paths["eval"]),
            llama_sft_row: heldout_cross_entropy(os.path.join(OUTPUT, "llama_sft"), paths["eval"]),
            llama_hidden_row: heldout_cross_entropy(os.path.join(OUTPUT, "llama_hidden"), paths["eval"]),
            preference_name: preference_ce}
    # Tokenizer-B students: the negative log-likelihood of the same assistant text, per teacher-tokenizer token.
    _, teacher_tokens = heldout_nats(paths["teacher"], paths["eval"])
    for name, folder in ((b_sft_row, "llama_b_sft"), (b_hidden_row, "llama_b_hidden"),
                         *((cross_rows[method], f"llama_b_{method}") for method in CROSS_TOKENIZER_ROWS)):
        rows[name] = heldout_nats(os.path.join(OUTPUT, folder), paths["eval"])[0] / teacher_tokens
    PHASE_SECONDS["held-out evaluation (--full rows)"] = time.time() - evaluation_start

    runtime = {name: next(log["train_runtime"] for log in trainer.state.log_history if "train_runtime" in log)
               for name, trainer in (("online", kd), ("offline", kd_offline))}
    offline = {
        "bytes_per_position_record": manifest["record_bytes"],
        "bytes_per_position_on_disk": manifest["bytes_per_position_on_disk"],
        "capture_positions_per_second": manifest["positions_per_second"],
        "training_speedup_offline_over_online": runtime["online"] / runtime["offline"],
        "eval_ce_offline_minus_online_relative": (rows[offline_row] - kd_cross_entropy) / kd_cross_entropy,
    }
    footnote = ("\\* tokenizer B: total nats on the same assistant text divided by its number of teacher-tokenizer "
                "tokens, so the rows compare.")
    summary = [f"- Offline capture: {manifest['record_bytes']} bytes per position per record "
               f"({manifest['bytes_per_position_on_disk']:.1f} on disk with parquet), "
               f"{manifest['positions_per_second']:,.0f} positions/s captured, training "
               f"{offline['training_speedup_offline_over_online']:.2f}x the online speed (both timings vary with the "
               f"machine's load), held-out CE {100 * offline['eval_ce_offline_minus_online_relative']:+.2f}% relative "
               "to online KD."]
    for label, sft_row, kd_row in (("Llama student", llama_sft_row, llama_hidden_row),
                                   ("Llama student on tokenizer B", b_sft_row, b_hidden_row),
                                   *((f"Llama student on tokenizer B, `{method}`", b_sft_row, cross_rows[method])
                                     for method in CROSS_TOKENIZER_ROWS)):
        gap = rows[kd_row] - rows[sft_row]
        summary.append(f"- {'Logit' if 'across' in kd_row else 'Hidden-state'} KD minus SFT ({label}): {gap:+.4f} "
                       f"nats/token ({'KD better' if gap < 0 else 'SFT better or equal'}).")
    return {"rows": rows, "footnote": footnote, "summary": summary + [""] + on_policy_lines(on_policy_results),
            "curves": {"Llama SFT": eval_curve(llama_sft), "Llama hidden KD": eval_curve(llama_hidden)},
            "offline": offline, "on_policy": on_policy_results}


def what_it_does(full: bool) -> str:
    """The run's settings in words: printed before training and written above the table."""
    teacher, student, kd = demo["teacher"], demo["student"], demo["kd"]
    text = (f"{'Full run' if full else 'Default run (--full adds the other rows)'}: a Qwen2-style teacher "
            f"({teacher['hidden_size']} x {teacher['num_hidden_layers']} layers) trained on all {demo['train_rows']:,} "
            f"training rows for {teacher['epochs']} epochs; one student ({student['hidden_size']} x "
            f"{student['num_hidden_layers']}) trained twice from the same initial weights on the same "
            f"{demo['student_rows']} rows for {student['epochs']} epochs (batch 32): plain SFT (alpha 0) and logit KD "
            f"({kd['divergence']}, T {kd['temperature']}, alpha {kd['alpha']})")
    if full:
        text += (f"; the same KD from an offline top-{demo['offline_top_k']} capture; a Llama-style student "
                 f"({demo['hidden_student']['hidden_size']} x {demo['hidden_student']['num_hidden_layers']}) with SFT "
                 f"and with hidden-state KD, on the teacher's tokenizer and on tokenizer B "
                 f"({demo['tokenizer_b']['vocab_size']} tokens, trained on other rows), where it also learns by logit "
                 f"KD across tokenizers ({', '.join(CROSS_TOKENIZER_ROWS)}); on-policy vs off-policy KD from the SFT "
                 f"student; DistiLLM-2 (distil_dpo.py) from the SFT student")
    return text + (f". Held-out cross-entropy on the assistant tokens of {demo['eval_rows']} unseen rows (lower is "
                   "better; per-token CE compares only on the same rendering, and every row renders the same ChatML "
                   "text):")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="every row: also offline KD, the hidden-state and cross-tokenizer students and on-policy")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached data, tokenizer and teacher")
    parser.add_argument("--on-policy-only", action="store_true",
                        help="train the SFT student, then only the on-policy vs off-policy comparison")
    parser.add_argument("--preference-only", action="store_true",
                        help="train the SFT student, then only the preference row (distil_dpo.py distillm2)")
    args = parser.parse_args()
    # One thread: these models are too small to gain from more, and on a busy 2-core machine two OpenMP threads
    # spin-wait for each other and run 10-50x slower.
    torch.set_num_threads(1)
    paths = build(args.rebuild)
    os.makedirs(OUTPUT, exist_ok=True)
    student_setup = dict(teacher=paths["teacher"], student=paths["student_init"], data=paths["train"],
                         eval_data=paths["eval"], rows=demo["student_rows"], epochs=demo["student"]["epochs"],
                         batch=32, learning_rate=7e-3)
    if not (args.on_policy_only or args.preference_only):
        print(what_it_does(args.full))
    print(f"training the SFT student (alpha = 0) on {demo['student_rows']} rows")
    sft = timed(distil_logits.main)(five_evaluations(run_config(
        "demo-sft", output_dir=os.path.join(OUTPUT, "sft"), alpha=0.0, **student_setup)))
    if args.on_policy_only:
        print(f"continuing the SFT student for {demo['on_policy']['steps']} steps: on-policy reverse KL vs off-policy KD")
        on_policy_results = on_policy_comparison(paths, os.path.join(OUTPUT, "sft"))
        print("\n" + "\n".join(on_policy_lines(on_policy_results)))
        json.dump(on_policy_results, open(os.path.join(OUTPUT, "demo_on_policy.json"), "w"), indent=2)
        print(f"seconds per run: {PHASE_SECONDS} ({time.time() - START:.0f} s in all)")
        return
    if args.preference_only:
        name, value = preference_row(paths, os.path.join(OUTPUT, "sft"))
        sft_value = heldout_cross_entropy(os.path.join(OUTPUT, "sft"), paths["eval"])
        print(f"\n| model | held-out CE (nats/token) |\n| --- | --- |\n| student, SFT on {demo['student_rows']} rows | "
              f"{sft_value:.4f} |\n| {name} | {value:.4f} |")
        json.dump({"sft": sft_value, name: value, "seconds_per_phase": PHASE_SECONDS},
                  open(os.path.join(OUTPUT, "demo_preference.json"), "w"), indent=2)
        print(f"seconds per run: {PHASE_SECONDS} ({time.time() - START:.0f} s in all)")
        return
    print(f"training the KD student ({demo['kd']}) from the same initial weights on the same {demo['student_rows']} rows")
    kd = timed(distil_logits.main)(five_evaluations(run_config(
        "demo-kd", output_dir=os.path.join(OUTPUT, "kd"), **demo["kd"], **student_setup)))

    evaluation_start = time.time()
    teacher, student = demo["teacher"], demo["student"]
    teacher_row = (f"teacher ({teacher['hidden_size']} x {teacher['num_hidden_layers']}; all {demo['train_rows']:,} "
                   f"rows, {teacher['epochs']} epochs)")
    sft_row = f"student, SFT on {demo['student_rows']} rows"
    kd_row = f"student, logit KD on {demo['student_rows']} rows"
    rows = {
        teacher_row: heldout_cross_entropy(paths["teacher"], paths["eval"]),
        f"student ({student['hidden_size']} x {student['num_hidden_layers']}), untrained":
            heldout_cross_entropy(paths["student_init"], paths["eval"]),
        sft_row: heldout_cross_entropy(os.path.join(OUTPUT, "sft"), paths["eval"]),
        kd_row: heldout_cross_entropy(os.path.join(OUTPUT, "kd"), paths["eval"]),
    }
    PHASE_SECONDS["held-out evaluation"] = time.time() - evaluation_start
    gap = rows[kd_row] - rows[sft_row]
    headline = (f"Logit KD minus SFT: {gap:+.4f} nats/token ({'KD better' if gap < 0 else 'SFT better or equal'}), "
                f"same student, initial weights, rows and steps.")
    extra = full_rows(paths, student_setup, kd, rows[kd_row]) if args.full else None
    if extra:
        rows.update(extra["rows"])

    students = [name for name in rows if name != teacher_row and "untrained" not in name]
    best = min(students, key=rows.get)
    lines = [what_it_does(args.full), "", "| model | held-out CE (nats/token) |", "| --- | --- |"]
    lines += [f"| {name} | {f'**{value:.4f}**' if name == best else f'{value:.4f}'} |" for name, value in rows.items()]
    lines += ["", extra["footnote"], "", headline, "", *extra["summary"]] if extra else ["", headline]

    suffix = "_full" if args.full else ""
    curves = {"SFT": eval_curve(sft), "logit KD": eval_curve(kd), **(extra["curves"] if extra else {})}
    plot(curves, {"teacher": rows[teacher_row]}, os.path.join(OUTPUT, f"demo_curves{suffix}.png"))
    seconds = time.time() - START
    built = "data, tokenizers and teacher built in this run" if BUILD in PHASE_SECONDS else \
        "data, tokenizers and teacher from examples/.cache"
    # Bitwise the same from run to run on one machine, but CPU kernels (AVX2, AVX-512, ARM) round differently: the line
    # says which ones made the numbers (AVX2 on x86 unless ATEN_CPU_CAPABILITY is set, see the top of this file).
    lines += ["", f"`python examples/demo.py{' --full' if args.full else ''}`, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s ({built}); "
                  f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, "
                  f"torch {torch.__version__}, one thread."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    with open(os.path.join(OUTPUT, f"demo_results{suffix}.md"), "w") as file:
        file.write(table)
    json.dump({"settings": demo, "full": args.full, "eval_cross_entropy": rows, "seconds": seconds,
               "seconds_per_phase": PHASE_SECONDS,
               **({"offline": extra["offline"], "on_policy": extra["on_policy"]} if extra else {})},
              open(os.path.join(OUTPUT, f"demo_results{suffix}.json"), "w"), indent=2)
    print("seconds per phase: " + ", ".join(f"{name} {value:.0f}" for name, value in PHASE_SECONDS.items()))
    print(f"wrote {OUTPUT}/demo_results{suffix}.md, demo_curves{suffix}.png and demo_results{suffix}.json")


if __name__ == "__main__":
    main()
