"""Same-tokenizer identity is judged by the ids both tokenizers give for the same text (the dataset's rows and a few
probe texts), not by their configs: a Qwen2 student holding a byte-identical copy of a Llama teacher's
tokenizer.json, which transformers 5 loads as Qwen2Tokenizer with an added NFC normaliser, distils as the same
tokenizer; a normaliser that does change ids (NFKC) is refused with each side's class and normaliser named."""

import json
import os
import shutil

import pytest
from conftest import _tiny_model, tiny_config

import distil_logits
from alignment import shared_vocab_size
from common import ConfigError, load_tokenizer
from data import rendered_texts


def with_normaliser(source: str, folder: str, normaliser: dict | None) -> str:
    """A copy of the model folder `source` whose tokenizer.json has `normaliser`."""
    shutil.copytree(source, folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as handle:
        definition = json.load(handle)
    definition["normalizer"] = normaliser
    with open(path, "w") as handle:
        json.dump(definition, handle)
    return folder


def normaliser(tokenizer) -> dict | None:
    return json.loads(tokenizer.backend_tokenizer.to_str())["normalizer"]


@pytest.fixture(scope="module")
def llama_teacher(assets, tmp_path_factory):
    """A Llama teacher over the tests' tokenizer (next to a Llama config it loads with its own class)."""
    folder = tmp_path_factory.mktemp("llama_teacher")
    return _tiny_model(str(folder / "model"), assets["tokenizer"], "llama", 32, 2, 384, seed=4)


def test_copied_tokenizer_json_next_to_a_qwen2_config_is_the_same_tokenizer(assets, llama_teacher, tmp_path):
    teacher = with_normaliser(llama_teacher, str(tmp_path / "teacher"), None)
    student = with_normaliser(assets["student"], str(tmp_path / "student"), None)  # byte-identical tokenizer.json
    with open(os.path.join(teacher, "tokenizer.json"), "rb") as a, open(os.path.join(student, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    teacher_tokenizer, student_tokenizer = load_tokenizer(teacher), load_tokenizer(student)
    # What transformers 5 makes of the same file: the configs differ, the ids on NFC text do not.
    assert (type(teacher_tokenizer).__name__, normaliser(teacher_tokenizer)) == ("TokenizersBackend", None)
    assert (type(student_tokenizer).__name__, normaliser(student_tokenizer)) == ("Qwen2Tokenizer", {"type": "NFC"})
    texts = rendered_texts({"name": assets["data"]}, student_tokenizer)
    assert shared_vocab_size(teacher_tokenizer, student_tokenizer, texts) == len(student_tokenizer)
    config = tiny_config(assets, str(tmp_path / "out"), student=student)
    config["models"]["teacher"] = teacher
    config["training"].update(max_steps=1, save_strategy="no", eval_strategy="no")
    trainer = distil_logits.main(config)
    assert trainer.vocab_size == len(student_tokenizer)
    assert any(log.get("kd_loss", 0) > 0 for log in trainer.state.log_history)


def test_a_normaliser_that_changes_ids_is_refused_naming_both_sides(assets, llama_teacher, tmp_path):
    teacher = with_normaliser(llama_teacher, str(tmp_path / "teacher"), {"type": "NFKC"})
    config = tiny_config(assets, str(tmp_path / "out"))
    config["models"]["teacher"] = teacher
    message = (r"do not give the same ids for the same text: their normalisers differ; e\.g\. a probe text .* \(teacher: "
               r"TokenizersBackend, normaliser NFKC; student: Qwen2Tokenizer, normaliser NFC\)")
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not os.path.exists(config["training"]["output_dir"])
