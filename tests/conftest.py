"""Shared fixtures: a tokenizer trained in-process, tiny Qwen2/Llama models built from config classes, a handful of
ShareGPT conversations, and (slow tests only) a real vLLM server of a tiny model (`served`, tests/vllm_server.py).
Nothing touches the network."""

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "Name a fruit that is red."},
                       {"from": "gpt", "value": "A cherry is red."}]},
    {"conversations": [{"from": "system", "value": "You are terse."},
                       {"from": "human", "value": "Pick an animal from the sea."},
                       {"from": "gpt", "value": "Shark."},
                       {"from": "human", "value": "Another one?"},
                       {"from": "gpt", "value": "I would say octopus."}]},
    {"conversations": [{"from": "human", "value": "Give a word that rhymes with cat."},
                       {"from": "gpt", "value": "Hat rhymes with cat."}]},
    {"conversations": [{"from": "user", "value": "Say something about café and 日本."},
                       {"from": "assistant", "value": "Café au lait is popular in 日本 too."}]},
] * 4


def _train_tokenizer(out_dir: str) -> None:
    """The demo's tokenizer recipe (byte-level BPE that round-trips next to a qwen2 config) on these conversations."""
    from demo_data import render_chatml, train_tokenizer

    texts = [render_chatml(row["conversations"]) for row in CONVERSATIONS]
    train_tokenizer(texts * 5, out_dir, vocab_size=320)


def _tiny_model(out_dir: str, tokenizer_dir: str, kind: str, hidden: int, layers: int, vocab: int, seed: int) -> str:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    model_config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config)
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Paths of: tokenizer, teacher (qwen2, hidden 64, 3 layers, vocab padded to 384), student (qwen2, hidden 32,
    2 layers, vocab 320), and a ShareGPT jsonl file."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer_dir = str(root / "tokenizer")
    _train_tokenizer(tokenizer_dir)
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
    return {
        "tokenizer": tokenizer_dir,
        "vocab": size,
        # Padded to a multiple of 64, as real model families do (151936 vs 152064 in Qwen2).
        "teacher": _tiny_model(str(root / "teacher"), tokenizer_dir, "qwen2", 64, 3, 384, seed=1),
        "student": _tiny_model(str(root / "student"), tokenizer_dir, "qwen2", 32, 2, size, seed=2),
        "data": str(data),
    }


@pytest.fixture(scope="session")
def vllm_env():
    """.venv-vllm built by serve_teacher.sh (once; later runs find it installed)."""
    import subprocess
    import time

    start = time.monotonic()
    result = subprocess.run(["bash", "scripts/serve_teacher.sh"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "SERVE_TEACHER_INSTALL_ONLY": "1"}, timeout=3600)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        # In CI (.ci/run sets CI) the vLLM tests must run against a real server: a failed build fails them.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f".venv-vllm could not be built by scripts/serve_teacher.sh: {last[0]}")
    print(f".venv-vllm ready in {time.monotonic() - start:.0f} s")


@pytest.fixture(scope="session")
def served(vllm_env, assets, tmp_path_factory):
    """A server as a user starts it (serve_teacher.sh's defaults), and the model and tokenizer it serves."""
    from transformers import AutoTokenizer
    from vllm_server import Server, make_served_model

    root = tmp_path_factory.mktemp("served")
    model = make_served_model(str(root / "teacher"), assets["tokenizer"], assets["vocab"])
    server = Server(model, str(root / "server.log"))
    yield {"server": server, "url": server.url, "model": model, "tokenizer": AutoTokenizer.from_pretrained(model),
           "vocab": assets["vocab"]}
    server.stop()



def tiny_config(assets: dict, output_dir: str, script=None, student: str | None = None, **distillation) -> dict:
    """The config of `script` (default distil_logits) pointed at the tiny assets, with a few CPU steps."""
    import copy

    import distil_logits

    config = copy.deepcopy((script or distil_logits).config)
    config["dataset"].update(name=assets["data"], eval_size=4, seed=0)
    config["models"].update(teacher=assets["teacher"], student=student or assets["student"])
    config["tokenizer"]["max_length"] = 64
    config["model_config"]["use_flash_attention"] = False
    config["distillation"].update(distillation)
    config["training"].update(
        output_dir=output_dir, num_train_epochs=1, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.0, activation_checkpointing=False,
        eval_steps=2, save_steps=2, logging_steps=1, dataloader_num_workers=0,
        bf16=False,  # float32 unless a test asks for bf16 autocast (tests/test_precision.py)
    )
    return config


def watch_output_heads(script, monkeypatch) -> list:
    """Shapes of every output-head call of the models that `script.load_causal_lm` loads from now on."""
    calls = []
    original = script.load_causal_lm

    def load_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
        return model

    monkeypatch.setattr(script, "load_causal_lm", load_and_watch)
    return calls
