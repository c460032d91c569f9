"""What the two scripts' trainers share: `DistillationTrainer`, a TRL SFTTrainer whose loss runs inside the student's
forward against a teacher signal (teacher_signal.py), with the start-up head check, the per-part loss log, the
process-count scaling of DDP, tokens/s in the log and the model card left to finished_run.save_finished_run; and the config
checks both scripts' `validate` make.

Each script still owns its trainer: a subclass whose `compute_loss` asks the teacher signal for its answer, calls the
loss, logs the parts and returns (distil_logits.LogitsTrainer, distil_hidden.HiddenStatesTrainer).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from trl import SFTTrainer

from common import (ConfigError, LossPartLog, check_config_keys, check_output_dir, check_precision, print_rank0,
                    without_tied_missing_keys)
from data import check_dataset_path, check_eval_size
from heads import add_hidden_states_forward, check_head_matches_forward
from losses import DIVERGENCES
from teacher_signal import NoTeacher, TeacherSignal, add_distillation_forward

# ---------------------------------------------------------------------------------------------------------------------
# Config checks shared by both scripts
# ---------------------------------------------------------------------------------------------------------------------


def config_keys(config: dict) -> dict:
    """The keys main() reads, per section, taken from a script's `config` dict itself: section -> tuple of keys, or
    None for a top-level value (common.check_config_keys's schema). `training` requires only output_dir: it takes any
    SFTConfig field, and main reads the others with defaults."""
    schema = {key: tuple(value) if isinstance(value, dict) else None for key, value in config.items()}
    schema["training"] = ("output_dir",)
    return schema


def check_kd_settings(distillation: dict) -> None:
    """distillation.temperature and .divergence, the logit-KD settings both scripts have."""
    if not isinstance(distillation["temperature"], (int, float)) or distillation["temperature"] <= 0:
        raise ConfigError(f"distillation.temperature must be > 0, got {distillation['temperature']}.")
    if distillation["divergence"] not in DIVERGENCES:
        raise ConfigError(f"unknown divergence '{distillation['divergence']}'; choose one of {', '.join(DIVERGENCES)}.")


def validate_config(config: dict, keys: dict, check_method: Callable[[dict], None]) -> None:
    """Check a script's config once, before anything is loaded or written: its keys against `keys` (`config_keys` of
    the script's dict), the data and precision settings and the output folder, and, through `check_method`, the
    script's own distillation settings."""
    check_config_keys(config, keys)
    check_eval_size(config["dataset"]["eval_size"])
    check_method(config)
    if config["tokenizer"]["max_length"] < 2:
        raise ConfigError("tokenizer.max_length must be at least 2 (a token and the one it predicts).")
    for key in ("name", "eval_name"):
        if config["dataset"][key]:
            check_dataset_path(config["dataset"][key])
    check_precision(config)
    check_output_dir(config)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class TrainingSpeed:
    """This process's non-padding tokens per second of forward and backward (teacher included), between two logs; with
    another `name`, any timed work's tokens per second (on_policy.py times generation with it).

    Nothing here waits for the device per micro-step: tokens are summed on the device, and on a GPU each micro-step is
    timed by a pair of CUDA events that are read (one synchronisation) only when the speed is logged."""

    def __init__(self, name: str = "training_tokens_per_second"):
        self.name = name
        self.tokens, self.seconds, self.events = 0, 0.0, []

    def start(self):
        """A mark before a micro-step: a recorded CUDA event on a GPU, else the wall clock."""
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, inputs: dict, start) -> None:
        """Count a finished micro-step that began at the mark `start`."""
        mask = inputs.get("attention_mask")  # absent in a padding-free packed batch, which has no padding
        self.add_tokens(mask.sum() if mask is not None else inputs["input_ids"].numel(), start)

    def add_tokens(self, tokens, start) -> None:
        """Count `tokens` (an int or a device tensor) of work that began at the mark `start` and ends now."""
        self.tokens = self.tokens + tokens
        if isinstance(start, float):
            self.seconds += time.perf_counter() - start
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))

    def pop(self) -> dict[str, float]:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
        speed = {self.name: float(self.tokens) / self.seconds} if self.seconds > 0 else {}
        self.tokens, self.seconds, self.events = 0, 0.0, []
        return speed


class Float32GradientAccumulation:
    """Sum a 16-bit student's gradients over an optimizer step's micro-batches in float32, rounded to the weights' dtype
    once, at the last micro-batch (model_config.student_dtype: bfloat16 with gradient_accumulation_steps > 1).

    Left to autograd, `.grad` holds the running sum in bf16 and is rounded at every micro-batch: a later micro-batch's
    gradient loses the bits below the sum's ulp. Here a hook after each parameter's gradient accumulation moves it
    into a float32 sum and clears `.grad`; at the step's last micro-batch (`accelerator.sync_gradients`, which the
    Trainer sets before each micro-batch) it writes the whole sum back instead, before DDP's reduction hook reads it.
    Costs 4 bytes per trainable parameter during the accumulation (docs/precision.md)."""

    def __init__(self, model: torch.nn.Module, accelerator):
        self.accelerator = accelerator
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.handles = [parameter.register_post_accumulate_grad_hook(self.accumulate)
                        for parameter in model.parameters()
                        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16)]

    def accumulate(self, parameter: torch.nn.Parameter) -> None:
        total = self.sums.pop(parameter, None)
        total = parameter.grad.float() if total is None else total.add_(parameter.grad)
        if self.accelerator.sync_gradients:
            parameter.grad = total.to(parameter.dtype)
        else:
            self.sums[parameter] = total
            parameter.grad = None


class DistillationTrainer(SFTTrainer):
    """SFTTrainer for a loss that the student's own forward computes against `teacher_signal` (None: no teacher).

    The student's forward is patched (teacher_signal.add_distillation_forward, heads.add_hidden_states_forward) and
    the teacher placed (`teacher_signal.setup`) here, before the Trainer wraps anything. Neither model builds its
    (tokens, vocabulary) logits. TRL 1.x also patches the student's forward (a fused LM head used when called with
    labels); the student is never given labels here, so that path is not taken.
    """

    # compute_loss normalises by the whole optimizer step's token count itself (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_signal: TeacherSignal | None = None, distillation: dict, vocab_size: int,
                 projections_attribute: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # N counts the positions whose next label is trained (data.next_token_mask). transformers counts labels[..., 1:]
        # only for classes it maps to ForCausalLM; for others (GPT2LMHeadModel) it would count one per text row too many.
        self._loss_shifts_labels = True
        self.distillation, self.vocab_size, self.teacher_signal = distillation, vocab_size, teacher_signal
        self.loss_log = LossPartLog(self.accelerator)
        self.speed = TrainingSpeed()
        self.heads_checked = False
        # DeepSpeed and FSDP accumulate gradients themselves (DeepSpeed in its data_types.grad_accum_dtype).
        self.float32_accumulation = None
        if self.args.gradient_accumulation_steps > 1 and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self.float32_accumulation = Float32GradientAccumulation(self.model, self.accelerator)
        add_distillation_forward(self.model, projections_attribute)
        add_hidden_states_forward(self.model)  # for the head check at the first step
        if teacher_signal is not None:
            teacher_signal.setup(self)

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher as the engine runs it (None when no teacher is loaded in this process)."""
        return None if self.teacher_signal is None else self.teacher_signal.placed

    def train(self, *args, **kwargs):
        # Said at start: gradient_accumulation_steps is easy to miss in the dict, and it multiplies the step.
        batch, accumulation = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        processes = self.accelerator.num_processes
        print_rank0(f"training on {processes} process(es), {self.accelerator.distributed_type}; an optimizer step is "
                    f"{batch} rows per device x {accumulation} micro-batches (gradient_accumulation_steps) x "
                    f"{processes} process(es) = {batch * accumulation * processes} rows")
        return super().train(*args, **kwargs)

    # --- what every compute_loss does ---

    def check_heads(self, model: torch.nn.Module, inputs: dict) -> None:
        """Once, at the first micro-batch, in the engine: the logits the loss builds are each model's own."""
        if self.heads_checked:
            return
        mixed_precision = self.args.bf16 or self.args.fp16
        check_head_matches_forward(model, self.model, inputs["input_ids"][:1, :16], "student", mixed_precision)
        if self.teacher_signal is not None:
            self.teacher_signal.check_head(inputs, mixed_precision)
        self.heads_checked = True

    def teacher_answer(self, inputs: dict, mode: str) -> NoTeacher | None:
        """What the teacher says about this micro-batch (None without a teacher)."""
        return None if self.teacher_signal is None else self.teacher_signal.signal(inputs, mode)

    def log_parts(self, mode: str, **parts: tuple) -> None:
        """Add this micro-batch's loss parts (name -> (value, normaliser, items)) to the log (common.LossPartLog)."""
        self.loss_log.add(mode, self.state.global_step + 1, self.args.output_dir, **parts)

    def scaled_for_processes(self, loss: torch.Tensor, mode: str) -> torch.Tensor:
        """DDP averages gradients over processes while the normalisers count every process's tokens: multiply back."""
        if mode == "train" and self.args.average_tokens_across_devices:
            return loss * self.accelerator.num_processes
        return loss

    # --- the Trainer's hooks ---

    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        """The optimizer step's micro-batches and counted tokens (`step_micro_batches`), shown to the teacher signal
        before the first of them trains, so that a remote teacher can answer while the student computes."""
        batches, num_items_in_batch = self.step_micro_batches(epoch_iterator, num_batches, device)
        if self.teacher_signal is not None:
            self.teacher_signal.prepare(batches)
        return batches, num_items_in_batch

    def step_micro_batches(self, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        """The Trainer's get_batch_samples: the micro-batches and the step's counted tokens (num_items_in_batch)."""
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = self.speed.start()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.speed.add(inputs, start)
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        logs.update(self.loss_log.pop_means("train" if self.model.training else "eval"))
        if self.model.training:
            logs.update(self.speed.pop())
            if self.teacher_signal is not None:
                logs.update(self.teacher_signal.pop_logs())
        super().log(logs, start_time)

    # The NaN/inf stop runs at logging steps (common.LossPartLog); an evaluation or a save between two of them checks
    # the training parts first, so that a diverged student is neither saved nor blamed on the evaluation.
    def evaluate(self, *args, **kwargs):
        self.loss_log.check("train")
        return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        self.loss_log.check("train")
        super()._save_checkpoint(model, trial)

    def create_model_card(self, *args, **kwargs) -> None:
        pass  # TRL's card knows neither the teacher nor the method; finished_run.save_finished_run writes ours

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied head is the embedding itself: its key is absent from the checkpoint by design, not missing.
        super()._issue_warnings_after_load(without_tied_missing_keys(self.model, load_result))
