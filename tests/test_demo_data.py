"""Tests for examples/demo_data.py, the offline demo's data and tokenizer.

Covers: determinism of make_conversations and the seed-independence of the
ground-truth answer distributions; the ShareGPT row shape (every row has a gpt
turn, some rows are multi-turn or carry a system turn); that sampled answers
follow true_answer_distribution; write_jsonl round trip; and the saved
tokenizer: AutoTokenizer reloads it with identical ids and offsets from a
folder that also holds a qwen2 or a llama config.json (transformers 5 rebuilds
tokenizers for some model types), offsets that index the original text for
multi-byte characters, and a chat template that matches render_chatml.

Run: HF_HUB_OFFLINE=1 python3 -m pytest -q tests/test_demo_data.py
"""

import collections
import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import demo_data  # noqa: E402

ROLES = {"system", "human", "gpt"}

# Strings that exercise specials, newlines, punctuation, digits, contractions,
# composed and decomposed accents and CJK; the byte-level pipelines of
# different tokenizer classes disagree on several of these.
PROBE_STRINGS = [
    "<|im_start|>system\nKeep answers short.<|im_end|>\n<|im_start|>user\nName a flower.<|im_end|>\n"
    "<|im_start|>assistant\nI would say tulip.<|im_end|>\n<|endoftext|>",
    "Hi.\nOK?! 12345 cats, don't they're \"quoted\" (x) -- end\n\n\tz",
    "café au lait, cafe\u0301, naïve",
    "日本 and 日本語!",
    "  leading spaces and trailing  ",
]


# --------------------------------------------------------------------------- data


def test_make_conversations_is_deterministic():
    a = demo_data.make_conversations(200, seed=7)
    assert a == demo_data.make_conversations(200, seed=7)
    assert a != demo_data.make_conversations(200, seed=8)
    # A prefix of a longer draw, so growing n never reshuffles earlier rows.
    assert demo_data.make_conversations(50, seed=7) == a[:50]


def test_rows_are_sharegpt_with_gpt_turns():
    rows = demo_data.make_conversations(2000, seed=0)
    n_multi = n_system = 0
    for row in rows:
        assert set(row) == {"conversations"}
        turns = row["conversations"]
        assert all(set(t) == {"from", "value"} and t["from"] in ROLES for t in turns)
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        assert any(t["from"] == "gpt" for t in turns)
        if turns[0]["from"] == "system":
            n_system += 1
            turns = turns[1:]
        # Strict human/gpt alternation after an optional system turn.
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        n_multi += len(turns) == 4
        for human, gpt in zip(turns[::2], turns[1::2]):
            assert demo_data.extract_answer(human["value"], gpt["value"]) is not None
    assert 0.2 < n_multi / len(rows) < 0.4
    assert 0.3 < n_system / len(rows) < 0.5


def test_declared_distributions_are_fixed_and_valid():
    assert 40 <= len(demo_data.PROMPTS) <= 80
    for prompt in demo_data.PROMPTS:
        dist = demo_data.true_answer_distribution(prompt)
        assert 5 <= len(dist) <= 15
        assert sum(dist.values()) == pytest.approx(1.0)
        assert min(dist.values()) > 0
        # Spread out on purpose: no question has a near-certain answer.
        assert max(dist.values()) < 0.9
    with pytest.raises(KeyError):
        demo_data.true_answer_distribution("Name a colour of the sky.")


def test_empirical_answer_frequencies_match_declared_distribution():
    rows = demo_data.make_conversations(40000, seed=123)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        turns = [t for t in row["conversations"] if t["from"] != "system"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            prompt = human["value"]
            counts[demo_data._canonical_prompt(prompt)][demo_data.extract_answer(prompt, gpt["value"])] += 1

    prompt = "Name an animal that lives in the sea."
    seen = counts[prompt]
    total = sum(seen.values())
    assert total > 500
    declared = demo_data.true_answer_distribution(prompt)
    assert set(seen) <= set(declared)
    tv = 0.5 * sum(abs(seen[a] / total - p) for a, p in declared.items())
    assert tv < 0.06, (tv, total)
    assert seen.most_common(1)[0][0] == max(declared, key=declared.get)

    # And pooled over every question, as a check on the follow-up turns too.
    tvs = []
    for prompt, seen in counts.items():
        total = sum(seen.values())
        declared = demo_data.true_answer_distribution(prompt)
        tvs.append(0.5 * sum(abs(seen[a] / total - p) for a, p in declared.items()))
    assert len(tvs) == len(demo_data.PROMPTS)
    assert sum(tvs) / len(tvs) < 0.05


def test_write_jsonl_round_trip(tmp_path):
    rows = demo_data.make_conversations(20, seed=1)
    rows.append({"conversations": [{"from": "human", "value": "日本?"}, {"from": "gpt", "value": "café."}]})
    path = tmp_path / "sub" / "rows.jsonl"
    demo_data.write_jsonl(rows, str(path))
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows


# ---------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rows = demo_data.make_conversations(1500, seed=0)
    out = tmp_path_factory.mktemp("tok")
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], str(out), vocab_size=512)
    return out


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_dir):
    """The tokenizer exactly as saved, read from tokenizer.json with no class logic on top."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))


def test_tokenizer_specials_and_size(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(demo_data.SPECIAL_TOKENS) == [0, 1, 2]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]
    assert ids[0] == 1 and 2 in ids


@pytest.mark.parametrize("config_name", ["Qwen2Config", "LlamaConfig"])
def test_autotokenizer_round_trip_next_to_model_config(tokenizer_dir, reference_tokenizer, tmp_path, config_name):
    import transformers
    from transformers import AutoTokenizer

    model_dir = tmp_path / config_name
    shutil.copytree(tokenizer_dir, model_dir)
    getattr(transformers, config_name)(vocab_size=512, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=64).save_pretrained(str(model_dir))
    assert json.load(open(model_dir / "config.json"))["model_type"] in {"qwen2", "llama"}

    loaded = AutoTokenizer.from_pretrained(str(model_dir))
    for text in PROBE_STRINGS:
        want = reference_tokenizer(text, return_offsets_mapping=True)
        got = loaded(text, return_offsets_mapping=True)
        assert got["input_ids"] == want["input_ids"], (config_name, type(loaded).__name__, text)
        assert got["offset_mapping"] == want["offset_mapping"], (config_name, text)
        assert loaded.decode(got["input_ids"]) == reference_tokenizer.decode(want["input_ids"])
    assert (loaded.eos_token_id, loaded.pad_token_id) == (0, 0)
    assert len(loaded) == len(reference_tokenizer)


def test_offsets_index_the_original_text(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "Je dis café, 日本!"
    enc = tok(text, return_offsets_mapping=True)
    # Byte-level BPE splits a multi-byte character into several tokens; each
    # of them must point at the whole character, never into the middle of it.
    by_span: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    prev = (0, 0)
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        assert (start, end) == prev or prev[1] <= start < end <= len(text)
        prev = (start, end)
        by_span[(start, end)].append(tid)
    # Ordered, non-overlapping spans that together spell the text: no gaps.
    assert "".join(text[a:b] for a, b in by_span) == text
    for (start, end), ids in by_span.items():
        assert tok.decode(ids) == text[start:end]
    assert len(by_span[(text.index("é"), text.index("é") + 1)]) == 2
    assert len(by_span[(text.index("日"), text.index("日") + 1)]) == 3


def test_chat_template_matches_render_chatml(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    conv = demo_data.make_conversations(30, seed=5)[-1]["conversations"]
    messages = [{"role": demo_data.SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in conv]
    assert tok.apply_chat_template(messages, tokenize=False) == demo_data.render_chatml(conv)
