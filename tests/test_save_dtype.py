"""The finished student is saved in its checkpoint's own dtype (the one its config.json names), or in
training.save_dtype, not in the float32 of its master weights: a bf16 student comes back bf16, the trained weights
rounded once, and loads with from_pretrained; an unknown save_dtype is refused before anything is written."""

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distil_logits
from common import ConfigError


def saved(output_dir: str) -> tuple[dict, str]:
    with open(os.path.join(output_dir, "config.json")) as handle:
        return load_file(os.path.join(output_dir, "model.safetensors")), json.load(handle)["dtype"]


def test_bf16_checkpoint_is_saved_in_bf16(assets, tmp_path):
    student = tmp_path / "bf16_student"
    AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.bfloat16).save_pretrained(student)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), student)
    config = tiny_config(assets, str(tmp_path / "out"), student=str(student))
    config["training"].update(max_steps=1, save_strategy="no", eval_strategy="no")
    trainer = distil_logits.main(config)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # trained on float32 master weights
    tensors, dtype = saved(config["training"]["output_dir"])
    assert dtype == "bfloat16"
    trained = trainer.model.state_dict()
    for name, value in tensors.items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, trained[name].to(torch.bfloat16)), name
    reloaded = AutoModelForCausalLM.from_pretrained(config["training"]["output_dir"])
    assert reloaded.dtype == torch.bfloat16


def test_save_dtype_overrides_the_checkpoint_dtype(assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"))  # a float32 student
    config["training"].update(max_steps=1, save_strategy="no", eval_strategy="no", save_dtype="float16")
    trainer = distil_logits.main(config)
    tensors, dtype = saved(config["training"]["output_dir"])
    assert dtype == "float16" and {value.dtype for value in tensors.values()} == {torch.float16}
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[name].to(torch.float16)) for name, value in tensors.items())


def test_unknown_save_dtype_is_refused_before_writing(assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"))
    config["training"]["save_dtype"] = "int8"
    with pytest.raises(ConfigError, match="training.save_dtype must be null"):
        distil_logits.main(config)
    assert not os.path.exists(config["training"]["output_dir"])
