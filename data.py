"""Data: loading a dataset (Hub id or local file), reading its rows as conversations (ShareGPT, messages) or text,
rendering them with a chat template, and labelling the tokens that train (-100 elsewhere), then shuffling,
subsampling and splitting off an evaluation set.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable

import torch

from common import ConfigError, print_rank0

# ChatML, as used by Qwen2 and Arcee-Spark. No generation prompt is added after a finished conversation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Templates a config may name instead of writing out the Jinja text (tokenizer.chat_template: chatml). The default
# (None) is the tokenizer's own template: the one its model was trained on.
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "system": "system",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool", "ipython": "tool",
}
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}

_DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def check_dataset_path(name: str) -> None:
    """A dataset name that looks like a local path (a data-file extension, or starting with . / ~) must exist."""
    extension = os.path.splitext(name)[1].lower()
    looks_local = extension in _DATA_EXTENSIONS or name.startswith((".", "/", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise ConfigError(f"dataset file '{name}' does not exist. Fix dataset.name (a local path or a Hub id).")


def load_raw_dataset(name: str, split: str = "train"):
    """Load a dataset from a local file (json, jsonl, parquet, csv), a folder written by `Dataset.save_to_disk`, a
    folder of such data files, or a Hub id. A local-looking path that does not exist is an error that names it."""
    import datasets

    check_dataset_path(name)
    extension = os.path.splitext(name)[1].lower()
    path = os.path.expanduser(name)
    try:
        if os.path.isfile(path):
            if extension not in _DATA_EXTENSIONS:
                raise ConfigError(f"dataset file '{name}' has an unknown extension; use .json, .jsonl, .parquet or .csv.")
            return datasets.load_dataset(_DATA_EXTENSIONS[extension], data_files=path, split="train")
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json")):
                loaded = datasets.load_from_disk(path)
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(path, split=split)
        return datasets.load_dataset(name, split=split)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - the library's error, summarised in one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load dataset '{name}' (split '{split}'): {first_line}") from None


def detect_format(column_names: Iterable[str]) -> str:
    """'sharegpt' (conversations), 'messages' (OpenAI-style) or 'text' (continued pre-training), from the columns."""
    columns = set(column_names)
    for column, kind in (("conversations", "sharegpt"), ("messages", "messages"), ("text", "text")):
        if column in columns:
            return kind
    raise ConfigError(
        f"dataset has none of the columns 'conversations' (ShareGPT), 'messages' or 'text' (found {sorted(columns)}). "
        "Rename the column or convert the dataset."
    )


# Per format: the column holding the turns, each turn's role and content keys, its name in errors, and its roles.
_CONVERSATION_FIELDS = {
    "sharegpt": ("conversations", "from", "value", "ShareGPT", SHAREGPT_ROLES),
    "messages": ("messages", "role", "content", "message", {role: role for role in MESSAGE_ROLES}),
}


def to_messages(row: dict, data_format: str, system_prompt: str | None = None) -> list[dict]:
    """Convert one row to a list of {'role', 'content'} messages (roles system, user, assistant, tool)."""
    column, role_key, content_key, kind, roles = _CONVERSATION_FIELDS[data_format]
    turns = row[column]
    if not isinstance(turns, list):
        raise ConfigError(f"a row's '{column}' is not a list of turns; each turn needs '{role_key}' and '{content_key}'.")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ConfigError(f"a {kind} turn lacks '{role_key}' or '{content_key}'; each turn must be "
                              f"{{'{role_key}': ..., '{content_key}': ...}}.")
        role = roles.get(str(turn[role_key]).lower() if data_format == "sharegpt" else turn[role_key])
        if role is None:
            raise ConfigError(f"unknown {kind} role '{turn[role_key]}'; known roles are {sorted(roles)}. Fix or map it.")
        messages.append({"role": role, "content": str(turn[content_key])})
    if system_prompt and not any(message["role"] == "system" for message in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the tokenizer's chat template and return the text and the character spans to train on.

    Each span is one assistant turn: its content plus the template's end-of-turn marker, found by rendering the
    conversation up to the turn with a generation prompt (the span's start) and through the turn (its end). The
    whitespace a template puts after the end-of-turn marker is not trained on.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError(
                "the chat template does not render conversations incrementally (a prefix of the conversation renders "
                "differently from the start of the whole), so assistant spans cannot be located. Set "
                "tokenizer.chat_template to a template that does (null: the tokenizer's own)."
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


# Text in a rendering that looks like a control token: <|im_start|>, <start_of_turn>, </s>, [INST], DeepSeek's
# <｜User｜>. Written for another tokenizer, such a marker is several ordinary tokens of this one.
_MARKER = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>\s]+｜>|</?[A-Za-z_][^<>\s]*>|\[/?[A-Z][A-Z_]*\]")
# The conversation a template is probed with (no system turn: Gemma's templates refuse one).
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]


def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text of a configured chat template: a name of NAMED_TEMPLATES, Jinja text, or None (the
    tokenizer's own)."""
    if not value:
        return None
    if isinstance(value, str) and value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if not isinstance(value, str) or not ("{{" in value or "{%" in value):
        raise ConfigError(f"chat template {value!r} is neither a known name ({', '.join(NAMED_TEMPLATES)}) nor a Jinja "
                          "template. Set it to null (the tokenizer's own template), chatml, or a Jinja template string.")
    return value


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's added and special tokens: text it splits off whole before its model (BPE, ...) runs."""
    return set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)


def _token_count(tokenizer, marker: str) -> int:
    return len(tokenizer(marker, add_special_tokens=False)["input_ids"]) if marker else 0


def _is_special_token(tokenizer, marker: str) -> bool:
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return len(ids) == 1 and ids[0] in special_token_ids(tokenizer)


def has_chatml_tokens(tokenizer) -> bool:
    """Whether <|im_start|> and <|im_end|> are single special tokens of the tokenizer (tokenizer.chat_template: chatml
    fits it)."""
    return all(_is_special_token(tokenizer, marker) for marker in ("<|im_start|>", "<|im_end|>"))


def end_of_turn_marker(tokenizer) -> str:
    """The text the chat template closes an assistant turn with (<|im_end|> in ChatML, <|eot_id|> in Llama 3), found
    by rendering a one-turn conversation: the end of its trained span, after the reply."""
    text, spans = assistant_char_spans(tokenizer, _PROBE)
    if not spans:
        raise ConfigError("the chat template renders no assistant turn for a user and an assistant message. Set "
                          "tokenizer.chat_template to a template that does (null: the tokenizer's own).")
    start, end = spans[-1]
    return text[start:end].split(_PROBE[-1]["content"], 1)[-1].strip()


def turn_marker_problems(tokenizer, own_template: bool) -> list[str]:
    """The turn markers of the tokenizer's chat template that are not single special tokens of the tokenizer, each
    as "'marker' (n tokens)"; empty when the template fits.

    The end-of-turn marker (`end_of_turn_marker`) is trained and generation stops at it, so it must always be one
    special token. Every other marker-like text in a rendering of `_PROBE` (`_MARKER`: <|im_start|>, [INST], ...) must
    be one too, unless the template is the tokenizer's own (own_template): a model was trained on its own template,
    and some (Zephyr's <|user|>, Mistral v0.1's [INST]) write their opening markers as ordinary text.
    """
    problems, marker = [], end_of_turn_marker(tokenizer)
    if not _is_special_token(tokenizer, marker):
        problems.append(f"{marker!r} ({_token_count(tokenizer, marker)} tokens)")
    if not own_template:
        rendered = _render(tokenizer, _PROBE, False) + _render(tokenizer, _PROBE[:1], True)
        for candidate in dict.fromkeys(_MARKER.findall(rendered)):
            if candidate != marker and not _is_special_token(tokenizer, candidate):
                problems.append(f"{candidate!r} ({_token_count(tokenizer, candidate)} tokens)")
    return problems


def check_chat_template(tokenizer, name: str, key: str, own_template: str | None) -> None:
    """Refuse, in one line, the tokenizer's chat template (set by config key `key`, or its own: `own_template`, None
    when it has none) when its turn markers are not single special tokens of the tokenizer of `name`
    (`turn_marker_problems`). Such markers (ChatML's <|im_start|> on a Llama-3 tokenizer) become several ordinary
    tokens: trained as text, read by a teacher in a format it never saw, and no single end-of-turn token to stop at."""
    whose, is_own = f"tokenizer '{name}'", tokenizer.chat_template == own_template
    try:
        problems = turn_marker_problems(tokenizer, is_own)
    except ConfigError as error:
        raise ConfigError(f"{key}, {whose}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a Jinja error of the template, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"the chat template of {whose} ({key}) fails to render a user and an assistant turn: {first}. "
                          f"Set {key} to a template that renders them.") from None
    if not problems:
        return
    # Reserved and unused placeholders (Llama 3's 250, Gemma's 99) would hide the tokens a template can use.
    specials = [token for token in tokenizer.convert_ids_to_tokens(sorted(special_token_ids(tokenizer)))
                if not re.search(r"reserved|unused", token)]
    fixes = ["null (its own template)"] if own_template and not is_own else []
    if has_chatml_tokens(tokenizer) and tokenizer.chat_template != CHATML_TEMPLATE:
        fixes.append("chatml")
    fixes.append(f"a Jinja template written with its special tokens ({', '.join(specials[:10])})")
    harm = ("the teacher would read them as ordinary text, a format it never saw" if "teacher" in key else
            "they would be trained as ordinary text and generation would not stop at the end of a turn")
    source = "its own chat template" if is_own else f"the chat template set by {key}"
    raise ConfigError(f"{source} does not fit {whose}: its turn markers {', '.join(problems)} are not single special "
                      f"tokens of it, so {harm}. Set {key} to {', or '.join(fixes)}.")


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with: generation stops at it, the saved student's
    generation_config lists it, and a sampled completion is labelled through it."""
    marker = end_of_turn_marker(tokenizer)
    if not _is_special_token(tokenizer, marker):
        raise ConfigError(f"the chat template ends an assistant turn with {marker!r}, which is "
                          f"{_token_count(tokenizer, marker)} tokens, not one special token of the tokenizer; "
                          "generation needs a single end-of-turn token to stop at. Set tokenizer.chat_template to a "
                          "template that has one.")
    return tokenizer(marker, add_special_tokens=False)["input_ids"][0]


def tokenize_row(row: dict, tokenizer, data_format: str, max_length: int, system_prompt: str | None = None,
                 with_prompt: bool = False) -> dict:
    """Tokenize one row into input_ids and labels (-100 where nothing is trained), truncated to max_length.

    Conversations: labels are the assistant tokens (content and end-of-turn token) and -100 elsewhere. Text rows:
    every token is trained and an EOS token is appended. A token is trained when it ends inside a trained span (end
    offset in (span start, span end]): a BPE with a "\n\n" token merges a reply's leading newline into the header's
    newline, and that token, which starts before the span, carries the reply's first character.

    `with_prompt` (on-policy distillation) adds `prompt_ids`: the conversation before its last assistant turn (all of
    it when it ends in another turn) with the generation prompt, what the student completes. A row with no assistant
    turn then keeps its prompt as input_ids, with no label.
    """
    if data_format == "text":
        if with_prompt:
            raise ConfigError("on-policy distillation samples completions of conversations; a text dataset has no "
                              "prompts. Set on_policy.fraction: 0 or use a conversation dataset.")
        input_ids = tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
            input_ids = input_ids + [tokenizer.eos_token_id]
        input_ids = input_ids[:max_length]
        return {"input_ids": input_ids, "labels": list(input_ids)}
    messages = to_messages(row, data_format, system_prompt)
    prompt = {}
    if with_prompt:
        before = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
        # A prompt keeps its last max_length - 1 tokens (the turn to answer, at least one token of room to sample).
        prompt["prompt_ids"] = tokenizer(_render(tokenizer, before, add_generation_prompt=True),
                                         add_special_tokens=False)["input_ids"][-(max_length - 1):]
    if not any(message["role"] == "assistant" for message in messages):
        if with_prompt:
            return {"input_ids": prompt["prompt_ids"][:max_length], "labels": [], **prompt}
        return {"input_ids": [], "labels": []}
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template already wrote any BOS token into the text, so the tokenizer must not add another one.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, labels = encoding["input_ids"], []
    span_index = 0
    for token_id, (_start, end) in zip(input_ids, encoding["offset_mapping"]):
        while span_index < len(spans) and end > spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] < end <= spans[span_index][1]
        labels.append(token_id if inside else -100)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], **prompt}


AUTO_EVAL_ROWS = 500  # eval_size "auto": the smaller of this and 10% of the rows


def check_eval_size(eval_size) -> None:
    """dataset.eval_size is "auto", a row count (int >= 0) or a fraction (float in (0, 1))."""
    valid = eval_size == "auto" or eval_size is None or (isinstance(eval_size, int) and not isinstance(eval_size, bool)
                                                         and eval_size >= 0) \
        or (isinstance(eval_size, float) and 0 <= eval_size < 1)
    if not valid:
        raise ConfigError(f"dataset.eval_size must be \"auto\" (10% of the rows, at most {AUTO_EVAL_ROWS}), a row count "
                          f"or a fraction in (0, 1); got {eval_size!r}.")


def rendered_texts(data_config: dict, tokenizer, rows: int = 64) -> list[str]:
    """The first `rows` rows of the dataset as the model reads them: conversations rendered with the tokenizer's chat
    template, text rows as they are. A sample on which to check that two tokenizers give the same ids."""
    name = data_config["name"]
    raw = load_raw_dataset(name, data_config.get("split", "train"))
    data_format = dataset_format(raw, data_config.get("format"))
    texts = []
    for index in range(min(rows, len(raw))):
        row = raw[index]
        if data_format == "text":
            texts.append(str(row["text"]))
            continue
        messages = _row_errors_named(lambda row: to_messages(row, data_format, data_config.get("system_prompt")),
                                     name)({**row, SOURCE_ROW: index})
        if tokenizer.chat_template:
            texts.append(_render(tokenizer, messages, add_generation_prompt=False))
        else:  # no template to render with (tokenizing will say so): compare the turns' text
            texts.append("\n".join(message["content"] for message in messages))
    return texts


def dataset_format(raw, requested: str | None) -> str:
    """The format to read `raw` as: `requested` (sharegpt, messages, text), or detected from the columns for auto."""
    if (requested or "auto") == "auto":
        return detect_format(raw.column_names)
    if requested not in ("sharegpt", "messages", "text"):
        raise ConfigError(f"dataset.format '{requested}' is unknown; use auto, sharegpt, messages or text.")
    detect_format(raw.column_names)  # the column must exist either way
    return requested


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (batch, seq - 1) of the counted positions: the prediction at position i targets labels[i + 1],
    exactly as the causal-LM cross-entropy shifts, and counts when that label is not -100."""
    return labels[:, 1:] != -100


def counted_positions(labels: list[int]) -> int:
    """How many positions of one row the loss counts (`next_token_mask` of a single row, summed)."""
    return sum(label != -100 for label in labels[1:])


# Each row's index in the dataset as loaded (before shuffling), so that a bad or dropped row can be named.
SOURCE_ROW = "__source_row__"


def with_source_rows(raw):
    """`raw` with a SOURCE_ROW column: the row's index in the file or split, kept through shuffling."""
    if SOURCE_ROW in raw.column_names:
        return raw
    return raw.add_column(SOURCE_ROW, list(range(len(raw))))


def json_lines_numbers(name: str, rows: Iterable[int]) -> dict[int, int]:
    """{row: line} for rows (0-based, in the order loaded) of a JSON-lines file: the 1-based line an editor shows,
    blank lines skipped as the loader skips them. Empty for anything else (a JSON array, another format, a Hub id)."""
    path = os.path.expanduser(name)
    if os.path.splitext(name)[1].lower() not in (".json", ".jsonl") or not os.path.isfile(path):
        return {}
    wanted, found = set(rows), {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        row = 0
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if row == 0 and line.lstrip().startswith("["):
                return {}  # one JSON array: its rows have no lines of their own
            if row in wanted:
                found[row] = line_number
                if len(found) == len(wanted):
                    break
            row += 1
    return found


def row_names(name: str, rows: list[int]) -> list[str]:
    """How errors and warnings name rows of dataset `name`: 'line N' (from 1) of a JSON-lines file, else 'row N'
    counting from 0, as `dataset[N]` reads it."""
    lines = json_lines_numbers(name, rows)
    if lines and len(lines) == len(rows):
        return [f"line {lines[row]}" for row in rows]
    return [f"row {row} (counting from 0)" for row in rows]


def _row_errors_named(tokenize: Callable[[dict], dict], name: str) -> Callable[[dict], dict]:
    """`tokenize`, whose ConfigError (an unknown role, a malformed turn) names the dataset and the row."""
    def tokenize_named(row: dict) -> dict:
        try:
            return tokenize(row)
        except ConfigError as error:
            where = row_names(name, [row[SOURCE_ROW]])[0] if row.get(SOURCE_ROW, -1) >= 0 else "a row"
            raise ConfigError(f"dataset '{name}', {where}: {error}") from None
    return tokenize_named


def tokenization_processes(rows: int) -> int | None:
    """Worker processes for `datasets.map` over `rows` rows: one per CPU core (at most 8) from 10,000 rows on, where
    the workers' start-up (each loads the tokenizer) is paid back; None (in-process) below."""
    if rows < 10_000:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if cores > 1 else None


def tokenize_dataset(raw, name: str, tokenize: Callable[[dict], dict], max_length: int, description: str = "Tokenizing",
                     keep_unanswered: bool = False):
    """Map `tokenize` over every row, then drop (and count) rows left with no counted position, with a warning that
    says why and names the first few (by SOURCE_ROW when `raw` has it). Returns (dataset, dropped).

    `keep_unanswered` (on-policy distillation at fraction 1, rows carry `prompt_ids`): every batch samples its
    answers, so a row with no answer (a prompt-only dataset) is kept, all its labels -100.

    Batched `datasets.map` and `filter`: the rows stream through Arrow files in the datasets cache a thousand at a
    time, never a whole column in Python, and a second run (or another process) with the same data, tokenizer and
    settings reads the cached result instead of tokenizing again.
    """
    columns = raw.column_names
    tokenize_named = _row_errors_named(tokenize, name)

    def tokenize_batch(batch: dict) -> dict:
        rows = [dict(zip(columns, values)) for values in zip(*(batch[column] for column in columns))]
        tokenized = [tokenize_named(row) for row in rows]
        columns_out = {key: [row[key] for row in tokenized] for key in (tokenized[0] if tokenized else {})}
        # Counted here, so that dropping rows reads one small column instead of every row's labels again (pages of
        # the memory-mapped cache that a process reads count in its resident memory). -1: no token at all (a
        # conversation without an assistant turn), 0: truncated before any trained token.
        columns_out["counted_positions"] = [counted_positions(row["labels"]) if row["labels"] else -1
                                            for row in tokenized]
        if keep_unanswered:  # every row is sampled from: its prompt is what counts
            columns_out["counted_positions"] = [1] * len(tokenized)
            columns_out["labels"] = [row["labels"] or [-100] * len(row["input_ids"]) for row in tokenized]
        columns_out[SOURCE_ROW] = batch[SOURCE_ROW] if SOURCE_ROW in batch else [-1] * len(rows)
        return columns_out

    tokenized = raw.map(tokenize_batch, batched=True, remove_columns=columns, desc=description,
                        num_proc=tokenization_processes(len(raw)))
    kept = tokenized.filter(lambda counted: [count > 0 for count in counted], input_columns="counted_positions",
                            batched=True, desc="Dropping rows with no trainable token")
    dropped = len(tokenized) - len(kept)
    if len(kept) == 0:
        raise ConfigError(
            f"no row of dataset '{name}' has a trainable token after formatting and truncation to "
            f"max_length={max_length} (no assistant turn, or max_length too small). Raise tokenizer.max_length or "
            "check the data."
        )
    if dropped:
        _warn_dropped(tokenized, name, dropped, max_length)
    return kept.remove_columns(["counted_positions", SOURCE_ROW]), dropped


def _warn_dropped(tokenized, name: str, dropped: int, max_length: int) -> None:
    """One warning naming how many rows were dropped, why, and the first few (their rows in the file)."""
    lost = tokenized.filter(lambda counted: [count <= 0 for count in counted], input_columns="counted_positions",
                            batched=True).select_columns(["counted_positions", SOURCE_ROW])
    reasons = []
    for flag, reason in ((-1, "no assistant turn"), (0, f"truncated to max_length={max_length} before any assistant token")):
        rows = sorted(source for source, count in zip(lost[SOURCE_ROW], lost["counted_positions"]) if count == flag)
        if rows:
            shown = ", ".join(row_names(name, rows[:5])) + (", ..." if len(rows) > 5 else "")
            reasons.append(f"{len(rows)} with {reason} ({shown})")
    print_rank0(f"warning: dropped {dropped} of {len(tokenized)} rows of '{name}' with no trainable token: "
                f"{'; '.join(reasons)}")


def wants_eval(data_config: dict) -> bool:
    """Whether `prepare_datasets` will return an evaluation set (known before any data is read)."""
    return bool(data_config.get("eval_name") or data_config.get("eval_size"))


def prepare_datasets(data_config: dict, tokenizer, max_length: int, tokenize: Callable | None = None,
                     description: str = "Tokenizing", sample_fraction: float = 0.0):
    """Load, shuffle, subsample, tokenize and split the dataset. Returns (train, eval or None, stats).

    The eval set is `eval_name` (a separate dataset) when given, else `eval_size` rows split off with the seed.
    Rows without a trainable token (no assistant turn, or truncated before one) are dropped and counted; if nothing
    is left the run stops with an error. Sequences are not padded here: the collator pads per batch (or TRL packs).
    `tokenize(row, data_format) -> dict` replaces `tokenize_row` (alignment.py tokenizes each row for two tokenizers).
    `sample_fraction` > 0 (on-policy distillation) keeps each row's prompt (see `tokenize_dataset`); the evaluation set
    then keeps only rows with an answer (it is scored on the dataset's answers).
    """
    name = data_config["name"]
    system_prompt = data_config.get("system_prompt")
    if tokenize is None:
        def tokenize(row: dict, data_format: str) -> dict:
            return tokenize_row(row, tokenizer, data_format, max_length, system_prompt, with_prompt=sample_fraction > 0)

    def tokenize_all(raw, dataset_name: str, data_format: str, keep_unanswered: bool = sample_fraction == 1):
        return tokenize_dataset(raw, dataset_name, lambda row: tokenize(row, data_format), max_length, description,
                                keep_unanswered)

    from accelerate import PartialState

    # Each node's main process loads and tokenizes first, writing its node's datasets cache; the others then read it.
    # The global main process alone would leave every process of the other nodes tokenizing at once.
    with PartialState().local_main_process_first():
        raw = load_raw_dataset(name, data_config.get("split", "train"))
        data_format = dataset_format(raw, data_config.get("format"))
        raw = with_source_rows(raw).shuffle(seed=data_config["seed"])
        if data_config.get("num_samples"):
            raw = raw.select(range(min(int(data_config["num_samples"]), len(raw))))
        tokenized, dropped = tokenize_all(raw, name, data_format)
        train, evaluation = tokenized, None
        if data_config.get("eval_name"):
            raw_eval = with_source_rows(load_raw_dataset(data_config["eval_name"], data_config.get("eval_split", "train")))
            evaluation, _ = tokenize_all(raw_eval, data_config["eval_name"], dataset_format(raw_eval, data_config.get("format")),
                                         keep_unanswered=False)  # eval scores the dataset's answers
        else:
            eval_size = data_config.get("eval_size") or 0
            if eval_size == "auto":  # 10% of the rows (as the reference DistillKit setup), at most 500, at least 1
                eval_size = max(1, min(AUTO_EVAL_ROWS, len(tokenized) // 10))
            # A fraction rounds up to at least one row: wants_eval() promised an evaluation set before the data was read.
            eval_rows = (max(1, int(round(eval_size * len(tokenized)))) if isinstance(eval_size, float) and 0 < eval_size < 1
                         else int(eval_size))
            if eval_rows >= len(tokenized):
                raise ConfigError(f"dataset.eval_size={eval_size} leaves no training rows out of {len(tokenized)}; lower it.")
            if eval_rows > 0:
                split = tokenized.train_test_split(test_size=eval_rows, seed=data_config["seed"], shuffle=True)
                train, evaluation = split["train"], split["test"]
                if sample_fraction == 1:  # prompt-only rows have nothing to evaluate against
                    evaluation = evaluation.filter(lambda labels: [counted_positions(row) > 0 for row in labels],
                                                   input_columns="labels", batched=True, desc="Keeping answered rows")
    stats = {"format": data_format, "rows": len(raw), "dropped": dropped, "train": len(train),
             "eval": 0 if evaluation is None else len(evaluation)}
    print_rank0(f"dataset: {stats}")
    return train, evaluation, stats


def check_ids_below(splits: dict, size: int, tokenizer) -> None:
    """Refuse tokenized data holding an id >= `size` (the teacher tokenizer's size, smaller than the student's) in one
    line. The teacher reads the student's ids as its own: its embedding rows at or above its tokenizer's size are
    padding that was never trained (Qwen2.5's tool tokens against a Qwen2 teacher), and every later position of the row
    would be computed from them. Counted with pyarrow, a batch of rows at a time."""
    import pyarrow.compute as pc

    for split, dataset in splits.items():
        for first, batch in zip(range(0, len(dataset), 10000),
                                dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10000)):
            flat = pc.list_flatten(batch["input_ids"])
            above = int(pc.sum(pc.greater_equal(flat, size)).as_py() or 0)
            if above:
                row = first + next(index for index, ids in enumerate(batch["input_ids"].to_pylist())
                                   if max(ids, default=0) >= size)
                largest = int(pc.max(flat).as_py())
                raise ConfigError(
                    f"the {split} data holds {above} token(s) with ids >= {size}, the teacher tokenizer's size (first "
                    f"in row {row} of the shuffled split; largest id {largest}, "
                    f"{tokenizer.convert_ids_to_tokens(largest)!r}): the teacher has no trained embedding for them. "
                    "Remove those tokens from the data and chat "
                    "template, or distil across tokenizers (distillation.cross_tokenizer)."
                )
