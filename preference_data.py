"""Preference data for distil_dpo.py: reading preference rows (TRL's standard or conversational `prompt` /
`chosen` / `rejected`) or prompts (ShareGPT or messages; a conversation's prompt is everything before its last
assistant turn), building pairs for prompts once (chosen: the teacher's sample, rejected: the starting student's)
into output_dir/pairs.jsonl, tokenizing pairs, collating them, and the starting student's log-probabilities that
DPO's reference term reads.

pairs.jsonl: a first line {"settings": {...}} (what made the pairs: models, a teacher server's url and model, data,
sampling), then one pair per line
{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}. A rerun with the same
settings reuses it, an interrupted build continues from its last complete batch (each batch samples with a seed of
its own, so the pairs do not depend on where a build stopped), and different settings are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import torch

from common import ConfigError, print_rank0
from data import (SOURCE_ROW, detect_format, load_raw_dataset, next_token_mask, row_names, to_messages, tokenize_dataset,
                  tokenize_row, with_source_rows)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
PAIRS_FILE = "pairs.jsonl"
REFERENCE_KEYS = ("student_reference_chosen", "student_reference_rejected")  # student_*: never a model input

# ---------------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------------


def data_shape(column_names) -> str:
    """"preference" (chosen and rejected columns) or "prompts" (a conversation column); a ConfigError otherwise."""
    columns = set(column_names)
    if {"chosen", "rejected"} <= columns:
        if "prompt" not in columns:
            raise ConfigError("preference rows need a 'prompt' column besides 'chosen' and 'rejected' (TRL's explicit "
                              "prompt form); split the shared conversation prefix into 'prompt'.")
        return "preference"
    if "chosen" in columns or "rejected" in columns:
        missing = "rejected" if "chosen" in columns else "chosen"
        raise ConfigError(f"the dataset has no '{missing}' column: preference rows need prompt, chosen and rejected.")
    if detect_format(column_names) == "text":
        raise ConfigError("a text dataset has no prompts to build pairs from; give preference rows (prompt, chosen, "
                          "rejected) or conversations (ShareGPT or messages).")
    return "prompts"


def _as_messages(value, role: str, what: str) -> list[dict]:
    """A TRL field as messages: a string is one turn of `role`, a list is taken as {role, content} messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(turn, dict) and "role" in turn and "content" in turn for turn in value):
        return [{"role": turn["role"], "content": str(turn["content"])} for turn in value]
    raise ConfigError(f"'{what}' must be a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}.")


def preference_messages(row: dict, system_prompt: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a preference row; a missing or empty answer is a ConfigError."""
    for key in ("chosen", "rejected"):
        if row.get(key) in (None, "", []):
            raise ConfigError(f"the row has no {key} answer; every preference row needs a prompt, a chosen and a "
                              "rejected answer. Fix or drop it.")
    prompt = to_messages({"messages": _as_messages(row["prompt"], "user", "prompt")}, "messages", system_prompt)
    return (prompt, to_messages({"messages": _as_messages(row["chosen"], "assistant", "chosen")}, "messages"),
            to_messages({"messages": _as_messages(row["rejected"], "assistant", "rejected")}, "messages"))


def check_preference_rows(raw, name: str, system_prompt: str | None) -> None:
    """Every preference row has a chosen and a rejected answer: one ConfigError naming the first row that does not."""
    for index, row in enumerate(raw):
        try:
            preference_messages(row, system_prompt)
        except ConfigError as error:
            where = row_names(name, [row.get(SOURCE_ROW, index)])[0]
            raise ConfigError(f"dataset '{name}', {where}: {error}") from None


def prompt_messages(row: dict, data_format: str, system_prompt: str | None) -> list[dict]:
    """A conversation's prompt: the turns before its last assistant turn (all of them when it ends in another)."""
    messages = to_messages(row, data_format, system_prompt)
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def load_rows(data_config: dict, name: str | None = None, split: str | None = None):
    """The raw dataset `name` (default dataset.name), numbered (data.SOURCE_ROW), shuffled with the seed and cut to
    num_samples when it is the training set, and its shape (`data_shape`)."""
    training_set = name is None
    raw = with_source_rows(load_raw_dataset(name or data_config["name"], split or data_config.get("split", "train")))
    shape = data_shape(raw.column_names)
    if training_set:
        raw = raw.shuffle(seed=data_config["seed"])
        if data_config.get("num_samples"):
            raw = raw.select(range(min(int(data_config["num_samples"]), len(raw))))
    return raw, shape


# ---------------------------------------------------------------------------------------------------------------------
# Pairs for prompts: built once, before training
# ---------------------------------------------------------------------------------------------------------------------


def pair_settings(config: dict, rows: int, served: dict | None = None) -> dict:
    """What makes a pairs.jsonl: two runs with the same settings get the same pairs, and reuse them. `served`: the
    {url, model} of the server that samples the chosen answers (None: the teacher in this process)."""
    data, pairs = config["dataset"], config["pairs"]
    return {"teacher": str(config["models"]["teacher"]), "student": str(config["models"]["student"]),
            **({"teacher_server": dict(served)} if served else {}),
            "dataset": str(data["name"]), "split": data.get("split"), "format": data.get("format"),
            "seed": data["seed"], "num_samples": data.get("num_samples"), "system_prompt": data.get("system_prompt"),
            "chat_template": hashlib.sha256(str(config["tokenizer"]["chat_template"]).encode()).hexdigest()[:16],
            "max_length": config["tokenizer"]["max_length"], "rows": rows,
            "sampling": {key: pairs[key] for key in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size")}}


def read_pairs(path: str) -> tuple[dict | None, list[dict]]:
    """(settings, pairs) of a pairs.jsonl; a last line cut off by an interrupted write is left out."""
    if not os.path.isfile(path):
        return None, []
    settings, pairs = None, []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if number == 0:
                settings = record.get("settings")
            else:
                pairs.append(record)
    return settings, pairs


def check_pairs_file(path: str, expected: dict) -> None:
    """Refuse a pairs.jsonl made with other settings, naming what differs (before anything is written)."""
    found, _ = read_pairs(path)
    if found is None or found == expected:
        return
    differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
    shown = "; ".join(f"{key}: {found.get(key)!r} there, {expected.get(key)!r} now" for key in differing[:3])
    raise ConfigError(f"{path} holds pairs built with other settings ({shown}). Delete it to build them again, or "
                      "choose another training.output_dir.")


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of one batch of prompts: the pairs do not depend on where an interrupted build resumed."""
    return random.Random(f"pairs:{seed}:{batch}").getrandbits(63)


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one prompt's served answer (a request's own seed): the same whatever the batch."""
    return random.Random(f"pairs:{seed}:row:{row}").getrandbits(63)


def build_pairs(path: str, settings: dict, prompts: list[list[dict]], tokenizer, teacher, student,
                vocab_size: int, device) -> list[dict]:
    """Sample a chosen (teacher) and a rejected (starting student) answer for every prompt, batch by batch, appending
    each finished batch to `path` (written with its settings first); a partial file with the same settings is
    continued from its last complete batch. Returns every pair.

    `teacher` is a model in this process, or a served_teacher.ServedTeacher: the server then samples each chosen
    answer from the prompt's token ids with the same temperature, top_p, length and stop tokens, and a seed per
    prompt (`row_seed`), and the teacher's weights are never loaded here."""
    from on_policy import end_of_turn_id, sample_completions
    from served_teacher import ServedTeacher

    sampling = settings["sampling"]
    size = sampling["batch_size"]
    found, done = read_pairs(path)
    done = done[: len(done) // size * size] if found == settings else []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:  # the kept part, rewritten whole, then renamed
        handle.write(json.dumps({"settings": settings}) + "\n")
        handle.writelines(json.dumps(pair) + "\n" for pair in done)
    os.replace(path + ".tmp", path)
    if done:
        print_rank0(f"pairs: continuing {path} after {len(done)} of {len(prompts)} prompts")
    stop_ids = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
    pad = tokenizer.pad_token_id
    max_length = settings["max_length"]
    pairs = list(done)
    for start in range(len(done), len(prompts), size):
        batch = prompts[start:start + size]
        ids = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in batch]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-(max_length - 1):] for text in ids]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        new_tokens = max(1, min(sampling["max_new_tokens"], max_length - width))
        seed = batch_seed(sampling["seed"], start // size)
        draw = {"sampling_temperature": sampling["temperature"], "top_p": sampling["top_p"]}  # on_policy's key names
        if isinstance(teacher, ServedTeacher):
            chosen = teacher.sample_rows(ids, [row_seed(sampling["seed"], start + row) for row in range(len(ids))],
                                         max_tokens=new_tokens, temperature=sampling["temperature"],
                                         top_p=sampling["top_p"], stop_ids=stop_ids)
        else:
            chosen = sample_completions(teacher, input_ids, mask, draw, stop_ids, pad, vocab_size, seed, new_tokens)
        answers = [chosen, sample_completions(student, input_ids, mask, draw, stop_ids, pad, vocab_size, seed,
                                              new_tokens)]
        with open(path, "a", encoding="utf-8") as handle:
            for messages, chosen, rejected in zip(batch, *answers):
                pair = {"prompt": messages, "chosen": [_assistant(chosen, stop_ids, tokenizer)],
                        "rejected": [_assistant(rejected, stop_ids, tokenizer)]}
                handle.write(json.dumps(pair) + "\n")
                pairs.append(pair)
        print_rank0(f"pairs: {len(pairs)} of {len(prompts)} prompts answered by teacher and student")
    return pairs


def _assistant(tokens: list[int], stop_ids: list[int], tokenizer) -> dict:
    """A sampled answer as an assistant message: its tokens up to the first stop token, decoded."""
    kept = []
    for token in tokens:
        if token in stop_ids:
            break
        kept.append(token)
    return {"role": "assistant", "content": tokenizer.decode(kept, skip_special_tokens=True)}


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing and collating pairs
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_pair(row: dict, tokenizer, max_length: int, system_prompt: str | None = None) -> dict:
    """A pair as two rows of input_ids and labels (data.tokenize_row's chat template and label mask), labelled on the
    final answer only: assistant turns inside the prompt are context here, not trained."""
    prompt, chosen, rejected = preference_messages(row, system_prompt)
    out = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        tokens = tokenize_row({"messages": prompt + answer}, tokenizer, "messages", max_length)
        prompt_length = len(tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                                      add_special_tokens=False)["input_ids"])
        labels = [-100] * min(prompt_length, len(tokens["labels"])) + tokens["labels"][prompt_length:]
        out[f"{side}_input_ids"], out[f"{side}_labels"] = tokens["input_ids"], labels
    # data.tokenize_dataset drops rows without a counted position: a pair needs both answers, so the labels it counts
    # are the chosen ones when the rejected answer has some, else none.
    rejected_counted = sum(label != -100 for label in out["rejected_labels"][1:])
    return {"input_ids": out["chosen_input_ids"], "labels": out["chosen_labels"] if rejected_counted else [], **out}


def tokenize_pairs(dataset, name: str, tokenizer, max_length: int, system_prompt: str | None):
    """Tokenize pairs (data.tokenize_dataset: rows whose chosen or rejected answer has no token left after truncation
    are dropped with a warning naming them). Returns (dataset, dropped)."""
    tokenized, dropped = tokenize_dataset(dataset, name, lambda row: tokenize_pair(row, tokenizer, max_length,
                                                                                 system_prompt), max_length,
                                          "Tokenizing pairs")
    return tokenized.remove_columns(["input_ids", "labels"]), dropped


class PairCollator:
    """P pairs as 2P right-padded rows, chosen rows first (preference_loss's layout), with the stored reference
    log-probabilities when the rows have them."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        rows = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        width = max(len(row) for row in rows)
        batch = {"input_ids": torch.tensor([list(row) + [self.pad_token_id] * (width - len(row)) for row in rows]),
                 "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
                 "labels": torch.tensor([list(label) + [-100] * (width - len(label)) for label in labels])}
        if REFERENCE_KEYS[0] in examples[0]:
            batch["student_reference_logps"] = torch.tensor([e[REFERENCE_KEYS[0]] for e in examples]
                                                            + [e[REFERENCE_KEYS[1]] for e in examples], dtype=torch.float32)
        return batch


def add_reference_log_probs(dataset, student, pad_token_id: int, batch_size: int, device):
    """The dataset with the starting student's summed log-probabilities of each answer (REFERENCE_KEYS), computed
    once here, before training, so that DPO's reference never runs during training. The logits are never built
    whole: the backbone's last hidden states go through preference_loss.response_log_probs."""
    from heads import head_transform
    from preference_loss import response_log_probs

    collate = PairCollator(pad_token_id)
    transform, head = head_transform(student), student.get_output_embeddings()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
            labels = batch["labels"].to(device)
            hidden = student.base_model(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device), use_cache=False)
            mask = next_token_mask(labels)
            per_token = response_log_probs(hidden.last_hidden_state[:, :-1][mask], head, transform, labels[:, 1:][mask])
            summed = per_token.new_zeros(labels.shape[0]).index_add(0, mask.nonzero()[:, 0], per_token.float()).cpu()
            pairs = len(summed) // 2
            chosen += summed[:pairs].tolist()
            rejected += summed[pairs:].tolist()
    return dataset.add_column(REFERENCE_KEYS[0], chosen).add_column(REFERENCE_KEYS[1], rejected)
