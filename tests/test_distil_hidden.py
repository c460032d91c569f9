"""distil_hidden.py: layer maps (uniform and explicit) for several layer counts; the alignment of two tokenizations on
hand-made offsets (no common boundary, multi-byte characters, two chat templates) and on real tokenizers; the hidden
loss against its formula; end to end with a Llama student that differs from the Qwen2 teacher in hidden size, layer
count and tokenizer (projections trained, saved, reloaded, restored on resume; a plain student checkpoint that loads
and generates); one step at batch 4 equal to two accumulated steps at batch 2; the shared-tokenizer path with the
logit-KD term; and bad input stopped in one line before anything is written."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CONVERSATIONS, ROOT, _tiny_model, tiny_config, watch_output_heads
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import distil_hidden
from alignment import PairedCollator, align_tokenizations, same_next_token, token_boundaries, tokenize_row_pair
from common import ConfigError
from data import CHATML_TEMPLATE, tokenize_row
from heads import add_hidden_states_forward
from losses import hidden_state_loss
from projections import build_projections, load_projections, resolve_layer_map, uniform_layer_map


# A Llama-3-style template (bench/cross_tokenizer_hidden.py's), for a student whose template differs from ChatML.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and two OpenMP threads on a busy 2-core machine can be 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hidden_assets(assets, tmp_path_factory):
    """A second tokenizer (trained on other text, 290 tokens: its token boundaries differ from the teacher's) and two
    Llama students of hidden size 48 and 2 blocks (the teacher: Qwen2, 64, 3 blocks): one with that tokenizer, one
    with the teacher's."""
    from demo_data import render_chatml, train_tokenizer

    root = tmp_path_factory.mktemp("hidden")
    texts = [render_chatml(row["conversations"]) for row in CONVERSATIONS[:2]] * 3 + ["A lazy fox naps near 日本 cafés."] * 5
    train_tokenizer(texts, str(root / "tokenizer_b"), vocab_size=290)
    size_b = len(AutoTokenizer.from_pretrained(str(root / "tokenizer_b")))
    return {
        "student_b": _tiny_model(str(root / "student_b"), str(root / "tokenizer_b"), "llama", 48, 2, size_b, seed=3),
        "student_a": _tiny_model(str(root / "student_a"), assets["tokenizer"], "llama", 48, 2, assets["vocab"], seed=3),
    }


def hidden_config(assets, hidden_assets, output_dir, student="student_b", **distillation):
    """distil_hidden.config pointed at the tiny assets, with a few CPU steps."""
    return tiny_config(assets, output_dir, distil_hidden, hidden_assets[student], **distillation)


# --- layer maps ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_layers,teacher_layers,expected", [
    (2, 4, [(1, 2), (2, 4)]),
    (3, 4, [(1, 2), (2, 3), (3, 4)]),
    (4, 4, [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (4, 2, [(1, 1), (2, 1), (3, 2), (4, 2)]),
    (3, 7, [(1, 3), (2, 5), (3, 7)]),
    (1, 5, [(1, 5)]),
    (2, 3, [(1, 2), (2, 3)]),
])
def test_uniform_layer_map(student_layers, teacher_layers, expected):
    assert uniform_layer_map(student_layers, teacher_layers) == expected
    assert resolve_layer_map("uniform", student_layers, teacher_layers) == expected


def test_uniform_layer_map_matches_last_to_last_and_stays_in_range():
    for student_layers in range(1, 30):
        for teacher_layers in range(1, 40):
            pairs = uniform_layer_map(student_layers, teacher_layers)
            assert [s for s, _ in pairs] == list(range(1, student_layers + 1))
            teacher = [t for _, t in pairs]
            assert teacher == sorted(teacher) and 1 <= teacher[0] and teacher[-1] == teacher_layers


def test_explicit_layer_map():
    assert resolve_layer_map([[1, 3], [2, 6]], 2, 6) == [(1, 3), (2, 6)]
    assert resolve_layer_map([[2, 6], [2, 3]], 2, 6) == [(2, 6), (2, 3)]  # one student block, two teacher blocks
    for layer_map, message in [
        ([[3, 1]], "names student layer 3, but the student has 2 blocks"),
        ([[1, 7]], "names teacher layer 7, but the teacher has 6 blocks"),
        ([[0, 1]], "embedding output"),
        ([[1, 2, 3]], "not a \\[student_layer, teacher_layer\\] pair"),
        ([[1, 2], [1, 2]], "repeats a pair"),
        ("last", "must be 'uniform' or a list"),
        ([], "must be 'uniform' or a list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_layer_map(layer_map, 2, 6)


# --- alignment ------------------------------------------------------------------------------------------------------


def offsets_of(text, pieces):
    """Offsets of `pieces` laid end to end over `text` (each piece is a substring, or (start, end) for a piece of a
    multi-byte character that covers the whole character)."""
    offsets, cursor = [], 0
    for piece in pieces:
        if isinstance(piece, tuple):
            offsets.append(piece)
            cursor = piece[1]
        else:
            assert text.startswith(piece, cursor), (piece, cursor)
            offsets.append((cursor, cursor + len(piece)))
            cursor += len(piece)
    assert cursor == len(text)
    return offsets


def test_token_boundaries_skip_pieces_of_a_character_and_added_tokens():
    # BOS (0, 0), "x", three byte pieces of "中" that all carry (1, 2), then "y".
    offsets = [(0, 0), (0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    assert token_boundaries(offsets) == {1: 1, 2: 4, 3: 5}


def test_alignment_two_templates_two_tokenizers():
    """The docs/hidden-states.md example: ChatML student, Llama-3-style teacher, different token boundaries."""
    student_text = "<|im_start|>assistant\nHat rhymes.<|im_end|>"
    teacher_text = "<|start_header_id|>assistant<|end_header_id|>\n\nHat rhymes.<|eot_id|>"
    student_offsets = offsets_of(student_text, ["<|im_start|>", "assistant", "\n", "Hat", " rhymes", ".", "<|im_end|>"])
    teacher_offsets = offsets_of(teacher_text, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n",
                                                "H", "at", " rhy", "mes", ".", "<|eot_id|>"])
    student_spans = [(student_text.index("Hat"), len(student_text))]
    teacher_spans = [(teacher_text.index("Hat"), len(teacher_text))]
    pairs = align_tokenizations(student_text, student_spans, student_offsets, teacher_text, teacher_spans, teacher_offsets)
    # Offsets from the span start 0 ("\n" / "\n\n"), 3 ("Hat" / "at"), 10 (" rhymes" / "mes"), 11 ("." / ".").
    # Teacher "H" (1) and " rhy" (7) end where the student does not; 13+ is past the common text "Hat rhymes.<|".
    assert pairs == [(2, 3), (3, 5), (4, 7), (5, 8)]


def test_same_next_token_keeps_pairs_that_predict_the_same_text():
    """The two-template example above: of its pairs, only the one before "." predicts the same token on both sides.
    Before "Hat" the teacher predicts "H", before " rhymes" it predicts " rhy", and before the end-of-turn marker the
    two templates predict different markers (<|im_end|> vs <|eot_id|>): none of those is followed by another pair."""
    pairs = torch.tensor([(2, 3), (3, 5), (4, 7), (5, 8)])
    rows = torch.zeros(4, dtype=torch.long)
    assert same_next_token(rows, pairs[:, 0], pairs[:, 1]).tolist() == [False, False, True, False]
    # Rows are kept apart: the same pair in row 1 without its successor in row 1 is dropped.
    rows = torch.tensor([0, 0, 1])
    assert same_next_token(rows, torch.tensor([4, 5, 4]), torch.tensor([7, 8, 7])).tolist() == [True, False, False]
    assert same_next_token(rows[:0], rows[:0], rows[:0]).tolist() == []


def test_same_next_token_with_one_tokenizer_drops_only_each_spans_last_pair(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    row = CONVERSATIONS[1]  # two assistant turns
    paired = tokenize_row_pair(row, tokenizer, tokenizer, "sharegpt", 128)
    positions = torch.tensor(paired["student_positions"])
    kept = same_next_token(torch.zeros_like(positions), positions, positions)
    labels = paired["labels"]
    # The last pair of a span predicts its end-of-turn token: the position after it predicts nothing trained.
    span_last = [i for i, p in enumerate(paired["student_positions"]) if p + 2 >= len(labels) or labels[p + 2] == -100]
    assert len(span_last) == 2
    assert [i for i, keep in enumerate(kept.tolist()) if not keep] == span_last


def test_same_next_token_on_real_tokenizers_compares_tokens_with_the_same_text(assets, hidden_assets):
    """Two real tokenizations: every kept pair's next tokens decode to the same text, and every dropped pair's differ."""
    student = AutoTokenizer.from_pretrained(hidden_assets["student_b"])
    teacher = AutoTokenizer.from_pretrained(assets["tokenizer"])
    student.chat_template = LLAMA3_TEMPLATE  # two templates as well as two tokenizers
    kept_pairs = dropped_pairs = 0
    for row in CONVERSATIONS[:3]:  # ASCII text: no byte piece of a character decodes to the same "\ufffd" on both sides
        paired = tokenize_row_pair(row, student, teacher, "sharegpt", 128)
        s, t = torch.tensor(paired["student_positions"]), torch.tensor(paired["teacher_positions"])
        kept = same_next_token(torch.zeros_like(s), s, t)
        for student_position, teacher_position, keep in zip(s.tolist(), t.tolist(), kept.tolist()):
            same = (student.decode(paired["input_ids"][student_position + 1])
                    == teacher.decode(paired["teacher_input_ids"][teacher_position + 1]))
            assert keep == same, (row, student_position, teacher_position)
            kept_pairs, dropped_pairs = kept_pairs + keep, dropped_pairs + (not keep)
    assert kept_pairs >= 5 and dropped_pairs >= 5  # both cases occur with these tokenizers


def test_defaults_across_tokenizers_compare_only_states_that_predict_the_same_text(assets, hidden_assets):
    """At distil_hidden.py's default settings, with two tokenizers and two templates, the trainer compares a pair of
    states only where both predict the same next text (docs/hidden-states.md: comparing a state that predicts " pan"
    with one that predicts " pancakes", or two templates' end-of-turn markers, made hidden KD lose to SFT); with one
    tokenizer it still compares every position whose next token is trained."""
    from types import SimpleNamespace

    student = AutoTokenizer.from_pretrained(hidden_assets["student_b"])
    teacher = AutoTokenizer.from_pretrained(assets["tokenizer"])
    student.chat_template = LLAMA3_TEMPLATE
    rows = [tokenize_row_pair(row, student, teacher, "sharegpt", 128) for row in CONVERSATIONS[:3]]
    batch = PairedCollator(student.pad_token_id, teacher.pad_token_id)(rows)
    defaults = SimpleNamespace(distillation=distil_hidden.config["distillation"])
    row_index, student_positions, teacher_positions = distil_hidden.HiddenStatesTrainer.aligned_positions(defaults, batch)
    assert 5 <= row_index.numel() < (batch["student_positions"] >= 0).sum()  # some pairs compared, some left out
    for r, s, t in zip(row_index.tolist(), student_positions.tolist(), teacher_positions.tolist()):
        assert student.decode(batch["input_ids"][r, s + 1]) == teacher.decode(batch["teacher_input_ids"][r, t + 1])

    shared = [tokenize_row(row, teacher, "sharegpt", 128) for row in CONVERSATIONS[:3]]
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(row["labels"]) for row in shared], batch_first=True,
                                             padding_value=-100)
    row_index, positions, same = distil_hidden.HiddenStatesTrainer.aligned_positions(defaults, {"labels": labels})
    assert torch.equal(positions, same) and row_index.numel() == int((labels[:, 1:] != -100).sum())


def test_alignment_without_common_boundary_inside_the_span():
    text = "Q:\nabcd"
    span = [(3, 7)]
    student = offsets_of(text, ["Q:", "\n", "ab", "cd"])  # boundaries at span offsets 0 and 2 (and its end, 4)
    teacher = offsets_of(text, ["Q:", "\na", "bcd"])  # boundaries at span offsets 1 (and 4)
    assert align_tokenizations(text, span, student, text, span, teacher) == []


def test_alignment_with_multi_byte_characters():
    text = "x中文y!"
    span = [(0, len(text))]
    student = offsets_of(text, ["x", (1, 2), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3), "y", "!"])  # byte pieces
    teacher = offsets_of(text, ["x中", "文", "y!"])
    # Common boundaries at 2 (after 中: student's last piece, 3) and 3 (after 文: piece 6); 5 is the span end.
    assert align_tokenizations(text, span, student, text, span, teacher) == [(3, 0), (6, 1)]


def test_real_boundaries_decode_to_the_text_before_them(assets):
    """On a byte-level tokenizer that splits unseen characters into byte pieces, the text up to each boundary is
    exactly what the tokens up to it decode to."""
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    text = "Café au lait, 中文 ok? 😀 日本."
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    boundaries = token_boundaries(encoding["offset_mapping"])
    assert len(boundaries) < len(encoding["input_ids"])  # some characters were split
    for end, position in boundaries.items():
        assert tokenizer.decode(encoding["input_ids"][: position + 1]) == text[:end]


def test_one_tokenizer_aligns_every_position_whose_next_token_is_trained(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    for row in CONVERSATIONS[:4]:
        paired = tokenize_row_pair(row, tokenizer, tokenizer, "sharegpt", 64)
        labels = tokenize_row(row, tokenizer, "sharegpt", 64)["labels"]
        expected = [i for i in range(len(labels) - 1) if labels[i + 1] != -100]
        assert paired["student_positions"] == paired["teacher_positions"] == expected


def test_pairs_lost_to_truncation_are_dropped(assets, hidden_assets):
    student = AutoTokenizer.from_pretrained(hidden_assets["student_b"])
    teacher = AutoTokenizer.from_pretrained(assets["tokenizer"])
    row = CONVERSATIONS[1]
    full = tokenize_row_pair(row, student, teacher, "sharegpt", 256)
    assert full["student_positions"] and len(full["student_positions"]) == len(full["teacher_positions"])
    short = tokenize_row_pair(row, student, teacher, "sharegpt", 40)
    assert len(short["input_ids"]) <= 40 and len(short["teacher_input_ids"]) <= 40
    kept = [(s, t) for s, t in zip(full["student_positions"], full["teacher_positions"]) if s < 40 and t < 40]
    assert list(zip(short["student_positions"], short["teacher_positions"])) == kept


def test_collator_pads_both_tokenizations_and_the_alignment():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "teacher_input_ids": [1, 2], "student_positions": [1],
             "teacher_positions": [0]},
            {"input_ids": [5], "labels": [-100], "teacher_input_ids": [1, 2, 3, 4], "student_positions": [],
             "teacher_positions": []}]
    batch = PairedCollator(student_pad_id=0, teacher_pad_id=9)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["teacher_input_ids"].tolist() == [[1, 2, 9, 9], [1, 2, 3, 4]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["student_positions"].tolist() == [[1], [-1]] and batch["teacher_positions"].tolist() == [[0], [-1]]


# --- loss and teacher -----------------------------------------------------------------------------------------------


def test_hidden_state_loss_matches_the_formula():
    torch.manual_seed(0)
    student = [torch.randn(5, 8), torch.randn(5, 8)]
    teacher = [torch.randn(5, 8), torch.randn(5, 8)]
    mse = sum(((s - t) ** 2).mean(-1).sum() for s, t in zip(student, teacher)) / (5 * 2)
    torch.testing.assert_close(hidden_state_loss(student, teacher, "mse"), mse)
    cosine = sum((1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).sum() for s, t in zip(student, teacher))
    torch.testing.assert_close(hidden_state_loss(student, teacher, "cosine"), cosine / (5 * 2))
    # Normalised by the optimizer step's positions (here 20), not this batch's 5.
    torch.testing.assert_close(hidden_state_loss(student, teacher, "mse", num_positions=20), mse / 4)


def test_rms_teacher_norm_matches_the_formula_and_is_scale_free():
    torch.manual_seed(0)
    student = [torch.randn(5, 8), torch.randn(5, 8)]
    teacher = [30 * torch.randn(5, 8), 0.1 * torch.randn(5, 8)]  # layers of very different scales, as in real models
    normed = [t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for t in teacher]
    mse = sum(((s - t) ** 2).mean(-1).sum() for s, t in zip(student, normed)) / (5 * 2)
    torch.testing.assert_close(hidden_state_loss(student, teacher, "mse", teacher_norm="rms"), mse)
    # A student that outputs zeros scores 1 on every layer, whatever the teacher's scale (up to the 1e-6 in the
    # root, relative 1e-6 / mean square <= 1e-3 here, and float32 rounding).
    zeros = [torch.zeros(5, 8), torch.zeros(5, 8)]
    torch.testing.assert_close(hidden_state_loss(zeros, teacher, "mse", teacher_norm="rms"), torch.tensor(1.0),
                               rtol=2e-3, atol=0)
    # Scaling the teacher by any factor leaves the loss unchanged (same tolerance reason).
    scaled = [1000 * t for t in teacher]
    torch.testing.assert_close(hidden_state_loss(student, scaled, "mse", teacher_norm="rms"),
                               hidden_state_loss(student, teacher, "mse", teacher_norm="rms"), rtol=2e-3, atol=0)
    with pytest.raises(ConfigError, match="unknown teacher_norm"):
        hidden_state_loss(student, teacher, "mse", teacher_norm="layer")


def test_unit_teacher_norm_standardises_each_unit_so_no_massive_unit_dominates():
    """teacher_norm unit: each teacher unit is standardised over the compared positions. A pretrained teacher's
    residual stream has a few units hundreds of times larger than the rest (SmolLM2's: RMS 2.7 to 17.8 per block,
    most of it in a few units): with rms, the target is then almost only those units, which a student matches without
    learning anything of the task; with unit every unit weighs the same, whatever its scale or offset."""
    torch.manual_seed(0)
    student = [torch.randn(40, 8)]
    teacher = torch.randn(40, 8)
    massive = teacher.clone()
    massive[:, 0] = 500 + 50 * massive[:, 0]  # one huge unit with a large offset, as in real models
    expected = (teacher - teacher.mean(0)) / teacher.var(0, unbiased=False).add(1e-6).sqrt()
    mse = ((student[0] - expected) ** 2).mean(-1).sum() / 40
    torch.testing.assert_close(hidden_state_loss(student, [teacher], "mse", teacher_norm="unit"), mse)
    # The massive unit changes nothing else: the other units' targets are the same, unit 0's is standardised.
    torch.testing.assert_close(hidden_state_loss(student, [massive], "mse", teacher_norm="unit"),
                               hidden_state_loss(student, [teacher], "mse", teacher_norm="unit"), rtol=1e-4, atol=1e-5)
    # With rms the same unit makes the other seven units' targets nearly 0: the loss no longer sees them.
    rms_target = massive / massive.pow(2).mean(-1, keepdim=True).sqrt()
    assert rms_target[:, 1:].abs().max() < 0.05 and rms_target[:, 0].abs().min() > 2


def test_default_teacher_norm_is_not_drowned_by_a_massive_unit():
    """At distil_hidden.py's default teacher_norm across tokenizers, a teacher unit that is hundreds of times larger than the rest and
    offset (a pretrained model's massive activations) changes the hidden loss no more than rounding: every unit counts
    (docs/hidden-states.md: with rms, hidden KD across tokenizers from SmolLM2 lost to SFT on every seed)."""
    torch.manual_seed(0)
    student, teacher = [torch.randn(40, 8)], torch.randn(40, 8)
    massive = teacher.clone()
    massive[:, 0] = 500 + 50 * massive[:, 0]
    norm = distil_hidden.resolved_teacher_norm(distil_hidden.config["distillation"]["teacher_norm"], False)
    torch.testing.assert_close(hidden_state_loss(student, [massive], "mse", teacher_norm=norm),
                               hidden_state_loss(student, [teacher], "mse", teacher_norm=norm), rtol=1e-4, atol=1e-5)
    # One tokenizer: the default keeps the rms normalisation it had (the same-tokenizer case is unchanged).
    assert distil_hidden.resolved_teacher_norm(distil_hidden.config["distillation"]["teacher_norm"], True) == "rms"


def test_linear_decay_schedule_ends_as_plain_ce():
    """alpha_schedule linear_decay: the hidden term's weight starts at alpha, never rises, and reaches 0 at the last
    step, so the run ends optimising CE alone; constant keeps alpha throughout."""
    weights = [distil_hidden.scheduled_alpha(0.5, "linear_decay", step, 30) for step in range(31)]
    assert weights[0] == 0.5 and weights[-1] == 0 and all(a >= b for a, b in zip(weights, weights[1:]))
    assert weights[15] == pytest.approx(0.25)
    assert {distil_hidden.scheduled_alpha(0.5, "constant", step, 30) for step in range(31)} == {0.5}


def test_student_renders_as_in_distil_logits_by_default():
    """The two scripts train the same student on the same rendering unless told otherwise: with a student whose
    tokenizer has its own template, distil_logits.py (chat_template ChatML) and distil_hidden.py used to train on
    different texts, and their held-out CEs (per token of different renderings) were compared as if alike."""
    import distil_logits

    assert distil_hidden.config["tokenizer"]["chat_template"] == distil_logits.config["tokenizer"]["chat_template"]


def test_teacher_returns_only_the_mapped_hidden_states(assets):
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    add_hidden_states_forward(teacher)
    input_ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        selected = teacher(input_ids=input_ids, hidden_layers=[1, 3])
        everything = teacher(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert [state is None for state in selected] == [True, False, True, False]
    torch.testing.assert_close(selected[1], everything[1])
    torch.testing.assert_close(selected[3], everything[3])  # the last block, after the final norm


# --- end to end -----------------------------------------------------------------------------------------------------


def test_cross_architecture_cross_tokenizer_end_to_end(assets, hidden_assets, tmp_path):
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"))
    before = load_file(os.path.join(hidden_assets["student_b"], "model.safetensors"))
    trainer = distil_hidden.main(config)

    assert not trainer.shared_tokenizer and trainer.layer_pairs == [(1, 2), (2, 3)]
    logs = trainer.state.log_history
    train_logs = [log for log in logs if "hidden_loss" in log]
    eval_logs = [log for log in logs if "eval_hidden_loss" in log]
    assert len(train_logs) == 3 and eval_logs
    # One log per optimizer step; step k (0-based) weighs the two terms with the scheduled alpha of step k.
    distillation = config["distillation"]
    for step, log in enumerate(train_logs):
        assert math.isfinite(log["loss"]) and log["hidden_loss"] > 0 and log["ce_loss"] > 0 and log["kd_loss"] == 0
        alpha = distil_hidden.scheduled_alpha(distillation["alpha"], distillation["alpha_schedule"], step, 3)
        assert log["loss"] == pytest.approx(alpha * log["hidden_loss"] + (1 - alpha) * log["ce_loss"], rel=1e-4)
    assert all(math.isfinite(log["eval_hidden_loss"]) and log["eval_ce_loss"] > 0 for log in eval_logs)

    out = config["training"]["output_dir"]
    # The projections trained, were saved with the map, and the file holds what the trainer holds.
    saved, layer_pairs = load_projections(out)
    assert layer_pairs == [(1, 2), (2, 3)]
    initial = build_projections(layer_pairs, 48, 64, seed=config["training"]["seed"]).state_dict()
    assert set(initial) == {"1_2.weight", "1_2.bias", "2_3.weight", "2_3.bias"}
    # With it, teacher_norm unit's statistics (the cross-tokenizer default), as the trainer used them.
    stats = {f"teacher_norm.{pair}.{part}" for pair in ("1_2", "2_3") for part in ("mean", "inv_std")}
    assert set(saved) == set(initial) | stats
    for name in initial:
        assert not torch.equal(saved[name], initial[name]), name
        assert torch.equal(saved[name], trainer.projections.state_dict()[name].cpu()), name
    for index, pair in enumerate(("1_2", "2_3")):
        assert torch.equal(saved[f"teacher_norm.{pair}.mean"], trainer.teacher_stats[index][0].cpu())
        assert torch.equal(saved[f"teacher_norm.{pair}.inv_std"], trainer.teacher_stats[index][1].cpu())
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "hidden_projections.safetensors"))

    # The student trained; the teacher did not, and ran frozen in eval mode without dropout.
    after = load_file(os.path.join(out, "model.safetensors"))
    assert set(after) == set(before) and all(not torch.equal(before[name], after[name]) for name in before)
    teacher_on_disk = load_file(os.path.join(assets["teacher"], "model.safetensors"))
    for name, parameter in trainer.teacher.named_parameters():
        assert torch.equal(parameter.detach().cpu(), teacher_on_disk[name]), name
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.teacher.config.attention_dropout == 0

    # A plain student checkpoint: no unexpected or missing keys, its own tokenizer, and it generates.
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.hidden_size == 48
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(hidden_assets["student_b"]).get_vocab()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit that is red."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    assert json.load(open(os.path.join(out, "distillation_config.json")))["distillation"]["layer_map"] == "uniform"
    card = open(os.path.join(out, "README.md")).read()
    assert f"- Teacher: `{assets['teacher']}`" in card and "hidden-state distillation: loss = 0.5 * mse" in card


def test_linear_decay_weighs_each_step_with_its_scheduled_alpha(assets, hidden_assets, tmp_path):
    """alpha_schedule linear_decay reaches the loss: the logged loss of step k is a_k * hidden + (1 - a_k) * CE with
    a_k = alpha * (1 - k / max_steps), so 0.5, 1/3 and 1/6 over three steps (a constant alpha would fail this)."""
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"), alpha_schedule="linear_decay")
    config["dataset"]["eval_size"] = 0
    config["training"].update(save_strategy="no")
    train_logs = [log for log in distil_hidden.main(config).state.log_history if "hidden_loss" in log]
    assert len(train_logs) == 3
    for log, alpha in zip(train_logs, (0.5, 1 / 3, 1 / 6)):
        assert log["hidden_loss"] > 0 and log["ce_loss"] > 0
        assert log["loss"] == pytest.approx(alpha * log["hidden_loss"] + (1 - alpha) * log["ce_loss"], rel=1e-4)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_resume_restores_the_projections(assets, hidden_assets, tmp_path, loss):
    """A run resumed from checkpoint-2 ends where the uninterrupted run does. With mse across tokenizers (teacher_norm
    unit) the checkpoint's unit statistics are restored too: measured again on step 3's rows, they would differ."""
    def run(out, resume=None):
        config = hidden_config(assets, hidden_assets, out, layer_map=[[2, 3]], loss=loss)
        config["dataset"]["eval_size"] = 0
        config["training"].update(max_steps=4, save_steps=2, save_total_limit=None, resume_from_checkpoint=resume)
        return distil_hidden.main(config)

    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    run(full)
    run(interrupted)
    # Pretend the run died after checkpoint-2: only that checkpoint is left.
    shutil.rmtree(os.path.join(interrupted, "checkpoint-4"))
    for name in os.listdir(interrupted):
        if not name.startswith("checkpoint-"):
            path = os.path.join(interrupted, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    at_checkpoint, _ = load_projections(os.path.join(interrupted, "checkpoint-2"))
    initial = build_projections([(2, 3)], 48, 64, seed=42).state_dict()
    assert not torch.equal(at_checkpoint["2_3.weight"], initial["2_3.weight"])  # so a reset would show

    trainer = run(interrupted, resume=True)
    assert trainer.state.global_step == 4
    if loss == "mse":
        saved = load_file(os.path.join(interrupted, "checkpoint-2", "hidden_projections.safetensors"))
        assert torch.equal(trainer.teacher_stats[0][0].cpu(), saved["teacher_norm.2_3.mean"])
    for name, value in load_projections(full)[0].items():
        torch.testing.assert_close(load_projections(interrupted)[0][name], value, rtol=1e-6, atol=1e-7)
    for name, value in load_file(os.path.join(full, "model.safetensors")).items():
        torch.testing.assert_close(load_file(os.path.join(interrupted, "model.safetensors"))[name], value,
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("teacher_norm", ["rms", "auto"])
def test_one_batch_of_4_equals_two_accumulated_batches_of_2(assets, hidden_assets, tmp_path, teacher_norm):
    """SGD: equal updates mean equal gradients. Rows have different numbers of aligned positions, so a hidden loss
    averaged per micro-batch would fail this; so would teacher_norm unit (auto across tokenizers) standardising each
    micro-batch with its own statistics instead of the step's."""
    def sgd_step(out, batch, accumulation):
        config = hidden_config(assets, hidden_assets, out, teacher_norm=teacher_norm)
        config["dataset"]["eval_size"] = 0
        config["training"].update(
            max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, optim="sgd",
            learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no",
            activation_checkpointing=True,
        )
        distil_hidden.main(config)
        return {**load_file(os.path.join(out, "model.safetensors")), **load_projections(out)[0]}

    single = sgd_step(str(tmp_path / "a"), 4, 1)
    accumulated = sgd_step(str(tmp_path / "b"), 2, 2)
    for name in single:
        torch.testing.assert_close(single[name], accumulated[name], rtol=1e-5, atol=1e-6)


def test_unit_statistics_are_the_first_steps_measured_once(assets, hidden_assets, tmp_path):
    """teacher_norm unit (the cross-tokenizer default) standardises each teacher unit with its mean and standard
    deviation over the compared positions of the first optimizer step: here every training row (one step of them
    all), recomputed row by row from the teacher's plain forward. Kept, not re-measured, at the next steps."""
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"))
    config["dataset"]["eval_size"] = 0
    config["training"].update(max_steps=2, per_device_train_batch_size=len(CONVERSATIONS), gradient_accumulation_steps=1,
                              save_strategy="no")
    trainer = distil_hidden.main(config)
    assert trainer.teacher_norm == "unit" and trainer.layer_pairs == [(1, 2), (2, 3)]

    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    states = {1: [], 2: []}
    for row in trainer.train_dataset:
        student_positions = torch.tensor(row["student_positions"])
        teacher_positions = torch.tensor(row["teacher_positions"])
        keep = same_next_token(torch.zeros_like(student_positions), student_positions, teacher_positions)
        with torch.no_grad():
            hidden = teacher(input_ids=torch.tensor([row["teacher_input_ids"]]), output_hidden_states=True).hidden_states
        for index, (_, teacher_layer) in enumerate(trainer.layer_pairs):
            states[index + 1].append(hidden[teacher_layer][0, teacher_positions[keep]])
    for index in range(2):
        compared = torch.cat(states[index + 1]).double()
        assert compared.shape[0] > 10
        mean, inv_std = trainer.teacher_stats[index]
        torch.testing.assert_close(mean.double(), compared.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inv_std.double(), torch.rsqrt(compared.var(0, unbiased=False) + 1e-6), rtol=1e-4, atol=0)


def test_shared_tokenizer_with_logit_term(assets, hidden_assets, tmp_path):
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"), student="student_a", kd_weight=0.5,
                           alpha=0.3, layer_map=[[2, 3]])
    trainer = distil_hidden.main(config)
    assert trainer.shared_tokenizer
    # Every position whose next token is trained is compared, one to one.
    batch = next(iter(trainer.get_train_dataloader()))
    rows, student_positions, teacher_positions = trainer.aligned_positions(batch)
    assert torch.equal(student_positions, teacher_positions)
    assert rows.numel() == (batch["labels"][:, 1:] != -100).sum()
    train_logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert train_logs and all(log["kd_loss"] > 0 and log["hidden_loss"] > 0 for log in train_logs)
    for log in train_logs:
        total = 0.3 * log["hidden_loss"] + 0.7 * log["ce_loss"] + 0.5 * log["kd_loss"]
        assert log["loss"] == pytest.approx(total, rel=1e-4)
    assert any(log.get("eval_kd_loss", 0) > 0 for log in trainer.state.log_history)


def test_logit_term_and_ce_never_build_full_logits(assets, hidden_assets, tmp_path, monkeypatch):
    """CE and the logit-KD term come from the chunked loss: neither model's output head is called in training."""
    calls = watch_output_heads(distil_hidden, monkeypatch)
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"), student="student_a", kd_weight=0.5,
                           alpha=0.3, layer_map=[[2, 3]])
    trainer = distil_hidden.main(config)
    assert any(log.get("kd_loss", 0) > 0 for log in trainer.state.log_history)
    # Only the one-time head check at the first step, on one row of at most 16 tokens, for student and teacher.
    assert len(calls) == 2 and all(shape[:2] == (1, 16) for shape in calls), calls


@pytest.mark.slow
def test_zero3_two_processes_match_one(assets, hidden_assets, tmp_path):
    """DeepSpeed ZeRO-3 partitions the student, its projections and the teacher over 2 processes (2 x batch 2 x 2
    accumulated = the reference's batch 2 x 4): the same losses, student and projections, saved consolidated. Plain
    SGD without clipping, so a constant scale error in the gradients would show, and activation checkpointing."""
    def config_for(name, accumulation):
        config = hidden_config(assets, hidden_assets, str(tmp_path / name))
        config["dataset"]["eval_size"] = 0
        config["training"].update(gradient_accumulation_steps=accumulation, save_strategy="no", eval_strategy="no",
                                  optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0,
                                  lr_scheduler_type="constant", activation_checkpointing=True)
        return config

    reference = config_for("single", 4)
    distil_hidden.main(reference)
    config = config_for("zero3", 2)
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                             "distillation", "training")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2", "distil_hidden.py", "--config", str(path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in result.stdout + result.stderr

    def losses(output_dir):
        state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
        return [(log["loss"], log["hidden_loss"], log["ce_loss"]) for log in state["log_history"] if "hidden_loss" in log]

    want, got = reference["training"]["output_dir"], config["training"]["output_dir"]
    assert len(losses(got)) == 3
    for a, b in zip(losses(got), losses(want)):
        assert a == pytest.approx(b, rel=1e-4)
    for name, value in load_file(os.path.join(want, "model.safetensors")).items():
        torch.testing.assert_close(load_file(os.path.join(got, "model.safetensors"))[name], value, rtol=1e-3, atol=1e-4)
    for name, value in load_projections(want)[0].items():
        torch.testing.assert_close(load_projections(got)[0][name], value, rtol=1e-3, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------------------------


def teacher_without_offsets(hidden_assets, tmp_path):
    """A (Llama) teacher with a Python tokenizer, which has no offset mapping. Next to a qwen2 config transformers
    would replace the saved tokenizer class with Qwen2's, so the Llama model is used."""
    from transformers import ByT5Tokenizer

    folder = tmp_path / "byte-teacher"
    shutil.copytree(hidden_assets["student_a"], folder,
                    ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special*"))
    ByT5Tokenizer().save_pretrained(str(folder))
    return str(folder)


LONG_PREAMBLE = "<|im_start|>system\n" + "Think step by step before you answer. " * 12 + "<|im_end|>\n" + CHATML_TEMPLATE


@pytest.mark.parametrize("change,message", [
    (lambda c, h, t: c["distillation"].update(layer_map=[[1, 5]]), "names teacher layer 5, but the teacher has 3"),
    (lambda c, h, t: c["distillation"].update(layer_map=[[3, 1]]), "names student layer 3, but the student has 2"),
    (lambda c, h, t: c["distillation"].update(loss="l1"), "unknown hidden-state loss 'l1'"),
    (lambda c, h, t: c["distillation"].update(teacher_norm="layer"), "unknown distillation.teacher_norm 'layer'"),
    (lambda c, h, t: c["distillation"].update(alpha_schedule="cosine"), "unknown distillation.alpha_schedule 'cosine'"),
    (lambda c, h, t: c["distillation"].update(positions="all"), "unknown distillation.positions 'all'"),
    (lambda c, h, t: c["distillation"].update(kd_weight=0.5), "kd_weight > 0 needs teacher and student to share"),
    (lambda c, h, t: c["models"].update(teacher=teacher_without_offsets(h, t)), "not a fast tokenizer"),
    (lambda c, h, t: c["tokenizer"].update(teacher_chat_template=LONG_PREAMBLE), "leaves no position to compare"),
    (lambda c, h, t: c["training"].update(packing=True), "packing"),
])
def test_bad_input_stops_before_writing(assets, hidden_assets, tmp_path, change, message):
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"))
    change(config, hidden_assets, tmp_path)
    with pytest.raises(ConfigError, match=message):
        distil_hidden.main(config)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_in_one_line(assets, hidden_assets, tmp_path):
    overrides = tmp_path / "override.json"
    config = hidden_config(assets, hidden_assets, str(tmp_path / "out"), kd_weight=0.5)
    overrides.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "distillation")}
                                    | {"training": {"output_dir": str(tmp_path / "out")}}))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "distil_hidden.py"), "--config", str(overrides)],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: distillation.kd_weight > 0 needs")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
