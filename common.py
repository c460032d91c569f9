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
    # Tear the process group down before the interpreter does: left to exit, gloo's threads can abort a process
    # ("terminate called without an active exception") after a run that finished and saved.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
    if config["training"].get("packing") and model.config._attn_implementation != "flash_attention_2":
        # TRL's padding-free packing flattens a whole batch into one row; sdpa then attends over all of it with a
        # block-diagonal mask: correct, but quadratic in the batch's length (bench/padding_bench.py: 5x slower).
        print_rank0(f"warning: packing without flash_attention_2 ({name} uses {model.config._attn_implementation}) is "
                    "correct but slow: sdpa attends over the whole flattened batch. Install flash-attn or set packing: false.")
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


def prepare_datasets(data_config: dict, tokenizer, max_length: int, tokenize_dataset: Callable | None = None):
    """Load, shuffle, subsample, tokenize and split the dataset. Returns (train, eval or None, stats).

    The eval set is `eval_name` (a separate dataset) when given, else `eval_size` rows split off with the seed.
    Rows without a trainable token (no assistant turn, or truncated before one) are dropped and counted; if nothing
    is left the run stops with an error. Sequences are not padded here: the collator pads per batch (or TRL packs).
    `tokenize_dataset(raw, name, data_format) -> (dataset, dropped)` replaces the per-row tokenization (distil_hidden.py
    tokenizes each row for two tokenizers).
    """
    name = data_config["name"]
    system_prompt = data_config.get("system_prompt")
    if tokenize_dataset is None:
        def tokenize_dataset(raw, dataset_name: str, data_format: str):
            return _tokenize_dataset(raw, dataset_name, data_format, tokenizer, max_length, system_prompt)
    raw = load_raw_dataset(name, data_config.get("split", "train"))
    data_format = _format_of(raw, data_config.get("format"))
    raw = raw.shuffle(seed=data_config["seed"])
    if data_config.get("num_samples"):
        raw = raw.select(range(min(int(data_config["num_samples"]), len(raw))))
    tokenized, dropped = tokenize_dataset(raw, name, data_format)
    train, evaluation = tokenized, None
    if data_config.get("eval_name"):
        raw_eval = load_raw_dataset(data_config["eval_name"], data_config.get("eval_split", "train"))
        evaluation, _ = tokenize_dataset(raw_eval, data_config["eval_name"], _format_of(raw_eval, data_config.get("format")))
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


def topk_bucket_divergence(
    student_scaled_logits: torch.Tensor, ids: torch.Tensor, teacher_log_probs: torch.Tensor, tail: torch.Tensor,
    divergence: str, beta: float = 0.5, skew: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence on k + 1 buckets: the teacher's k stored tokens, and one bucket for all other tokens.

    Teacher buckets: exp(teacher_log_probs) and `tail` (its mass outside the top-k). Student buckets: q at the same
    ids, and q_rest = the student's mass on every other token, computed as a log-sum-exp over those tokens (not
    1 - sum, which cancels catastrophically when the top-k holds nearly everything). `student_scaled_logits` are the
    student's logits over the real vocabulary divided by the temperature. Returns shape (N,).
    """
    log_normaliser = torch.logsumexp(student_scaled_logits, -1, keepdim=True)
    student_topk = student_scaled_logits.gather(1, ids) - log_normaliser
    others = student_scaled_logits.scatter(1, ids, float("-inf"))
    student_rest = torch.logsumexp(others, -1, keepdim=True) - log_normaliser
    student_buckets = torch.cat([student_topk, student_rest], 1)
    teacher_buckets = torch.cat([teacher_log_probs, tail.clamp(min=0).log()[:, None]], 1)
    return token_divergence(student_buckets, teacher_buckets, divergence, beta, skew)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: int | None = None):
    """The teacher's top-k at temperature T from logits (N, V): (ids (N, k), log-probabilities (N, k), tail (N,)),
    the tail being the mass outside the top-k. This is what a capture stores (before quantisation)."""
    vocab_size = vocab_size or teacher_logits.shape[-1]
    log_probs = F.log_softmax(teacher_logits[:, :vocab_size].float() / temperature, -1)
    top_log_probs, ids = log_probs.topk(k, -1)
    if k == vocab_size:
        return ids, top_log_probs, torch.zeros_like(top_log_probs[:, 0])
    # The tail as a log-sum-exp over the other tokens, for the same reason as in topk_bucket_divergence.
    tail = torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), -1).exp()
    return ids, top_log_probs, tail


def topk_distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, teacher_log_probs: torch.Tensor,
    tail: torch.Tensor, divergence: str = "forward_kl", temperature: float = 1.0, vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None, beta: float = 0.5, skew: float = 0.1,
) -> torch.Tensor:
    """Reference offline KD from full student logits (batch, seq, vocab): T^2 / N * sum over counted positions of
    `topk_bucket_divergence`, the teacher given at the counted positions in order, normalised as
    `logit_distillation_loss`."""
    mask = shift_for_next_token(labels)
    vocab_size = vocab_size or student_logits.shape[-1]
    student = student_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    per_token = topk_bucket_divergence(student, ids, teacher_log_probs, tail, divergence, beta, skew)
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() * temperature**2 / torch.as_tensor(count, device=per_token.device).clamp(min=1)


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


# Bytes of one float32 (block, vocab) temporary on the CPU; a block holds 2 (the two log-softmaxes) besides its rows
# of the two logit buffers. Smaller blocks stay in cache but multiply the operations, and each operation is a
# parallel region where both threads must meet: on a machine shared with another job, 2 MiB blocks (16 rows of a
# 32768 vocabulary) made a step 4-8x slower, 16 MiB ones were unaffected. Undisturbed, 1 to 16 MiB are within ~5%.
CPU_BLOCK_BYTES = 8 * 2**20


def row_block_tokens(rows: int, device: torch.device) -> int:
    """Rows of a chunk processed together by the softmax arithmetic: CPU_BLOCK_BYTES per float32 temporary on the CPU,
    unlimited on CUDA (where per-kernel launch cost dominates and a chunk is already sized for memory)."""
    if device.type != "cpu":
        return 1 << 30
    return max(1, CPU_BLOCK_BYTES // (4 * rows))


def _transform_(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """Apply logits = softcap * tanh(scale * raw / softcap) (or scale * raw) in place; return d logits / d raw when it
    is not a constant."""
    if softcap is None:
        if scale != 1.0:
            logits.mul_(scale)
        return None
    capped = logits.mul_(scale / softcap).tanh_()
    slope = (1 - capped.square()).mul_(scale)
    capped.mul_(softcap)
    return slope


def _addmm_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator (float32) += a @ b without a rounded or temporary (vocab, hidden) product."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b.float())
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(a.float(), b.float())


class _ChunkedDistillationLoss(torch.autograd.Function):
    """kd_weight * KD + ce_weight * CE from hidden states, gradients computed chunk by chunk during the forward.

    Memory: the two (chunk, vocab) logit buffers are allocated once per call and reused by every chunk, and the
    student's is overwritten in place with d loss / d logits, so a chunk holds those two buffers and the row block's
    temporaries. The softmax arithmetic runs on row blocks (`row_block_tokens`) so that it stays in the CPU's cache.
    Forward and reverse KL use closed-form logit gradients; the other divergences, and the offline top-k buckets,
    differentiate their reference formula on each row block with autograd, so every divergence is exactly the one of
    `logit_distillation_loss` / `topk_distillation_loss`.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, options):
        o = options
        needs_grad = student_hidden.requires_grad or student_weight.requires_grad
        device, tokens = student_hidden.device, student_hidden.shape[0]
        count = torch.as_tensor(o["num_items"], dtype=torch.float32, device=device).clamp(min=1)
        temperature, vocab, rows = o["temperature"], o["vocab_size"], student_weight.shape[0]
        use_teacher = o["kd_weight"] != 0 and o["teacher_topk"] is None
        use_topk = o["kd_weight"] != 0 and o["teacher_topk"] is not None
        kd_weight = o["kd_weight"] * temperature / count  # d(T^2 * D)/ds = T * dD/d(s/T)
        ce_weight = o["ce_weight"] / count
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros_like(kd_sum)
        chunk = min(o["chunk_tokens"], max(tokens, 1))
        # The only (chunk, vocab) memory of the whole loss: one buffer per head, reused by every chunk.
        student_logits = torch.empty((chunk, rows), dtype=student_weight.dtype, device=device)
        teacher_logits = (torch.empty((chunk, teacher_weight.shape[0]), dtype=teacher_weight.dtype, device=device)
                          if use_teacher else None)
        if needs_grad:
            grad_hidden = torch.empty_like(student_hidden)
            grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
            grad_bias = None if student_bias is None else torch.zeros_like(student_bias, dtype=torch.float32)
        block = row_block_tokens(rows, device)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            hidden, logits = student_hidden[start:end], student_logits[: end - start]
            torch.mm(hidden, student_weight.t(), out=logits)
            if student_bias is not None:
                logits.add_(student_bias)
            if use_teacher:
                teacher = teacher_logits[: end - start]
                torch.mm(teacher_hidden[start:end], teacher_weight.t(), out=teacher)
                if teacher_bias is not None:
                    teacher.add_(teacher_bias)
            for row in range(0, end - start, block):
                stop = min(row + block, end - start)
                raw = logits[row:stop]
                s = raw.float()  # a view when the head is float32: the gradient then overwrites the logits in place
                slope = _transform_(s, *o["student_head"])
                block_targets = targets[start + row:start + stop]
                log_probs = F.log_softmax(s, -1)
                ce_sum -= log_probs.gather(1, block_targets[:, None]).sum()
                grad_kd = None
                if use_teacher:
                    teacher_block = teacher[row:stop].float()  # a view when float32, like s
                    _transform_(teacher_block, *o["teacher_head"])
                    log_p = F.log_softmax(teacher_block[:, :vocab].div_(temperature), -1)
                    scaled = s[:, :vocab]  # s itself is not needed any more: the CE's log-softmax is taken
                    if temperature != 1:
                        scaled.div_(temperature)
                    if o["divergence"] in ("forward_kl", "reverse_kl"):
                        # log q over the scaled logits and q over the teacher's logits (free once log p is taken):
                        # besides the two log-softmaxes the block then needs no (block, vocab) temporary.
                        q = teacher_block[:, :vocab]
                        top = scaled.amax(-1, keepdim=True)
                        total = torch.sub(scaled, top, out=q).exp_().sum(-1, keepdim=True)
                        q.div_(total)
                        log_q = scaled.sub_(total.log_().add_(top))
                    if o["divergence"] == "forward_kl":
                        diff = torch.sub(log_p, log_q, out=log_q)
                        p = log_p.exp_()
                        kd_sum += torch.einsum("ij,ij->i", p, diff).sum()
                        if needs_grad:  # dKL(p||q)/d(s/T) = q - p
                            grad_kd = q.sub_(p)
                    elif o["divergence"] == "reverse_kl":
                        diff = torch.sub(log_q, log_p, out=log_p)
                        per_token = torch.einsum("ij,ij->i", q, diff)[:, None]
                        kd_sum += per_token.sum()
                        if needs_grad:  # dKL(q||p)/d(s/T) = q * (log q - log p - KL)
                            grad_kd = diff.sub_(per_token).mul_(q)
                    else:
                        with torch.enable_grad():
                            leaf = scaled.detach().requires_grad_(needs_grad)
                            block_sum = token_divergence(F.log_softmax(leaf, -1), log_p, o["divergence"], o["beta"],
                                                         o["skew"]).sum()
                            if needs_grad:
                                (grad_kd,) = torch.autograd.grad(block_sum, leaf)
                        kd_sum += block_sum.detach()
                elif use_topk:
                    ids, teacher_log_probs, tail = (x[start + row : start + stop] for x in o["teacher_topk"])
                    with torch.enable_grad():
                        leaf = (s[:, :vocab] / temperature).detach().requires_grad_(needs_grad)
                        block_sum = topk_bucket_divergence(leaf, ids, teacher_log_probs, tail, o["divergence"],
                                                           o["beta"], o["skew"]).sum()
                        if needs_grad:
                            (grad_kd,) = torch.autograd.grad(block_sum, leaf)
                    kd_sum += block_sum.detach()
                if not needs_grad:
                    continue
                # d CE / d s = softmax(s) - onehot(target), written over the logits
                grad = torch.exp(log_probs, out=s).mul_(ce_weight)
                grad[torch.arange(stop - row, device=device), block_targets] -= ce_weight
                if grad_kd is not None:
                    grad[:, :vocab].addcmul_(grad_kd, kd_weight)
                if slope is not None:
                    grad.mul_(slope)
                elif o["student_head"][0] != 1.0:
                    grad.mul_(o["student_head"][0])
                if grad is not raw:
                    raw.copy_(grad)
            if not needs_grad:
                continue
            if grad_hidden.dtype == logits.dtype:
                torch.mm(logits, student_weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = logits @ student_weight
            _addmm_fp32(grad_weight, logits.t(), hidden)
            if grad_bias is not None:
                grad_bias.add_(logits.sum(0, dtype=torch.float32))
        del student_logits, teacher_logits
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
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("backward ran twice through the chunked distillation loss (retain_graph=True): its "
                               "gradients are computed in the forward and scaled in place, so a second pass would be "
                               "wrong. Recompute the loss instead.")
        ctx.backward_done = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # In place: a scaled copy would hold a second (vocab, hidden) gradient while autograd assigns it.
        grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.mul_(grad_loss).to(ctx.weight_dtype)
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
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_weight * KD + ce_weight * CE, equal to `logit_distillation_loss` and `causal_lm_loss`, without the full
    logits. Returns (loss, kd_loss, ce_loss); only the first carries gradients.

    `student_hidden` (N, Hs) and `teacher_hidden` (N, Ht) are the final hidden states at the N counted positions
    (already shifted: position i predicts targets[i]); the heads are the models' output-embedding modules (weight
    and optional bias), with `*_transform` = (logit scale, soft-cap) from `head_transform`. The chunk size comes from
    `memory_budget_mb` (see `chunk_tokens_for_budget`). KD uses the first `vocab_size` logits; CE uses all of them,
    as the model's own loss does.

    Offline distillation passes `teacher_topk` = (ids (N, k), log-probabilities (N, k), tail mass (N,)) at temperature
    T instead of the teacher's hidden states and head: KD is then `topk_bucket_divergence`, the divergence over the
    k stored tokens plus one bucket for everything else.
    """
    student_weight, student_bias = _full_head_tensors(student_head)
    teacher_weight, teacher_bias = _full_head_tensors(teacher_head)
    output_rows = student_weight.shape[0]
    vocab_size = vocab_size or output_rows
    if teacher_head is None and teacher_topk is None:
        kd_weight = 0.0
    options = {
        "kd_weight": float(kd_weight), "ce_weight": float(ce_weight), "divergence": divergence,
        "temperature": float(temperature), "vocab_size": vocab_size, "beta": beta, "skew": skew,
        "num_items": targets.shape[0] if num_items_in_batch is None else num_items_in_batch,
        "student_head": student_transform, "teacher_head": teacher_transform,
        "chunk_tokens": chunk_tokens_for_budget(output_rows, memory_budget_mb), "teacher_topk": teacher_topk,
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


def add_distillation_forward(model: torch.nn.Module, projections_attribute: str | None = None) -> None:
    """Let `model(..., distillation={...})` run the backbone and the chunked loss instead of building logits, and
    `model(..., project_hidden={...})` also return projected intermediate states (distil_hidden.py).

    The loss and the projections run inside the model's forward on purpose: DDP and DeepSpeed hook the forward
    (gradient sync, ZeRO-3 parameter gathering), and a loss computed outside it on the raw head weight would bypass
    them. Without these arguments the forward is the original one, so generation and saving are unchanged.

    `distillation` holds: labels (batch, seq), teacher_hidden (N, Ht) at the counted positions or None,
    teacher_head (module) or None, and the keyword arguments of `chunked_distillation_loss`; the result then has
    loss, kd_loss and ce_loss. `project_hidden` holds layer_pairs [(student_layer, teacher_layer)], rows and positions:
    the result then has projected_hidden, for each pair the student's states at (rows, positions) passed through
    the pair's projection in the ModuleDict `model.<projections_attribute>`. Only the mapped layers are recorded.
    """
    import types

    from trl.trainer.utils import maybe_gather_lm_head_ctx

    original_forward = model.forward
    transform = head_transform(model)

    def forward(self, *args, distillation: dict | None = None, project_hidden: dict | None = None, **kwargs):
        if distillation is None and project_hidden is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if project_hidden is not None:
            kwargs["output_hidden_states"] = sorted({student_layer for student_layer, _ in project_hidden["layer_pairs"]})
        outputs = self.base_model(*args, **kwargs)
        result = {}
        if project_hidden is not None:
            projections = getattr(self, projections_attribute)
            rows, positions = project_hidden["rows"], project_hidden["positions"]
            result["projected_hidden"] = [projections[projection_key(s, t)](outputs.hidden_states[s][rows, positions])
                                          for s, t in project_hidden["layer_pairs"]]
        if distillation is not None:
            options = dict(distillation)
            labels = options.pop("labels")
            teacher_hidden, teacher_head = options.pop("teacher_hidden"), options.pop("teacher_head")
            mask = shift_for_next_token(labels)
            head = self.get_output_embeddings()
            teacher_params = () if teacher_head is None else (teacher_head.weight, getattr(teacher_head, "bias", None))
            # Under ZeRO-3 the heads are partitioned; gather them for the loss only.
            with maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None), *teacher_params):
                loss, kd_loss, ce_loss = chunked_distillation_loss(
                    outputs.last_hidden_state[:, :-1][mask], head, teacher_hidden, teacher_head, labels[:, 1:][mask],
                    student_transform=transform, **options,
                )
            result.update(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss)
        return result

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
    return hidden[:, :-1][shift_for_next_token(labels)]


# ---------------------------------------------------------------------------------------------------------------------
# Offline distillation: the teacher's top-k next-token distribution, captured once, stored compactly
# ---------------------------------------------------------------------------------------------------------------------

CAPTURE_FORMAT_VERSION = 1


class TopKCodec:
    """Fixed-size binary record per trained position: the teacher's top-k token ids and probabilities.

    Layout of one record (bits, most significant first, padded to whole bytes):
    - ids: the k ids sorted ascending, Elias-Fano coded: the low L = floor(log2(V / k)) bits of each id, then the high
      parts in unary (k ones among k + (V >> L) bits). About k * (2 + log2(V / k)) bits: 843 bits for k = 64,
      V = 151,936, against 1,152 for 18-bit ids.
    - scale: the largest probability p_max, 8 bits on a log scale over [1/(e V), 1], rounded up.
    - tail: the probability mass outside the top-k, 8 bits on a log scale over [e^-30, 1] (code 0: below e^-30).
    - probabilities, in the same id order, quantised as c = round((levels - 1) * (p / scale)^0.35) with 90 levels,
      two codes per 13 bits (90 * 90 <= 2^13). Why a power: KL ~ sum p * (dlog p)^2 / 2, and with x = p^(1/2) every
      entry costs the same for the same step in x; top-k probabilities crowd near zero, so a smaller power (0.35, chosen
      by measurement on Gaussian and Zipf logits, bench/offline_bench.py) puts more levels there and cut the worst mean KL
      about threefold at k = 64. A code 0 decodes to a quarter step.
    Decoding renormalises the k probabilities and the tail to sum to 1. At k = 64 and V = 151,936 a record is
    843 + 8 + 8 + 416 = 1,275 bits = 160 bytes.
    """

    levels = 90
    pair_bits = 13
    power = 0.35

    def __init__(self, vocab_size: int, k: int):
        import numpy as np

        if not 1 <= k <= vocab_size:
            raise ConfigError(f"top_k={k} must be between 1 and the vocabulary size {vocab_size}.")
        self.vocab_size, self.k = vocab_size, k
        self.low_bits = max(0, int(np.floor(np.log2(vocab_size / k))))
        self.high_bits = k + (vocab_size >> self.low_bits) + 1
        self.pairs = (k + 1) // 2
        self.bits = k * self.low_bits + self.high_bits + 16 + self.pairs * self.pair_bits
        self.scale_floor = -np.log(vocab_size) - 1.0  # log of the smallest possible p_max, with a margin
        self.tail_floor = -30.0
        self.record_bytes = (self.bits + 7) // 8

    @staticmethod
    def _to_bits(values, width: int):
        """(n, m) unsigned ints -> (n, m * width) bits, most significant first."""
        import numpy as np

        shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
        return ((values.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8).reshape(values.shape[0], -1)

    @staticmethod
    def _from_bits(bits, width: int):
        import numpy as np

        weights = (1 << np.arange(width - 1, -1, -1, dtype=np.uint64))
        return (bits.reshape(bits.shape[0], -1, width).astype(np.uint64) * weights).sum(-1)

    def encode(self, ids, log_probs) -> "np.ndarray":
        """ids (n, k) int, log_probs (n, k) float (natural log, any order) -> (n, record_bytes) uint8."""
        import numpy as np

        ids, log_probs = np.asarray(ids, dtype=np.int64), np.asarray(log_probs, dtype=np.float64)
        n = ids.shape[0]
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1)
        probs = np.exp(np.take_along_axis(log_probs, order, 1))
        low = ids & ((1 << self.low_bits) - 1)
        high = ids >> self.low_bits
        upper = np.zeros((n, self.high_bits), dtype=np.uint8)
        np.put_along_axis(upper, high + np.arange(self.k), 1, axis=1)
        # Rounded up, so that every probability is at most the decoded scale.
        scale_code = np.clip(np.ceil(np.log(probs.max(1)) / self.scale_floor * -255 + 255), 0, 255)
        scale = np.exp(self.scale_floor * (255 - scale_code) / 255)
        tail = np.maximum(1.0 - probs.sum(1), 0.0)
        tail_code = np.clip(np.rint(255 - np.log(np.maximum(tail, 1e-300)) / self.tail_floor * 255), 0, 255)
        codes = np.power(probs / scale[:, None], self.power) * (self.levels - 1)
        codes = np.clip(np.rint(codes), 0, self.levels - 1).astype(np.int64)
        if self.k % 2:
            codes = np.concatenate([codes, np.zeros((n, 1), dtype=np.int64)], 1)
        paired = codes[:, 0::2] * self.levels + codes[:, 1::2]
        fields = [self._to_bits(low, self.low_bits) if self.low_bits else np.zeros((n, 0), np.uint8), upper,
                  self._to_bits(np.stack([scale_code, tail_code], 1).astype(np.uint64), 8),
                  self._to_bits(paired, self.pair_bits)]
        return np.packbits(np.concatenate(fields, 1), axis=1)

    def decode(self, records) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """(n, record_bytes) uint8 -> ids (n, k) int64 ascending, log_probs (n, k) float32, tail (n,) float32: the
        mass outside the top-k. Probabilities plus tail sum to 1."""
        import numpy as np

        records = np.asarray(records, dtype=np.uint8).reshape(-1, self.record_bytes)
        n = records.shape[0]
        bits = np.unpackbits(records, axis=1)[:, : self.bits]
        start = self.k * self.low_bits
        low = self._from_bits(bits[:, :start], self.low_bits) if self.low_bits else np.zeros((n, self.k), np.uint64)
        upper = bits[:, start : start + self.high_bits]
        rows, positions = np.nonzero(upper)
        if positions.shape[0] != n * self.k:
            raise ValueError("corrupt top-k record: wrong number of ids")
        high = positions.reshape(n, self.k) - np.arange(self.k)
        ids = (high.astype(np.int64) << self.low_bits) | low.astype(np.int64)
        start += self.high_bits
        scale_code, tail_code = self._from_bits(bits[:, start : start + 16], 8).astype(np.float64).T
        scale = np.exp(self.scale_floor * (255 - scale_code) / 255)
        tail = np.exp(self.tail_floor * (255 - tail_code) / 255)  # code 0: below e^-30, kept as e^-30
        paired = self._from_bits(bits[:, start + 16 :], self.pair_bits).astype(np.int64)
        codes = np.stack([paired // self.levels, paired % self.levels], 2).reshape(n, -1)[:, : self.k]
        probs = scale[:, None] * np.power(np.where(codes == 0, 0.25, codes) / (self.levels - 1), 1 / self.power)
        total = probs.sum(1) + tail
        return ids, np.log(probs / total[:, None]).astype(np.float32), (tail / total).astype(np.float32)


def vocabulary_hash(tokenizer, size: int) -> str:
    """sha256 of the token strings of ids [0, size): two tokenizers with the same hash share that vocabulary."""
    import hashlib

    by_id = {index: token for token, index in tokenizer.get_vocab().items() if index < size}
    return hashlib.sha256(json.dumps([by_id.get(i) for i in range(size)]).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of every row's input_ids and labels, in order: the exact tokens a capture was made from."""
    import hashlib

    digest = hashlib.sha256()
    for input_ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        digest.update(json.dumps([input_ids, labels]).encode())
    return digest.hexdigest()


def counted_positions(labels: list[int]) -> int:
    """How many positions of a row the loss counts (next-token label not -100)."""
    return sum(label != -100 for label in labels[1:])


class TopKCapture:
    """A teacher's top-k distribution stored on disk (parquet shards + manifest.json) and read back per batch.

    Shards are `{split}-r{rank}-{n}.parquet`, each with columns `row` (index in the split) and `records` (the row's
    TopKCodec records, one per counted position, in order). Shards are written to a temporary name and renamed, so
    a crash leaves no partial shard; a run that resumes skips the rows already written.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest_path = os.path.join(folder, "manifest.json")

    def manifest(self) -> dict | None:
        if not os.path.isfile(self.manifest_path):
            return None
        with open(self.manifest_path) as handle:
            return json.load(handle)

    def shard_paths(self, split: str) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, name) for name in os.listdir(self.folder)
                      if name.startswith(f"{split}-") and name.endswith(".parquet"))

    def _read_shard(self, path: str):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, memory_map=True)
        except Exception as error:  # noqa: BLE001 - pyarrow's many error types all mean "this file is broken"
            raise ConfigError(f"capture shard '{path}' is truncated or corrupt ({str(error).splitlines()[0]}). "
                              "Delete it and run the capture again with the same config: it resumes and redoes only "
                              "those rows.") from None

    def rows_written(self, split: str) -> set[int]:
        rows = set()
        for path in self.shard_paths(split):
            rows.update(self._read_shard(path).column("row").to_pylist())
        return rows

    def write_shard(self, split: str, rank: int, rows: list[int], records: list[bytes]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(self.folder, exist_ok=True)
        taken = {os.path.basename(p) for p in self.shard_paths(split)}
        number = 0
        while f"{split}-r{rank:03d}-{number:05d}.parquet" in taken:
            number += 1
        path = os.path.join(self.folder, f"{split}-r{rank:03d}-{number:05d}.parquet")
        table = pa.table({"row": pa.array(rows, pa.int64()), "records": pa.array(records, pa.binary())})
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    def load(self, split: str, dataset, codec: TopKCodec) -> "TopKReader":
        """Check that every row of `dataset` is in the capture with the right number of records."""
        locations = {}
        for path in self.shard_paths(split):
            table = self._read_shard(path)
            for offset, row in enumerate(table.column("row").to_pylist()):
                locations[row] = (table, offset)
        missing = [row for row in range(len(dataset)) if row not in locations]
        if missing:
            raise ConfigError(
                f"capture '{self.folder}' lacks {len(missing)} of the {len(dataset)} rows of its {split} split (first: "
                f"row {missing[0]}): a shard is missing. Run the capture again with the same config to fill them in."
            )
        return TopKReader(locations, codec, dataset)


class TopKReader:
    """Decodes the stored top-k of a batch of rows, in the order the loss counts positions."""

    def __init__(self, locations: dict, codec: TopKCodec, dataset):
        self.locations, self.codec = locations, codec
        self.expected = [counted_positions(labels) for labels in dataset["labels"]]

    def batch(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import numpy as np

        chunks = []
        for row in rows:
            table, offset = self.locations[row]
            data = np.frombuffer(table.column("records")[offset].as_py(), dtype=np.uint8)
            if data.size != self.expected[row] * self.codec.record_bytes:
                raise ConfigError(f"capture row {row} holds {data.size // self.codec.record_bytes} positions but the "
                                  f"dataset row has {self.expected[row]}: the capture does not match this data.")
            chunks.append(data)
        ids, log_probs, tail = self.codec.decode(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
        return (torch.from_numpy(ids).to(device), torch.from_numpy(log_probs).to(device),
                torch.from_numpy(tail).to(device))


def capture_settings(config: dict, tokenizer, vocab_size: int, splits: dict) -> dict:
    """What a capture depends on; training from it checks each field against its own config and data."""
    data = config["dataset"]
    return {
        "format_version": CAPTURE_FORMAT_VERSION,
        "teacher": config["models"]["teacher"],
        "vocab_size": vocab_size,
        "vocabulary_hash": vocabulary_hash(tokenizer, vocab_size),
        "chat_template": tokenizer.chat_template,
        "max_length": config["tokenizer"]["max_length"],
        "top_k": config["offline"]["top_k"],
        "temperature": config["distillation"]["temperature"],
        "dataset": {key: data.get(key) for key in ("name", "split", "format", "num_samples", "eval_size", "eval_name",
                                                   "eval_split", "seed", "system_prompt")},
        "fingerprints": {split: dataset_fingerprint(dataset) for split, dataset in splits.items()},
        "rows": {split: len(dataset) for split, dataset in splits.items()},
    }


_MISMATCH_HINTS = {
    "vocabulary_hash": "the capture was made with another tokenizer",
    "vocab_size": "the capture was made with another tokenizer",
    "chat_template": "the chat template differs",
    "max_length": "tokenizer.max_length differs",
    "temperature": "distillation.temperature differs (the stored distribution is at the capture's temperature)",
    "fingerprints": "the tokenized dataset differs (data, num_samples, seed, eval split, template or truncation)",
}


def check_capture_manifest(manifest: dict | None, expected: dict, folder: str, for_training: bool) -> None:
    """One clear error when a capture does not match the current run."""
    if manifest is None:
        if for_training:
            raise ConfigError(f"offline.capture_dir '{folder}' holds no manifest.json: run distil_logits.py with "
                              "offline.mode: capture first.")
        return
    if manifest.get("format_version") != CAPTURE_FORMAT_VERSION:
        raise ConfigError(f"capture '{folder}' has format version {manifest.get('format_version')}, this code reads "
                          f"{CAPTURE_FORMAT_VERSION}. Capture again.")
    ignore = {"teacher", "dataset", "rows"} if for_training else set()
    for key, value in expected.items():
        if key not in ignore and manifest.get(key) != value:
            hint = _MISMATCH_HINTS.get(key, f"{key} differs")
            raise ConfigError(f"capture '{folder}' does not match this run: {hint} (manifest {key}: "
                              f"{str(manifest.get(key))[:60]!r}, now: {str(value)[:60]!r}). Capture again or fix the config.")
    if for_training and not manifest.get("complete"):
        raise ConfigError(f"capture '{folder}' is not complete (the capture run stopped early). Run the capture again "
                          "with the same config: it resumes.")


def run_capture(config: dict, teacher, tokenizer, splits: dict, vocab_size: int) -> dict:
    """Write the teacher's top-k at every counted position of every split to config["offline"]["capture_dir"].

    Rows are split over processes (launch with accelerate for several GPUs); rows already in the folder are skipped,
    so an interrupted capture resumes. Returns the manifest.
    """
    import time

    import numpy as np
    from accelerate import PartialState

    offline, temperature = config["offline"], config["distillation"]["temperature"]
    state = PartialState()
    capture = TopKCapture(offline["capture_dir"])
    codec = TopKCodec(vocab_size, offline["top_k"])
    expected = capture_settings(config, tokenizer, vocab_size, splits)
    check_capture_manifest(capture.manifest(), expected, capture.folder, for_training=False)
    if state.is_main_process and capture.manifest() is None:
        os.makedirs(capture.folder, exist_ok=True)
        with open(capture.manifest_path, "w") as handle:
            json.dump({**expected, "complete": False}, handle, indent=2)
    state.wait_for_everyone()

    teacher.to(state.device)
    freeze_for_inference(teacher)
    add_final_hidden_forward(teacher)
    head = teacher.get_output_embeddings()
    transform = head_transform(teacher)
    chunk = chunk_tokens_for_budget(head.weight.shape[0], config["distillation"]["loss_memory_mb"], copies=4)
    pad_id = tokenizer.pad_token_id
    tokens, start_time = 0, time.time()
    for split, dataset in splits.items():
        done = capture.rows_written(split)
        todo = [row for row in range(len(dataset)) if row % state.num_processes == state.process_index and row not in done]
        buffer_rows, buffer_records = [], []
        for first in range(0, len(todo), offline["capture_batch_size"]):
            rows = todo[first : first + offline["capture_batch_size"]]
            examples = [dataset[row] for row in rows]
            length = max(len(example["input_ids"]) for example in examples)
            input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), length), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
            for index, example in enumerate(examples):
                size = len(example["input_ids"])
                input_ids[index, :size] = torch.tensor(example["input_ids"])
                labels[index, :size] = torch.tensor(example["labels"])
                attention_mask[index, :size] = 1
            inputs = {"input_ids": input_ids.to(state.device), "attention_mask": attention_mask.to(state.device)}
            hidden = teacher_hidden_at_counted_positions(teacher, inputs, labels.to(state.device))
            encoded = []
            with torch.no_grad():
                for begin in range(0, hidden.shape[0], chunk):
                    logits, _ = _head_logits(hidden[begin : begin + chunk], head.weight, head.bias, *transform)
                    ids, log_probs, _ = teacher_topk(logits, offline["top_k"], temperature, vocab_size)
                    encoded.append(codec.encode(ids.cpu().numpy(), log_probs.cpu().numpy()))
            records = np.concatenate(encoded) if encoded else np.zeros((0, codec.record_bytes), np.uint8)
            counts = [counted_positions(example["labels"]) for example in examples]
            for row, piece in zip(rows, np.split(records, np.cumsum(counts)[:-1])):
                buffer_rows.append(row)
                buffer_records.append(piece.tobytes())
            tokens += sum(counts)
            if len(buffer_rows) >= offline["shard_rows"] or first + offline["capture_batch_size"] >= len(todo):
                capture.write_shard(split, state.process_index, buffer_rows, buffer_records)
                buffer_rows, buffer_records = [], []
    seconds = time.time() - start_time
    print(f"capture on rank {state.process_index}: {tokens} positions in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.0f} positions/s)", flush=True)
    state.wait_for_everyone()
    manifest = {**expected, "complete": False}
    if state.is_main_process:
        for split, dataset in splits.items():
            written = capture.rows_written(split)
            if len(written) != len(dataset):
                raise ConfigError(f"capture of split {split} has {len(written)} of {len(dataset)} rows after the run.")
        positions = sum(counted_positions(labels) for dataset in splits.values() for labels in dataset["labels"])
        stored = sum(os.path.getsize(path) for split in splits for path in capture.shard_paths(split))
        manifest.update(complete=True, record_bytes=codec.record_bytes, positions=positions,
                        bytes_on_disk=stored, bytes_per_position_on_disk=stored / max(positions, 1),
                        positions_per_second=tokens / max(seconds, 1e-9))
        with open(capture.manifest_path + ".tmp", "w") as handle:
            json.dump(manifest, handle, indent=2)
        os.replace(capture.manifest_path + ".tmp", capture.manifest_path)
        print_rank0(f"capture complete: {positions} positions, {codec.record_bytes} bytes per position per record, "
                    f"{stored / max(positions, 1):.1f} bytes per position on disk, in {capture.folder}")
    state.wait_for_everyone()
    return manifest


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


# ---------------------------------------------------------------------------------------------------------------------
# Hidden-state distillation
# Layer maps, aligning two tokenizations of one row, paired datasets and their collator, and the projection file.
# ---------------------------------------------------------------------------------------------------------------------

HIDDEN_LOSSES = ("mse", "cosine")
PROJECTIONS_FILE = "hidden_projections.safetensors"


def model_shape(name: str) -> tuple[int, int]:
    """(number of transformer blocks, hidden size) of a causal LM, read from its config without loading weights."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(name).get_text_config()
    except OSError as error:
        raise ConfigError(f"could not load the config of '{name}': {str(error).splitlines()[0]}") from None
    return model_config.num_hidden_layers, model_config.hidden_size


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Every student block s = 1..S matched to teacher block ceil(s * T / S).

    The teacher's T blocks are cut into S equal groups and student block s matches the last block of group s, so the
    last student block always matches the last teacher block. S = 2, T = 4: (1, 2), (2, 4); S = 3, T = 4: (1, 2),
    (2, 3), (3, 4); S = 4, T = 2: (1, 1), (2, 1), (3, 2), (4, 2). Blocks count from 1 as in `output_hidden_states`
    (index 0 is the embedding output; index T is the last block after the final norm).
    """
    return [(block, -(-block * teacher_layers // student_layers)) for block in range(1, student_layers + 1)]


def check_layer_map_format(layer_map: Any) -> None:
    """'uniform', or a non-empty list of distinct [student_layer, teacher_layer] pairs of positive integers."""
    if layer_map == "uniform":
        return
    example = "e.g. [[1, 2], [2, 4]] (student block, teacher block; blocks count from 1)"
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ConfigError(f"distillation.layer_map must be 'uniform' or a list of [student_layer, teacher_layer] pairs, {example}; got {layer_map!r}.")
    for pair in layer_map:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(type(x) is int for x in pair)):
            raise ConfigError(f"distillation.layer_map entry {pair!r} is not a [student_layer, teacher_layer] pair of integers, {example}.")
        if min(pair) < 1:
            raise ConfigError(
                f"distillation.layer_map entry {list(pair)} names layer 0, the embedding output. Blocks count from 1 "
                "(as in output_hidden_states); map transformer blocks only."
            )
    if len({tuple(pair) for pair in layer_map}) != len(layer_map):
        raise ConfigError(f"distillation.layer_map {layer_map!r} repeats a pair; list each pair once.")


def resolve_layer_map(layer_map: Any, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs of `layer_map` ('uniform' or explicit pairs), checked against the two
    models' block counts. A layer the model does not have is a ConfigError."""
    check_layer_map_format(layer_map)
    if layer_map == "uniform":
        return uniform_layer_map(student_layers, teacher_layers)
    for student_layer, teacher_layer in layer_map:
        for which, layer, count in (("student", student_layer, student_layers), ("teacher", teacher_layer, teacher_layers)):
            if layer > count:
                raise ConfigError(
                    f"distillation.layer_map pair [{student_layer}, {teacher_layer}] names {which} layer {layer}, but "
                    f"the {which} has {count} blocks (valid layers: 1 to {count})."
                )
    return [(int(student_layer), int(teacher_layer)) for student_layer, teacher_layer in layer_map]


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
            f"({len(student_spans)} and {len(teacher_spans)}) for the same row. Set tokenizer.student_chat_template and "
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


def check_chat_templates(data_config: dict, tokenizers: dict) -> None:
    """A conversation dataset needs a chat template for every tokenizer ({'teacher': ..., 'student': ...})."""
    missing = [which for which, tokenizer in tokenizers.items() if not tokenizer.chat_template]
    if not missing:
        return
    raw = load_raw_dataset(data_config["name"], data_config.get("split", "train"))
    if _format_of(raw, data_config.get("format")) != "text":
        raise ConfigError(
            f"the {' and '.join(missing)} tokenizer has no chat template to render conversations with. Set "
            f"tokenizer.{missing[0]}_chat_template (e.g. common.CHATML_TEMPLATE)."
        )


def _pair_dataset(raw, name: str, data_format: str, student_tokenizer, teacher_tokenizer, max_length: int,
                  system_prompt: str | None):
    """Tokenize every row for both models, then drop (and count) rows left with no trainable student token."""

    def tokenize(row: dict) -> dict:
        return tokenize_row_pair(row, student_tokenizer, teacher_tokenizer, data_format, max_length, system_prompt)

    paired = raw.map(tokenize, remove_columns=raw.column_names, desc="Tokenizing for student and teacher")
    keep = [i for i, labels in enumerate(paired["labels"]) if any(label != -100 for label in labels[1:])]
    if not keep:
        raise ConfigError(
            f"no row of dataset '{name}' has a trainable token after formatting and truncation to "
            f"max_length={max_length} (no assistant turn, or max_length too small). Raise tokenizer.max_length or "
            "check the data."
        )
    if len(keep) < len(paired):
        print_rank0(f"dropped {len(paired) - len(keep)} of {len(paired)} rows of '{name}' with no trainable token")
    return paired.select(keep), len(paired) - len(keep)


def prepare_paired_datasets(data_config: dict, student_tokenizer, teacher_tokenizer, max_length: int):
    """`prepare_datasets` for a teacher with another tokenizer or template: the same rows, shuffling, subsampling,
    dropping and eval split, with each row tokenized by `tokenize_row_pair`. Returns (train, eval or None, stats).

    A training set in which alignment leaves no position to compare is an error (nothing to distil).
    """
    name, system_prompt = data_config["name"], data_config.get("system_prompt")

    def pair(raw, dataset_name: str, data_format: str):
        return _pair_dataset(raw, dataset_name, data_format, student_tokenizer, teacher_tokenizer, max_length,
                             system_prompt)

    train, evaluation, stats = prepare_datasets(data_config, student_tokenizer, max_length, tokenize_dataset=pair)
    aligned = sum(len(positions) for positions in train["student_positions"])
    trained = sum(sum(label != -100 for label in labels[1:]) for labels in train["labels"])
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
    with -1 (not a position)."""

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
        }


def projection_key(student_layer: int, teacher_layer: int) -> str:
    """Name of a pair's projection in the ModuleDict and in the saved file ('3_6': student block 3, teacher block 6)."""
    return f"{student_layer}_{teacher_layer}"


def add_hidden_layers_forward(model: torch.nn.Module) -> None:
    """Let `model(..., hidden_layers=[...])` return the backbone's hidden states at those `output_hidden_states`
    indices (a tuple indexed like `output_hidden_states`, None at the other indices), without the output head. Only
    the requested layers are kept. Going through the model's own forward keeps the DeepSpeed and FSDP hooks."""
    import types

    original_forward = model.forward

    def forward(self, *args, hidden_layers: list[int] | None = None, **kwargs):
        if hidden_layers is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, output_hidden_states=list(hidden_layers), **kwargs).hidden_states

    model.forward = types.MethodType(forward, model)


def build_projections(layer_pairs: list[tuple[int, int]], student_hidden_size: int, teacher_hidden_size: int,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.ModuleDict:
    """One Linear(student_hidden_size -> teacher_hidden_size) per mapped pair, biases at zero. The weight starts as the
    identity when the sizes match, else as a random semi-orthogonal matrix (it preserves norms on the smaller side),
    so the hidden loss starts from a map that neither erases nor inflates the student's signal. `seed` makes the
    random matrices reproducible."""
    generator = torch.Generator().manual_seed(seed)
    projections = torch.nn.ModuleDict()
    for student_layer, teacher_layer in layer_pairs:
        projection = torch.nn.Linear(student_hidden_size, teacher_hidden_size, bias=True, dtype=dtype)
        with torch.no_grad():
            if student_hidden_size == teacher_hidden_size:
                projection.weight.copy_(torch.eye(teacher_hidden_size, dtype=dtype))
            else:
                projection.weight.copy_(torch.nn.init.orthogonal_(torch.empty(teacher_hidden_size, student_hidden_size),
                                                                generator=generator))
            projection.bias.zero_()
        projections[projection_key(student_layer, teacher_layer)] = projection
    return projections


def save_projections(tensors: dict[str, torch.Tensor], layer_pairs: list[tuple[int, int]], folder: str) -> str:
    """Write the projections' tensors ('3_6.weight', '3_6.bias', ...) to folder/hidden_projections.safetensors, with
    the layer map (student block, teacher block; 1-based) in the file's metadata. Returns the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROJECTIONS_FILE)
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, path,
              metadata={"format": "pt", "layer_map": json.dumps([list(pair) for pair in layer_pairs])})
    return path


def load_projections(folder: str) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Read folder/hidden_projections.safetensors: (tensors, layer map). A missing file is a ConfigError."""
    from safetensors import safe_open

    path = os.path.join(folder, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"'{folder}' has no {PROJECTIONS_FILE}; it was not written by distil_hidden.py.")
    with safe_open(path, framework="pt") as handle:
        layer_pairs = [tuple(pair) for pair in json.loads(handle.metadata()["layer_map"])]
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, layer_pairs
