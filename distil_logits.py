"""Logit distillation: a student learns a teacher's next-token distribution (KL and friends at a temperature),
mixed with the usual cross-entropy. Teacher and student share a tokenizer, or distillation.cross_tokenizer is set.

    python distil_logits.py                                   # one GPU (or the CPU), the inline `config` below
    accelerate launch --multi_gpu --num_processes 8 distil_logits.py   # 8 GPUs, DDP (keep --multi_gpu: README)
    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml distil_logits.py   # DeepSpeed ZeRO-3
    python distil_logits.py --config my_experiment.yaml       # override any key of `config` from YAML or JSON
    python distil_logits.py --config capture.yaml             # offline.mode: capture -> store the teacher's top-k once
    python examples/demo.py                                   # the offline CPU demo (tiny models, made-up data)

Copy this file per experiment and edit `config`.

The loss, per optimizer step (losses.py has the reference formulas and the memory-saving kernel that computes them):

    loss = alpha * KD + (1 - alpha) * CE
    KD   = T^2 / N * sum_i D(p_i, q_i),   p_i = softmax(teacher_logits_i[:V] / T),  q_i = softmax(student_logits_i[:V] / T)
    CE   = 1 / N * sum_i -log softmax(student_logits_i)[label_{i+1}]

- i runs over the counted positions: those whose next token is trained (an assistant token; every token of a text row).
- D is `distillation.divergence`: forward_kl = KL(p || q) (teacher first: the student covers all the teacher's
  mass), reverse_kl = KL(q || p) (mode-seeking), jsd, tvd, skew_forward_kl, skew_reverse_kl (formulas in
  losses.token_divergence).
- T^2 keeps the gradient's scale independent of the temperature (Hinton et al., 2015).
- V is the tokenizer's real vocabulary: rows by which an output head is padded beyond it are dropped, never
  compared. CE uses the student's whole head, as the model's own loss does.
- N is the number of counted positions in the whole optimizer step (all accumulated micro-batches, all processes):
  the Trainer's `num_items_in_batch`, so that 2 x 2 accumulated rows train exactly as a batch of 4.
- Offline training (`offline.mode: train`) replaces p by the teacher's stored top-k plus one bucket for the rest.
- On-policy (`on_policy.fraction` > 0, on_policy.py): a sampled micro-batch replaces each row's last answer by the
  student's own completion of the prompt; its loss is KD alone (no ground truth for CE) on the completion tokens,
  with the same N (the step's counted tokens, completions included). Reverse KL at T = 1 is recommended (README).
- A teacher with another tokenizer (`distillation.cross_tokenizer: uld | hybrid`): each model reads its own rendering,
  i runs over the aligned pairs (both end a token at the same character; alignment.py), and D compares the two
  vocabularies by sorted L1 (uld) or by D on the exact-match shared tokens plus sorted L1 on the rest (hybrid);
  N and CE are as above (losses.cross_tokenizer_divergence; README, "Logit distillation across tokenizers").
"""

import torch
from trl import SFTTrainer

from common import (
    ConfigError,
    LossPartLog,
    apply_spectrum,
    build_sft_config,
    check_config_keys,
    check_output_dir,
    check_precision,
    load_causal_lm,
    load_tokenizer,
    micro_batch_normaliser,
    output_vocab_size,
    print_rank0,
    read_spectrum_patterns,
    resolve_resume_checkpoint,
    return_large_frees_to_the_system,
    run_cli,
    save_finished_run,
    student_optimizer,
)
from alignment import (PairedCollator, check_chat_templates, prepare_paired_datasets, shared_vocab_size, shared_vocabulary,
                       span_continuations, tokenize_row_for_logits)
from distributed import check_launch, peak_memory_mib, place_teacher, print_memory_report, teacher_head_for_loss
from data import (
    CHATML_TEMPLATE,
    check_dataset_path,
    check_eval_size,
    next_token_mask,
    prepare_datasets,
    rendered_texts,
    wants_eval,
)
from losses import (
    CROSS_TOKENIZER_METHODS,
    DIVERGENCES,
    add_distillation_forward,
    add_hidden_states_forward,
    check_head_matches_forward,
    final_layer,
    head_transform,
    sorted_l1_top_k,
    student_loss,
    teacher_hidden_at_counted_positions,
)
from on_policy import NOT_MODEL_INPUTS, COMPLETION_LENGTHS, OnPolicySampler, PromptCollator, check_on_policy
from offline import (CaptureRowCollator, TopKCapture, TopKCodec, capture_settings, check_capture_manifest, run_capture,
                     with_row_index)

config = {
    "project_name": "distil-logits",  # a label written into the saved config
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
        "teacher": "arcee-ai/Arcee-Spark",  # Hub id or local folder; shares the student's tokenizer unless cross_tokenizer
        "student": "Qwen/Qwen2-1.5B",  # Hub id or local folder
    },
    "tokenizer": {
        "max_length": 4096,  # tokens per row; longer rows are truncated, rows are never padded to this length
        "chat_template": CHATML_TEMPLATE,  # Jinja template used to render conversations (None: the tokenizer's own)
        "teacher_chat_template": None,  # cross_tokenizer only: the teacher's own template (None: its tokenizer's own)
    },
    "model_config": {
        "use_flash_attention": True,  # flash_attention_2 when installed on a GPU, else sdpa
        "student_dtype": "float32",  # float32 (master weights, autocast by bf16/fp16) | bfloat16 (half the memory, Kahan-summed AdamW)
    },
    # --- distillation ---
    "distillation": {
        "temperature": 2.0,  # softens both distributions; the divergence is multiplied by temperature ** 2
        "alpha": 0.5,  # loss = alpha * KD + (1 - alpha) * CE; 0 is plain SFT (no teacher loaded), 1 pure KD
        "divergence": "forward_kl",  # forward_kl | reverse_kl | jsd | tvd | skew_forward_kl | skew_reverse_kl
        "beta": 0.5,  # jsd only: mixture weight of the teacher, in (0, 1); 0.5 is the symmetric JSD
        "skew": 0.1,  # skew_*_kl only: weight of the first distribution in the mixture, in (0, 1) (DistiLLM)
        "loss_memory_mb": 1024,  # memory for the chunked loss's temporaries per chunk; sets the tokens per chunk
        "cross_tokenizer": None,  # None: the teacher must share the tokenizer | uld | hybrid: any teacher tokenizer (README)
        "hybrid_matched_weight": 1.0,  # hybrid: weight of the divergence on the exact-match shared vocabulary
        "hybrid_unmatched_weight": 0.25,  # hybrid: weight of the sorted L1 on the rest (and at merged spans); measured, README
    },
    "on_policy": {
        "fraction": 0.0,  # share of micro-batches whose completions the student samples itself (GKD's lambda); 0 off, 1 always
        "max_new_tokens": 256,  # length of a sampled completion (also capped by tokenizer.max_length)
        "temperature": 1.0,  # sampling temperature of the student (1: its own distribution)
        "top_p": 1.0,  # nucleus sampling (1: the whole vocabulary)
    },
    "offline": {
        "mode": None,  # None: teacher runs next to the student | capture: store its top-k and stop | train: learn from a capture
        "capture_dir": None,  # folder of the capture (parquet shards + manifest.json)
        "top_k": 64,  # tokens stored per position (k), plus one bucket for the rest of the teacher's mass
        "capture_batch_size": 8,  # rows per teacher forward while capturing
        "shard_rows": 1000,  # rows per parquet shard (the unit an interrupted capture resumes from)
    },
    "spectrum": {
        "layers_to_unfreeze": None,  # Spectrum YAML (unfrozen_parameters: [regex, ...]); None trains everything
    },
    # --- training: any TRL SFTConfig / transformers TrainingArguments field ---
    "training": {
        "output_dir": "./results",  # checkpoints, the final student, its tokenizer and distillation_config.json
        "num_train_epochs": 3,  # passes over the training rows
        "per_device_train_batch_size": 1,  # rows per device per micro-step
        "gradient_accumulation_steps": 8,  # micro-steps per optimizer step
        "learning_rate": 2e-5,  # peak learning rate
        "weight_decay": 0.05,  # AdamW weight decay
        "warmup_ratio": 0.1,  # fraction of steps spent warming up (mapped to transformers 5's warmup_steps)
        "lr_scheduler_type": "cosine",  # learning-rate schedule after warm-up
        "bf16": True,  # autocast to bf16 (GPU and CPU); the student keeps float32 weights, the frozen teacher is bf16
        "packing": False,  # pack rows into max_length sequences with TRL's best-fit packing (padding-free)
        "activation_checkpointing": True,  # recompute activations in backward to save memory
        "logging_steps": 1,  # log kd_loss, ce_loss and loss every this many optimizer steps
        "eval_strategy": "steps",  # evaluate every eval_steps (when dataset.eval_size > 0)
        "eval_steps": 500,  # optimizer steps between evaluations
        "save_steps": 500,  # optimizer steps between checkpoints
        "save_total_limit": 2,  # keep only the newest checkpoints
        "seed": 42,  # model init and data order seed
        "resume_from_checkpoint": None,  # True (latest checkpoint in output_dir) or a checkpoint path
        "overwrite_output_dir": False,  # allow training into an output_dir that holds a finished run
        "save_dtype": None,  # saved student's dtype: None = its checkpoint's (config.json) | float32 | bfloat16 | float16
    },
}


# The keys main() reads, per section. A key missing from an edited `config` (or one it does not know) is one error
# naming it and the nearest known key; `training` also takes any SFTConfig field. tests/ keep this equal to `config`.
CONFIG_KEYS = {
    "project_name": None,
    "dataset": ("name", "split", "format", "num_samples", "eval_size", "eval_name", "eval_split", "seed",
                "system_prompt"),
    "models": ("teacher", "student"),
    "tokenizer": ("max_length", "chat_template", "teacher_chat_template"),
    "model_config": ("use_flash_attention", "student_dtype"),
    "distillation": ("temperature", "alpha", "divergence", "beta", "skew", "loss_memory_mb", "cross_tokenizer",
                     "hybrid_matched_weight", "hybrid_unmatched_weight"),
    "on_policy": ("fraction", "max_new_tokens", "temperature", "top_p"),
    "offline": ("mode", "capture_dir", "top_k", "capture_batch_size", "shard_rows"),
    "spectrum": ("layers_to_unfreeze",),
    "training": ("output_dir",),
}


def validate(config: dict) -> None:
    """Check the config's keys and the distillation settings once, before anything is loaded or written."""
    check_config_keys(config, CONFIG_KEYS)
    check_eval_size(config["dataset"]["eval_size"])
    distillation = config["distillation"]
    if not isinstance(distillation["temperature"], (int, float)) or distillation["temperature"] <= 0:
        raise ConfigError(f"distillation.temperature must be > 0, got {distillation['temperature']}.")
    if not 0 <= distillation["alpha"] <= 1:
        raise ConfigError(f"distillation.alpha must be in [0, 1], got {distillation['alpha']} (0: SFT, 1: pure KD).")
    if distillation["divergence"] not in DIVERGENCES:
        raise ConfigError(
            f"unknown divergence '{distillation['divergence']}'; choose one of {', '.join(DIVERGENCES)}."
        )
    for key in ("beta", "skew"):
        if not 0 < distillation[key] < 1:
            raise ConfigError(f"distillation.{key} must be strictly between 0 and 1, got {distillation[key]}.")
    if distillation["cross_tokenizer"] not in (None, *CROSS_TOKENIZER_METHODS):
        raise ConfigError(f"distillation.cross_tokenizer must be null, uld or hybrid, got {distillation['cross_tokenizer']!r}.")
    for key in ("hybrid_matched_weight", "hybrid_unmatched_weight"):
        if not isinstance(distillation[key], (int, float)) or distillation[key] < 0:
            raise ConfigError(f"distillation.{key} must be a number >= 0, got {distillation[key]!r}.")
    if distillation["cross_tokenizer"] and (config["offline"]["mode"] or config["training"].get("packing")):
        raise ConfigError("distillation.cross_tokenizer needs offline.mode: null and training.packing: false (each row "
                          "carries the teacher's own tokens and an alignment).")
    offline = config["offline"]
    if offline["mode"] not in (None, "capture", "train"):
        raise ConfigError(f"offline.mode must be null, capture or train, got {offline['mode']!r}.")
    if offline["mode"] and not offline["capture_dir"]:
        raise ConfigError(f"offline.mode {offline['mode']} needs offline.capture_dir (the capture folder).")
    if offline["mode"] == "train" and config["training"].get("packing"):
        raise ConfigError("training from a capture needs training.packing: false (the stored positions are per row).")
    if offline["mode"] and distillation["alpha"] == 0:
        raise ConfigError("offline.mode is set but distillation.alpha is 0 (plain SFT needs no teacher).")
    if not isinstance(offline["top_k"], int) or offline["top_k"] < 1:
        raise ConfigError(f"offline.top_k must be a positive integer, got {offline['top_k']!r}.")
    check_on_policy(config["on_policy"], config)
    if config["tokenizer"]["max_length"] < 2:
        raise ConfigError("tokenizer.max_length must be at least 2 (a token and the one it predicts).")
    for key in ("name", "eval_name"):
        if config["dataset"][key]:
            check_dataset_path(config["dataset"][key])
    check_precision(config)
    check_output_dir(config)


class LogitsTrainer(SFTTrainer):
    """SFTTrainer whose loss is alpha * KD(teacher || student) + (1 - alpha) * CE (the module docstring's formula).

    Neither model builds its (tokens, vocab) logits: the teacher runs its backbone only, and the student's forward
    (patched by losses.add_distillation_forward) computes both terms chunk by chunk from the final hidden states
    and the two output heads. TRL 1.x also patches the student's forward (a fused LM head used when called with
    labels); the student is never given labels here, so that path is not taken.
    """

    # compute_loss normalises by the whole optimizer step's token count itself (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher=None, capture_readers: dict | None = None, distillation: dict, vocab_size: int,
                 on_policy: OnPolicySampler | None = None, cross: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # N counts the positions whose next label is trained (data.next_token_mask). transformers counts labels[..., 1:]
        # only for classes it maps to ForCausalLM; for others (GPT2LMHeadModel) it would count one per text row too many.
        self._loss_shifts_labels = True
        self.on_policy = on_policy
        self.distillation = distillation
        self.cross = cross  # a teacher with another tokenizer: shared_ids and teacher_vocab (main)
        if cross is not None:  # on the device once, not copied there at every chunk of every step
            device = self.accelerator.device
            self.cross = {**cross, "shared_ids": tuple(ids.to(device) for ids in cross["shared_ids"])}
        self.vocab_size = vocab_size
        self.capture_readers = capture_readers
        self.teacher = self.teacher_head = None
        self.teacher_transform = (1.0, None)
        self.loss_log = LossPartLog(self.accelerator)
        self.heads_checked = False
        add_distillation_forward(self.model)
        add_hidden_states_forward(self.model)  # for the head check at the first step
        self.teacher_module = teacher
        if teacher is not None and distillation["alpha"] > 0:
            add_hidden_states_forward(teacher)  # before any wrapping, so the engines call the patched forward
            self.teacher = place_teacher(teacher, self)
            self.teacher_head = teacher_head_for_loss(teacher, self.accelerator.device)
            self.teacher_transform = head_transform(teacher)
            self.teacher_final_layer = final_layer(teacher)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        if not self.heads_checked:  # once, in the engine: the logits the loss builds are the model's own
            row, mixed_precision = inputs["input_ids"][:1, :16], self.args.bf16 or self.args.fp16
            check_head_matches_forward(model, self.model, row, "student", mixed_precision)
            if self.teacher is not None:
                teacher_row = inputs["teacher_input_ids"][:1, :16] if self.cross else row
                check_head_matches_forward(self.teacher, self.teacher_module, teacher_row, "teacher", mixed_precision)
            self.heads_checked = True
        labels, capture_rows = inputs["labels"], inputs.get("capture_row")
        student_inputs = {key: value for key, value in inputs.items()
                          if key not in ("labels", "capture_row") + NOT_MODEL_INPUTS
                          and not key.startswith(("teacher_", "student_"))}
        student_inputs["use_cache"] = False
        batch_tokens = next_token_mask(labels).sum()
        if num_items_in_batch is None:
            num_items_in_batch = micro_batch_normaliser(batch_tokens, self, mode == "train")
        teacher_hidden = stored_topk = cross = None
        if self.teacher is not None and self.cross:
            cross = self.cross_tokenizer_inputs(inputs)
        elif self.teacher is not None:
            teacher_hidden = teacher_hidden_at_counted_positions(self.teacher, student_inputs, labels,
                                                                 self.teacher_final_layer)
        elif self.capture_readers is not None:
            stored_topk = self.capture_readers[mode].batch(capture_rows.tolist(), labels.device)
        alpha, distillation = self.distillation["alpha"], self.distillation
        sampled = COMPLETION_LENGTHS in inputs  # the student's own completions: KD alone, there is no ground truth
        kd_weight, ce_weight = (1.0, 0.0) if sampled else (alpha, 1 - alpha)
        outputs = student_loss(
            model, student_inputs, labels,
            teacher_hidden=teacher_hidden, teacher_head=self.teacher_head, teacher_transform=self.teacher_transform,
            stored_topk=stored_topk, cross_tokenizer=cross,
            kd_weight=kd_weight, ce_weight=ce_weight, num_items_in_batch=num_items_in_batch,
            divergence=distillation["divergence"], temperature=distillation["temperature"], vocab_size=self.vocab_size,
            beta=distillation["beta"], skew=distillation["skew"], memory_budget_mb=distillation["loss_memory_mb"],
        )
        parts = dict(kd_loss=(outputs["kd_loss"], num_items_in_batch, batch_tokens),
                     ce_loss=(outputs["ce_loss"], num_items_in_batch, batch_tokens))
        if cross is not None:  # share of the student's counted positions that have a teacher position
            aligned = torch.as_tensor(cross["rows"].numel(), device=labels.device)
            parts["aligned_share"] = (aligned / batch_tokens.clamp(min=1), batch_tokens, batch_tokens)
        if self.on_policy is not None:  # sampled and dataset batches logged apart; a part with no tokens is not logged
            lengths = inputs[COMPLETION_LENGTHS].float() if sampled else batch_tokens.new_zeros(1).float()
            parts = dict(kd_loss=(outputs["kd_loss"], num_items_in_batch, batch_tokens * (not sampled)),
                         ce_loss=(outputs["ce_loss"], num_items_in_batch, batch_tokens * (not sampled)),
                         kd_loss_on_policy=(outputs["kd_loss"], num_items_in_batch, batch_tokens * sampled),
                         completion_length=(lengths.mean(), lengths.numel() * sampled, lengths.numel() * sampled))
        self.loss_log.add(mode, self.state.global_step + 1, self.args.output_dir, **parts)
        loss = outputs["loss"]
        # DDP averages gradients over processes while num_items_in_batch counts every process's tokens.
        if mode == "train" and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def cross_tokenizer_inputs(self, inputs: dict) -> dict:
        """What `chunked_cross_tokenizer_kd` needs for a batch of `tokenize_row_for_logits` rows: the aligned pairs, the
        following tokens of merged spans on both sides, and the teacher's final hidden states there (backbone only,
        on its own tokens)."""
        valid = inputs["student_positions"] >= 0
        rows = valid.nonzero(as_tuple=True)[0]
        teacher_positions = inputs["teacher_positions"][valid]
        with torch.no_grad():
            teacher_hidden = self.teacher(input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"],
                                          use_cache=False, hidden_layers=[self.teacher_final_layer])[self.teacher_final_layer]
        owner, continuation_rows, continuation_positions, targets = span_continuations(
            rows, inputs["student_positions"][valid], inputs["student_span_tokens"][valid], inputs["input_ids"])
        teacher_owner, teacher_rows, teacher_continuation, teacher_targets = span_continuations(
            rows, teacher_positions, inputs["teacher_span_tokens"][valid], inputs["teacher_input_ids"])
        return {
            "rows": rows, "positions": inputs["student_positions"][valid],
            "merged": (inputs["student_span_tokens"][valid] > 1) | (inputs["teacher_span_tokens"][valid] > 1),
            "continuation_owner": owner, "continuation_rows": continuation_rows,
            "continuation_positions": continuation_positions, "continuation_targets": targets,
            "teacher_hidden": teacher_hidden[rows, teacher_positions],
            "teacher_continuation_hidden": teacher_hidden[teacher_rows, teacher_continuation],
            "teacher_continuation_owner": teacher_owner, "teacher_continuation_targets": teacher_targets,
            "teacher_head": self.teacher_head, "teacher_transform": self.teacher_transform,
            "teacher_vocab": self.cross["teacher_vocab"], "shared_ids": self.cross["shared_ids"],
            "method": self.distillation["cross_tokenizer"],
            "top_k": sorted_l1_top_k(self.vocab_size, self.cross["teacher_vocab"]),
            "matched_weight": self.distillation["hybrid_matched_weight"],
            "unmatched_weight": self.distillation["hybrid_unmatched_weight"],
        }

    def log(self, logs: dict, start_time=None) -> None:
        logs.update(self.loss_log.pop_means("train" if self.model.training else "eval"))
        if self.on_policy is not None and self.model.training:
            logs.update(self.on_policy.pop_speeds())
        super().log(logs, start_time)

    # --- on-policy distillation (on_policy.py): sampled batches are built before the step's tokens are counted ---
    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        """The Trainer's, except that the micro-batches that sample are replaced by the student's completions before
        num_items_in_batch (N) is counted, so completions of any length weigh per token across the whole step."""
        if self.on_policy is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        batches = self.on_policy.replace(batches, self.state.global_step, self.model_wrapped, self.accelerator, zero3,
                                         self.accelerator.autocast)
        return batches, self._get_num_items_in_batch(batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.on_policy is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.on_policy.timing_training(inputs):
            return super().training_step(model, inputs, num_items_in_batch)

    def create_model_card(self, *args, **kwargs) -> None:
        pass  # TRL's card knows neither the teacher nor the method; common.save_finished_run writes ours


def main(config: dict) -> LogitsTrainer:
    """Validate, load, train, save. Returns the trainer (its state holds the logged kd_loss and ce_loss)."""
    validate(config)
    distillation, training = config["distillation"], config["training"]
    patterns = read_spectrum_patterns(config["spectrum"]["layers_to_unfreeze"]) if config["spectrum"]["layers_to_unfreeze"] else None

    offline = config["offline"]
    tokenizer = load_tokenizer(config["models"]["student"], config["tokenizer"]["chat_template"])
    use_teacher = distillation["alpha"] > 0 and offline["mode"] != "train"
    vocab_size, cross = len(tokenizer), None
    if use_teacher and distillation["cross_tokenizer"]:
        # Any teacher tokenizer: each model renders the rows with its own template, positions are aligned by character.
        teacher_tokenizer = load_tokenizer(config["models"]["teacher"], config["tokenizer"]["teacher_chat_template"])
        check_chat_templates(config["dataset"], {"teacher": teacher_tokenizer, "student": tokenizer},
                             {"student": "tokenizer.chat_template"})
        cross = {"shared_ids": shared_vocabulary(tokenizer, teacher_tokenizer), "teacher_vocab": len(teacher_tokenizer)}
        print_rank0(f"cross-tokenizer KD ({distillation['cross_tokenizer']}): {cross['shared_ids'][0].numel()} of the "
                    f"student's {vocab_size} tokens have an exact match among the teacher's {len(teacher_tokenizer)}")
    elif use_teacher:
        teacher_tokenizer = load_tokenizer(config["models"]["teacher"], config["tokenizer"]["chat_template"])
        vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, rendered_texts(config["dataset"], tokenizer))
    if offline["top_k"] > vocab_size:
        raise ConfigError(f"offline.top_k={offline['top_k']} is larger than the vocabulary ({vocab_size} tokens).")
    args = None
    if offline["mode"] != "capture":
        # Before any model loads: the training arguments register DeepSpeed's config with transformers, and only then
        # does from_pretrained partition each model as it loads (zero.Init) instead of loading it whole per process.
        # The capture runs the teacher whole on each process, so it builds none.
        args = build_sft_config(
            config,
            max_length=config["tokenizer"]["max_length"],
            eval_strategy=training.get("eval_strategy", "no") if wants_eval(config["dataset"]) else "no",
        )
        check_launch(args, "distil_logits.py")
        from transformers.integrations import is_deepspeed_zero3_enabled

        if cross and is_deepspeed_zero3_enabled():
            raise ConfigError("distillation.cross_tokenizer does not run under DeepSpeed ZeRO-3: its checkpointed chunks "
                              "recompute the output heads in backward, after ZeRO-3 has partitioned them again. Use "
                              "DDP, ZeRO-1/2 or FSDP.")
    fraction = config["on_policy"]["fraction"]  # before the data: the template's end-of-turn token is checked here
    sampler = OnPolicySampler(config["on_policy"], tokenizer, vocab_size, config["tokenizer"]["max_length"],
                              args.seed) if fraction > 0 else None
    if cross and args.device.type == "cpu":
        # On the CPU the chunk loop allocates and frees (chunk, vocabulary) buffers; with glibc's adaptive threshold
        # they are served from the heap and its high-water mark grows with the pairs per step (measured; README). On a
        # GPU they are CUDA memory, and a process-wide threshold would only make every large host buffer an mmap.
        return_large_frees_to_the_system()
    if cross:
        train_dataset, eval_dataset, _ = prepare_paired_datasets(config["dataset"], tokenizer, teacher_tokenizer,
                                                                 config["tokenizer"]["max_length"], tokenize_row_for_logits)
    else:
        train_dataset, eval_dataset, _ = prepare_datasets(config["dataset"], tokenizer, config["tokenizer"]["max_length"],
                                                          sample_fraction=fraction)
    if fraction > 0 and eval_dataset is not None and len(eval_dataset) == 0:
        print_rank0("warning: no held-out row has an answer to evaluate on (prompt-only data); evaluation is off")
        eval_dataset, args.eval_strategy = None, "no"
    splits = {"train": train_dataset} if eval_dataset is None else {"train": train_dataset, "eval": eval_dataset}

    capture_readers = None
    if offline["mode"] == "train":
        # Offline: the teacher is never loaded; its top-k comes from the capture, checked against this run first.
        capture = TopKCapture(offline["capture_dir"])
        manifest = capture.manifest()
        expected = capture_settings(config, tokenizer, manifest["vocab_size"] if manifest else vocab_size, splits)
        check_capture_manifest(manifest, expected, capture.folder, for_training=True)
        codec = TopKCodec(manifest["vocab_size"], manifest["top_k"])
        capture_readers = {split: capture.load(split, dataset, codec) for split, dataset in splits.items()}
        vocab_size = manifest["vocab_size"]
        train_dataset = train_dataset.map(with_row_index, with_indices=True, batched=True, desc="Numbering rows")
        if eval_dataset is not None:
            eval_dataset = eval_dataset.map(with_row_index, with_indices=True, batched=True, desc="Numbering rows")

    before = peak_memory_mib()
    teacher = load_causal_lm(config["models"]["teacher"], config, trainable=False) if use_teacher else None
    if teacher is not None:
        print_memory_report("teacher loaded", before)
    if offline["mode"] == "capture":
        return run_capture(config, teacher, tokenizer, splits, vocab_size)
    student = load_causal_lm(config["models"]["student"], config)
    for name, model, size in (("student", student, vocab_size),
                              ("teacher", teacher, cross["teacher_vocab"] if cross else vocab_size)):
        if model is not None and output_vocab_size(model) < size:
            raise ConfigError(
                f"the {name}'s output head has {output_vocab_size(model)} rows, fewer than the {size} tokens of "
                "the tokenizer. Use the tokenizer that was trained with the model."
            )
    if patterns:
        apply_spectrum(student, patterns)

    trainer = LogitsTrainer(
        model=student,
        teacher=teacher,
        capture_readers=capture_readers,
        distillation=distillation,
        vocab_size=vocab_size,
        cross=cross,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=student_optimizer(config, args),
        data_collator=(CaptureRowCollator(tokenizer.pad_token_id) if capture_readers else
                       PairedCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id) if cross else
                       PromptCollator(tokenizer.pad_token_id, args.pad_to_multiple_of) if fraction > 0 else None),
        on_policy=sampler,
    )
    print_rank0(f"training on {trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type}")
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(training["output_dir"], training.get("resume_from_checkpoint"),
                                                                   training.get("overwrite_output_dir")))
    output_dir = save_finished_run(trainer, tokenizer, config)
    print_rank0(f"saved the student, its tokenizer and distillation_config.json to {output_dir}")
    return trainer


if __name__ == "__main__":
    run_cli(main, config)
