"""The chat template a run renders with: by default the tokenizer's own (a Llama-3-style tokenizer renders with its
<|eot_id|>, not ChatML), the saved student's generation_config stops at that template's end-of-turn token, a
template whose turn markers are not single special tokens of the tokenizer (ChatML on a tokenizer without
<|im_start|> and <|im_end|>) is refused in one line in every mode before anything is written, and a tokenizer
without a template is told how to get one."""

import json
import os
import shutil

import pytest
from conftest import CONVERSATIONS, _tiny_model, tiny_config
from transformers import AutoTokenizer, GenerationConfig

import distil_hidden
import distil_logits
from common import ConfigError
from data import CHATML_TEMPLATE, end_of_turn_id, turn_marker_problems

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def train_llama3_tokenizer(out_dir: str) -> None:
    """A byte-level BPE with Llama 3's special tokens and its own Llama-3-style template (no <|im_start|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["<|begin_of_text|>" + "".join(f"<|start_header_id|>{turn['from']}<|end_header_id|>\n\n{turn['value']}"
                                           "<|eot_id|>" for turn in row["conversations"]) for row in CONVERSATIONS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                            bos_token="<|begin_of_text|>", extra_special_tokens=LLAMA3_SPECIALS[2:],
                            chat_template=LLAMA3_TEMPLATE).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A Llama-3-style tokenizer, and a tiny Llama student and teacher on it (eos_token_id 0: <|end_of_text|>)."""
    root = tmp_path_factory.mktemp("llama3")
    train_llama3_tokenizer(str(root / "tokenizer"))
    size = len(AutoTokenizer.from_pretrained(str(root / "tokenizer")))
    return {"tokenizer": str(root / "tokenizer"),
            "student": _tiny_model(str(root / "student"), str(root / "tokenizer"), "llama", 32, 2, size, seed=4),
            "teacher": _tiny_model(str(root / "teacher"), str(root / "tokenizer"), "llama", 64, 2, size, seed=5)}


def test_the_default_is_the_tokenizers_own_template_and_the_saved_student_stops_at_its_end_of_turn(assets, llama3,
                                                                                                    tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"), student=llama3["student"], alpha=0.0)  # SFT: no teacher
    config["dataset"]["eval_size"] = 0
    config["training"].update(max_steps=1, save_strategy="no")
    trainer = distil_logits.main(config)
    tokenizer = AutoTokenizer.from_pretrained(llama3["tokenizer"])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    row = trainer.train_dataset[0]
    text = tokenizer.decode(row["input_ids"])
    assert "<|start_header_id|>assistant<|end_header_id|>" in text and "<|eot_id|>" in text
    assert "im_start" not in text and "im_end" not in text
    trained = [token for token in row["labels"] if token != -100]
    assert trained[-1] == eot and row["labels"].count(eot) == text.count("<|start_header_id|>assistant")
    out = config["training"]["output_dir"]
    assert AutoTokenizer.from_pretrained(out).chat_template == LLAMA3_TEMPLATE
    # The checkpoint's generation_config stops at <|end_of_text|> (0) only; the saved student stops at <|eot_id|> too.
    assert GenerationConfig.from_pretrained(llama3["student"]).eos_token_id == 0
    assert GenerationConfig.from_pretrained(out).eos_token_id == [0, eot]


def refused_config(assets, llama3, tmp_path, mode):
    """A config in `mode` whose ChatML template (given as Jinja text, as 122d9b0's default was) meets the
    Llama-3-style tokenizer: the student's (and its teacher's) in every mode but cross, where it is the teacher's.
    Without the check each of these configs would run (122d9b0 trained them)."""
    script = distil_hidden if mode == "hidden" else distil_logits
    config = tiny_config(assets, str(tmp_path / "out"), script, student=llama3["student"])
    config["models"]["teacher"] = llama3["teacher"]
    config["tokenizer"]["chat_template"] = CHATML_TEMPLATE
    if mode == "cross":
        config["models"].update(student=assets["student"], teacher=llama3["student"])
        config["tokenizer"].update(chat_template=None, teacher_chat_template=CHATML_TEMPLATE)
        config["distillation"]["cross_tokenizer"] = "hybrid"
    elif mode == "capture":
        config["offline"].update(mode=mode, capture_dir=str(tmp_path / "capture"), top_k=16)
    elif mode == "on_policy":
        config["on_policy"].update(fraction=1.0, max_new_tokens=4)
    return config


@pytest.mark.parametrize("mode", ["logits", "hidden", "cross", "capture", "on_policy"])
def test_chatml_on_a_tokenizer_without_its_tokens_is_refused_in_one_line(assets, llama3, tmp_path, mode):
    config = refused_config(assets, llama3, tmp_path, mode)
    script = distil_hidden if mode == "hidden" else distil_logits
    key = "tokenizer.teacher_chat_template" if mode == "cross" else "tokenizer.chat_template"
    with pytest.raises(ConfigError) as error:
        script.main(config)
    message = str(error.value)
    assert "\n" not in message
    assert f"tokenizer '{llama3['student']}'" in message and f"Set {key} to null (its own template), or a Jinja" in message
    assert "'<|im_end|>' (" in message and "'<|im_start|>' (" in message and "<|eot_id|>" in message
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "capture")


def test_chatml_by_name_fits_a_tokenizer_that_has_its_tokens(assets, llama3, tmp_path):
    from common import load_tokenizer

    tokenizer = load_tokenizer(assets["student"], "chatml", "tokenizer.chat_template")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
    with pytest.raises(ConfigError, match=r"'<\|im_end\|>' \(\d+ tokens\)"):
        load_tokenizer(llama3["student"], "chatml", "tokenizer.chat_template")
    with pytest.raises(ConfigError, match="neither a known name"):
        load_tokenizer(assets["student"], "llama3", "tokenizer.chat_template")


def test_opening_markers_must_be_special_tokens_unless_the_template_is_the_tokenizers_own(assets, llama3):
    """A Zephyr-style template writes <|user|> and <|assistant|> as ordinary text: accepted as a tokenizer's own
    (its model was trained on it), refused when a config sets it. The end of turn must be one special token always."""
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tokenizer.chat_template = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
                               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    assert turn_marker_problems(tokenizer, own_template=True) == []
    problems = turn_marker_problems(tokenizer, own_template=False)
    assert [problem.split(" (")[0] for problem in problems] == ["'<|user|>'", "'<|assistant|>'"]
    tokenizer.chat_template = LLAMA3_TEMPLATE  # on the ChatML tokenizer: <|eot_id|> is plain text there
    assert turn_marker_problems(tokenizer, own_template=True)[0].startswith("'<|eot_id|>' (")
    llama = AutoTokenizer.from_pretrained(llama3["tokenizer"])
    assert turn_marker_problems(llama, own_template=False) == []


@pytest.mark.parametrize("which", ["chatml_tokens", "llama3"])
def test_a_tokenizer_without_a_template_is_told_the_fix(assets, llama3, tmp_path, which):
    source = assets["student"] if which == "chatml_tokens" else llama3["student"]
    student = str(tmp_path / "student")
    shutil.copytree(source, student, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special*"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(student)
    assert not AutoTokenizer.from_pretrained(student).chat_template
    config = tiny_config(assets, str(tmp_path / "out"), student=student, alpha=0.0)
    with pytest.raises(ConfigError) as error:
        distil_logits.main(config)
    message = str(error.value)
    assert "\n" not in message and "has no chat template" in message
    if which == "chatml_tokens":
        assert "Set tokenizer.chat_template: chatml" in message
    else:
        assert "chatml does not fit it" in message
    assert not os.path.exists(tmp_path / "out")
    # Text rows need no template.
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"A fox naps {i}."}) + "\n" for i in range(8)))
    config["dataset"]["name"] = str(text)
    config["training"].update(max_steps=1, save_strategy="no", eval_strategy="no")
    config["dataset"]["eval_size"] = 0
    distil_logits.main(config)
