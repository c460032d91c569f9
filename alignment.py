"""Two tokenizers: whether they give the same ids for the same text (then the teacher reads the student's tokens
position by position), and, where they do not, aligning the two tokenizations of one conversation by character
offsets: each model renders a row with its own chat template and tokenizer, and positions are paired where both
tokenizations end a token at the same character of a trained span. distil_hidden.py compares hidden states at those
pairs; the paired dataset and its collator live here too.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from common import ConfigError, print_rank0
from data import (
    assistant_char_spans,
    counted_positions,
    dataset_format,
    has_chatml_tokens,
    load_raw_dataset,
    prepare_datasets,
    to_messages,
    tokenize_row,
)


def tokens_by_id(tokenizer, size: int) -> list[str | None]:
    """The token string of every id in [0, size) (None for an id the tokenizer does not use)."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items() if index < size}
    return [by_id.get(index) for index in range(size)]


def _backend_json(tokenizer) -> dict | None:
    """The fast tokenizer's full definition (tokenizer.json: model, merges, normaliser, pre-tokenizer, added tokens)."""
    try:
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:  # noqa: BLE001 - no serialisable backend: the encoded sample still decides
        return None


def _definition_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """Which part of the two tokenizer definitions differs, or None: the explanation printed when the ids differ.

    Compared: the normaliser, the pre-tokenizer, the model (type, settings, merges, vocabulary) and the added tokens
    both have. Allowed: the padding, truncation and post-processor settings, and extra vocabulary entries or added
    tokens beyond the other tokenizer's size (one family's tokenizer with more special tokens at the end).
    """
    teacher, student = _backend_json(teacher_tokenizer), _backend_json(student_tokenizer)
    if teacher is None or student is None:
        return None
    for part, name in (("normalizer", "normalisers"), ("pre_tokenizer", "pre-tokenizers")):
        if teacher.get(part) != student.get(part):
            return f"their {name} differ"
    teacher_model, student_model = dict(teacher.get("model") or {}), dict(student.get("model") or {})
    teacher_merges, student_merges = teacher_model.pop("merges", None), student_model.pop("merges", None)
    teacher_vocab, student_vocab = teacher_model.pop("vocab", None), student_model.pop("vocab", None)
    # None and "" (no continuing-subword prefix, say) mean the same; tokenizer classes write one or the other.
    teacher_model = {key: value for key, value in teacher_model.items() if value not in (None, "", False)}
    student_model = {key: value for key, value in student_model.items() if value not in (None, "", False)}
    if teacher_model != student_model:
        return f"their models differ ({teacher_model.get('type')} vs {student_model.get('type')}, or their settings)"
    if teacher_merges != student_merges:
        return f"their merges differ (teacher {len(teacher_merges or [])}, student {len(student_merges or [])})"
    if teacher_vocab != student_vocab:
        if not (isinstance(teacher_vocab, dict) and isinstance(student_vocab, dict)):
            return "their vocabularies differ"
        smaller, larger = sorted((teacher_vocab, student_vocab), key=len)
        if any(larger.get(token) != index for token, index in smaller.items()) or \
                any(index < len(smaller) for token, index in larger.items() if token not in smaller):
            return (f"their vocabularies differ (teacher {len(teacher_vocab)}, student {len(student_vocab)} entries, "
                    "not one extending the other at the end)")

    def added(definition: dict) -> dict[int, tuple]:
        return {token["id"]: tuple(token.get(key) for key in ("content", "single_word", "lstrip", "rstrip", "normalized"))
                for token in definition.get("added_tokens") or []}

    teacher_added, student_added = added(teacher), added(student)
    for index in sorted(set(teacher_added) & set(student_added)):
        if teacher_added[index] != student_added[index]:
            return f"their added token {index} differs ({teacher_added[index][0]!r} vs {student_added[index][0]!r})"
    return None


# Text beyond the dataset's sample on which two tokenizers must agree: digits, whitespace runs, code, punctuation,
# several scripts, emoji. All of it is in NFC, so tokenizers that differ only in an NFC normaliser (transformers 5
# loads a copied tokenizer.json next to a Qwen2 config as Qwen2Tokenizer, which adds one) give the same ids; NFKC
# (which rewrites "…" and the no-break space) or other merges or digit splitting do not.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the Quick-brown fox's den.",
    "Numbers: 0 7 42 123 2024 31415926 3.14159 -17 1,000,000 1e-5 0x1F 12:30 50% #7",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif a != b and c >= d: print({'k': [1, 2]})\n",
    "Café, naïve, façade, straße, İstanbul; Привет, мир; 你好，世界; こんにちは; 안녕하세요; مرحبا; नमस्ते",
    "Emoji 🙂👍🏽 and symbols © ® ™ € £ ¥ — – … « » “quoted” ‘single’ a\u00a0b c\u2009d   trailing   ",
    "https://example.com/a?b=c&d=e#f and x.y@example.org, <tag attr=\"v\">text</tag>",
)


def describe_tokenizer(tokenizer) -> str:
    """The tokenizer's class and its normaliser, e.g. 'Qwen2Tokenizer, normaliser NFC'."""
    definition = _backend_json(tokenizer) or {}

    def name(normaliser) -> str:
        if not normaliser:
            return "none"
        if normaliser.get("type") == "Sequence":
            return "+".join(name(part) for part in normaliser.get("normalizers") or []) or "none"
        return str(normaliser.get("type"))

    return f"{type(tokenizer).__name__}, normaliser {name(definition.get('normalizer'))}"


def tokenization_difference(teacher_tokenizer, student_tokenizer, texts: list[str] = ()) -> str | None:
    """Why the two tokenizers would give different ids for the same text, or None when they give the same.

    Identity is judged by ids, never by the tokenizers' configs: the same token at every shared id, and the same ids
    for each of `texts` (a sample of the dataset's rendered rows) and of PROBE_TEXTS. One tokenizer may have more
    tokens at the end than the other. When they differ, the message names the first text that shows it, which part
    of the two definitions differs (`_definition_difference`), and each side's class and normaliser.
    """
    size = min(len(teacher_tokenizer), len(student_tokenizer))
    teacher_tokens, student_tokens = tokens_by_id(teacher_tokenizer, size), tokens_by_id(student_tokenizer, size)
    differing = [index for index in range(size) if teacher_tokens[index] != student_tokens[index]]
    reason = f"{len(differing)} ids map to different tokens, first id {differing[0]}" if differing else None
    example = None
    samples = [(f"row {row} of the dataset", text) for row, text in enumerate(texts)]
    samples += [("a probe text", text) for text in PROBE_TEXTS]
    teacher_ids = teacher_tokenizer([text for _, text in samples], add_special_tokens=False)["input_ids"]
    student_ids = student_tokenizer([text for _, text in samples], add_special_tokens=False)["input_ids"]
    for (where, text), teacher_row, student_row in zip(samples, teacher_ids, student_ids):
        if teacher_row != student_row:
            example = (f"{where} ({text[:40]!r}...) is {len(teacher_row)} teacher tokens and {len(student_row)} "
                       "student tokens")
            break
    if reason is None and example is None:
        return None
    reason = reason or _definition_difference(teacher_tokenizer, student_tokenizer)
    sides = f" (teacher: {describe_tokenizer(teacher_tokenizer)}; student: {describe_tokenizer(student_tokenizer)})"
    return "; e.g. ".join(part for part in (reason, example) if part) + sides


def shared_vocab_size(teacher_tokenizer, student_tokenizer, texts: list[str] = ()) -> int:
    """Number of token ids whose meaning teacher and student share, or a ConfigError if the tokenizers differ.

    The tokenizers must give the same ids for the same text (`tokenization_difference`, with `texts` a sample of the
    dataset's rendered rows). Distributions are then compared over ids [0, V) with V = the smaller tokenizer's size,
    never over padded embedding rows.
    """
    difference = tokenization_difference(teacher_tokenizer, student_tokenizer, texts)
    if difference:
        raise ConfigError(
            f"teacher and student tokenizers do not give the same ids for the same text: {difference}. Set "
            "distillation.cross_tokenizer: hybrid (or uld) to distil across tokenizers, or use distil_hidden.py."
        )
    size = min(len(teacher_tokenizer), len(student_tokenizer))
    if len(teacher_tokenizer) != len(student_tokenizer):
        print_rank0(
            f"warning: teacher tokenizer has {len(teacher_tokenizer)} tokens, student {len(student_tokenizer)}; "
            f"distributions are compared over the {size} shared ids."
        )
    return size


def same_tokenization(teacher_tokenizer, student_tokenizer, texts: list[str] = ()) -> bool:
    """True when the teacher can read the student's token ids position by position: the same size, the same chat
    template and the same ids for the same text (`tokenization_difference`, on `texts` too)."""
    if len(teacher_tokenizer) != len(student_tokenizer) or teacher_tokenizer.chat_template != student_tokenizer.chat_template:
        return False
    return tokenization_difference(teacher_tokenizer, student_tokenizer, texts) is None

def token_boundaries(offsets: list[tuple[int, int]]) -> dict[int, int]:
    """Character offsets at which a tokenization ends a token, mapped to that token's position.

    Token i ends a boundary at offsets[i][1] when it covers text (end > start) and no later token starts before that
    offset. Byte-level tokenizers split a multi-byte character into several tokens that all carry the character's
    offsets, so only the last piece ends a boundary. Tokens that cover no text (BOS/EOS added by the tokenizer, with
    offsets (0, 0)) end none.
    """
    boundaries: dict[int, int] = {}
    next_start = math.inf
    for position in range(len(offsets) - 1, -1, -1):
        start, end = offsets[position]
        if end > start:
            if next_start >= end:
                boundaries[end] = position
            next_start = min(next_start, start)
    return boundaries


def align_tokenizations(
    student_text: str,
    student_spans: list[tuple[int, int]],
    student_offsets: list[tuple[int, int]],
    teacher_text: str,
    teacher_spans: list[tuple[int, int]],
    teacher_offsets: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs whose hidden states are compared, for one row rendered twice.

    Spans are paired in order (the k-th assistant turn of each rendering). Within a span pair, offsets r count from the
    span's start, and a pair is kept when both tokenizations end a token at r (`token_boundaries`), the text before r
    is the same in both spans (r <= the length of their common prefix), and text of both spans follows r (r < each
    span's length). The hidden state at such a position has read the same conversation up to the same character and
    predicts trained text. With one template and one tokenizer this gives every position whose next token is trained.
    """
    if len(student_spans) != len(teacher_spans):
        raise ConfigError(
            f"the student's and the teacher's chat templates render different numbers of assistant turns "
            f"({len(student_spans)} and {len(teacher_spans)}) for the same row. Set tokenizer.chat_template and "
            "tokenizer.teacher_chat_template to templates that render every assistant turn."
        )
    student_boundaries, teacher_boundaries = token_boundaries(student_offsets), token_boundaries(teacher_offsets)
    pairs = []
    for (student_start, student_end), (teacher_start, teacher_end) in zip(student_spans, teacher_spans):
        common = len(os.path.commonprefix([student_text[student_start:student_end], teacher_text[teacher_start:teacher_end]]))
        for r in range(min(common, student_end - student_start - 1, teacher_end - teacher_start - 1) + 1):
            student_position = student_boundaries.get(student_start + r)
            teacher_position = teacher_boundaries.get(teacher_start + r)
            if student_position is not None and teacher_position is not None:
                pairs.append((student_position, teacher_position))
    return pairs


def same_next_token(rows: torch.Tensor, student_positions: torch.Tensor, teacher_positions: torch.Tensor) -> torch.Tensor:
    """Boolean mask over aligned pairs (row, s, t) of a batch: True where (row, s + 1, t + 1) is aligned too, i.e. the
    next token on both sides ends at the same character after the same text. Such a pair predicts the same piece of
    text on both sides; the others predict a longer or shorter piece on one side (" pancakes" against " pan"), or two
    templates' different end-of-turn markers (the text after the last aligned offset differs). With one tokenizer
    and one template every pair but each span's last (whose next token ends the span, where no pair starts) is kept.
    """
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rows.device)
    width = int(max(student_positions.max(), teacher_positions.max())) + 2
    keys = (rows * width + student_positions) * width + teacher_positions
    return torch.isin((rows * width + student_positions + 1) * width + teacher_positions + 1, keys)


def rendered_offsets(row: dict, tokenizer, data_format: str, system_prompt: str | None = None):
    """(text, trained character spans, token offsets) of one row, tokenized exactly as `tokenize_row` does (same text,
    same special tokens; `tokenize_row` then appends EOS to text rows and truncates)."""
    if data_format == "text":
        text = str(row["text"])
        spans = [(0, len(text))]
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        messages = to_messages(row, data_format, system_prompt)
        if not any(message["role"] == "assistant" for message in messages):
            return "", [], []
        text, spans = assistant_char_spans(tokenizer, messages)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in encoding:
        raise ConfigError(
            f"the tokenizer {type(tokenizer).__name__} returns no offset mapping; aligning two tokenizations needs "
            "character offsets. Use a fast (Rust) tokenizer."
        )
    return text, spans, [tuple(offset) for offset in encoding["offset_mapping"]]


def tokenize_row_pair(
    row: dict, student_tokenizer, teacher_tokenizer, data_format: str, max_length: int, system_prompt: str | None = None
) -> dict:
    """One row for hidden-state distillation across tokenizers: the student's input_ids and labels (`tokenize_row`),
    the teacher's teacher_input_ids (the same row rendered with the teacher's own template and tokenizer, truncated to
    max_length too), and the aligned positions student_positions / teacher_positions (`align_tokenizations`), keeping
    only pairs that survive truncation on both sides."""
    student = tokenize_row(row, student_tokenizer, data_format, max_length, system_prompt)
    teacher = tokenize_row(row, teacher_tokenizer, data_format, max_length, system_prompt)
    if not student["input_ids"] or not teacher["input_ids"]:
        return {**student, "teacher_input_ids": teacher["input_ids"], "student_positions": [], "teacher_positions": []}
    student_text, student_spans, student_offsets = rendered_offsets(row, student_tokenizer, data_format, system_prompt)
    teacher_text, teacher_spans, teacher_offsets = rendered_offsets(row, teacher_tokenizer, data_format, system_prompt)
    pairs = [
        (s, t)
        for s, t in align_tokenizations(student_text, student_spans, student_offsets, teacher_text, teacher_spans, teacher_offsets)
        if s < len(student["input_ids"]) and t < len(teacher["input_ids"])
    ]
    return {
        "input_ids": student["input_ids"],
        "labels": student["labels"],
        "teacher_input_ids": teacher["input_ids"],
        "student_positions": [s for s, _ in pairs],
        "teacher_positions": [t for _, t in pairs],
    }


# The config key that sets each model's chat template, in both scripts.
TEMPLATE_KEYS = {"student": "tokenizer.chat_template", "teacher": "tokenizer.teacher_chat_template"}


def check_chat_templates(data_config: dict, tokenizers: dict) -> None:
    """A conversation dataset needs a chat template for every tokenizer ({'teacher': ..., 'student': ...})."""
    missing = [which for which, tokenizer in tokenizers.items() if not tokenizer.chat_template]
    if not missing:
        return
    raw = load_raw_dataset(data_config["name"], data_config.get("split", "train"))
    if dataset_format(raw, data_config.get("format")) != "text":
        key = TEMPLATE_KEYS[missing[0]]
        fix = (f"Set {key}: chatml (its <|im_start|> and <|im_end|> are special tokens) or a Jinja template string"
               if has_chatml_tokens(tokenizers[missing[0]]) else
               f"Set {key} to a Jinja template string whose turn markers are special tokens of that tokenizer "
               "(chatml does not fit it: <|im_start|> and <|im_end|> are not special tokens of it)")
        raise ConfigError(f"the {' and '.join(missing)} tokenizer has no chat template of its own to render "
                          f"conversations with. {fix}.")


def prepare_paired_datasets(data_config: dict, student_tokenizer, teacher_tokenizer, max_length: int,
                            tokenize_pair=None):
    """`prepare_datasets` for a teacher with another tokenizer or template: the same rows, shuffling, subsampling,
    dropping and eval split, with each row tokenized by `tokenize_pair` (default `tokenize_row_pair`; distil_logits.py
    passes `tokenize_row_for_logits`). Returns (train, eval or None, stats).

    A training set in which alignment leaves no position to compare is an error (nothing to distil).
    """
    name, system_prompt = data_config["name"], data_config.get("system_prompt")

    def tokenize(row: dict, data_format: str) -> dict:
        return (tokenize_pair or tokenize_row_pair)(row, student_tokenizer, teacher_tokenizer, data_format, max_length,
                                                    system_prompt)

    train, evaluation, stats = prepare_datasets(data_config, student_tokenizer, max_length, tokenize,
                                                description="Tokenizing for student and teacher")
    aligned = trained = 0
    for batch in train.select_columns(["student_positions", "labels"]).iter(batch_size=1000):  # never whole columns
        aligned += sum(len(positions) for positions in batch["student_positions"])
        trained += sum(counted_positions(labels) for labels in batch["labels"])
    if aligned == 0:
        raise ConfigError(
            f"aligning the teacher's and the student's tokenizations of '{name}' leaves no position to compare: no "
            "trained span has a character offset where both end a token (check the chat templates, and raise "
            "tokenizer.max_length if the teacher's rendering is truncated before the assistant turns)."
        )
    stats.update(aligned_positions=aligned, trained_tokens=trained)
    print_rank0(f"alignment: {aligned} compared positions, {100 * aligned / max(trained, 1):.0f}% of the student's "
                "predicting positions have a teacher position")
    return train, evaluation, stats


class PairedCollator:
    """Pads a batch of `tokenize_row_pair` rows on the right: input_ids / attention_mask / labels for the student,
    teacher_input_ids / teacher_attention_mask for the teacher, and student_positions / teacher_positions padded
    with -1 (not a position); student_span_tokens / teacher_span_tokens too when the rows have them."""

    def __init__(self, student_pad_id: int, teacher_pad_id: int):
        self.student_pad_id, self.teacher_pad_id = student_pad_id, teacher_pad_id

    def __call__(self, rows: list[dict]) -> dict:
        from torch.nn.utils.rnn import pad_sequence

        def pad(key: str, value: int) -> torch.Tensor:
            return pad_sequence([torch.tensor(row[key], dtype=torch.long) for row in rows], batch_first=True, padding_value=value)

        def mask(key: str) -> torch.Tensor:
            return pad_sequence([torch.ones(len(row[key]), dtype=torch.long) for row in rows], batch_first=True)

        return {
            "input_ids": pad("input_ids", self.student_pad_id),
            "attention_mask": mask("input_ids"),
            "labels": pad("labels", -100),
            "teacher_input_ids": pad("teacher_input_ids", self.teacher_pad_id),
            "teacher_attention_mask": mask("teacher_input_ids"),
            "student_positions": pad("student_positions", -1),
            "teacher_positions": pad("teacher_positions", -1),
            # tokenize_row_for_logits: tokens of each aligned span on each side (0 past the row's pairs)
            **{key: pad(key, 0) for key in ("student_span_tokens", "teacher_span_tokens") if key in rows[0]},
        }




# ---------------------------------------------------------------------------------------------------------------------
# Logit distillation across tokenizers (distil_logits.py, distillation.cross_tokenizer)
# ---------------------------------------------------------------------------------------------------------------------


def align_next_tokens(
    student_text: str,
    student_spans: list[tuple[int, int]],
    student_offsets: list[tuple[int, int]],
    teacher_text: str,
    teacher_spans: list[tuple[int, int]],
    teacher_offsets: list[tuple[int, int]],
    max_piece_tokens: int = 1,
) -> list[tuple[int, int, int, int]]:
    """(student position, teacher position, student tokens, teacher tokens) for every pair of next-token predictions
    that cover the same next piece of text, for one row rendered twice.

    The positions are those of `align_tokenizations` (both tokenizations end a token at the same character r of a
    trained span), and each pair covers the text from r to the next such character r' (or, after the last one, to
    the end of each span): the student needs `student tokens` tokens for it, the teacher `teacher tokens`. Kept:
    pairs whose two pieces are the same text and take at most `max_piece_tokens` tokens on either side (1, the
    default: only pairs whose next token is the same text on both sides).
    """
    if len(student_spans) != len(teacher_spans):  # the same error as align_tokenizations gives
        align_tokenizations(student_text, student_spans, [], teacher_text, teacher_spans, [])
    student_boundaries, teacher_boundaries = token_boundaries(student_offsets), token_boundaries(teacher_offsets)
    pairs = []
    for (student_start, student_end), (teacher_start, teacher_end) in zip(student_spans, teacher_spans):
        common = len(os.path.commonprefix([student_text[student_start:student_end], teacher_text[teacher_start:teacher_end]]))
        shared = [r for r in range(min(common, student_end - student_start - 1, teacher_end - teacher_start - 1) + 1)
                  if student_start + r in student_boundaries and teacher_start + r in teacher_boundaries]
        # After the last shared offset each side's next piece runs to its span's end (the end-of-turn marker).
        ends = [(student_start + r, teacher_start + r) for r in shared[1:]] + [(student_end, teacher_end)]
        for r, (student_next, teacher_next) in zip(shared, ends):
            if student_next not in student_boundaries or teacher_next not in teacher_boundaries:
                continue
            # Two templates that end a turn differently (<|eot_id|> against <|im_end|>) leave different text after
            # the last shared offset: the two predictions are then of different pieces, not one piece to compare.
            if student_text[student_start + r:student_next] != teacher_text[teacher_start + r:teacher_next]:
                continue
            student_position, teacher_position = student_boundaries[student_start + r], teacher_boundaries[teacher_start + r]
            student_tokens = student_boundaries[student_next] - student_position
            teacher_tokens = teacher_boundaries[teacher_next] - teacher_position
            if max(student_tokens, teacher_tokens) <= max_piece_tokens:
                pairs.append((student_position, teacher_position, student_tokens, teacher_tokens))
    return pairs


def tokenize_row_for_logits(
    row: dict, student_tokenizer, teacher_tokenizer, data_format: str, max_length: int, system_prompt: str | None = None,
    max_piece_tokens: int = 1,
) -> dict:
    """`tokenize_row_pair` for logit distillation: the student's input_ids and labels, the teacher's
    teacher_input_ids, and the pairs of `align_next_tokens` as student_positions / teacher_positions /
    student_span_tokens / teacher_span_tokens, keeping only pairs whose whole piece survives truncation on both sides."""
    student = tokenize_row(row, student_tokenizer, data_format, max_length, system_prompt)
    teacher = tokenize_row(row, teacher_tokenizer, data_format, max_length, system_prompt)
    pairs = []
    if student["input_ids"] and teacher["input_ids"]:
        student_text, student_spans, student_offsets = rendered_offsets(row, student_tokenizer, data_format, system_prompt)
        teacher_text, teacher_spans, teacher_offsets = rendered_offsets(row, teacher_tokenizer, data_format, system_prompt)
        pairs = [pair for pair in align_next_tokens(student_text, student_spans, student_offsets, teacher_text,
                                                    teacher_spans, teacher_offsets, max_piece_tokens)
                 if pair[0] + pair[2] < len(student["input_ids"]) and pair[1] + pair[3] < len(teacher["input_ids"])]
    columns = ("student_positions", "teacher_positions", "student_span_tokens", "teacher_span_tokens")
    return {"input_ids": student["input_ids"], "labels": student["labels"], "teacher_input_ids": teacher["input_ids"],
            **{column: [pair[index] for pair in pairs] for index, column in enumerate(columns)}}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's: printable bytes as themselves, the others shifted to U+0100 and up, so a
    space is Ġ and a newline Ċ), from character to byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + shifted)] = byte
            shifted += 1
    return characters


def token_texts(tokenizer) -> list[bytes | None]:
    """The text each id stands for, as bytes, with a leading-space marker read as a space: byte-level tokens (Ġ, Ċ,
    ...) through their alphabet, SentencePiece tokens with ▁ as a space and <0xNN> byte-fallback pieces as that byte.
    Special and added control tokens get b"\\0special:" + their content, which no text token can equal. None for an
    id the tokenizer does not use."""
    definition = _backend_json(tokenizer) or {}
    byte_level = "ByteLevel" in json.dumps(definition.get("decoder")) or "ByteLevel" in json.dumps(definition.get("pre_tokenizer"))
    alphabet = _byte_level_alphabet()
    specials = {token["id"] for token in definition.get("added_tokens") or [] if token.get("special")}
    specials |= set(tokenizer.all_special_ids)
    texts: list[bytes | None] = []
    for index, token in enumerate(tokens_by_id(tokenizer, len(tokenizer))):
        if token is None:
            texts.append(None)
        elif index in specials:
            texts.append(b"\0special:" + token.encode())
        elif byte_level and all(character in alphabet for character in token):
            texts.append(bytes(alphabet[character] for character in token))
        elif _BYTE_FALLBACK.fullmatch(token):
            texts.append(bytes([int(_BYTE_FALLBACK.fullmatch(token).group(1), 16)]))
        else:
            texts.append(token.replace("\u2581", " ").encode())
    return texts


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens whose text (`token_texts`) is the same in both vocabularies, paired
    in order: the exact-match part of the hybrid loss. Built once at start-up. A text that several ids of one
    vocabulary spell (a SentencePiece byte piece and a plain piece, say) is paired through its first id only, so the
    pairing is one-to-one. Special tokens pair only with a special token of the same content."""
    first_teacher_id: dict[bytes, int] = {}
    for index, text in enumerate(token_texts(teacher_tokenizer)):
        if text is not None:
            first_teacher_id.setdefault(text, index)
    student_ids, teacher_ids, seen = [], [], set()
    for index, text in enumerate(token_texts(student_tokenizer)):
        if text is not None and text in first_teacher_id and text not in seen:
            seen.add(text)
            student_ids.append(index)
            teacher_ids.append(first_teacher_id[text])
    return torch.tensor(student_ids, dtype=torch.long), torch.tensor(teacher_ids, dtype=torch.long)


def span_continuations(rows: torch.Tensor, positions: torch.Tensor, span_tokens: torch.Tensor,
                       input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions that predict the following tokens of pieces of several tokens: pair k, whose piece of
    span_tokens[k] tokens is predicted from position positions[k] of row rows[k], owns positions[k] + 1 ...
    positions[k] + span_tokens[k] - 1, predicting the row's next token at each. Returns (owner pair, row, position, target token) per such position."""
    extra = (span_tokens - 1).clamp(min=0)
    owner = torch.repeat_interleave(torch.arange(extra.numel(), device=extra.device), extra)
    step = torch.arange(owner.numel(), device=extra.device) - (extra.cumsum(0) - extra)[owner] + 1
    continuation_rows, continuation_positions = rows[owner], positions[owner] + step
    return owner, continuation_rows, continuation_positions, input_ids[continuation_rows, continuation_positions + 1]
