"""Hidden-state distillation: a student learns to reproduce a teacher's hidden states (through one trained projection
per mapped layer pair), mixed with the usual cross-entropy. Teacher and student may differ in architecture, hidden
size, layer count and tokenizer: with two tokenizers, hidden states are compared only where both tokenizations end a
token at the same character of a trained span (see docs/hidden-states.md).

    python distil_hidden.py                                   # one GPU (or the CPU), the inline `config` below
    accelerate launch --multi_gpu --num_processes 8 distil_hidden.py   # 8 GPUs, DDP (keep --multi_gpu: docs/hardware.md)
    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml distil_hidden.py   # DeepSpeed ZeRO-3
    python distil_hidden.py --config my_experiment.yaml       # override any key of `config` from YAML or JSON
    python examples/demo.py                                   # the offline CPU demo (tiny models, made-up data)

Copy this file per experiment and edit `config`. The projections are saved next to the student, in
output_dir/hidden_projections.safetensors (with the layer map); the student itself is a plain checkpoint.

The loss, per optimizer step (losses.py has the reference formulas and the chunked kernel):

    loss = alpha * H + (1 - alpha) * CE + kd_weight * KD      (alpha_schedule: linear_decay -> alpha * (1 - step / steps))
    H    = 1 / (M * L) * sum_(l = 1..L) sum_(k aligned) d(P_l(s_l,k), t_l,k)

- l runs over the L pairs of `distillation.layer_map` (student block, teacher block); s_l,k and t_l,k are the two
  models' hidden states after those blocks at aligned position k; P_l is the pair's trained linear projection from
  the student's hidden size to the teacher's.
- d is `distillation.loss`: mse = mean over the teacher's hidden units of the squared difference, or
  cosine = 1 - cosine similarity. With `teacher_norm: rms` (the default `auto` with one tokenizer) each teacher
  state is first divided by its root mean square unit, so the mse is 1 for a student that outputs zeros, whatever the teacher's layer or scale;
  `teacher_norm: unit` (`auto` with two tokenizers) standardises each teacher unit instead, with its mean and
  standard deviation over the compared positions of the first optimizer step (all micro-batches and processes),
  measured once before the first update and saved with the projections: a few huge units of a pretrained teacher
  then no longer make up the whole target, and a position's loss does not depend on its micro-batch.
- Aligned positions: with one tokenizer and template, every position whose next token is trained; with two, the
  positions where both tokenizations end a token at the same character of a trained span (alignment.py) and, with
  `positions: same_next_token` (default), whose next token also ends at the same character after the same text on
  both sides (the two states then predict the same piece of text: not " pan" against " pancakes", nor two
  templates' different end-of-turn markers); `positions: aligned` keeps every such pair. Measured on three tasks
  in docs/hidden-states.md.
- M is the number of aligned positions in the whole optimizer step (all micro-batches and processes).
- CE and KD are those of distil_logits.py (KD only with a shared tokenizer), normalised by the step's counted tokens.
"""

import os

import torch

from alignment import PairedCollator, check_chat_templates, prepare_paired_datasets, same_next_token, same_tokenization
from finished_run import save_finished_run
from common import (
    ConfigError,
    apply_spectrum,
    build_sft_config,
    load_causal_lm,
    load_tokenizer,
    micro_batch_normaliser,
    output_vocab_size,
    print_rank0,
    read_spectrum_patterns,
    resolve_resume_checkpoint,
    run_cli,
    student_optimizer,
)
from data import next_token_mask, prepare_datasets, rendered_texts, wants_eval
from distillation_trainer import DistillationTrainer, check_kd_settings, config_keys, validate_config
from distributed import check_launch, peak_memory_mib, print_memory_report
from losses import HIDDEN_LOSSES, TEACHER_NORMS, UNIT_NORM_EPS, hidden_state_loss
from projections import (
    PROJECTIONS_FILE,
    build_projections,
    check_layer_map_format,
    load_projections,
    model_shape,
    projection_key,
    resolve_layer_map,
    save_projections,
)
from teacher_signal import InProcessTeacher, LossTerms, TeacherHidden, model_inputs, student_loss

config = {
    "project_name": "distil-hidden",  # a label written into the saved config
    # --- data ---
    "dataset": {
        "name": "mlabonne/FineTome-100k",  # Hub id, or a local .json/.jsonl/.parquet file or save_to_disk folder
        "split": "train",  # split to read from a Hub dataset
        "format": "auto",  # auto | sharegpt (conversations) | messages (role/content) | text (pre-training)
        "num_samples": None,  # keep only this many rows after shuffling (None: all)
        "eval_size": "auto",  # held-out rows: "auto" = 10% of the rows (1 to 500) | an int | a fraction < 1 | 0: none
        "eval_name": None,  # a separate held-out dataset (file or Hub id) instead of splitting eval_size rows off
        "eval_split": "train",  # split of eval_name to read
        "seed": 42,  # shuffling and eval-split seed
        "system_prompt": None,  # system message prepended to conversations that have none (None: no system turn)
    },
    # --- models ---
    "models": {
        "teacher": "arcee-ai/Arcee-Spark",  # Hub id or local folder; any causal LM whose tokenizer gives char offsets
        "student": "Qwen/Qwen2-1.5B",  # Hub id or local folder
    },
    "tokenizer": {
        "max_length": 4096,  # tokens per row for each model; longer rows are truncated, never padded to this length
        "chat_template": None,  # None: the student tokenizer's own | chatml (needs <|im_start|>, <|im_end|> special tokens) | Jinja text
        "teacher_chat_template": None,  # the teacher's template, as chat_template (None: its tokenizer's own)
    },
    "model_config": {
        "use_flash_attention": True,  # flash_attention_2 when installed on a GPU, else sdpa
        "student_dtype": "float32",  # float32 (master weights, autocast by bf16/fp16) | bfloat16 (half the memory, Kahan-summed AdamW)
    },
    # --- distillation ---
    "distillation": {
        "layer_map": "uniform",  # uniform: student block s -> teacher block ceil(s*T/S), last to last; or [[s, t], ...]
        "loss": "mse",  # mse: mean squared error per hidden unit | cosine: 1 - cosine similarity (scale-free)
        "teacher_norm": "auto",  # auto: unit across tokenizers, rms with one | rms: divided by their RMS unit | unit: each unit standardised (statistics of the first step) | none: raw
        "positions": "same_next_token",  # two tokenizers: same_next_token (both predict the same text) | aligned (every pair)
        "alpha": 0.5,  # loss = alpha * hidden + (1 - alpha) * CE + kd_weight * KD; alpha = kd_weight = 0 is plain SFT
        "alpha_schedule": "constant",  # constant | linear_decay: alpha falls linearly to 0 at the last step (ends as CE)
        "kd_weight": 0.0,  # weight of a logit-KD term; needs a shared tokenizer and chat template; 0 turns it off
        "temperature": 2.0,  # logit-KD term only: softens both distributions; the divergence is multiplied by T^2
        "divergence": "forward_kl",  # logit-KD term only: forward_kl | reverse_kl | jsd | tvd | skew_forward_kl | ...
        "loss_memory_mb": 1024,  # MB per GPU for the CE/KD loss's logit chunks and temporaries; lower it if it runs out of memory
    },
    "spectrum": {
        "layers_to_unfreeze": None,  # Spectrum YAML (unfrozen_parameters: [regex, ...]); None trains everything
    },
    # --- training: any TRL SFTConfig / transformers TrainingArguments field ---
    "training": {
        "output_dir": "./results",  # checkpoints, the final student, its tokenizer, projections, distillation_config.json
        "num_train_epochs": 3,  # passes over the training rows
        "per_device_train_batch_size": 1,  # rows per device per micro-step
        "gradient_accumulation_steps": 8,  # micro-steps per optimizer step
        "learning_rate": 2e-5,  # peak learning rate (student and projections)
        "weight_decay": 0.05,  # AdamW weight decay
        "warmup_ratio": 0.1,  # fraction of steps spent warming up (mapped to transformers 5's warmup_steps)
        "lr_scheduler_type": "cosine",  # learning-rate schedule after warm-up
        "bf16": True,  # autocast to bf16 (GPU and CPU); the student keeps float32 weights, the frozen teacher is bf16
        "packing": False,  # pack rows (TRL best-fit, padding-free); only with a shared tokenizer and template
        "activation_checkpointing": True,  # recompute activations in backward to save memory
        "logging_steps": 1,  # log hidden_loss, ce_loss, kd_loss and loss every this many optimizer steps
        "eval_strategy": "steps",  # evaluate every eval_steps (when dataset.eval_size > 0)
        "eval_steps": 500,  # optimizer steps between evaluations
        "save_steps": 500,  # optimizer steps between checkpoints
        "save_total_limit": 2,  # keep only the newest checkpoints
        "seed": 42,  # model init, projection init and data order seed
        "resume_from_checkpoint": None,  # True (latest checkpoint in output_dir) or a checkpoint path
        "overwrite_output_dir": False,  # allow training into an output_dir that holds a finished run
        "save_dtype": None,  # saved student's dtype: None = its checkpoint's (config.json) | float32 | bfloat16 | float16
    },
}

PROJECTIONS_ATTRIBUTE = "hidden_projections"  # the student's submodule holding the projections during training
TEACHER_STATS_PREFIX = "teacher_norm."  # teacher_norm unit: its statistics' keys in hidden_projections.safetensors
HIDDEN_POSITIONS = ("same_next_token", "aligned")  # distillation.positions
ALPHA_SCHEDULES = ("constant", "linear_decay")  # distillation.alpha_schedule


def resolved_teacher_norm(setting: str, shared_tokenizer: bool) -> str:
    """distillation.teacher_norm as losses.hidden_state_loss takes it: `auto` is `unit` across tokenizers (measured
    at most SFT on three tasks as the mean over 5-6 seeds, docs/hidden-states.md) and `rms` with one tokenizer, as before."""
    if setting == "auto":
        return "rms" if shared_tokenizer else "unit"
    return setting


def scheduled_alpha(alpha: float, schedule: str, step: int, max_steps: int) -> float:
    """The hidden term's weight at optimizer step `step` (0-based) of `max_steps`: alpha throughout (constant), or
    alpha * (1 - step / max_steps) (linear_decay), so that the last steps are nearly plain CE."""
    if schedule == "constant" or max_steps <= 0:
        return alpha
    return alpha * max(0.0, 1.0 - step / max_steps)


# The keys main() reads, per section: a key missing from the config main() is given, or one it does not know, is one
# error naming it and the nearest known key; `training` also takes any SFTConfig field.
CONFIG_KEYS = config_keys(config)


def same_next_token_count(dataset) -> int:
    """How many of a paired dataset's aligned pairs distillation.positions = same_next_token keeps."""
    kept = 0
    for batch in dataset.select_columns(["student_positions", "teacher_positions"]).iter(batch_size=1000):
        for student_positions, teacher_positions in zip(batch["student_positions"], batch["teacher_positions"]):
            student_positions = torch.tensor(student_positions, dtype=torch.long)
            teacher_positions = torch.tensor(teacher_positions, dtype=torch.long)
            kept += int(same_next_token(torch.zeros_like(student_positions), student_positions, teacher_positions).sum())
    return kept



def check_distillation(config: dict) -> None:
    """The distillation settings (validate_config checks the rest). Layer numbers are checked against the models in
    main, from their configs, still before anything is loaded."""
    distillation = config["distillation"]
    if not 0 <= distillation["alpha"] <= 1:
        raise ConfigError(f"distillation.alpha must be in [0, 1], got {distillation['alpha']} (0: no hidden loss, 1: no CE).")
    if not isinstance(distillation["kd_weight"], (int, float)) or distillation["kd_weight"] < 0:
        raise ConfigError(f"distillation.kd_weight must be >= 0, got {distillation['kd_weight']} (0 turns the logit term off).")
    if distillation["loss"] not in HIDDEN_LOSSES:
        raise ConfigError(f"unknown hidden-state loss '{distillation['loss']}'; choose one of {', '.join(HIDDEN_LOSSES)}.")
    if distillation["teacher_norm"] not in ("auto", *TEACHER_NORMS):
        raise ConfigError(f"unknown distillation.teacher_norm '{distillation['teacher_norm']}'; choose one of "
                          f"auto, {', '.join(TEACHER_NORMS)}.")
    if distillation["alpha_schedule"] not in ALPHA_SCHEDULES:
        raise ConfigError(f"unknown distillation.alpha_schedule '{distillation['alpha_schedule']}'; choose one of "
                          f"{', '.join(ALPHA_SCHEDULES)}.")
    if distillation["positions"] not in HIDDEN_POSITIONS:
        raise ConfigError(f"unknown distillation.positions '{distillation['positions']}'; choose one of "
                          f"{', '.join(HIDDEN_POSITIONS)}.")
    check_kd_settings(distillation)
    check_layer_map_format(distillation["layer_map"])


def validate(config: dict) -> None:
    """Check the config's keys and settings once, before anything is loaded or written."""
    validate_config(config, CONFIG_KEYS, check_distillation)


class HiddenStatesTrainer(DistillationTrainer):
    """DistillationTrainer whose loss is alpha * hidden + (1 - alpha) * CE + kd_weight * KD.

    The projections are a submodule of the student while it trains and run inside its forward (patched by
    teacher_signal.add_distillation_forward), so the optimizer, DDP and DeepSpeed treat them as weights; they are left
    out of every saved student checkpoint and saved beside it in hidden_projections.safetensors, from which a resumed
    run restores them. With a shared tokenizer the teacher (teacher_signal.InProcessTeacher) reads the student's
    batch; otherwise it reads its own tokenization (teacher_input_ids) and states are compared at each row's aligned
    positions.
    """

    def __init__(self, *args, projections=None, layer_pairs=(), shared_tokenizer: bool, **kwargs):
        super().__init__(*args, projections_attribute=PROJECTIONS_ATTRIBUTE, **kwargs)
        self.shared_tokenizer = shared_tokenizer
        self.teacher_norm = resolved_teacher_norm(self.distillation["teacher_norm"], shared_tokenizer)
        self.projections = projections
        self.layer_pairs = list(layer_pairs)
        # Only the mapped layers are recorded (the others come back as None): no model keeps every layer's states.
        self.teacher_layers = sorted({teacher_layer for _, teacher_layer in self.layer_pairs})
        if self.teacher_signal is not None and self.teacher_signal.head is not None:  # the logit term's final state
            self.teacher_layers = sorted(set(self.teacher_layers) | {self.teacher_signal.final_layer})
        self.aligned_in_step = None
        self.teacher_stats = None  # teacher_norm unit: per pair (mean, 1 / sqrt(var + 1e-6)), measured at the first step

    def aligned_positions(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, student position, teacher position) of every compared position: the collator's alignment, or, with a
        shared tokenizer, every position whose next token is trained (the positions the CE loss counts)."""
        if "student_positions" in inputs:
            valid = inputs["student_positions"] >= 0
            rows, student_positions = valid.nonzero(as_tuple=True)[0], inputs["student_positions"][valid]
            teacher_positions = inputs["teacher_positions"][valid]
            if self.distillation["positions"] == "same_next_token":
                keep = same_next_token(rows, student_positions, teacher_positions)
                rows, student_positions, teacher_positions = rows[keep], student_positions[keep], teacher_positions[keep]
            return rows, student_positions, teacher_positions
        rows, positions = next_token_mask(inputs["labels"]).nonzero(as_tuple=True)
        return rows, positions, positions

    def step_micro_batches(self, epoch_iterator, num_batches, device):
        # The Trainer counts the labels of the optimizer step (num_items_in_batch); count the aligned positions too.
        batch_samples, num_items_in_batch = super().step_micro_batches(epoch_iterator, num_batches, device)
        aligned = torch.tensor(sum(self.aligned_positions(batch)[0].numel() for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            aligned = self.accelerator.gather(aligned).sum()
        self.aligned_in_step = aligned
        if self.teacher_stats is None and self.teacher_norm == "unit" and self.layer_pairs:
            self.teacher_stats = self.measure_teacher_stats(batch_samples)
        return batch_samples, num_items_in_batch

    def measure_teacher_stats(self, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """teacher_norm unit: each mapped teacher unit's mean and 1 / sqrt(var + 1e-6) over the compared positions of
        these micro-batches (the first optimizer step's, of all processes together), measured once in float64 and kept
        for the run, so a position's target does not depend on the micro-batch it is in (accumulation and processes
        give the loss of one large batch). None when the step compares fewer than 2 positions (measured next step)."""
        moments = [None] * len(self.layer_pairs)  # per pair: [count, sum of each unit, sum of its squares]
        with torch.no_grad():
            for batch in batches:
                batch = self._prepare_inputs(batch)
                rows, _, teacher_positions = self.aligned_positions(batch)
                hidden = self.teacher_hidden_states(batch)
                for index, (_, teacher_layer) in enumerate(self.layer_pairs):
                    states = hidden[teacher_layer][rows, teacher_positions].double()
                    part = torch.cat([states.new_tensor([states.shape[0]]), states.sum(0), states.pow(2).sum(0)])
                    moments[index] = part if moments[index] is None else moments[index] + part
                del hidden
        moments = torch.stack(moments)
        if self.args.world_size > 1:
            moments = self.accelerator.reduce(moments, reduction="sum")
        count = int(moments[0, 0])
        if count < 2:
            return None
        units = (moments.shape[1] - 1) // 2
        mean = moments[:, 1:1 + units] / count
        variance = (moments[:, 1 + units:] / count - mean.pow(2)).clamp(min=0)
        inv_std = torch.rsqrt(variance + UNIT_NORM_EPS)
        print_rank0(f"teacher_norm unit: each teacher unit's mean and standard deviation measured over the {count} "
                    "compared positions of the first optimizer step; kept for the run, saved with the projections")
        return [(mean[index].float(), inv_std[index].float()) for index in range(len(self.layer_pairs))]

    def teacher_stats_tensors(self) -> dict[str, torch.Tensor]:
        """The unit statistics as tensors of hidden_projections.safetensors ('teacher_norm.3_6.mean', ...)."""
        if self.teacher_stats is None:
            return {}
        tensors = {}
        for pair, (mean, inv_std) in zip(self.layer_pairs, self.teacher_stats):
            key = TEACHER_STATS_PREFIX + projection_key(*pair)
            tensors[key + ".mean"], tensors[key + ".inv_std"] = mean.detach().cpu(), inv_std.detach().cpu()
        return tensors

    def teacher_hidden_states(self, inputs: dict) -> tuple:
        """The teacher's hidden states, a tuple indexed by layer with only the mapped layers (and, for the logit term,
        the final one) filled. Only the backbone runs: the teacher's logits are never built."""
        if self.shared_tokenizer:
            teacher_inputs = model_inputs(inputs)
        else:
            teacher_inputs = {"input_ids": inputs["teacher_input_ids"], "attention_mask": inputs["teacher_attention_mask"],
                              "use_cache": False}
        return self.teacher_signal.hidden_states(teacher_inputs, self.teacher_layers)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        self.check_heads(model, inputs)
        labels = inputs["labels"]
        rows, student_positions, teacher_positions = self.aligned_positions(inputs)
        batch_tokens = next_token_mask(labels).sum()
        if num_items_in_batch is None:
            num_items_in_batch = micro_batch_normaliser(batch_tokens, self, mode == "train")
        aligned_in_step = self.aligned_in_step if mode == "train" else None
        if aligned_in_step is None:  # get_batch_samples counts them for every training step
            aligned_in_step = micro_batch_normaliser(rows.numel(), self, mode == "train")
        teacher_hidden = self.teacher_hidden_states(inputs) if self.teacher_signal is not None else None
        answer, teacher = None, self.teacher_signal
        if teacher is not None and teacher.head is not None:  # the logit term: shared tokenizer, counted positions
            answer = TeacherHidden(teacher_hidden[teacher.final_layer][:, :-1][next_token_mask(labels)], teacher.head,
                                   teacher.transform)
        distillation = self.distillation
        alpha = scheduled_alpha(distillation["alpha"], distillation["alpha_schedule"], self.state.global_step,
                                self.state.max_steps)
        outputs = student_loss(
            model, model_inputs(inputs), labels, answer,
            LossTerms(kd_weight=distillation["kd_weight"], ce_weight=1 - alpha, num_items_in_batch=num_items_in_batch,
                      divergence=distillation["divergence"], temperature=distillation["temperature"],
                      vocab_size=self.vocab_size, memory_budget_mb=distillation["loss_memory_mb"]),
            project_hidden={"layer_pairs": self.layer_pairs, "rows": rows, "positions": student_positions}
            if self.layer_pairs else None,
        )
        hidden_loss = torch.zeros_like(outputs["ce_loss"])
        if self.layer_pairs:
            hidden_loss = hidden_state_loss(
                outputs["projected_hidden"],
                [teacher_hidden[teacher_layer][rows, teacher_positions] for _, teacher_layer in self.layer_pairs],
                loss=distillation["loss"], num_positions=aligned_in_step, teacher_norm=self.teacher_norm,
                teacher_stats=self.teacher_stats,  # None before the first training step: the batch's own statistics
            )
        del teacher_hidden
        # outputs["loss"] = (1 - alpha) * CE + kd_weight * KD, with the gradients of the chunked loss.
        loss = alpha * hidden_loss + outputs["loss"]
        self.log_parts(mode, hidden_loss=(hidden_loss, aligned_in_step, rows.numel()),
                       ce_loss=(outputs["ce_loss"], num_items_in_batch, batch_tokens),
                       kd_loss=(outputs["kd_loss"], num_items_in_batch, batch_tokens))
        loss = self.scaled_for_processes(loss, mode)
        return (loss, outputs) if return_outputs else loss

    # --- saving and resuming: the student checkpoint stays plain, the projections get their own file ---

    def _save(self, output_dir=None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.projections is None:
            return super()._save(output_dir, state_dict)
        prefix = PROJECTIONS_ATTRIBUTE + "."
        if state_dict is None:
            tensors = self.projections.state_dict()
            submodules = self.model._modules
            projections = submodules.pop(PROJECTIONS_ATTRIBUTE)  # saved without it, then put back
            try:
                super()._save(output_dir, None)
            finally:
                submodules[PROJECTIONS_ATTRIBUTE] = projections
        else:  # DeepSpeed / FSDP hand over a gathered state dict
            tensors = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
            super()._save(output_dir, {key: value for key, value in state_dict.items() if not key.startswith(prefix)})
        if self.args.should_save:
            save_projections({**tensors, **self.teacher_stats_tensors()}, self.layer_pairs, output_dir)

    def load_projections(self, folder: str) -> None:
        """Restore the projections from folder/hidden_projections.safetensors (a checkpoint or a finished run); the
        teacher_norm unit statistics in the same file are restored once, by train()."""
        tensors, layer_pairs = load_projections(folder)
        if layer_pairs != self.layer_pairs:
            raise ConfigError(f"'{folder}' holds projections for the layer map {layer_pairs}, but this run maps "
                              f"{self.layer_pairs}. Resume with the same distillation.layer_map.")
        self.projections.load_state_dict({key: value for key, value in tensors.items()
                                          if not key.startswith(TEACHER_STATS_PREFIX)})

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # teacher_norm unit: a resumed run standardises with the statistics the checkpoint was trained with (measured
        # again on this run's first step, they would differ). Read here for every engine: DeepSpeed restores the
        # projections from its own checkpoint, without _load_from_checkpoint.
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE) if isinstance(resume_from_checkpoint, str) else ""
        if self.teacher_norm == "unit" and self.projections is not None and os.path.isfile(path):
            tensors = load_projections(resume_from_checkpoint)[0]
            keys = [TEACHER_STATS_PREFIX + projection_key(*pair) for pair in self.layer_pairs]
            if all(key + ".mean" in tensors and key + ".inv_std" in tensors for key in keys):
                self.teacher_stats = [(tensors[key + ".mean"].to(self.args.device, torch.float32),
                                       tensors[key + ".inv_std"].to(self.args.device, torch.float32)) for key in keys]
            else:
                print_rank0(f"warning: '{resume_from_checkpoint}' has no teacher_norm unit statistics; they are "
                            "measured again at the first step of this run")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projections is not None:
            self.load_projections(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.projections is not None and not self.is_deepspeed_enabled:
            self.load_projections(self.state.best_model_checkpoint)

    def _issue_warnings_after_load(self, load_result) -> None:
        # The student checkpoint has no projections by design; they are loaded from their own file.
        missing = [key for key in load_result.missing_keys if not key.startswith(PROJECTIONS_ATTRIBUTE + ".")]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))



def main(config: dict) -> HiddenStatesTrainer:
    """Validate, load, train, save. Returns the trainer (its state holds the logged hidden_loss, ce_loss, kd_loss)."""
    validate(config)
    distillation, training, models = config["distillation"], config["training"], config["models"]
    patterns = read_spectrum_patterns(config["spectrum"]["layers_to_unfreeze"]) if config["spectrum"]["layers_to_unfreeze"] else None
    use_teacher = distillation["alpha"] > 0 or distillation["kd_weight"] > 0

    # Layer numbers against the models' configs, then tokenizers and data: all before any weights load.
    student_layers, student_hidden_size = model_shape(models["student"])
    layer_pairs = []
    if use_teacher:
        teacher_layers, teacher_hidden_size = model_shape(models["teacher"])
        if distillation["alpha"] > 0:
            layer_pairs = resolve_layer_map(distillation["layer_map"], student_layers, teacher_layers)
            print_rank0(f"layer map (student block, teacher block): {layer_pairs}")
    tokenizer = load_tokenizer(models["student"], config["tokenizer"]["chat_template"], "tokenizer.chat_template")
    tokenizers = {"student": tokenizer}
    if use_teacher:
        tokenizers["teacher"] = load_tokenizer(models["teacher"], config["tokenizer"]["teacher_chat_template"],
                                               "tokenizer.teacher_chat_template")
    shared = not use_teacher or same_tokenization(tokenizers["teacher"], tokenizer,
                                                  rendered_texts(config["dataset"], tokenizer))
    if distillation["kd_weight"] > 0 and not shared:
        raise ConfigError(
            "distillation.kd_weight > 0 needs teacher and student to share a tokenizer and a chat template (the logit "
            "term compares next-token distributions position by position), but theirs differ. Set kd_weight: 0."
        )
    if not shared and (training.get("packing") or training.get("padding_free")):
        raise ConfigError(
            "training.packing / padding_free is not supported when teacher and student tokenize differently: each "
            "row carries the teacher's tokens and an alignment that packing would drop. Set packing: false."
        )
    check_chat_templates(config["dataset"], tokenizers)
    max_length = config["tokenizer"]["max_length"]
    # Before any model loads: the training arguments register DeepSpeed's config with transformers, and only then does
    # from_pretrained partition each model as it loads (zero.Init) instead of loading it whole per process.
    args = build_sft_config(
        config,
        max_length=max_length,
        eval_strategy=training.get("eval_strategy", "no") if wants_eval(config["dataset"]) else "no",
        remove_unused_columns=False,  # the teacher's columns and the alignment must reach compute_loss
    )
    check_launch(args, "distil_hidden.py")
    if shared:
        print_rank0("tokenizers: shared; hidden states compared position by position")
        train_dataset, eval_dataset, _ = prepare_datasets(config["dataset"], tokenizer, max_length)
    else:
        print_rank0("tokenizers or chat templates differ; hidden states compared at aligned character offsets")
        train_dataset, eval_dataset, stats = prepare_paired_datasets(config["dataset"], tokenizer, tokenizers["teacher"],
                                                                     max_length)
        if distillation["positions"] == "same_next_token" and layer_pairs:
            kept = same_next_token_count(train_dataset)
            print_rank0(f"positions same_next_token: {kept} of the {stats['aligned_positions']} aligned positions "
                        f"predict the same next token on both sides ({100 * kept / max(stats['trained_tokens'], 1):.0f}% "
                        "of the student's predicting positions); hidden states are compared there")
            if kept == 0:
                raise ConfigError("no aligned position predicts the same next token on both sides, so the hidden "
                                  "loss would compare nothing. Set distillation.positions: aligned.")

    student = load_causal_lm(models["student"], config)
    before = peak_memory_mib()
    teacher = load_causal_lm(models["teacher"], config, trainable=False) if use_teacher else None
    if teacher is not None:
        print_memory_report("teacher loaded", before)
    vocab_size = len(tokenizer)
    if distillation["kd_weight"] > 0 and output_vocab_size(teacher) < vocab_size:
        raise ConfigError(f"the teacher's output head has {output_vocab_size(teacher)} rows, fewer than the {vocab_size} "
                          "tokens of the shared tokenizer. Use the tokenizer that was trained with the model.")
    if patterns:
        apply_spectrum(student, patterns)
    projections = None
    if layer_pairs:
        projections = build_projections(layer_pairs, student_hidden_size, teacher_hidden_size, dtype=student.dtype,
                                        seed=training.get("seed", 42))
        # A submodule of the student, so the optimizer, DDP and DeepSpeed treat it as trained weights (after Spectrum,
        # which would freeze it). HiddenStatesTrainer._save keeps it out of the saved student.
        setattr(student, PROJECTIONS_ATTRIBUTE, projections)
        print_rank0(f"projections: {len(layer_pairs)} x ({student_hidden_size} -> {teacher_hidden_size}), "
                    f"{sum(p.numel() for p in projections.parameters()):,} parameters")

    trainer = HiddenStatesTrainer(
        model=student,
        teacher_signal=None if teacher is None else InProcessTeacher(teacher, needs_head=distillation["kd_weight"] > 0),
        projections=projections,
        layer_pairs=layer_pairs,
        shared_tokenizer=shared,
        distillation=distillation,
        vocab_size=vocab_size,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=student_optimizer(config, args),
        data_collator=None if shared else PairedCollator(tokenizer.pad_token_id, tokenizers["teacher"].pad_token_id),
    )
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(training["output_dir"], training.get("resume_from_checkpoint"),
                                                                   training.get("overwrite_output_dir")))
    output_dir = save_finished_run(trainer, tokenizer, config)
    saved = f"its tokenizer, {PROJECTIONS_FILE}" if projections is not None else "its tokenizer"
    print_rank0(f"saved the student, {saved} and distillation_config.json to {output_dir}")
    return trainer


if __name__ == "__main__":
    run_cli(main, config)
