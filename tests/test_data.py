"""Data handling: labels are exactly the assistant spans (ShareGPT, messages) or every token (text rows), a reply's
first character is trained when a "\n\n" token merges it into the header, the system prompt option, truncation and dropped rows, dataset loading from local files and its errors, and Spectrum
regex freezing."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from common import (
    ConfigError,
    apply_spectrum,
    read_spectrum_patterns,
)
from data import CHATML_TEMPLATE, load_raw_dataset, prepare_datasets, tokenize_row


@pytest.fixture(scope="module")
def tokenizer(assets):
    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def trained_runs(tokenizer, encoded) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


SHAREGPT = {"conversations": [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Pick an animal from the sea."},
    {"from": "gpt", "value": "Shark."},
    {"from": "human", "value": "Another one?"},
    {"from": "gpt", "value": "I would say octopus."},
]}


def test_sharegpt_labels_are_exactly_the_assistant_turns(tokenizer):
    encoded = tokenize_row(SHAREGPT, tokenizer, "sharegpt", 512)
    assert trained_runs(tokenizer, encoded) == ["Shark.<|im_end|>", "I would say octopus.<|im_end|>"]
    text = tokenizer.decode(encoded["input_ids"])
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nPick an animal from the sea.<|im_end|>\n"
        "<|im_start|>assistant\nShark.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n"
        "<|im_start|>assistant\nI would say octopus.<|im_end|>\n"
    )  # no generation prompt after a finished conversation


def test_messages_format_with_multibyte_text(tokenizer):
    row = {"messages": [{"role": "user", "content": "Say something about café and 日本."},
                        {"role": "assistant", "content": "Café au lait is popular in 日本 too."}]}
    encoded = tokenize_row(row, tokenizer, "messages", 512)
    assert trained_runs(tokenizer, encoded) == ["Café au lait is popular in 日本 too.<|im_end|>"]


def test_system_prompt_only_when_asked(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    plain = tokenizer.decode(tokenize_row(row, tokenizer, "sharegpt", 512)["input_ids"])
    assert "system" not in plain
    with_system = tokenize_row(row, tokenizer, "sharegpt", 512, system_prompt="Be kind.")
    assert tokenizer.decode(with_system["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert trained_runs(tokenizer, with_system) == ["Hello<|im_end|>"]


def test_text_rows_train_every_token_and_end_with_eos(tokenizer):
    encoded = tokenize_row({"text": "A cherry is red."}, tokenizer, "text", 512)
    assert encoded["labels"] == encoded["input_ids"]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded["input_ids"][:-1]) == "A cherry is red."


def test_truncation(tokenizer):
    encoded = tokenize_row(SHAREGPT, tokenizer, "sharegpt", 10)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == 10


def test_unknown_role_is_one_clear_error(tokenizer):
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(ConfigError, match="unknown ShareGPT role 'narrator'"):
        tokenize_row(row, tokenizer, "sharegpt", 512)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rows_without_assistant_are_dropped_and_counted(tokenizer, tmp_path, capsys):
    no_answer = {"conversations": [{"from": "human", "value": "Hello?"}]}
    name = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, no_answer, SHAREGPT, no_answer, no_answer])
    train, evaluation, stats = prepare_datasets({"name": name, "seed": 0, "eval_size": 1}, tokenizer, 512)
    assert stats["dropped"] == 3 and len(train) == 1 and len(evaluation) == 1
    assert "dropped 3 of 5 rows of" in capsys.readouterr().out


def test_no_row_left_is_an_error(tokenizer, tmp_path):
    name = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "Hello?"}]}])
    with pytest.raises(ConfigError, match="no row .* has a trainable token"):
        prepare_datasets({"name": name, "seed": 0}, tokenizer, 512)


def test_max_length_too_small_for_any_assistant_token(tokenizer, tmp_path):
    name = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    with pytest.raises(ConfigError, match="max_length=8"):
        prepare_datasets({"name": name, "seed": 0}, tokenizer, 8)


def test_shuffle_subsample_and_eval_split_are_seeded(tokenizer, tmp_path):
    rows = [{"text": f"row number {i}"} for i in range(20)]
    name = write_jsonl(tmp_path / "d.jsonl", rows)
    config = {"name": name, "seed": 3, "num_samples": 10, "eval_size": 0.2}
    first = prepare_datasets(config, tokenizer, 64)
    second = prepare_datasets(config, tokenizer, 64)
    assert len(first[0]) == 8 and len(first[1]) == 2
    assert first[0]["input_ids"] == second[0]["input_ids"] and first[1]["input_ids"] == second[1]["input_ids"]
    assert set(map(tuple, first[0]["input_ids"])).isdisjoint(map(tuple, first[1]["input_ids"]))


@pytest.mark.parametrize("writer", ["parquet", "save_to_disk"])
def test_local_parquet_and_saved_dataset_folders_load(tmp_path, writer):
    from datasets import Dataset

    dataset = Dataset.from_list([SHAREGPT, SHAREGPT])
    if writer == "parquet":
        path = str(tmp_path / "d.parquet")
        dataset.to_parquet(path)
    else:
        path = str(tmp_path / "saved")
        dataset.save_to_disk(path)
    assert load_raw_dataset(path)["conversations"][0][2]["value"] == "Shark."


def test_missing_file_and_unknown_format(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_raw_dataset(str(tmp_path / "missing.jsonl"))
    name = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match="none of the columns"):
        prepare_datasets({"name": name, "seed": 0}, tokenizer, 64)
    with pytest.raises(ConfigError, match="dataset.format 'alpaca' is unknown"):
        prepare_datasets({"name": name, "seed": 0, "format": "alpaca"}, tokenizer, 64)


def test_spectrum_freezes_everything_but_the_matches(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=3, num_attention_heads=2,
                                                         num_key_value_heads=1))
    spec = tmp_path / "spectrum.yaml"
    spec.write_text("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.layers.1.mlp.down_proj.weight$\n"
                    "- model.layers.2.self_attn.(q|k)_proj\n")
    trainable, total = apply_spectrum(model, read_spectrum_patterns(str(spec)))
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert names == {"lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                     "model.layers.2.self_attn.q_proj.bias", "model.layers.2.self_attn.k_proj.weight",
                     "model.layers.2.self_attn.k_proj.bias"}
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names) and total > trainable


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("unfrozen_parameters: [", "not valid YAML"),
    ("something_else: 1\n", "must hold 'unfrozen_parameters'"),
    ("unfrozen_parameters:\n- '(unclosed'\n", "invalid regex"),
])
def test_spectrum_file_errors(tmp_path, content, message):
    path = tmp_path / "spectrum.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_spectrum_patterns(str(path))


def test_spectrum_matching_nothing_is_an_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="no parameter name matches"):
        apply_spectrum(model, ["^model.layers.99"])


def test_reply_starting_with_a_newline_trains_its_first_character(tmp_path):
    """Qwen2's BPE has a "\n\n" token: "<|im_start|>assistant\n" + "\nAnswer" puts the header's newline and the reply's
    first character into one token that starts before the assistant span. Tokens are labelled by where they end,
    so that token is trained and no header token is."""
    from demo_data import render_chatml, train_tokenizer

    texts = [render_chatml([{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"\nAnswer {i}.\n\nMore."}])
             for i in range(50)]
    train_tokenizer(texts, str(tmp_path), vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = CHATML_TEMPLATE
    assert len(tok("\n\n")["input_ids"]) == 1  # the tokenizer has the merged token
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "\nAnswer 7."}]}
    encoded = tokenize_row(row, tok, "sharegpt", 64)
    tokens = [tok.decode([token]) for token in encoded["input_ids"]]
    merged = tokens.index("\n\n")  # "assistant" + "\n\n": the header's newline and the reply's first character
    assert tokens[merged - 1] == "assistant"
    assert encoded["labels"][merged] == encoded["input_ids"][merged]
    assert all(label == -100 for label in encoded["labels"][:merged])  # the header and the user turn
    assert trained_runs(tok, encoded) == ["\n\nAnswer 7.<|im_end|>"]  # the merged token, the reply, end of turn


@pytest.fixture(scope="module")
def larger_student(assets, tmp_path_factory):
    """The tiny student with one more token than the teacher's tokenizer at its end (as Qwen2.5's tool tokens against
    a Qwen2 teacher), and a dataset of 70 rows whose last alone uses it: beyond the 64 rows on which the tokenizers'
    identity is checked, so that the run gets as far as reading the data."""
    from conftest import CONVERSATIONS, _tiny_model

    root = tmp_path_factory.mktemp("larger_student")
    folder = _tiny_model(str(root / "student"), assets["tokenizer"], "qwen2", 32, 2, assets["vocab"] + 64, seed=2)
    student_tokenizer = AutoTokenizer.from_pretrained(folder)
    student_tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    student_tokenizer.save_pretrained(folder)
    assert len(student_tokenizer) == assets["vocab"] + 1
    rows = [CONVERSATIONS[index % len(CONVERSATIONS)] for index in range(69)]
    rows.append({"conversations": [{"from": "human", "value": "Call the weather tool."},
                                   {"from": "gpt", "value": "<tool_call> weather"}]})
    data = root / "tool.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, str(data)


@pytest.mark.parametrize("mode", [None, "capture"])
def test_student_ids_beyond_the_teachers_tokenizer_are_refused_before_loading(assets, larger_student, tmp_path,
                                                                              monkeypatch, mode):
    """The teacher would read id 'vocab' (untrained padding in its embedding) for <tool_call>: one line naming the
    token and the fix, before any model loads or anything is written, in training and in an offline capture."""
    import distil_logits
    import offline
    from conftest import tiny_config

    student, data = larger_student
    config = tiny_config(assets, str(tmp_path / "out"), student=student)
    config["dataset"].update(name=data, eval_size=0)
    config["offline"].update(mode=mode, capture_dir=str(tmp_path / "capture"))
    monkeypatch.setattr(distil_logits, "load_causal_lm", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    monkeypatch.setattr(offline, "load_capture_teacher", lambda *args, **kwargs: pytest.fail("a model was loaded"),
                        raising=False)
    with pytest.raises(ConfigError, match=rf"the train data holds 1 token\(s\) with ids >= {assets['vocab']}, the "
                                          rf"teacher tokenizer's size \(first in row \d+ of the shuffled split; largest id {assets['vocab']}, "
                                          r"'<tool_call>'\).*distillation.cross_tokenizer"):
        distil_logits.main(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "capture").exists()


def test_ids_below_the_teachers_size_pass(assets, tokenizer):
    from datasets import Dataset

    from data import check_ids_below

    splits = {"train": Dataset.from_dict({"input_ids": [[1, 2, 3], [], [assets["vocab"] - 1]]})}
    check_ids_below(splits, assets["vocab"], tokenizer)
    with pytest.raises(ConfigError, match=r"first in row 2 of the shuffled split; largest id"):
        check_ids_below(splits, assets["vocab"] - 1, tokenizer)
