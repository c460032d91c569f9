"""Logit distillation: a student learns a teacher's next-token distribution (KL and friends at a temperature),
mixed with the usual cross-entropy. Teacher and student share a tokenizer, or distillation.cross_tokenizer is set.

    python distil_logits.py                                   # one GPU (or the CPU), the inline `config` below
    accelerate launch --multi_gpu --num_processes 8 distil_logits.py   # 8 GPUs, DDP (keep --multi_gpu: docs/hardware.md)
    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml distil_logits.py   # DeepSpeed ZeRO-3
    python distil_logits.py --config my_experiment.yaml       # override any key of `config` from YAML or JSON
    python distil_logits.py --config capture.yaml             # offline.mode: capture -> store the teacher's top-k once
    bash scripts/serve_teacher.sh TEACHER & python distil_logits.py --config served.yaml   # teacher_server.url: vLLM
    python distil_logits.py --config on_policy_vllm.yaml      # on_policy.engine: vllm, the student sampled by vLLM
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
- Offline training (`offline.mode: train`) replaces p by the teacher's stored top-k plus one bucket for the rest;
  a served teacher (`teacher_server.url`, T = 1 only) by the server's top-k plus that bucket, the same way.
- On-policy (`on_policy.fraction` > 0, on_policy.py): a sampled micro-batch replaces each row's last answer by the
  student's own completion of the prompt; its loss is KD alone (no ground truth for CE) on the completion tokens,
  with the same N (the step's counted tokens, completions included), and with the on_policy block's own D and T
  (default reverse KL at T = 1, the student's samples' own distribution; docs/on-policy.md).
- A teacher with another tokenizer (`distillation.cross_tokenizer: uld | hybrid`): each model reads its own rendering,
  i runs over the aligned pairs (both end a token at the same character and predict the same next text;
  alignment.py), and the two vocabularies are compared by the sorted L1 at T = 1 (uld, as ULD) or by T^2 * p(S) *
  D on the exact-match shared tokens S plus the sorted L1 at T = 1 on the rest (hybrid, after GOLD); N and CE are as
  above (cross_tokenizer_loss.cross_tokenizer_divergence; docs/cross-tokenizer.md).
"""

import functools

import torch

from alignment import (PairedCollator, check_chat_templates, prepare_paired_datasets, shared_vocab_size, shared_vocabulary,
                       tokenize_row_for_logits)
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
    return_large_frees_to_the_system,
    run_cli,
    student_optimizer,
)
from cross_tokenizer_loss import CROSS_TOKENIZER_METHODS
from data import check_ids_below, next_token_mask, prepare_datasets, rendered_texts, wants_eval
from distillation_trainer import DistillationTrainer, check_kd_settings, config_keys, validate_config
from distributed import check_launch, peak_memory_mib, print_memory_report
from offline import CaptureRowCollator, capture_teacher, with_row_index
from on_policy import COMPLETION_LENGTHS, OnPolicySampler, PromptCollator, check_on_policy, on_policy_parts
from served_teacher import check_teacher_server, served_teacher_from_config
from vllm_engine import start_vllm_engine
from teacher_signal import (AlignedPairs, CapturedTopK, CrossTokenizerTeacher, InProcessTeacher, LossTerms, ServedTopK,
                            model_inputs, student_loss)

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
    "teacher_server": {  # the teacher served by vLLM (scripts/serve_teacher.sh; docs/served-teacher.md)
        "url": None,  # None: the teacher loads in this process | e.g. http://127.0.0.1:8000: its top-k from that server
        "model": None,  # served model name; None: the server's only model
        "top_k": 64,  # log-probabilities asked per position; KD over them plus one bucket for the rest (<= --max-logprobs)
        "api_key_env": None,  # name of the environment variable holding the server's --api-key (never the key itself)
        "timeout_s": 120,  # longest silence of the server while connecting or answering before a retry
        "max_retries": 5,  # retries of a failed request (backoff 0.5 s, doubling) before the run stops with one line
        "prefetch": 2,  # micro-batches of the step requested ahead of the one the student trains on (0: each when reached)
    },
    "tokenizer": {
        "max_length": 4096,  # tokens per row; longer rows are truncated, rows are never padded to this length
        "chat_template": None,  # None: the tokenizer's own | chatml (needs <|im_start|>, <|im_end|> special tokens) | Jinja text
        "teacher_chat_template": None,  # cross_tokenizer only: the teacher's template, as chat_template (None: its tokenizer's own)
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
        "loss_memory_mb": 1024,  # MB per GPU for the loss's logit chunks and temporaries; lower it if the loss runs out of memory
        "cross_tokenizer": None,  # None: the teacher must share the tokenizer | uld | hybrid: any teacher tokenizer (docs/cross-tokenizer.md)
        "hybrid_matched_weight": 1.0,  # hybrid: weight of D on the exact-match shared vocabulary (times the teacher's mass there)
        "hybrid_unmatched_weight": 0.25,  # hybrid: weight of the sorted L1 (at T = 1) on the rest of the two vocabularies
        "cross_tokenizer_max_piece_tokens": 1,  # 1: pair only same-text next tokens | k > 1: also pieces of up to k tokens, by probability
    },
    "on_policy": {
        "fraction": 0.0,  # share of micro-batches whose completions the student samples itself (GKD's lambda); 0 off, 1 always
        "max_new_tokens": 256,  # length of a sampled completion (also capped by tokenizer.max_length)
        "divergence": "reverse_kl",  # KD on sampled micro-batches (distillation.divergence's choices); reverse_kl: KL(student || teacher)
        "temperature": 1.0,  # loss temperature on sampled micro-batches (times T^2); 1 compares the distributions sampled from
        "sampling_temperature": 1.0,  # the student's sampling temperature (1: its own distribution; else a warning)
        "top_p": 1.0,  # nucleus sampling (1: the whole vocabulary; else a warning)
        "engine": "hf",  # hf: the student samples with transformers' generate | vllm: a vLLM server synced to its weights
        "vllm_url": None,  # engine vllm: None starts a local server (scripts/serve_student.sh) | e.g. http://127.0.0.1:8001
        "vllm_args": [],  # engine vllm, local server: extra vLLM arguments, e.g. ["--gpu-memory-utilization", "0.3"]
        "vllm_sync_dir": "/dev/shm",  # engine vllm: folder the student's weights are written to per sync (the server reads it)
        "vllm_timeout_s": 600,  # engine vllm: longest wait for the server to start, load a sync or answer a request
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


# The keys main() reads, per section: a key missing from the config main() is given, or one it does not know, is one
# error naming it and the nearest known key; `training` also takes any SFTConfig field.
CONFIG_KEYS = config_keys(config)


def check_distillation(config: dict) -> None:
    """The distillation, offline and on-policy settings and their combinations (validate_config checks the rest)."""
    distillation = config["distillation"]
    check_kd_settings(distillation)
    if not 0 <= distillation["alpha"] <= 1:
        raise ConfigError(f"distillation.alpha must be in [0, 1], got {distillation['alpha']} (0: SFT, 1: pure KD).")
    for key in ("beta", "skew"):
        if not 0 < distillation[key] < 1:
            raise ConfigError(f"distillation.{key} must be strictly between 0 and 1, got {distillation[key]}.")
    if distillation["cross_tokenizer"] not in (None, *CROSS_TOKENIZER_METHODS):
        raise ConfigError(f"distillation.cross_tokenizer must be null, uld or hybrid, got {distillation['cross_tokenizer']!r}.")
    for key in ("hybrid_matched_weight", "hybrid_unmatched_weight"):
        if not isinstance(distillation[key], (int, float)) or distillation[key] < 0:
            raise ConfigError(f"distillation.{key} must be a number >= 0, got {distillation[key]!r}.")
    pieces = distillation["cross_tokenizer_max_piece_tokens"]
    if isinstance(pieces, bool) or not isinstance(pieces, int) or not 1 <= pieces <= 16:
        raise ConfigError(f"distillation.cross_tokenizer_max_piece_tokens must be an integer from 1 to 16, got {pieces!r} "
                          "(1: only positions whose next token is the same text on both sides).")
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
    check_teacher_server(config)


def validate(config: dict) -> None:
    """Check the config's keys and settings once, before anything is loaded or written."""
    validate_config(config, CONFIG_KEYS, check_distillation)


class LogitsTrainer(DistillationTrainer):
    """DistillationTrainer whose loss is alpha * KD(teacher || student) + (1 - alpha) * CE (the module docstring's
    formula) against the teacher signal main chose: the teacher in this process, a capture, or a teacher on another
    tokenizer. An on-policy run (`on_policy`) samples before the step's tokens are counted and trains on the sampled
    micro-batches with KD alone, at on_policy's divergence and temperature."""

    def __init__(self, *args, on_policy: OnPolicySampler | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_policy = on_policy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        self.check_heads(model, inputs)
        labels = inputs["labels"]
        batch_tokens = next_token_mask(labels).sum()
        if num_items_in_batch is None:
            num_items_in_batch = micro_batch_normaliser(batch_tokens, self, mode == "train")
        answer = self.teacher_answer(inputs, mode)
        alpha, distillation = self.distillation["alpha"], self.distillation
        sampled = COMPLETION_LENGTHS in inputs  # the student's own completions: KD alone, there is no ground truth
        kd = self.on_policy.settings if sampled else distillation  # on_policy has its own divergence and temperature
        outputs = student_loss(model, model_inputs(inputs), labels, answer, LossTerms(
            kd_weight=1.0 if sampled else alpha, ce_weight=0.0 if sampled else 1 - alpha,
            num_items_in_batch=num_items_in_batch, divergence=kd["divergence"],
            temperature=kd["temperature"], vocab_size=self.vocab_size,
            memory_budget_mb=distillation["loss_memory_mb"], beta=distillation["beta"], skew=distillation["skew"]))
        parts = dict(kd_loss=(outputs["kd_loss"], num_items_in_batch, batch_tokens),
                     ce_loss=(outputs["ce_loss"], num_items_in_batch, batch_tokens))
        if isinstance(answer, AlignedPairs):  # share of the student's counted positions that have a teacher position
            aligned = torch.as_tensor(answer.pairs["rows"].numel(), device=labels.device)
            parts["aligned_share"] = (aligned / batch_tokens.clamp(min=1), batch_tokens, batch_tokens)
        if self.on_policy is not None:  # sampled and dataset micro-batches are logged apart
            parts = on_policy_parts(outputs, inputs, num_items_in_batch, batch_tokens)
        self.log_parts(mode, **parts)
        loss = self.scaled_for_processes(outputs["loss"], mode)
        return (loss, outputs) if return_outputs else loss

    def step_micro_batches(self, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        if self.on_policy is None:
            return super().step_micro_batches(epoch_iterator, num_batches, device)
        return self.on_policy.step_micro_batches(self, epoch_iterator, num_batches, device)

    def log(self, logs: dict, start_time=None) -> None:
        if self.on_policy is not None and self.model.training:
            logs.update(self.on_policy.pop_speeds())
        super().log(logs, start_time)


def main(config: dict) -> LogitsTrainer:
    """Validate, load, train, save. Returns the trainer (its state holds the logged kd_loss and ce_loss), or the
    capture's manifest (offline.mode: capture)."""
    validate(config)
    distillation, training, offline = config["distillation"], config["training"], config["offline"]
    patterns = read_spectrum_patterns(config["spectrum"]["layers_to_unfreeze"]) if config["spectrum"]["layers_to_unfreeze"] else None

    tokenizer = load_tokenizer(config["models"]["student"], config["tokenizer"]["chat_template"], "tokenizer.chat_template")
    use_teacher = distillation["alpha"] > 0 and offline["mode"] != "train"
    cross = bool(use_teacher and distillation["cross_tokenizer"])
    vocab_size = len(tokenizer)
    if cross:
        # Any teacher tokenizer: each model renders the rows with its own template, positions are aligned by character.
        teacher_tokenizer = load_tokenizer(config["models"]["teacher"], config["tokenizer"]["teacher_chat_template"],
                                           "tokenizer.teacher_chat_template")
        check_chat_templates(config["dataset"], {"teacher": teacher_tokenizer, "student": tokenizer})
        shared_ids = shared_vocabulary(tokenizer, teacher_tokenizer)
        print_rank0(f"cross-tokenizer KD ({distillation['cross_tokenizer']}): {shared_ids[0].numel()} of the "
                    f"student's {vocab_size} tokens have an exact match among the teacher's {len(teacher_tokenizer)}")
    else:
        check_chat_templates(config["dataset"], {"student": tokenizer})
    if use_teacher and not cross:
        # Only for the vocabulary check: the teacher reads the student's ids, rendered with the student's template.
        teacher_tokenizer = load_tokenizer(config["models"]["teacher"], config["tokenizer"]["chat_template"])
        vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, rendered_texts(config["dataset"], tokenizer))
    if offline["top_k"] > vocab_size:
        raise ConfigError(f"offline.top_k={offline['top_k']} is larger than the vocabulary ({vocab_size} tokens).")
    if offline["mode"] == "capture":  # store the teacher's top-k once (offline.py): no student, no training
        return capture_teacher(config, tokenizer, vocab_size)
    # Before any model loads: the training arguments register DeepSpeed's config with transformers, and only then does
    # from_pretrained partition each model as it loads (zero.Init) instead of loading it whole per process.
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
        # they are served from the heap and its high-water mark grows with the pairs per step (measured:
        # docs/cross-tokenizer.md, "Memory and time"). On a GPU they are CUDA memory, and a process-wide threshold
        # would only make every large host buffer an mmap.
        return_large_frees_to_the_system()
    if cross:
        tokenize_pair = functools.partial(tokenize_row_for_logits,
                                          max_piece_tokens=distillation["cross_tokenizer_max_piece_tokens"])
        train_dataset, eval_dataset, _ = prepare_paired_datasets(config["dataset"], tokenizer, teacher_tokenizer,
                                                                 config["tokenizer"]["max_length"], tokenize_pair)
    else:
        train_dataset, eval_dataset, _ = prepare_datasets(config["dataset"], tokenizer, config["tokenizer"]["max_length"],
                                                          sample_fraction=fraction)
        if use_teacher and len(tokenizer) > vocab_size:  # the student's tokenizer has tokens the teacher's lacks
            check_ids_below({"train": train_dataset, **({"eval": eval_dataset} if eval_dataset else {})}, vocab_size,
                            tokenizer)
    if fraction > 0 and eval_dataset is not None and len(eval_dataset) == 0:
        print_rank0("warning: no held-out row has an answer to evaluate on (prompt-only data); evaluation is off")
        eval_dataset, args.eval_strategy = None, "no"

    teacher_signal = collator = None
    if offline["mode"] == "train":
        # Offline: the teacher is never loaded; its top-k comes from the capture, checked against this run first.
        splits = {"train": train_dataset} if eval_dataset is None else {"train": train_dataset, "eval": eval_dataset}
        teacher_signal = CapturedTopK.from_capture(config, tokenizer, vocab_size, splits)
        vocab_size = teacher_signal.vocab_size
        train_dataset = train_dataset.map(with_row_index, with_indices=True, batched=True, desc="Numbering rows")
        if eval_dataset is not None:
            eval_dataset = eval_dataset.map(with_row_index, with_indices=True, batched=True, desc="Numbering rows")
        collator = CaptureRowCollator(tokenizer.pad_token_id)
    served = use_teacher and config["teacher_server"]["url"] is not None  # models.teacher: its tokenizer only
    before = peak_memory_mib()
    teacher = load_causal_lm(config["models"]["teacher"], config, trainable=False) if use_teacher and not served else None
    if teacher is not None:
        print_memory_report("teacher loaded", before)
    student = load_causal_lm(config["models"]["student"], config)
    for name, model, size in (("student", student, vocab_size),
                              ("teacher", teacher, len(teacher_tokenizer) if cross else vocab_size)):
        if model is not None and output_vocab_size(model) < size:
            raise ConfigError(
                f"the {name}'s output head has {output_vocab_size(model)} rows, fewer than the {size} tokens of "
                "the tokenizer. Use the tokenizer that was trained with the model."
            )
    if patterns:
        apply_spectrum(student, patterns)
    if cross:
        teacher_signal = CrossTokenizerTeacher(teacher, shared_ids, vocab_size, len(teacher_tokenizer), distillation)
        collator = PairedCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    elif teacher is not None:
        teacher_signal = InProcessTeacher(teacher)
    elif served:  # the server's vocabulary is checked against vocab_size at start-up (served_teacher.check_vocabulary)
        client, checks = served_teacher_from_config(config, tokenizer)
        teacher_signal = ServedTopK(client, vocab_size, distillation["temperature"], config["teacher_server"]["prefetch"],
                                    checks)
    if sampler is not None:
        collator = PromptCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
    resume = resolve_resume_checkpoint(training["output_dir"], training.get("resume_from_checkpoint"),
                                       training.get("overwrite_output_dir"))
    engine, server = None, None
    try:
        if sampler is not None and config["on_policy"]["engine"] == "vllm":  # checked (and synced) before training
            engine, server = start_vllm_engine(config["on_policy"], config["models"]["student"], student,
                                               config["tokenizer"]["max_length"], training["output_dir"],
                                               synced=resume is None and not is_deepspeed_zero3_enabled())
            sampler.engine = engine
        return train_and_save(config, student, teacher_signal, vocab_size, args, train_dataset, eval_dataset, tokenizer,
                              collator, sampler, resume)
    finally:  # also on errors and Ctrl-C: the local server's processes must not outlive the run
        if engine is not None:
            engine.close()
        if server is not None:
            server.stop()


def train_and_save(config: dict, student, teacher_signal, vocab_size: int, args, train_dataset, eval_dataset, tokenizer,
                   collator, sampler: OnPolicySampler | None, resume) -> LogitsTrainer:
    """Build the trainer, train (from `resume`, a checkpoint path or None), save the finished run."""
    trainer = LogitsTrainer(
        model=student,
        teacher_signal=teacher_signal,
        distillation=config["distillation"],
        vocab_size=vocab_size,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=student_optimizer(config, args),
        data_collator=collator,
        on_policy=sampler,
    )
    trainer.train(resume_from_checkpoint=resume)
    output_dir = save_finished_run(trainer, tokenizer, config)
    print_rank0(f"saved the student, its tokenizer and distillation_config.json to {output_dir}")
    return trainer


if __name__ == "__main__":
    run_cli(main, config)
