"""Fingerprint of short plain-SGD runs: sha256 of the saved weights after a fixed config, for checking that a
refactoring changed no arithmetic (compare the output before and after; it must be identical, bit for bit).

    python scripts/weights_fingerprint.py            # prints one line per run: name, sha256 of the saved tensors
    python scripts/weights_fingerprint.py --json out.json

Runs (tiny models and data built in-process, the test suite's recipe, CPU, one thread, float32):
logits forward_kl / reverse_kl / jsd at T=2; SFT (alpha 0); offline capture then training from it; on-policy
(fraction 0.5 and 1, reverse KL at T=1, so sampled and dataset micro-batches both occur); logit KD across tokenizers
(cross_tokenizer uld and hybrid, a teacher on another tokenizer); hidden-state distillation with a shared tokenizer
plus the logit term, and across two tokenizers. Each is 2 SGD steps of 2 accumulated micro-batches, so accumulation
and normalisation are exercised too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tensors_digest(folder: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of every .safetensors file in `folder`, in name order."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(folder, name))
            for key in sorted(tensors):
                tensor = tensors[key].contiguous()
                digest.update(f"{name}:{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def sgd(config: dict, output_dir: str) -> dict:
    config["training"].update(output_dir=output_dir, max_steps=2, optim="sgd", learning_rate=0.05, eval_strategy="no",
                              save_strategy="no", lr_scheduler_type="constant", weight_decay=0.0,
                              bf16=False)  # float32: bf16 is honoured on the CPU now
    config["dataset"]["eval_size"] = 0
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the fingerprints to this file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from conftest import CONVERSATIONS, _tiny_model, _train_tokenizer, tiny_config
    from demo_data import render_chatml, train_tokenizer
    from transformers import AutoTokenizer

    import distil_hidden
    import distil_logits

    results = {}
    with tempfile.TemporaryDirectory() as root:
        tokenizer_dir = os.path.join(root, "tokenizer")
        _train_tokenizer(tokenizer_dir)
        size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        data = os.path.join(root, "chat.jsonl")
        with open(data, "w") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
        assets = {
            "tokenizer": tokenizer_dir, "vocab": size, "data": data,
            "teacher": _tiny_model(os.path.join(root, "teacher"), tokenizer_dir, "qwen2", 64, 3, 384, seed=1),
            "student": _tiny_model(os.path.join(root, "student"), tokenizer_dir, "qwen2", 32, 2, size, seed=2),
        }
        texts = [render_chatml(row["conversations"]) for row in CONVERSATIONS[:2]] * 3 + ["A lazy fox naps near 日本 cafés."] * 5
        train_tokenizer(texts, os.path.join(root, "tokenizer_b"), vocab_size=290)
        size_b = len(AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer_b")))
        student_b = _tiny_model(os.path.join(root, "student_b"), os.path.join(root, "tokenizer_b"), "llama", 48, 2, size_b, seed=3)
        student_a = _tiny_model(os.path.join(root, "student_a"), tokenizer_dir, "llama", 48, 2, size, seed=3)

        def run(name: str, script, config: dict) -> None:
            out = os.path.join(root, name)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                script.main(sgd(config, out))
            results[name] = tensors_digest(out)
            print(f"{name:24s} {results[name]}", flush=True)

        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            run(f"logits_{divergence}", distil_logits, tiny_config(assets, "", temperature=2.0, alpha=0.5,
                                                                    divergence=divergence))
        run("logits_sft", distil_logits, tiny_config(assets, "", alpha=0.0))
        capture = tiny_config(assets, "", temperature=2.0, alpha=0.7)
        capture["dataset"]["eval_size"] = 0
        capture["offline"].update(mode="capture", capture_dir=os.path.join(root, "capture"), top_k=16)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            distil_logits.main(capture)
        offline = copy.deepcopy(capture)
        offline["offline"]["mode"] = "train"
        run("logits_offline", distil_logits, offline)

        for fraction in (0.5, 1.0):
            on_policy = tiny_config(assets, "", temperature=1.0, alpha=0.5, divergence="reverse_kl")
            on_policy["on_policy"].update(fraction=fraction, max_new_tokens=8)
            run(f"logits_on_policy_{fraction:g}", distil_logits, on_policy)

        # A teacher on its own tokenizer (tokenizer B below), as tests/test_cross_tokenizer.py builds it.
        teacher_b = _tiny_model(os.path.join(root, "teacher_b"), os.path.join(root, "tokenizer_b"), "qwen2", 64, 3, 320,
                                seed=1)
        for method in ("uld", "hybrid"):
            run(f"logits_cross_{method}", distil_logits,
                tiny_config({**assets, "teacher": teacher_b}, "", temperature=2.0, alpha=0.5, cross_tokenizer=method))

        def hidden(student: str, **distillation) -> dict:
            config = copy.deepcopy(distil_hidden.config)
            config["dataset"].update(name=data, seed=0)
            config["models"].update(teacher=assets["teacher"], student=student)
            config["tokenizer"]["max_length"] = 64
            config["model_config"]["use_flash_attention"] = False
            config["distillation"].update(distillation)
            config["training"].update(num_train_epochs=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                      warmup_ratio=0.0, activation_checkpointing=False, logging_steps=1,
                                      dataloader_num_workers=0)
            return config

        run("hidden_shared_kd", distil_hidden, hidden(student_a, kd_weight=0.3))
        run("hidden_cross_tokenizer", distil_hidden, hidden(student_b))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
