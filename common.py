"""Mechanics shared by distil_logits.py and distil_hidden.py: errors and printing, config merging and checks,
checkpoints, training arguments, model and tokenizer loading, teacher placement, Spectrum freezing, loss-part
logging (saving a finished run: finished_run.py).

Nothing here is an experiment choice: those live in each script's `config` dict. Datasets, chat rendering and label
masks are in data.py, the losses in losses.py (across tokenizers: cross_tokenizer_loss.py; output heads: heads.py),
the teacher's signal per batch in teacher_signal.py, the trainers' shared base in distillation_trainer.py, the offline
capture format in offline.py, tokenizer alignment in alignment.py, layer maps and projections in projections.py.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
import re
import sys
from typing import Any, Callable

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Errors and printing
# ---------------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A user mistake: the message says what is wrong and how to fix it. Scripts print it as one line and exit."""


# DeepSpeed is imported by accelerate whenever it is installed, and on a machine without CUDA its accelerator probe
# warns "Setting accelerator to CPU" in every run, DeepSpeed or not. CPU is then the only choice, so say it up front.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


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
    merged = config
    try:
        merged = load_overrides(config, sys.argv[1:])
        main(merged)
    except (ConfigError, TrainingDivergedError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if is_main_process():
            print(f"\ninterrupted: {how_to_resume(merged)}", file=sys.stderr, flush=True)
        sys.exit(130)
    # Tear the process group down before the interpreter does: left to exit, gloo's threads can abort a process
    # ("terminate called without an active exception") after a run that finished and saved.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Config: --config FILE deep-merged into the inline dict
# ---------------------------------------------------------------------------------------------------------------------


def did_you_mean(key: str, known) -> str:
    """' Did you mean 'x'?' for the known key nearest to a misspelt one, or '' when none is close."""
    close = difflib.get_close_matches(str(key), [str(name) for name in known], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


# Keys renamed since an earlier version: a config that still uses the old name is told the new one.
RENAMED_KEYS = {"tokenizer.student_chat_template": "tokenizer.chat_template"}


def check_renamed_key(where: str) -> None:
    """One error naming the new key when `where` (a dotted config key) is an old name of it."""
    if where in RENAMED_KEYS:
        raise ConfigError(f"config key '{where}' is now called '{RENAMED_KEYS[where]}'. Rename it in your config.")


# Training keys that say the same thing two ways: an override that sets one replaces the dict's other.
_ALTERNATIVE_TRAINING_KEYS = {"warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_steps"}


def deep_merge(base: dict, overrides: dict, path: str = "") -> dict:
    """Return a copy of `base` with `overrides` merged in, recursively. A key that `base` does not have is an error
    (typos must not be silently ignored), except below keys whose default is None or a free-form dict such as
    `training`, which is checked later against the Trainer's own arguments. An override of training.warmup_steps
    drops the dict's warmup_ratio (and the reverse): the override says how to warm up."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        where = f"{path}{key}"
        if key not in merged:
            check_renamed_key(where)
            raise ConfigError(f"unknown config key '{where}'.{did_you_mean(key, merged)} Check its spelling against the "
                              "script's `config` dict.")
        if isinstance(merged[key], dict) and merged[key] and isinstance(value, dict) and not where == "training":
            merged[key] = deep_merge(merged[key], value, where + ".")
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            if where == "training":
                check_training_keys(value)
                for set_key, other in _ALTERNATIVE_TRAINING_KEYS.items():
                    if set_key in value and other not in value:
                        merged[key].pop(other, None)
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_config_keys(config: dict, schema: dict, path: str = "") -> None:
    """Check the config dict a script's main() receives against the keys it reads (`schema`: section -> tuple of
    keys, or None for a top-level value), so a misspelt or deleted key in an edited `config` is one error naming it
    and the nearest known key, not a KeyError after the data and models are loaded. `training` may hold any
    SFTConfig field besides its listed keys."""
    if not isinstance(config, dict):
        raise ConfigError(f"config{' section ' + repr(path.rstrip('.')) if path else ''} must be a dict, got "
                          f"{type(config).__name__}.")
    for key in config:
        if key not in schema and not (path == "training." and key in training_keys()):
            check_renamed_key(f"{path}{key}")
            known = set(schema) | (training_keys() if path == "training." else set())
            raise ConfigError(f"unknown config key '{path}{key}'.{did_you_mean(key, known)} Fix it in the `config` "
                              "dict (docs/config.md lists every key).")
    for key, keys in schema.items():
        if key not in config:
            raise ConfigError(f"config key '{path}{key}' is missing.{did_you_mean(key, config)} Add it back to the "
                              "`config` dict (docs/config.md lists every key and its default).")
        if keys is not None:
            check_config_keys(config[key], {name: None for name in keys}, f"{path}{key}.")


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
    try:
        return deep_merge(config, overrides)
    except ConfigError as error:  # the typo is in the file, not in the script's dict: say so
        raise ConfigError(f"--config file '{args.config}': {error}") from None


def check_output_dir(config: dict) -> None:
    """Refuse to train into a folder that already holds a finished run or the checkpoints of an unfinished one,
    unless asked to overwrite or resume: started again from step 0, a run's checkpoint rotation would delete them."""
    training = config["training"]
    output_dir = training["output_dir"]
    if training.get("resume_from_checkpoint") or training.get("overwrite_output_dir"):
        return
    if os.path.isfile(os.path.join(output_dir, "distillation_config.json")):
        # Resuming a finished run with the same schedule starts at its last step and trains nothing.
        checkpoints = complete_checkpoints(output_dir)
        further = (f"; to train it further, raise training.num_train_epochs (or max_steps) and set "
                   f"training.resume_from_checkpoint: true (it continues from {os.path.basename(checkpoints[-1][1])})"
                   if checkpoints else "")
        raise ConfigError(
            f"output_dir '{output_dir}' already holds a finished run. Choose another output_dir for a new run, or set "
            f"training.overwrite_output_dir: true to replace it{further}."
        )
    checkpoints = _checkpoint_folders(output_dir)
    if checkpoints:
        raise ConfigError(
            f"output_dir '{output_dir}' holds checkpoints of an unfinished run (newest: "
            f"{os.path.basename(checkpoints[-1][1])}). Set training.resume_from_checkpoint: true to continue it, or "
            "training.overwrite_output_dir: true to start again and delete them, or choose another output_dir."
        )


def how_to_resume(config: dict) -> str:
    """One line for an interrupted run: the checkpoint it can resume from and the key to set."""
    output_dir = (config.get("training") or {}).get("output_dir") if isinstance(config, dict) else None
    checkpoints = complete_checkpoints(output_dir) if output_dir else []
    if not checkpoints:
        return f"no checkpoint was saved yet in {output_dir}; launching again starts from the beginning."
    return (f"the newest complete checkpoint is {checkpoints[-1][1]}. Launch again with "
            "training.resume_from_checkpoint: true to continue from it.")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint-N folder in output_dir, oldest first."""
    return [(step, path) for step, path in _checkpoint_folders(output_dir) if checkpoint_is_complete(path)]


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def checkpoint_is_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last in a checkpoint: without it the save was cut off."""
    has_weights = any(name.startswith(("model", "pytorch_model", "adapter_model")) or name.startswith("global_step")
                      for name in os.listdir(path))
    return has_weights and os.path.isfile(os.path.join(path, "trainer_state.json"))


def resolve_resume_checkpoint(output_dir: str, resume: bool | str | None, overwrite: bool = False) -> str | None:
    """Turn training.resume_from_checkpoint into a checkpoint path, never one whose save was cut off.

    True picks the newest complete checkpoint-N in output_dir (newer, incomplete ones are named and left alone) and
    starts fresh when there is none, so a preempted job can be relaunched with the same config. A path must be a
    complete checkpoint. Starting again with `overwrite` (training.overwrite_output_dir) deletes the old run's
    checkpoint-N folders and its finished-run marker first: left there, the Trainer's rotation would keep the old,
    higher-numbered checkpoints and delete the new run's, and a later resume would pick an old one.
    """
    if not resume:
        if overwrite and is_main_process():
            import shutil

            for _, path in _checkpoint_folders(output_dir):
                shutil.rmtree(path)
            marker = os.path.join(output_dir, "distillation_config.json")
            if os.path.isfile(marker):
                os.remove(marker)
        return None
    if isinstance(resume, str):
        if not os.path.isdir(resume) or not checkpoint_is_complete(resume):
            raise ConfigError(f"resume_from_checkpoint '{resume}' is not a complete checkpoint folder (no "
                              "trainer_state.json or weights). Point it at another checkpoint-N, or set it to true.")
        return resume
    found = _checkpoint_folders(output_dir)
    complete = [(step, path) for step, path in found if checkpoint_is_complete(path)]
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
_OWN_TRAINING_KEYS = {"warmup_ratio", "resume_from_checkpoint", "overwrite_output_dir", "save_dtype"}


def training_keys() -> set[str]:
    """Every key config["training"] may hold: the SFTConfig/TrainingArguments fields and this project's own."""
    import dataclasses

    from trl import SFTConfig

    return {field.name for field in dataclasses.fields(SFTConfig)} | _OWN_TRAINING_KEYS


def check_training_keys(training: dict) -> None:
    """An unknown training key is an error naming it (and the nearest field), not a TypeError from the dataclass."""
    known = training_keys()
    for key in training:
        if key not in known:
            raise ConfigError(f"unknown config key 'training.{key}': it is not an SFTConfig/TrainingArguments field."
                              f"{did_you_mean(key, known)}")


def build_sft_config(config: dict, **extra: Any):
    """Build TRL's SFTConfig from config["training"] plus the data keys it needs.

    - `warmup_ratio` (transformers 4 name) becomes `warmup_steps`, which transformers 5 reads as a ratio below 1.
    - `use_cpu` is set when no CUDA device exists: under accelerate + DeepSpeed on the CPU the Trainer otherwise
      miscounts the processes. `bf16` stays on there: accelerate then autocasts to bf16 on the CPU, so the
      mixed-precision path runs (slowly) in tests and CI too.
    - An unknown key is an error naming it, not a TypeError from inside the dataclass.
    """
    from trl import SFTConfig

    training = dict(config["training"])
    check_training_keys(training)
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
    training.setdefault("report_to", "none")
    training.setdefault("remove_unused_columns", False)
    if not training.get("packing"):
        # data.prepare_datasets already tokenized, truncated and dropped rows; TRL's preparation would map and filter
        # every row again (reading the whole dataset into the process's resident memory). Packing still needs it.
        training.setdefault("dataset_kwargs", {"skip_prepare_dataset": True})
    training.update(extra)
    return SFTConfig(**training)


STUDENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAVE_DTYPES = {**STUDENT_DTYPES, "float16": torch.float16}


def check_precision(config: dict) -> None:
    """Check the precision settings once, before anything is loaded or written.

    `training.bf16` / `fp16` are mixed precision: float32 weights, gradients and Adam moments, with the forward and
    backward autocast to 16 bits. `model_config.student_dtype: bfloat16` stores the student's weights, gradients and
    Adam moments in bf16 instead, which loses every update below half a bf16 ulp (at lr 2e-5 most of them), so it is
    allowed only with AdamW that compensates with Kahan summation (`student_optimizer`).
    """
    training = config["training"]
    student_dtype = config["model_config"].get("student_dtype", "float32")
    if student_dtype not in STUDENT_DTYPES:
        raise ConfigError(f"model_config.student_dtype must be float32 or bfloat16, got {student_dtype!r}.")
    if training.get("save_dtype") not in (None, *SAVE_DTYPES):
        raise ConfigError(f"training.save_dtype must be null (the student checkpoint's own dtype), float32, bfloat16 "
                          f"or float16, got {training['save_dtype']!r}.")
    if training.get("fp16") and not torch.cuda.is_available():
        raise ConfigError("training.fp16 needs a CUDA device: accelerate does not autocast to fp16 on the CPU, so the "
                          "run would silently train in float32. Use bf16: true on the CPU.")
    if student_dtype == "bfloat16":
        if not training.get("bf16") or training.get("fp16"):
            raise ConfigError("model_config.student_dtype: bfloat16 needs training.bf16: true (and fp16: false).")
        if training.get("deepspeed") or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise ConfigError("model_config.student_dtype: bfloat16 does not apply under DeepSpeed, which keeps its own "
                              "float32 master weights; set it to float32 (ZeRO shards those instead).")
        if training.get("optim", "adamw_torch_fused") not in ("adamw_torch", "adamw_torch_fused"):
            raise ConfigError(f"model_config.student_dtype: bfloat16 trains with optimi's AdamW with Kahan summation, "
                              f"not training.optim={training['optim']!r}. Remove training.optim or use float32 weights.")
        try:
            import optimi  # noqa: F401
        except ImportError:
            raise ConfigError("model_config.student_dtype: bfloat16 needs torch-optimi (AdamW with Kahan summation): "
                              "pip install torch-optimi==0.3.3, or set student_dtype: float32.") from None


def model_dtype(config: dict, trainable: bool = True) -> torch.dtype:
    """The dtype a model's weights are loaded in.

    The student (trainable) is float32 unless `model_config.student_dtype` says bfloat16: mixed precision keeps float32
    master weights and autocasts, because bf16 weights lose AdamW's small updates. The frozen teacher is loaded in the
    autocast dtype (bf16 or fp16) when mixed precision is on: it is never updated, so there is no update to lose; it
    takes 2 bytes per parameter instead of 4; and accelerate autocasts only the student's forward, so 16-bit weights are
    what makes the teacher compute in 16 bits at all (its norms then run in 16 bits too, where autocast would keep
    float32).
    """
    training = config["training"]
    if trainable:
        return STUDENT_DTYPES[config["model_config"].get("student_dtype", "float32")]
    if training.get("bf16"):
        return torch.bfloat16
    if training.get("fp16"):
        return torch.float16
    return torch.float32


def student_optimizer(config: dict, args) -> tuple[type, dict] | None:
    """The Trainer's `optimizer_cls_and_kwargs`: None (its own AdamW) for float32 weights; for bf16 weights, optimi's
    AdamW with Kahan summation (a bf16 buffer per weight keeps the part of each update that rounding dropped), with
    the Trainer's learning rate, betas, epsilon and weight decay (the Trainer still groups the parameters that are
    not decayed)."""
    if config["model_config"].get("student_dtype", "float32") != "bfloat16":
        return None
    from optimi import AdamW

    return AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                   "weight_decay": args.weight_decay, "kahan_sum": True}


# ---------------------------------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------------------------------


_warned_once: set[str] = set()


def warn_once(message: str) -> None:
    """A warning printed once per process (on rank 0), however many models or datasets ask for it."""
    if message not in _warned_once:
        _warned_once.add(message)
        print_rank0(f"warning: {message}")


def attention_implementation(use_flash_attention: bool) -> str:
    """flash_attention_2 when asked for and importable on a CUDA machine, else sdpa. Only a GPU without flash-attn
    is warned about (once per run): without CUDA, sdpa is the only choice and there is nothing to fix."""
    if not use_flash_attention or not torch.cuda.is_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        warn_once("flash-attn is not installed; using sdpa attention (slower and more memory at long sequences). "
                  "Install it (setup.sh does on CUDA machines) or set model_config.use_flash_attention: false.")
    return "sdpa"


def model_source(name: str) -> str:
    """What `from_pretrained` reads for a configured model name: the local folder (with ~ expanded) when there is one,
    else the Hub id as given. A name that can only be a local path (it starts with /, ./, ../ or ~, or has more than
    one /, which no Hub id has) but names no folder is a ConfigError saying so, not the Hub's repo-id error."""
    path = os.path.expanduser(str(name))
    if os.path.isdir(path):
        return path
    text = str(name)
    looks_local = (text.startswith(("/", "./", "../", "~")) or text in (".", "..") or text.count("/") > 1
                   or (os.sep != "/" and os.sep in text))
    if not looks_local:
        return text
    if os.path.exists(path):
        raise ConfigError(f"model path '{name}' is a file; give the folder that holds config.json and the weights.")
    parent, base = os.path.split(os.path.normpath(path))
    nearby = ""
    if os.path.isdir(parent or "."):
        folders = [entry for entry in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", entry))]
        close = difflib.get_close_matches(base, folders, n=1, cutoff=0.6)
        nearby = f" Did you mean '{os.path.join(os.path.dirname(text.rstrip('/')), close[0])}'?" if close else ""
    raise ConfigError(f"model folder '{name}' does not exist.{nearby} Fix the path in models.student or models.teacher "
                      "(or give a Hub id, namespace/name).")


def load_error(what: str, name: str, error: Exception) -> ConfigError:
    """One line for a model, config or tokenizer that `from_pretrained` could not load."""
    text = " ".join(str(error).split())
    if "trust_remote_code" in text:
        return ConfigError(
            f"{what} '{name}' needs Python code shipped with the checkpoint (trust_remote_code), which these scripts do "
            "not run. Use a checkpoint of an architecture transformers includes, or, if you trust that code, pass "
            "trust_remote_code=True in common.load_causal_lm, load_tokenizer and projections.model_shape."
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"could not load {what} '{name}': {first}")


def load_tokenizer(name: str, chat_template: str | None = None, template_key: str | None = None):
    """Load a tokenizer, give it a pad token if it has none, and set the chat template if one is configured (a name
    such as "chatml", or Jinja text; None keeps the tokenizer's own). With `template_key` (the config key that chose
    the template), a template whose turn markers are not single special tokens of the tokenizer is refused in one
    line naming that key (data.check_chat_template)."""
    from transformers import AutoTokenizer

    from data import check_chat_template, resolve_chat_template  # data imports this module

    chat_template = resolve_chat_template(chat_template)

    source = model_source(name)
    try:
        # trust_remote_code=False: a checkpoint with its own code is refused at once (None would prompt on stdin).
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise load_error("the tokenizer of", name, error) from None
    if not tokenizer.is_fast:
        raise ConfigError(f"the tokenizer of '{name}' is not a fast tokenizer; label masks need its offset mapping.")
    if tokenizer.pad_token is None:
        # Padding positions get label -100 and attention mask 0, so reusing EOS as pad never trains on it.
        tokenizer.pad_token = tokenizer.eos_token
    own_template = tokenizer.chat_template
    if chat_template:
        tokenizer.chat_template = chat_template
    if template_key and tokenizer.chat_template:
        check_chat_template(tokenizer, name, template_key, own_template)
    return tokenizer


def return_large_frees_to_the_system() -> None:
    """Make glibc give every freed buffer of 128 KiB or more back to the system at once (Linux; a no-op elsewhere).

    Under ZeRO-3 each layer is gathered to full size, used and freed, while loading and at every forward. glibc raises
    its mmap threshold to the size of the first large buffer freed (up to 32 MiB), so later layer-sized buffers come
    from the heap, where freed ones stay resident between live shards: measured +0.15x the teacher's float32 size per
    rank on top of its half shard with 2 processes (bench/zero3_memory.py, docs/performance.md). A fixed threshold
    (glibc's initial 128 KiB) keeps each large buffer in its own mapping, unmapped when freed.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_causal_lm(name: str, config: dict, trainable: bool = True, **placement):
    """Load a causal LM in the configured precision and attention implementation (`placement`: from_pretrained's
    device_map and max_memory, if any). A frozen model (the teacher) is put in eval mode with every dropout probability
    set to zero and no gradients."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return_large_frees_to_the_system()
    source = model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=model_dtype(config, trainable),
            attn_implementation=attention_implementation(config["model_config"]["use_flash_attention"]),
            trust_remote_code=False,
            **placement,
        )
    except (OSError, ValueError) as error:
        raise load_error("the model", name, error) from None
    if not trainable:
        freeze_for_inference(model)
    if config["training"].get("packing") and model.config._attn_implementation != "flash_attention_2":
        # TRL's padding-free packing flattens a whole batch into one row; sdpa then attends over all of it with a
        # block-diagonal mask: correct, but quadratic in the batch's length (bench/padding_bench.py: 5x slower).
        print_rank0(f"warning: packing without flash_attention_2 ({name} uses {model.config._attn_implementation}) is "
                    "correct but slow: sdpa attends over the whole flattened batch. Install flash-attn or set packing: false.")
    return model


def without_tied_missing_keys(model: torch.nn.Module, load_result):
    """`load_result` (of `load_state_dict(..., strict=False)`) less the missing keys of weights tied to a loaded one.

    A tied output head (tie_word_embeddings) is saved once, as the input embedding, so no checkpoint holds
    `lm_head.weight`; loading the embedding restores both, yet the Trainer warns on resume that the head is missing.
    Only keys whose parameter is the very tensor of a loaded source are dropped: a head that is really missing stays.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = set(load_result.missing_keys)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    restored = {key for key, source in tied.items() if key in missing and source not in missing
                and key in parameters and parameters.get(source) is parameters[key]}
    return load_result._replace(missing_keys=[key for key in load_result.missing_keys if key not in restored])


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
    """Rows of the model's output head (often padded beyond the tokenizer, e.g. 151936 vs 152064 in Qwen2). ZeRO-3
    leaves a partitioned parameter empty and keeps its shape in ds_shape."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


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
        numel = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 partitions at load; ds_numel is whole
        total += numel
        trainable += numel if keep else 0
    if not matched:
        raise ConfigError(
            "no parameter name matches the Spectrum file's patterns (was it made for another model?). Example "
            f"parameter name: '{next(iter(dict(model.named_parameters())))}'."
        )
    print_rank0(f"Spectrum: training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.1f}%)")
    return trainable, total


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step, the term and the checkpoint to go back to."""


def check_finite_losses(parts: dict[str, float], step: int, output_dir: str, mode: str = "train") -> None:
    """Stop the run when a loss term is NaN or infinite, naming the step, the term and the last good checkpoint
    (nothing is saved after the bad step, so every checkpoint on disk predates it)."""
    bad = {name: value for name, value in parts.items() if not math.isfinite(value)}
    if not bad:
        return
    checkpoints = complete_checkpoints(output_dir)
    last = checkpoints[-1][1] if checkpoints else "none saved yet"
    terms = ", ".join(f"{name}={value}" for name, value in parts.items())
    raise TrainingDivergedError(
        f"{' and '.join(sorted(bad))} became non-finite at {'optimizer step' if mode == 'train' else 'evaluation before step'} "
        f"{step} ({terms}). Last good checkpoint: {last}. Lower the learning rate or check the data, then resume."
    )


class LossPartLog:
    """Each loss part's exact mean over a logging interval (per token for KD and CE, per aligned position for the
    hidden loss), whatever the batch split and the number of processes, plus the NaN/inf stop.

    A micro-step costs no collective and no host sync: each process adds its parts' (sum, items) pairs, and the first
    step at which a part's sum was non-finite, to tensors on its device. Only `pop_means` (the logging step) and
    `check` (before a checkpoint is saved) reduce them over the processes, one all_reduce, and read them; a non-finite
    sum then stops every process together, naming the part and the step it first went bad. A plain sum on purpose:
    `gather_for_metrics` drops the samples accelerate duplicates on an epoch's last uneven batch, and applied to
    per-process scalars that drops whole processes from the log and from the NaN check.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.names: dict[str, list[str]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad: dict[str, torch.Tensor] = {}  # per part: the first step of a non-finite sum, inf if none
        self.output_dir = ""

    def add(self, mode: str, step: int, output_dir: str, **parts: tuple) -> None:
        """parts: name -> (value, normaliser, items), where value * normaliser is this micro-batch's sum over its
        `items` tokens or positions. Device operations only: nothing is reduced or read here."""
        values = [value.detach().float().reshape(()) for value, _, _ in parts.values()]
        device = values[0].device
        local = torch.stack([torch.stack([value * torch.as_tensor(normaliser, device=device).float(),
                                          torch.as_tensor(items, device=device).float()])
                             for value, (_, normaliser, items) in zip(values, parts.values())])
        bad_at = torch.where(torch.isfinite(local[:, 0]), math.inf, float(step))
        if mode in self.sums:
            self.sums[mode] += local
            torch.minimum(self.first_bad[mode], bad_at, out=self.first_bad[mode])
        else:
            self.names[mode], self.sums[mode], self.first_bad[mode] = list(parts), local, bad_at
        self.output_dir = output_dir

    def _reduced(self, mode: str) -> list[list[float]]:
        """The interval's (sum, items) per part over every process; stop every process on a non-finite sum."""
        totals = self.accelerator.reduce(self.sums[mode], reduction="sum").tolist()  # every process's, one collective
        sums = dict(zip(self.names[mode], (total for total, _ in totals)))
        if not all(math.isfinite(value) for value in sums.values()):
            # Every process sees the same reduced sums, so all of them take this branch and join the gather.
            first = self.accelerator.gather(self.first_bad[mode][None]).min(0).values
            bad = [step for value, step in zip(sums.values(), first.tolist()) if not math.isfinite(value)]
            check_finite_losses(sums, int(min(bad)) if math.isfinite(min(bad)) else -1, self.output_dir, mode)
        return totals

    def check(self, mode: str = "train") -> None:
        """The NaN/inf stop alone, the interval kept (before a checkpoint is saved); every process calls it."""
        if mode in self.sums:
            self._reduced(mode)

    def pop_means(self, mode: str) -> dict[str, float]:
        """The means since the last call, named as the Trainer logs them (eval_ prefix); every process calls it."""
        prefix = "eval_" if mode == "eval" else ""
        if mode not in self.sums:
            return {}
        totals = self._reduced(mode)
        names, _, _ = self.names.pop(mode), self.sums.pop(mode), self.first_bad.pop(mode)
        # A part with no items in the interval (on-policy: no sampled batch, or no dataset batch) is left out.
        return {f"{prefix}{name}": total / max(items, 1) for name, (total, items) in zip(names, totals) if items > 0}


def micro_batch_normaliser(items, trainer, training: bool):
    """What a micro-batch's loss sum over `items` tokens (or positions) is divided by when the Trainer counted none
    for the step (evaluation, or a model with accepts_loss_kwargs=False): in training, shared out over the accumulated
    micro-batches and, since the scripts multiply the loss by the process count, over the processes too (without
    that, DDP's gradients would be that many times too large)."""
    if not training:
        return items
    items = items * trainer.current_gradient_accumulation_steps
    if trainer.args.average_tokens_across_devices:
        items = items * trainer.accelerator.num_processes
    return items
