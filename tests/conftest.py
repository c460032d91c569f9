"""Shared fixtures: a tokenizer trained in-process, tiny Qwen2/Llama models built from config classes, and a handful
of ShareGPT conversations. Nothing touches the network."""

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from common import CHATML_TEMPLATE

    texts = []
    for row in CONVERSATIONS:
        for turn in row["conversations"]:
            texts.append(f"<|im_start|>{turn['from']}\n{turn['value']}<|im_end|>\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    fast.save_pretrained(out_dir)


def _tiny_model(out_dir: str, tokenizer_dir: str, kind: str, hidden: int, layers: int, vocab: int, seed: int) -> str:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    model_config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=2, pad_token_id=0, bos_token_id=None,
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


def tiny_config(assets: dict, output_dir: str, **distillation) -> dict:
    """distil_logits.config pointed at the tiny assets, with a few CPU steps."""
    import copy

    import distil_logits

    config = copy.deepcopy(distil_logits.config)
    config["dataset"].update(name=assets["data"], eval_size=4, seed=0)
    config["models"].update(teacher=assets["teacher"], student=assets["student"])
    config["tokenizer"]["max_length"] = 64
    config["model_config"]["use_flash_attention"] = False
    config["distillation"].update(distillation)
    config["training"].update(
        output_dir=output_dir, num_train_epochs=1, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.0, activation_checkpointing=False,
        eval_steps=2, save_steps=2, logging_steps=1, dataloader_num_workers=0,
    )
    return config
