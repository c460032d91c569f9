"""Processes and engines: refusing a launch that would fall into nn.DataParallel, placing the frozen teacher where the
student's engine (DeepSpeed, FSDP, DDP, one device) needs it, its output head for the loss under FSDP2, and the
per-rank memory report printed around the teacher's loading.
"""

from __future__ import annotations

import os

import torch

from common import ConfigError


def launch_processes_asked(argv: list[str]) -> int | None:
    """The --num_processes given on an `accelerate launch` (or `python -m accelerate.commands.launch`) command line,
    or None when `argv` is not one or does not set it."""
    for index, word in enumerate(argv):
        if word == "accelerate.commands.launch" or (
                word == "launch" and index > 0 and os.path.basename(argv[index - 1]).startswith("accelerate")):
            from accelerate.commands.launch import launch_command_parser

            try:
                known, _ = launch_command_parser().parse_known_args(argv[index + 1:])
            except SystemExit:  # a command line accelerate itself could not parse did not start us
                return None
            return known.num_processes
    return None


def parent_command_line() -> list[str]:
    """The command line of this process's parent (the launcher, if any), or [] where /proc cannot tell."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def check_launcher_processes(script: str) -> None:
    """Refuse a run that `accelerate launch --num_processes N` (N > 1) started as a single process: without
    --multi_gpu (or a config file naming a distributed engine) accelerate runs the script once where fewer than two
    GPUs are visible, CPUs included, and says nothing. Read from the launcher's command line (Linux)."""
    asked = launch_processes_asked(parent_command_line())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if asked is not None and asked > 1 and world_size < asked:
        raise ConfigError(
            f"accelerate launch was given --num_processes {asked} but started {script} as {world_size} process: "
            "without --multi_gpu (or a --config_file for DeepSpeed or FSDP) it runs one process where fewer than 2 "
            f"GPUs are visible. Run `accelerate launch --multi_gpu --num_processes {asked} {script}` (the CPU too: "
            "gloo), or drop --num_processes."
        )


def check_launch(args, script: str) -> None:
    """Refuse a launch that would train differently from what was asked: a plain `python script` on a machine with
    several visible GPUs (the Trainer would wrap the student in nn.DataParallel, which splits every tensor argument
    along dim 0, the distillation inputs (teacher hidden states at counted positions, stored top-k) included, so they
    no longer match the student's rows), or `accelerate launch --num_processes N` that started one process."""
    check_launcher_processes(script)
    if args.n_gpu > 1:
        raise ConfigError(
            f"{args.n_gpu} GPUs are visible but {script} was started without a distributed launcher (the Trainer "
            f"would fall back to nn.DataParallel, which splits the distillation inputs wrongly). Run `accelerate "
            f"launch --multi_gpu --num_processes {args.n_gpu} {script}` (or set CUDA_VISIBLE_DEVICES=0 for one GPU)."
        )


def peak_memory_mib() -> dict[str, float]:
    """This process's peak resident memory (VmHWM) and current anonymous memory (RssAnon) from /proc/self/status, and
    the size of the safetensors files it has memory-mapped (Mapped) from /proc/self/maps, in MiB (Linux; empty
    elsewhere). Printed per rank around the teacher's loading: under ZeRO-3 each rank must grow by its shard, not by
    the whole teacher."""
    found = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    found[key] = int(value.split()[0]) / 1024
        mapped = 0
        with open("/proc/self/maps") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                    start, _, end = fields[0].partition("-")
                    mapped += int(end, 16) - int(start, 16)
        found["Mapped"] = mapped / 2**20
    except OSError:
        pass
    return found


def print_memory_report(event: str, before: dict[str, float]) -> None:
    """Print, on every rank, how `event` moved this process's peak resident memory and its anonymous memory since
    `before` (a `peak_memory_mib()` reading)."""
    after = peak_memory_mib()
    if not after or not before:
        return
    mapped = after.get("Mapped", 0) - before.get("Mapped", 0)
    # Weights loaded in their file's dtype on the CPU stay memory-mapped: neither figure counts them until read.
    note = (f"; +{mapped:.1f} MiB of safetensors files memory-mapped, not yet resident (their pages are read in, as "
            "shared file cache, when the weights are used)" if mapped > 0 else "")
    print(f"memory on rank {os.environ.get('RANK', '0')}, {event}: peak RSS {before['VmHWM']:.0f} -> "
          f"{after['VmHWM']:.0f} MiB (+{after['VmHWM'] - before['VmHWM']:.0f}), anonymous {before['RssAnon']:.0f} -> "
          f"{after['RssAnon']:.0f} MiB (+{after['RssAnon'] - before['RssAnon']:.0f}){note}", flush=True)


def place_teacher(teacher: torch.nn.Module, trainer) -> torch.nn.Module:
    """Put the frozen teacher where the student's engine runs, and return the module to call.

    DeepSpeed: wrapped with the student's ZeRO stage, so under ZeRO-3 each process holds only its shard (printed per
    rank). FSDP: sharded like the student, in eval mode, never given to the optimizer. DDP or one device: one replica
    per process, moved once here, never per step. Patch the teacher's forward before this, so the engines call it.
    """
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        before = peak_memory_mib()
        placed = prepare_deepspeed(teacher, trainer.accelerator)
        print_memory_report("teacher placed by DeepSpeed", before)
        held = sum(getattr(p, "ds_tensor", p).numel() for p in teacher.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in teacher.parameters())
        print(f"teacher on rank {trainer.accelerator.process_index}: holds {held:,} of {total:,} parameters", flush=True)
        return placed
    if trainer.is_fsdp_enabled:
        from trl.models import prepare_fsdp

        return prepare_fsdp(teacher, trainer.accelerator)
    return teacher.to(trainer.accelerator.device)


def teacher_head_for_loss(teacher: torch.nn.Module, device) -> torch.nn.Module:
    """The placed teacher's output head as the chunked loss reads it.

    Under FSDP2 the head's weight is a sharded DTensor, and heads.full_head_tensors would all-gather it at every
    micro-step: vocabulary x hidden, 1.1 GB in bf16 at Qwen2-7B's shape, for one matrix product per counted token. The
    teacher is frozen, so one copy gathered here never goes stale; it costs that much memory per GPU for the whole
    run instead of the same traffic every micro-step (docs/hardware.md, "FSDP2 and the teacher's head"). Every
    process calls this at the same point (the gather is a collective). Other engines: the head itself (ZeRO-3 gathers
    it inside the student's forward, where the memory is scarcer than the traffic).
    """
    head = teacher.get_output_embeddings()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return head
    if not isinstance(head.weight, DTensor):
        return head
    gathered = torch.nn.Module()
    with torch.no_grad():
        gathered.weight = torch.nn.Parameter(head.weight.to(device).full_tensor(), requires_grad=False)
        bias = getattr(head, "bias", None)
        gathered.bias = None if bias is None else torch.nn.Parameter(
            bias.to(device).full_tensor() if isinstance(bias, DTensor) else bias.to(device), requires_grad=False)
    return gathered


# ---------------------------------------------------------------------------------------------------------------------
# The capture teacher (offline.mode: capture builds no Trainer, so nothing else places it)
# ---------------------------------------------------------------------------------------------------------------------


def launched_deepspeed_config(training: dict) -> dict | None:
    """The DeepSpeed config this run was started with, as a dict: training.deepspeed (a path or a dict), else the one
    `accelerate launch` passes to its processes (--config_file with a deepspeed_config_file, or only a ZeRO stage).
    None without DeepSpeed."""
    import copy
    import json

    source = training.get("deepspeed")
    if source is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or {
            "zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}}
    if isinstance(source, str):
        with open(source) as handle:
            return json.load(handle)
    return copy.deepcopy(source)


def zero3_inference_config(deepspeed_config: dict, hidden_size: int, micro_batch: int, world_size: int,
                           training: dict) -> dict:
    """A ZeRO-3 config for a frozen model that only runs forwards: the launched config with its training-only blocks
    dropped and its "auto" values filled as the Trainer would (batch sizes, mixed precision from training.bf16 / fp16,
    and TRL's bucket sizes for a frozen model of this hidden size). `deepspeed.initialize` refuses "auto", and
    without the Trainer nothing else fills it."""
    import copy

    config = copy.deepcopy(deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    for key in ("bf16", "fp16"):
        if config.setdefault(key, {}).get("enabled", "auto") == "auto":
            config[key]["enabled"] = bool(training.get(key))
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch * world_size)
    return config


def capture_gpus(local_process_index: int, local_processes: int, gpus: int) -> list[int]:
    """The GPUs of its node that one capture process spreads the teacher over (`device_map="auto"` within them): the
    node's GPUs shared out among its processes, so that `--num_processes 1` per node holds the teacher across all the
    node's GPUs, 2 processes on 8 GPUs 4 each, and one process per GPU (or more processes than GPUs) one each."""
    share = max(1, gpus // max(local_processes, 1))
    first = (local_process_index * share) % max(gpus, 1)
    return list(range(first, min(first + share, gpus)))
