"""N, the optimizer step's count of trained positions that both scripts divide their losses by, is the Trainer's
`num_items_in_batch`. transformers 5.23 counts `labels[..., 1:]` only for models whose class name it maps to
ForCausalLM; for others (GPT2LMHeadModel: loss_type None) it counts every label, one per text row too many, since
a text row trains its first token as a label. N must equal the shifted `next_token_mask` count whatever the model."""

import json
import os
import shutil

import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, GPT2Config

import pytest

import distil_hidden
import distil_logits
from data import next_token_mask


def gpt2_student(assets, folder) -> str:
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=assets["vocab"], n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, tie_word_embeddings=False))
    assert model.loss_type is None  # the case the Trainer's counting rule misses
    model.save_pretrained(folder)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), folder)
    return str(folder)


@pytest.mark.parametrize("script", [distil_logits, distil_hidden], ids=["distil_logits", "distil_hidden"])
def test_n_equals_the_shifted_label_count_for_text_rows(assets, tmp_path, monkeypatch, script):
    """SFT (alpha 0) of a GPT-2 student on text rows, 2 accumulated micro-batches of 2: N, passed to every
    micro-batch, is the sum of their shifted label counts."""
    rows = tmp_path / "text.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Row {index} says something about the sea and a cat."}) + "\n"
                            for index in range(8)))
    config = tiny_config(assets, str(tmp_path / "out"), script, gpt2_student(assets, tmp_path / "gpt2"), alpha=0.0)
    config["dataset"].update(name=str(rows), format="text", eval_size=0)
    config["training"].update(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                              save_strategy="no", eval_strategy="no")
    seen = []
    trainer_class = script.LogitsTrainer if script is distil_logits else script.HiddenStatesTrainer
    compute_loss = trainer_class.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append((int(num_items_in_batch), int(next_token_mask(inputs["labels"]).sum())))
        return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(trainer_class, "compute_loss", recording)
    script.main(config)
    assert len(seen) == 2 and seen[0][0] == seen[1][0]
    assert seen[0][0] == seen[0][1] + seen[1][1], seen
