"""Mechanics shared by distil_logits.py and distil_hidden.py: config merging and validation, data loading and
chat formatting with label masks, the logit-distillation divergences, model loading, Spectrum freezing.

Nothing here is an experiment choice: those live in each script's `config` dict.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Errors and printing
# ---------------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A user mistake: the message says what is wrong and how to fix it. Scripts print it as one line and exit."""


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched distributed)."""
    return int(os.environ.get("RANK", "0")) == 0


def print_rank0(*args: Any) -> None:
    """print() on the main process only, flushed so it interleaves sanely with the Trainer's logs."""
    if is_main_process():
        print(*args, flush=True)


def run_cli(main: Callable[[dict], Any], config: dict) -> None:
    """Entry point of both scripts: merge `--config FILE` into `config`, run `main`, and turn a ConfigError into one
    line on stderr and exit code 2 instead of a traceback."""
    try:
        main(load_overrides(config, sys.argv[1:]))
    except (ConfigError, TrainingDivergedError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------------
# Config: --config FILE deep-merged into the inline dict
# ---------------------------------------------------------------------------------------------------------------------


def deep_merge(base: dict, overrides: dict, path: str = "") -> dict:
    """Return a copy of `base` with `overrides` merged in, recursively. A key that `base` does not have is an error
    (typos must not be silently ignored), except below keys whose default is None or a free-form dict such as
    `training`, which is checked later against the Trainer's own arguments."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        where = f"{path}{key}"
        if key not in merged:
            raise ConfigError(f"unknown config key '{where}'. Check its spelling against the script's `config` dict.")
        if isinstance(merged[key], dict) and merged[key] and isinstance(value, dict) and not where == "training":
            merged[key] = deep_merge(merged[key], value, where + ".")
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_overrides(config: dict, argv: list[str] | None = None) -> dict:
    """Parse `--config FILE` (YAML or JSON) from argv and deep-merge it into `config`. Without it, return a copy."""
    parser = argparse.ArgumentParser(description="Runs the script on its inline `config`, optionally overridden.")
    parser.add_argument("--config", help="YAML or JSON file whose keys override the inline config dict")
    args = parser.parse_args(argv)
    if not args.config:
        return copy.deepcopy(config)
    if not os.path.isfile(args.config):
        raise ConfigError(f"--config file '{args.config}' does not exist. Pass the path of a YAML or JSON file.")
    with open(args.config) as handle:
        text = handle.read()
    try:
        if args.config.endswith(".json"):
            overrides = json.loads(text)
        else:
            import yaml

            overrides = yaml.safe_load(text) or {}
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file, reported in one line
        raise ConfigError(f"--config file '{args.config}' could not be parsed: {str(error).splitlines()[0]}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"--config file '{args.config}' must hold a mapping of config keys at its top level.")
    return deep_merge(config, overrides)


def check_output_dir(config: dict) -> None:
    """Refuse to train into a folder that already holds a finished run, unless asked to overwrite or resume."""
    training = config["training"]
    output_dir = training["output_dir"]
    finished = os.path.isfile(os.path.join(output_dir, "distillation_config.json"))
    if finished and not training.get("resume_from_checkpoint") and not training.get("overwrite_output_dir"):
        raise ConfigError(
            f"output_dir '{output_dir}' already holds a finished run. Choose another output_dir, or set "
            "training.resume_from_checkpoint, or training.overwrite_output_dir: true to replace it."
        )


def checkpoint_is_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last in a checkpoint: without it the save was cut off."""
    has_weights = any(name.startswith(("model", "pytorch_model", "adapter_model")) or name.startswith("global_step")
                      for name in os.listdir(path))
    return has_weights and os.path.isfile(os.path.join(path, "trainer_state.json"))


def resolve_resume_checkpoint(output_dir: str, resume: bool | str | None) -> str | None:
    """Turn training.resume_from_checkpoint into a checkpoint path, never one whose save was cut off.

    True picks the newest complete checkpoint-N in output_dir (newer, incomplete ones are named and left alone) and
    starts fresh when there is none, so a preempted job can be relaunched with the same config. A path must be a
    complete checkpoint.
    """
    if not resume:
        return None
    if isinstance(resume, str):
        if not os.path.isdir(resume) or not checkpoint_is_complete(resume):
            raise ConfigError(f"resume_from_checkpoint '{resume}' is not a complete checkpoint folder (no "
                              "trainer_state.json or weights). Point it at another checkpoint-N, or set it to true.")
        return resume
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    complete = [(step, path) for step, path in sorted(found) if checkpoint_is_complete(path)]
    broken = [path for step, path in found if complete == [] or step > complete[-1][0]]
    broken = [path for path in broken if not checkpoint_is_complete(path)]
    if broken:
        print_rank0(f"warning: skipping checkpoints whose save was cut off: {', '.join(sorted(broken))}")
    if not complete:
        print_rank0(f"no complete checkpoint in {output_dir}; starting from the beginning")
        return None
    print_rank0(f"resuming from {complete[-1][1]}")
    return complete[-1][1]


# ---------------------------------------------------------------------------------------------------------------------
# Training arguments
# ---------------------------------------------------------------------------------------------------------------------

# Keys of config["training"] that this project handles itself rather than passing to SFTConfig.
_OWN_TRAINING_KEYS = {"warmup_ratio", "resume_from_checkpoint", "overwrite_output_dir"}


def build_sft_config(config: dict, **extra: Any):
    """Build TRL's SFTConfig from config["training"] plus the data keys it needs.

    - `warmup_ratio` (transformers 4 name) becomes `warmup_steps`, which transformers 5 reads as a ratio below 1.
    - `use_cpu` is set when no CUDA device exists: under accelerate + DeepSpeed on the CPU the Trainer otherwise
      miscounts the processes.
    - An unknown key is an error naming it, not a TypeError from inside the dataclass.
    """
    import dataclasses

    from trl import SFTConfig

    training = dict(config["training"])
    known = {field.name for field in dataclasses.fields(SFTConfig)}
    for key in training:
        if key not in known and key not in _OWN_TRAINING_KEYS:
            raise ConfigError(f"unknown config key 'training.{key}': it is not an SFTConfig/TrainingArguments field.")
    warmup_ratio = training.pop("warmup_ratio", None)
    for key in _OWN_TRAINING_KEYS:
        training.pop(key, None)
    if warmup_ratio is not None:
        if "warmup_steps" in training and training["warmup_steps"]:
            raise ConfigError("set either training.warmup_ratio or training.warmup_steps, not both.")
        if not 0 <= warmup_ratio < 1:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        training["warmup_steps"] = float(warmup_ratio)
    if not torch.cuda.is_available():
        training["use_cpu"] = True
        # bf16/fp16 mixed precision is a GPU setting; on the CPU it only slows the demo and tests down.
        training["bf16"] = training["fp16"] = False
    training.setdefault("report_to", "none")
    training.setdefault("remove_unused_columns", False)
    training.update(extra)
    return SFTConfig(**training)


def model_dtype(config: dict) -> torch.dtype:
    """bf16 or fp16 weights when the run trains in that precision on a GPU, else float32."""
    training = config["training"]
    if torch.cuda.is_available() and training.get("bf16"):
        return torch.bfloat16
    if torch.cuda.is_available() and training.get("fp16"):
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def attention_implementation(use_flash_attention: bool) -> str:
    """flash_attention_2 when asked for and importable on a CUDA machine, else sdpa (with a one-line warning)."""
    if not use_flash_attention:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
    except ImportError:
        pass
    print_rank0("warning: flash-attn is not installed or there is no GPU; using sdpa attention instead.")
    return "sdpa"


def load_tokenizer(name: str, chat_template: str | None = None):
    """Load a tokenizer, give it a pad token if it has none, and set the chat template if one is configured."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(f"could not load the tokenizer of '{name}': {str(error).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"the tokenizer of '{name}' is not a fast tokenizer; label masks need its offset mapping.")
    if tokenizer.pad_token is None:
        # Padding positions get label -100 and attention mask 0, so reusing EOS as pad never trains on it.
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_causal_lm(name: str, config: dict, trainable: bool = True):
    """Load a causal LM in the configured precision and attention implementation. A frozen model (the teacher) is put
    in eval mode with every dropout probability set to zero and no gradients."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=model_dtype(config),
            attn_implementation=attention_implementation(config["model_config"]["use_flash_attention"]),
        )
    except OSError as error:
        raise ConfigError(f"could not load the model '{name}': {str(error).splitlines()[0]}") from None
    if not trainable:
        freeze_for_inference(model)
    return model


def freeze_for_inference(model: torch.nn.Module) -> None:
    """eval() mode, no gradients, and zero dropout everywhere: eval() alone leaves a dropout probability in
    configs that some attention kernels read directly."""
    model.eval()
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "attention_dropout"):
        model_config.attention_dropout = 0.0


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output head (often padded beyond the tokenizer, e.g. 151936 vs 152064 in Qwen2)."""
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(teacher_tokenizer, student_tokenizer) -> int:
    """Number of token ids whose meaning teacher and student share, or a ConfigError if the tokenizers differ.

    Both tokenizers must map every token to the same id on their common range. Distributions are then compared
    over ids [0, V) with V = the smaller tokenizer's size, never over padded embedding rows.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    size = min(len(teacher_tokenizer), len(student_tokenizer))
    teacher_by_id = {index: token for token, index in teacher_vocab.items() if index < size}
    student_by_id = {index: token for token, index in student_vocab.items() if index < size}
    if teacher_by_id != student_by_id:
        differing = sorted(i for i in set(teacher_by_id) | set(student_by_id) if teacher_by_id.get(i) != student_by_id.get(i))
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(differing)} ids map to different tokens, first id "
            f"{differing[0]}). Logit distillation needs a shared tokenizer; use distil_hidden.py for models with "
            "different tokenizers."
        )
    if len(teacher_tokenizer) != len(student_tokenizer):
        print_rank0(
            f"warning: teacher tokenizer has {len(teacher_tokenizer)} tokens, student {len(student_tokenizer)}; "
            f"distributions are compared over the {size} shared ids."
        )
    return size


# ---------------------------------------------------------------------------------------------------------------------
# Data: loading, formats, chat rendering and label masks
# ---------------------------------------------------------------------------------------------------------------------

# ChatML, as used by Qwen2 and Arcee-Spark. No generation prompt is added after a finished conversation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
    "ipython": "tool",
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


def to_messages(row: dict, data_format: str, system_prompt: str | None = None) -> list[dict]:
    """Convert one row to a list of {'role', 'content'} messages (roles system, user, assistant, tool)."""
    if data_format == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise ConfigError("a row's 'conversations' is not a list of turns; each turn needs 'from' and 'value'.")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ConfigError("a ShareGPT turn lacks 'from' or 'value'; each turn must be {'from': ..., 'value': ...}.")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise ConfigError(
                    f"unknown ShareGPT role '{turn['from']}'; known roles are {sorted(SHAREGPT_ROLES)}. Fix or map it."
                )
            messages.append({"role": role, "content": str(turn["value"])})
    else:
        turns = row["messages"]
        if not isinstance(turns, list):
            raise ConfigError("a row's 'messages' is not a list; each message needs 'role' and 'content'.")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise ConfigError("a message lacks 'role' or 'content'; each must be {'role': ..., 'content': ...}.")
            if turn["role"] not in MESSAGE_ROLES:
                raise ConfigError(f"unknown message role '{turn['role']}'; known roles are {sorted(MESSAGE_ROLES)}.")
            messages.append({"role": turn["role"], "content": str(turn["content"])})
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
                "tokenizer.chat_template to a template that does, e.g. common.CHATML_TEMPLATE."
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def tokenize_row(row: dict, tokenizer, data_format: str, max_length: int, system_prompt: str | None = None) -> dict:
    """Tokenize one row into input_ids and labels (-100 where nothing is trained), truncated to max_length.

    Conversations: labels are the assistant tokens (content and end-of-turn token) and -100 elsewhere. Text rows:
    every token is trained and an EOS token is appended. A token is trained when it starts inside a trained span.
    """
    if data_format == "text":
        input_ids = tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
            input_ids = input_ids + [tokenizer.eos_token_id]
        input_ids = input_ids[:max_length]
        return {"input_ids": input_ids, "labels": list(input_ids)}
    messages = to_messages(row, data_format, system_prompt)
    if not any(message["role"] == "assistant" for message in messages):
        return {"input_ids": [], "labels": []}
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template already wrote any BOS token into the text, so the tokenizer must not add another one.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, labels = encoding["input_ids"], []
    span_index = 0
    for token_id, (start, _end) in zip(input_ids, encoding["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        labels.append(token_id if inside else -100)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _format_of(raw, requested: str | None) -> str:
    if (requested or "auto") == "auto":
        return detect_format(raw.column_names)
    if requested not in ("sharegpt", "messages", "text"):
        raise ConfigError(f"dataset.format '{requested}' is unknown; use auto, sharegpt, messages or text.")
    detect_format(raw.column_names)  # the column must exist either way
    return requested


def _tokenize_dataset(raw, name: str, data_format: str, tokenizer, max_length: int, system_prompt: str | None):
    """Tokenize every row, then drop (and count) rows left with no trainable token."""

    def tokenize(row: dict) -> dict:
        return tokenize_row(row, tokenizer, data_format, max_length, system_prompt)

    tokenized = raw.map(tokenize, remove_columns=raw.column_names, desc="Tokenizing")
    keep = [i for i, labels in enumerate(tokenized["labels"]) if any(label != -100 for label in labels[1:])]
    dropped = len(tokenized) - len(keep)
    if not keep:
        raise ConfigError(
            f"no row of dataset '{name}' has a trainable token after formatting and truncation to "
            f"max_length={max_length} (no assistant turn, or max_length too small). Raise tokenizer.max_length or "
            "check the data."
        )
    if dropped:
        print_rank0(f"dropped {dropped} of {len(tokenized)} rows of '{name}' with no trainable token (no assistant turn or truncated)")
    return tokenized.select(keep), dropped


def prepare_datasets(data_config: dict, tokenizer, max_length: int):
    """Load, shuffle, subsample, tokenize and split the dataset. Returns (train, eval or None, stats).

    The eval set is `eval_name` (a separate dataset) when given, else `eval_size` rows split off with the seed.
    Rows without a trainable token (no assistant turn, or truncated before one) are dropped and counted; if nothing
    is left the run stops with an error. Sequences are not padded here: the collator pads per batch (or TRL packs).
    """
    name = data_config["name"]
    raw = load_raw_dataset(name, data_config.get("split", "train"))
    data_format = _format_of(raw, data_config.get("format"))
    raw = raw.shuffle(seed=data_config["seed"])
    if data_config.get("num_samples"):
        raw = raw.select(range(min(int(data_config["num_samples"]), len(raw))))
    system_prompt = data_config.get("system_prompt")
    tokenized, dropped = _tokenize_dataset(raw, name, data_format, tokenizer, max_length, system_prompt)
    train, evaluation = tokenized, None
    if data_config.get("eval_name"):
        raw_eval = load_raw_dataset(data_config["eval_name"], data_config.get("eval_split", "train"))
        evaluation, _ = _tokenize_dataset(raw_eval, data_config["eval_name"], _format_of(raw_eval, data_config.get("format")),
                                          tokenizer, max_length, system_prompt)
    else:
        eval_size = data_config.get("eval_size") or 0
        eval_rows = int(round(eval_size * len(tokenized))) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
        if eval_rows >= len(tokenized):
            raise ConfigError(f"dataset.eval_size={eval_size} leaves no training rows out of {len(tokenized)}; lower it.")
        if eval_rows > 0:
            split = tokenized.train_test_split(test_size=eval_rows, seed=data_config["seed"], shuffle=True)
            train, evaluation = split["train"], split["test"]
    stats = {"format": data_format, "rows": len(raw), "dropped": dropped, "train": len(train),
             "eval": 0 if evaluation is None else len(evaluation)}
    print_rank0(f"dataset: {stats}")
    return train, evaluation, stats


# ---------------------------------------------------------------------------------------------------------------------
# Spectrum: train only the parameters a Spectrum scan selected
# ---------------------------------------------------------------------------------------------------------------------


def read_spectrum_patterns(path: str) -> list[str]:
    """Read `unfrozen_parameters` (a list of regular expressions) from a Spectrum YAML file."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"Spectrum file '{path}' does not exist. Fix spectrum.layers_to_unfreeze or set it to null.")
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"Spectrum file '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    patterns = content.get("unfrozen_parameters") if isinstance(content, dict) else None
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"Spectrum file '{path}' must hold 'unfrozen_parameters': a non-empty list of regexes.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"Spectrum file '{path}' has an invalid regex '{pattern}': {error}.") from None
    return patterns


def apply_spectrum(model: torch.nn.Module, patterns: list[str]) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of `patterns` (regexes, `re.search`). Returns (trainable, total)
    parameter counts. Patterns that match no parameter at all are an error: the file was made for another model."""
    compiled = [re.compile(pattern) for pattern in patterns]
    trainable = total = 0
    matched = False
    for name, parameter in model.named_parameters():
        keep = any(pattern.search(name) for pattern in compiled)
        matched |= keep
        parameter.requires_grad_(keep)
        total += parameter.numel()
        trainable += parameter.numel() if keep else 0
    if not matched:
        raise ConfigError(
            "no parameter name matches the Spectrum file's patterns (was it made for another model?). Example "
            f"parameter name: '{next(iter(dict(model.named_parameters())))}'."
        )
    print_rank0(f"Spectrum: training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.1f}%)")
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------------
# Logit distillation: divergences between teacher and student next-token distributions
# ---------------------------------------------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


def _mixture_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def token_divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-row divergence between teacher distribution p and student distribution q, given as log-probabilities of
    shape (N, V). Returns shape (N,).

    forward_kl      KL(p || q) = sum_v p_v (log p_v - log q_v)
    reverse_kl      KL(q || p)
    jsd             beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q   (beta in (0, 1))
    tvd             0.5 * sum_v |p_v - q_v|
    skew_forward_kl KL(p || skew * p + (1 - skew) * q)                                            (DistiLLM, skew in (0, 1))
    skew_reverse_kl KL(q || skew * q + (1 - skew) * p)
    """
    log_p, log_q = teacher_log_probs, student_log_probs
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _mixture_log_probs(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "skew_forward_kl":
        return _kl(log_p, _mixture_log_probs(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _mixture_log_probs(log_q, log_p, skew))
    raise ConfigError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}.")


def shift_for_next_token(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (batch, seq - 1) of positions whose next-token label counts: the prediction at position i targets
    labels[i + 1], exactly as the causal-LM cross-entropy shifts."""
    return labels[:, 1:] != -100


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Knowledge-distillation loss from full logits (batch, seq, vocab) of student and teacher.

        KD = T^2 / N * sum_{i : labels[i+1] != -100} D(softmax(t_i[:V] / T), softmax(s_i[:V] / T))

    where D is `token_divergence`, V = `vocab_size` (the real tokenizer vocabulary: padded rows of either output head
    are dropped, never zero-filled), and N = `num_items_in_batch` (the counted tokens of the whole optimizer step,
    as the cross-entropy uses) or, when None, the counted tokens of this batch. Softmax math runs in float32.
    """
    mask = shift_for_next_token(labels)
    vocab_size = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    # Select counted positions before the float32 upcast: the (tokens, vocab) copies are the memory bill.
    student = student_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    teacher = teacher_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    per_token = token_divergence(F.log_softmax(student, -1), F.log_softmax(teacher, -1), divergence, beta, skew)
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() * temperature**2 / torch.as_tensor(count, device=per_token.device).clamp(min=1)


def causal_lm_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy over the counted positions, summed in float32 and divided by N as in
    `logit_distillation_loss` (so the two mix consistently under gradient accumulation)."""
    mask = shift_for_next_token(labels)
    logits = student_logits[:, :-1][mask].float()
    total = F.cross_entropy(logits, labels[:, 1:][mask], reduction="sum")
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked logit distillation: the same loss, from final hidden states and output-head weights, chunk by chunk over
# tokens, so that the (tokens, vocab) logits never exist for teacher or student.
# ---------------------------------------------------------------------------------------------------------------------


def head_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) that the model applies between its output head and its logits:
    logits = softcap * tanh(scale * (h W^T + b) / softcap), or scale * (h W^T + b) without soft-capping."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None):
        scale = 1.0 / text_config.logits_scaling  # Granite divides its logits by logits_scaling
    return float(1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)


def _head_logits(hidden, weight, bias, scale, softcap):
    """Logits (float32) of one chunk, and d logits / d (h W^T + b) for the backward (None when it is a constant)."""
    raw = hidden @ weight.t()
    if bias is not None:
        raw = raw + bias
    logits = raw.float() * scale
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, (1 - capped.square()) * scale


def chunk_tokens_for_budget(vocab: int, memory_budget_mb: float, copies: int = 8) -> int:
    """Tokens per chunk so that the chunk's float32 (tokens, vocab) temporaries fit in the budget.

    One chunk holds about `copies` float32 arrays of (chunk, vocab): student and teacher logits, both log-softmaxes,
    their probabilities and the logit gradient. chunk = budget / (copies * 4 bytes * vocab), at least 16 and a
    multiple of 16 so the matrix products keep an efficient shape.
    """
    chunk = int(memory_budget_mb * 2**20 / (copies * 4 * vocab))
    return max(16, chunk // 16 * 16)


class _ChunkedDistillationLoss(torch.autograd.Function):
    """kd_weight * KD + ce_weight * CE from hidden states, gradients computed chunk by chunk during the forward.

    Forward KL and reverse KL use closed-form logit gradients; the other divergences differentiate
    `token_divergence` on each chunk with autograd, so every divergence is exactly the one of
    `logit_distillation_loss`.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, options):
        o = options
        needs_grad = student_hidden.requires_grad or student_weight.requires_grad
        device = student_hidden.device
        count = torch.as_tensor(o["num_items"], dtype=torch.float32, device=device).clamp(min=1)
        temperature, vocab, rows = o["temperature"], o["vocab_size"], student_weight.shape[0]
        kd_weight = o["kd_weight"] * temperature / count  # d(T^2 * D)/ds = T * dD/d(s/T)
        ce_weight = o["ce_weight"] / count
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros_like(kd_sum)
        if needs_grad:
            grad_hidden = torch.empty_like(student_hidden)
            grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
            grad_bias = None if student_bias is None else torch.zeros_like(student_bias, dtype=torch.float32)
        for start in range(0, student_hidden.shape[0], o["chunk_tokens"]):
            end = min(start + o["chunk_tokens"], student_hidden.shape[0])
            hidden, chunk_targets = student_hidden[start:end], targets[start:end]
            logits, slope = _head_logits(hidden, student_weight, student_bias, *o["student_head"])
            grad_kd = log_probs = None
            if o["kd_weight"] != 0:
                teacher_logits, _ = _head_logits(teacher_hidden[start:end], teacher_weight, teacher_bias, *o["teacher_head"])
                log_p = F.log_softmax(teacher_logits[:, :vocab] / temperature, -1)
                del teacher_logits
                scaled = logits[:, :vocab] / temperature if temperature != 1 or vocab != rows else logits
                if o["divergence"] == "forward_kl":
                    log_q = F.log_softmax(scaled, -1)
                    p = log_p.exp()
                    kd_sum += _kl(log_p, log_q).sum()
                    if needs_grad:  # dKL(p||q)/d(s/T) = q - p
                        grad_kd = log_q.exp().sub_(p)
                    del p
                elif o["divergence"] == "reverse_kl":
                    log_q = F.log_softmax(scaled, -1)
                    q = log_q.exp()
                    diff = log_q - log_p
                    per_token = (q * diff).sum(-1)
                    kd_sum += per_token.sum()
                    if needs_grad:  # dKL(q||p)/d(s/T) = q * (log q - log p - KL)
                        grad_kd = diff.sub_(per_token[:, None]).mul_(q)
                    del q, diff
                else:
                    with torch.enable_grad():
                        leaf = scaled.detach().requires_grad_(needs_grad)
                        log_q = F.log_softmax(leaf, -1)
                        chunk_sum = token_divergence(log_q, log_p, o["divergence"], o["beta"], o["skew"]).sum()
                        if needs_grad:
                            (grad_kd,) = torch.autograd.grad(chunk_sum, leaf)
                    kd_sum += chunk_sum.detach()
                    log_q = log_q.detach()
                del log_p
                if scaled is logits:
                    log_probs = log_q  # T = 1 over the whole head: the CE's log-softmax is the same tensor
            if log_probs is None:
                log_probs = F.log_softmax(logits, -1)
            ce_sum -= log_probs.gather(1, chunk_targets[:, None]).sum()
            if not needs_grad:
                continue
            # d CE / d s = softmax(s) - onehot(target)
            grad = log_probs.exp()
            grad[torch.arange(end - start, device=device), chunk_targets] -= 1
            grad.mul_(ce_weight)
            if grad_kd is not None:
                grad[:, :vocab].add_(grad_kd.mul_(kd_weight))
            del grad_kd, log_probs
            if slope is not None:
                grad.mul_(slope)
            elif o["student_head"][0] != 1.0:
                grad.mul_(o["student_head"][0])
            grad = grad.to(student_weight.dtype)
            grad_hidden[start:end] = grad @ student_weight
            grad_weight.add_((grad.t() @ hidden).float())
            if grad_bias is not None:
                grad_bias.add_(grad.float().sum(0))
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        else:
            ctx.save_for_backward(None, None, None)
        ctx.weight_dtype = student_weight.dtype
        kd_loss, ce_loss = kd_sum * temperature**2 / count, ce_sum / count
        ctx.mark_non_differentiable(kd_loss, ce_loss)
        return o["kd_weight"] * kd_loss + o["ce_weight"] * ce_loss, kd_loss, ce_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else (grad_bias * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.nn.Module | None,
    targets: torch.Tensor,
    kd_weight: float,
    ce_weight: float,
    num_items_in_batch: int | torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    student_transform: tuple[float, float | None] = (1.0, None),
    teacher_transform: tuple[float, float | None] = (1.0, None),
    memory_budget_mb: float = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_weight * KD + ce_weight * CE, equal to `logit_distillation_loss` and `causal_lm_loss`, without the full
    logits. Returns (loss, kd_loss, ce_loss); only the first carries gradients.

    `student_hidden` (N, Hs) and `teacher_hidden` (N, Ht) are the final hidden states at the N counted positions
    (already shifted: position i predicts targets[i]); the heads are the models' output-embedding modules (weight
    and optional bias), with `*_transform` = (logit scale, soft-cap) from `head_transform`. The chunk size comes from
    `memory_budget_mb` (see `chunk_tokens_for_budget`). KD uses the first `vocab_size` logits; CE uses all of them,
    as the model's own loss does.
    """
    student_weight, student_bias = _full_head_tensors(student_head)
    teacher_weight, teacher_bias = _full_head_tensors(teacher_head)
    output_rows = student_weight.shape[0]
    vocab_size = vocab_size or output_rows
    if teacher_head is None:
        kd_weight = 0.0
    options = {
        "kd_weight": float(kd_weight), "ce_weight": float(ce_weight), "divergence": divergence,
        "temperature": float(temperature), "vocab_size": vocab_size, "beta": beta, "skew": skew,
        "num_items": targets.shape[0] if num_items_in_batch is None else num_items_in_batch,
        "student_head": student_transform, "teacher_head": teacher_transform,
        "chunk_tokens": chunk_tokens_for_budget(output_rows, memory_budget_mb),
    }
    return _ChunkedDistillationLoss.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, targets, options
    )


def _full_head_tensors(head: torch.nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of an output head; FSDP2 shards them as DTensors, gathered here (differentiably) for the loss."""
    if head is None:
        return None, None
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return weight, bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def add_distillation_forward(model: torch.nn.Module) -> None:
    """Let `model(..., distillation={...})` run the backbone and the chunked loss instead of building logits.

    The loss runs inside the model's forward on purpose: DDP and DeepSpeed hook the forward (gradient sync,
    ZeRO-3 parameter gathering), and a loss computed outside it on the raw head weight would bypass them. Without
    the `distillation` argument the forward is the original one, so generation and saving are unchanged.

    `distillation` holds: labels (batch, seq), teacher_hidden (N, Ht) at the counted positions or None,
    teacher_head (module) or None, and the keyword arguments of `chunked_distillation_loss`.
    """
    import types

    from trl.trainer.utils import maybe_gather_lm_head_ctx

    original_forward = model.forward
    transform = head_transform(model)

    def forward(self, *args, distillation: dict | None = None, **kwargs):
        if distillation is None:
            return original_forward(*args, **kwargs)
        options = dict(distillation)
        labels = options.pop("labels")
        teacher_hidden, teacher_head = options.pop("teacher_hidden"), options.pop("teacher_head")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        mask = labels[:, 1:] != -100
        head = self.get_output_embeddings()
        teacher_params = () if teacher_head is None else (teacher_head.weight, getattr(teacher_head, "bias", None))
        # Under ZeRO-3 the heads are partitioned; gather them for the loss only, once per step.
        with maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None), *teacher_params):
            loss, kd_loss, ce_loss = chunked_distillation_loss(
                hidden[:, :-1][mask], head, teacher_hidden, teacher_head, labels[:, 1:][mask],
                student_transform=transform, **options,
            )
        return {"loss": loss, "kd_loss": kd_loss, "ce_loss": ce_loss}

    model.forward = types.MethodType(forward, model)


def add_final_hidden_forward(model: torch.nn.Module) -> None:
    """Let `model(..., final_hidden_only=True)` return the backbone's last hidden state without the output head.
    Going through the model's own forward keeps the DeepSpeed and FSDP hooks that gather sharded parameters."""
    import types

    original_forward = model.forward

    def forward(self, *args, final_hidden_only: bool = False, **kwargs):
        if not final_hidden_only:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)


def teacher_hidden_at_counted_positions(teacher: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states at the positions whose next-token label counts, shape (N, Ht). Needs
    `add_final_hidden_forward(teacher)`: only the backbone runs, the logits are built chunk by chunk in the loss."""
    with torch.no_grad():
        hidden = teacher(**inputs, final_hidden_only=True)
    return hidden[:, :-1][labels[:, 1:] != -100]


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step, the term and the checkpoint to go back to."""


def check_finite_losses(parts: dict[str, float], step: int, output_dir: str, mode: str = "train") -> None:
    """Stop the run when a loss term is NaN or infinite, naming the step, the term and the last good checkpoint
    (nothing is saved after the bad step, so every checkpoint on disk predates it)."""
    bad = {name: value for name, value in parts.items() if not math.isfinite(value)}
    if not bad:
        return
    checkpoints = []
    if os.path.isdir(output_dir):
        checkpoints = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
                             and checkpoint_is_complete(os.path.join(output_dir, name)))
    last = os.path.join(output_dir, checkpoints[-1][1]) if checkpoints else "none saved yet"
    terms = ", ".join(f"{name}={value}" for name, value in parts.items())
    raise TrainingDivergedError(
        f"{' and '.join(sorted(bad))} became non-finite at {'optimizer step' if mode == 'train' else 'evaluation before step'} "
        f"{step} ({terms}). Last good checkpoint: {last}. Lower the learning rate or check the data, then resume."
    )
