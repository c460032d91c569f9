"""Preference distillation: the student learns from pairs of answers to one prompt, the teacher's (chosen) and a worse
one (rejected): DistiLLM-2's contrastive loss, or DPO with a teacher term. Teacher and student share a tokenizer.

    python distil_dpo.py                                      # one GPU (or the CPU), the inline `config` below
    accelerate launch --multi_gpu --num_processes 8 distil_dpo.py      # 8 GPUs, DDP (keep --multi_gpu: docs/hardware.md)
    accelerate launch --config_file deepspeed_configs/accelerate_zero3.yaml distil_dpo.py   # DeepSpeed ZeRO-3
    python distil_dpo.py --config my_experiment.yaml          # override any key of `config` from YAML or JSON
    bash scripts/serve_teacher.sh TEACHER & python distil_dpo.py --config served.yaml   # teacher_server.url: vLLM

Copy this file per experiment and edit `config`. docs/preference.md has the data shapes, the pairs file and what was
measured.

The data: preference rows (TRL's `prompt`, `chosen`, `rejected`, as strings or as messages) are read as they are.
Prompts (ShareGPT or messages; a conversation's prompt is everything before its last assistant turn, its own answer
is not used) get their pairs built once, before training: chosen is the teacher's sample, rejected the starting
student's, with the `pairs` settings, written to output_dir/pairs.jsonl and reused by a rerun with the same settings.
With `teacher_server.url` the teacher is served by vLLM and never loaded here: the server samples the chosen answers
and answers the KD terms' top-k (k + 1 buckets, as distil_logits.py; docs/preference.md).

The loss, per optimizer step (preference_loss.py has the reference formulas; the computation runs on hidden states
and never builds the (tokens, vocabulary) logits). c and r are a pair's chosen and rejected answers, x its prompt:

  distillm2 (DistiLLM-2, Ko et al., ICML 2025; code jongwooko/distillm-2, src/distillm_trainer.py):
    loss = (2 - m) * T^2 / N_c * sum_{i in c} KL(p_i || a1(c) p_i + (1 - a1(c)) q_i)
              +  m * T^2 / N_r * sum_{i in r} KL(q_i || a2(r) q_i + (1 - a2(r)) p_i)
    p the teacher's, q the student's next-token distribution (softmax(logits[:V] / T)). m = 1, or with
    preference.gradual_mix DistiLLM-2's gradual_beta schedule m = 1 + 0.5 * min(1, 2 * step / max_steps), which
    shifts weight to the rejected term. The skews: a1 = preference.skew_chosen and a2 = skew_rejected (DistiLLM-2's
    0.1) for every answer, or with preference.adaptive_skew DistiLLM-2's curriculum, one skew per answer y:
      g(c) = P(c) - Q(c),  g(r) = Q(r) - P(r),  P(y) = exp(mean_{i in y} log p_i(y_i)), Q(y) likewise for q
      a1(c) = clip(1 - (1 - a1) * G_c / (g(c) + 1e-5), 0.01, a1),  a2(r) = clip(1 - (1 - a2) * G_r / (g(r) + 1e-5), 0.01, a2)
    (log-probabilities of the answer's own tokens, whole head, T = 1; no gradient flows through a skew). G_c, G_r,
    the anchors, are the mean gaps g over the pairs of the run's first optimizer step, which trains with a1, a2;
    they are kept for the rest of the run (and in each checkpoint). An answer whose gap is at least the anchor keeps
    the base skew; one on which teacher and student are closer gets a smaller skew, down to 0.01.
  dpo_kd:
    loss = 1 / P * sum_pairs -log sigmoid(beta * ((log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x))))
           + alpha * T^2 / N_c * sum_{i in c} D(p_i, q_i)
    log pi(y|x) sums the student's log-probabilities of the answer's tokens (whole head, T = 1); ref is the starting
    student, whose log-probabilities are computed once before training and stored with the rows; D is
    distillation.divergence. Without the teacher term, DPO is known to lower the chosen answers' likelihood too.

- N_c, N_r: the counted (answer) tokens of the chosen and rejected rows, P the pairs, all in the whole optimizer step
  (accumulated micro-batches, all processes), so that 2 x 2 accumulated pairs train exactly as a batch of 4.
- V is the tokenizer's real vocabulary: padded head rows are never compared.
- Sources: the two KL terms and the adaptive skew follow distillm_trainer.py's get_batch_logps (tea_pos_kl, ref_pos_kl
  and alpha_1, alpha_2, as quoted from the released file in public walkthroughs; the mirror lyx0727/distillm-2 has no
  copy of the trainer), the mixing (2 - m) / m and its schedule its kd_loss as re-implementations write it.
- Against DistiLLM-2's code, four differences, each said here (docs/preference.md has more): its terms are averaged
  per answer and then per pair, here per token over the step (as every loss of this repository); its skew reverse
  KL stops the gradient through the student inside the mixture, losses.skew_reverse_kl does not; its skew is
  computed with gradients through the student's gap, here it is a coefficient; its anchor is the mean gap logged
  over the first logging window (and, as released, the curriculum is off: update_alpha and gradual_beta are False),
  here the first optimizer step's, with the curriculum and the schedule on by default, as the paper trains.

Why an SFTTrainer subclass (DistillationTrainer) and not TRL's DPOTrainer: the teacher's placement (ZeRO-3 included),
its head check, KD computed inside the student's forward by the chunked kernel, the per-part log and the model card
are DistillationTrainer's already; DPOTrainer would need each of them again, builds its own tokenization of the rows
instead of data.py's chat templates and label masks, and averages its loss per micro-batch (TRL 1.16's
DPOTrainer.compute_loss ignores num_items_in_batch), so accumulation would not equal a larger batch. What DPO needs
beyond that is small: the collator (preference_data.PairCollator), the stored reference log-probabilities
(DPOTrainer's precompute_ref_log_probs, done here before training) and TRL's own chunked log-prob kernel.
"""

import functools
import json
import os

import torch

from alignment import shared_vocab_size
from common import (
    ConfigError,
    build_sft_config,
    load_causal_lm,
    load_tokenizer,
    micro_batch_normaliser,
    output_vocab_size,
    print_rank0,
    resolve_resume_checkpoint,
    run_cli,
    student_optimizer,
)
from data import CHATML_TEMPLATE, dataset_format, next_token_mask
from distillation_trainer import DistillationTrainer, check_kd_settings, config_keys, validate_config
from distributed import check_launch
from finished_run import save_finished_run
from preference_data import (PAIRS_FILE, PairCollator, add_reference_log_probs, build_pairs, check_pairs_file,
                             check_preference_rows, load_rows, pair_settings, preference_messages, prompt_messages,
                             read_pairs, tokenize_pairs)
from preference_loss import METHODS, PreferenceTerms, distillm2_mix, preference_student_loss
from served_teacher import ServedTeacher, check_server_block, run_startup_checks, served_teacher_from_config
from teacher_signal import InProcessTeacher, ServedTopK, model_inputs

config = {
    "project_name": "distil-dpo",  # a label written into the saved config
    # --- data ---
    "dataset": {
        "name": "mlabonne/FineTome-100k",  # preference rows (prompt, chosen, rejected) or prompts (ShareGPT / messages)
        "split": "train",  # split to read from a Hub dataset
        "format": "auto",  # prompts only: auto | sharegpt | messages
        "num_samples": None,  # keep only this many rows after shuffling (None: all); prompts: the pairs built
        "eval_size": "auto",  # held-out pairs: "auto" = 10% (1 to 500) | an int | a fraction < 1 | 0: none
        "eval_name": None,  # a separate held-out dataset of preference rows instead of splitting eval_size pairs off
        "eval_split": "train",  # split of eval_name to read
        "seed": 42,  # shuffling and eval-split seed
        "system_prompt": None,  # system message prepended to prompts that have none (None: no system turn)
    },
    # --- models ---
    "models": {
        "teacher": "arcee-ai/Arcee-Spark",  # Hub id or local folder; must share the student's tokenizer
        "student": "Qwen/Qwen2-1.5B",  # Hub id or local folder; also the frozen DPO reference (its starting weights)
    },
    "teacher_server": {  # the teacher served by vLLM (scripts/serve_teacher.sh; docs/preference.md, docs/served-teacher.md)
        "url": None,  # None: the teacher loads in this process | e.g. http://127.0.0.1:8000: it samples the chosen answers and answers the KD terms' top-k
        "model": None,  # served model name; None: the server's only model
        "top_k": 64,  # log-probabilities asked per position; KD over them plus one bucket for the rest (<= --max-logprobs)
        "api_key_env": None,  # name of the environment variable holding the server's --api-key (never the key itself)
        "timeout_s": 120,  # longest silence of the server while connecting or answering before a retry
        "max_retries": 5,  # retries of a failed request (backoff 0.5 s, doubling) before the run stops with one line
        "prefetch": 2,  # micro-batches of the step requested ahead of the one the student trains on (0: each when reached)
    },
    "tokenizer": {
        "max_length": 4096,  # tokens per row (prompt + answer); longer rows are truncated
        "chat_template": CHATML_TEMPLATE,  # Jinja template used to render conversations (None: the tokenizer's own)
    },
    "model_config": {
        "use_flash_attention": True,  # flash_attention_2 when installed on a GPU, else sdpa
        "student_dtype": "float32",  # float32 (master weights, autocast by bf16/fp16) | bfloat16 (Kahan-summed AdamW)
    },
    # --- preference distillation ---
    "preference": {
        "method": "distillm2",  # distillm2 (DistiLLM-2's contrastive KL) | dpo_kd (DPO + alpha * KD on chosen)
        "skew_chosen": 0.1,  # distillm2: a1, the teacher's weight in the chosen term's mixture, in (0, 1)
        "skew_rejected": 0.1,  # distillm2: a2, the student's weight in the rejected term's mixture, in (0, 1)
        "gradual_mix": True,  # distillm2: weight of the rejected term rises from 1 to 1.5 over the first half of training
        "adaptive_skew": True,  # distillm2: DistiLLM-2's curriculum, one skew per answer from its probability gap (docstring)
        "beta": 0.1,  # dpo_kd: DPO's beta (> 0); larger keeps the student closer to its start
        "alpha": 1.0,  # dpo_kd: weight of the teacher term (>= 0; 0 is plain DPO, no teacher loaded)
    },
    "distillation": {
        "temperature": 1.0,  # softens both distributions; the KL terms are multiplied by temperature ** 2
        "divergence": "forward_kl",  # dpo_kd's teacher term: forward_kl | reverse_kl | jsd | tvd | skew_forward_kl | skew_reverse_kl
        "beta": 0.5,  # dpo_kd with jsd: mixture weight of the teacher, in (0, 1)
        "skew": 0.1,  # dpo_kd with skew_*_kl: weight of the first distribution in the mixture, in (0, 1)
        "loss_memory_mb": 1024,  # MB per GPU for the loss's logit chunks and temporaries; lower it if the loss runs out of memory
    },
    "pairs": {
        "build": True,  # prompts: sample the pairs before training (False: refuse prompt-only data)
        "max_new_tokens": 256,  # length of each sampled answer (also capped by tokenizer.max_length)
        "temperature": 1.0,  # sampling temperature of teacher and student (1: their own distributions)
        "top_p": 1.0,  # nucleus sampling (1: the whole vocabulary)
        "seed": 42,  # sampling seed; each batch of prompts draws from its own seed derived from it
        "batch_size": 8,  # prompts sampled together (part of the settings: a change builds other pairs)
    },
    # --- training: any TRL SFTConfig / transformers TrainingArguments field ---
    "training": {
        "output_dir": "./results-dpo",  # pairs.jsonl, checkpoints, the final student, its tokenizer, distillation_config.json
        "num_train_epochs": 1,  # passes over the pairs
        "per_device_train_batch_size": 1,  # pairs per device per micro-step (each pair is two rows)
        "gradient_accumulation_steps": 8,  # micro-steps per optimizer step
        "learning_rate": 5e-6,  # peak learning rate
        "weight_decay": 0.0,  # AdamW weight decay
        "warmup_ratio": 0.1,  # fraction of steps spent warming up (mapped to transformers 5's warmup_steps)
        "lr_scheduler_type": "cosine",  # learning-rate schedule after warm-up
        "bf16": True,  # autocast to bf16 (GPU and CPU); the student keeps float32 weights, the frozen teacher is bf16
        "activation_checkpointing": True,  # recompute activations in backward to save memory
        "logging_steps": 1,  # log each loss term every this many optimizer steps
        "eval_strategy": "steps",  # evaluate every eval_steps (when dataset.eval_size > 0)
        "eval_steps": 500,  # optimizer steps between evaluations
        "save_steps": 500,  # optimizer steps between checkpoints
        "save_total_limit": 2,  # keep only the newest checkpoints
        "seed": 42,  # model init and data order seed
        "resume_from_checkpoint": None,  # True (latest checkpoint in output_dir) or a checkpoint path
        "overwrite_output_dir": False,  # allow training into an output_dir that holds a finished run (pairs.jsonl is kept)
        "save_dtype": None,  # saved student's dtype: None = its checkpoint's (config.json) | float32 | bfloat16 | float16
    },
}

CONFIG_KEYS = config_keys(config)
SKEW_ANCHOR_FILE = "skew_anchor.json"  # in each checkpoint: distillm2's measured anchors, read back on resume


def check_preference(config: dict) -> None:
    """The preference, distillation and pairs settings (validate_config checks the rest)."""
    preference, distillation, pairs = config["preference"], config["distillation"], config["pairs"]
    if preference["method"] not in METHODS:
        raise ConfigError(f"unknown preference.method '{preference['method']}'; choose one of {', '.join(METHODS)}.")
    if not isinstance(preference["beta"], (int, float)) or preference["beta"] <= 0:
        raise ConfigError(f"preference.beta must be > 0 (DPO's inverse temperature), got {preference['beta']!r}.")
    if not isinstance(preference["alpha"], (int, float)) or preference["alpha"] < 0:
        raise ConfigError(f"preference.alpha must be >= 0 (0: plain DPO), got {preference['alpha']!r}.")
    for section, key in (("preference", "skew_chosen"), ("preference", "skew_rejected"), ("distillation", "beta"),
                         ("distillation", "skew")):
        if not 0 < config[section][key] < 1:
            raise ConfigError(f"{section}.{key} must be strictly between 0 and 1, got {config[section][key]}.")
    check_kd_settings(distillation)
    for key in ("max_new_tokens", "batch_size"):
        if isinstance(pairs[key], bool) or not isinstance(pairs[key], int) or pairs[key] < 1:
            raise ConfigError(f"pairs.{key} must be an integer >= 1, got {pairs[key]!r}.")
    if not isinstance(pairs["temperature"], (int, float)) or pairs["temperature"] <= 0:
        raise ConfigError(f"pairs.temperature must be > 0, got {pairs['temperature']!r}.")
    if not isinstance(pairs["top_p"], (int, float)) or not 0 < pairs["top_p"] <= 1:
        raise ConfigError(f"pairs.top_p must be in (0, 1], got {pairs['top_p']!r}.")
    if config["training"].get("packing"):
        raise ConfigError("distil_dpo.py needs training.packing: false (a pair's two rows are compared as rows).")
    if config["teacher_server"]["url"] is not None:
        check_server_block(config["teacher_server"])
        if uses_teacher(config) and distillation["temperature"] != 1:
            # The server answers the top k at T = 1; the tempered mass outside them needs every logit.
            raise ConfigError(f"teacher_server.url needs distillation.temperature: 1 (got {distillation['temperature']}): "
                              "the server's top-k at T = 1 cannot give the exact tempered distribution; use T = 1 or "
                              "an in-process teacher (teacher_server.url: null).")
        if preference["method"] == "distillm2" and preference["adaptive_skew"]:
            raise ConfigError("teacher_server.url cannot train distillm2 with preference.adaptive_skew: the skew needs "
                              "the teacher's log-probability of every answer token, which its top-k lacks when the "
                              "token is outside the k; set adaptive_skew: false, or teacher_server.url: null.")


def validate(config: dict) -> None:
    """Check the config's keys and settings once, before anything is loaded or written."""
    validate_config(config, CONFIG_KEYS, check_preference)


def uses_teacher(config: dict) -> bool:
    """distillm2 always compares with the teacher; dpo_kd only when alpha > 0."""
    return config["preference"]["method"] == "distillm2" or config["preference"]["alpha"] > 0


class PreferenceTrainer(DistillationTrainer):
    """DistillationTrainer whose micro-batches are pairs (P chosen rows, then P rejected rows) and whose loss is the
    module docstring's distillm2 or dpo_kd, normalised by the optimizer step's chosen tokens, rejected tokens and
    pairs."""

    def __init__(self, *args, preference: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference, self.step_counts = preference, None
        # distillm2's adaptive skew: (chosen, rejected) anchors, measured on the run's first optimizer step, summed in
        # anchor_sums (chosen gaps, rejected gaps, pairs) until the step ends.
        self.skew_anchor, self.anchor_sums = None, None

    def measure_skew_anchor(self) -> None:
        """End the anchor's measurement (on every process at once): the mean gaps of the first step's pairs."""
        if self.anchor_sums is None or self.skew_anchor is not None:
            return
        sums = self.anchor_sums
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        pairs = max(float(sums[2]), 1.0)
        self.skew_anchor, self.anchor_sums = (float(sums[0]) / pairs, float(sums[1]) / pairs), None
        print_rank0(f"distillm2 adaptive skew: anchors (mean probability gap on the first step's pairs) "
                    f"{self.skew_anchor[0]:.4f} on the chosen answers, {self.skew_anchor[1]:.4f} on the rejected")

    def _save_checkpoint(self, model, trial) -> None:
        self.measure_skew_anchor()
        super()._save_checkpoint(model, trial)
        if self.skew_anchor is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, SKEW_ANCHOR_FILE), "w") as handle:
                json.dump({"skew_anchor": self.skew_anchor}, handle)

    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        # Read here rather than in _load_from_checkpoint, which a DeepSpeed resume does not go through.
        path = os.path.join(resume_from_checkpoint, SKEW_ANCHOR_FILE) if isinstance(resume_from_checkpoint, str) else ""
        if os.path.isfile(path):  # else the resumed run measures it again, on its first step
            with open(path) as handle:
                self.skew_anchor = tuple(json.load(handle)["skew_anchor"])
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def pair_counts(self, batches: list[dict], device, all_processes: bool) -> torch.Tensor:
        """(chosen tokens, rejected tokens, pairs) of these micro-batches, summed over the processes if asked."""
        counts = torch.zeros(3, dtype=torch.long, device=device)
        for batch in batches:
            mask = next_token_mask(batch["labels"])
            pairs = mask.shape[0] // 2
            counts += torch.stack([mask[:pairs].sum(), mask[pairs:].sum(), torch.tensor(pairs, device=mask.device)]).to(device)
        if all_processes and self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts).view(-1, 3).sum(0)
        return counts

    def step_micro_batches(self, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        self.measure_skew_anchor()  # the previous step was the anchor's
        batches, num_items_in_batch = super().step_micro_batches(epoch_iterator, num_batches, device)
        self.step_counts = self.pair_counts(batches, device, self.args.average_tokens_across_devices)
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        self.check_heads(model, inputs)
        local = self.pair_counts([inputs], inputs["labels"].device, all_processes=False)
        counts = self.step_counts if mode == "train" and self.step_counts is not None \
            else micro_batch_normaliser(local, self, mode == "train")
        preference, distillation = self.preference, self.distillation
        terms = PreferenceTerms(
            method=preference["method"], chosen_tokens=counts[0], rejected_tokens=counts[1], pairs=counts[2],
            temperature=distillation["temperature"], vocab_size=self.vocab_size,
            memory_budget_mb=distillation["loss_memory_mb"], beta=preference["beta"], alpha=preference["alpha"],
            divergence=distillation["divergence"], jsd_beta=distillation["beta"], skew=distillation["skew"],
            skew_chosen=preference["skew_chosen"], skew_rejected=preference["skew_rejected"],
            mix=distillm2_mix(self.state.global_step, self.state.max_steps, preference["gradual_mix"]),
            adaptive_skew=preference["method"] == "distillm2" and preference["adaptive_skew"], skew_anchor=self.skew_anchor)
        outputs = model(**model_inputs(inputs), student_loss=functools.partial(
            preference_student_loss, labels=inputs["labels"], teacher=self.teacher_answer(inputs, mode),
            reference_log_probs=inputs.get("student_reference_logps"), terms=terms))
        if preference["method"] == "distillm2":
            parts = dict(chosen_kl=(outputs["chosen_kl"], counts[0], local[0]),
                         rejected_kl=(outputs["rejected_kl"], counts[1], local[1]))
            if terms.adaptive_skew:  # per pair: the gaps and the skews they gave
                parts.update({name: (outputs[name], 1, local[2]) for name in
                              ("gap/chosen", "gap/rejected", "skew/chosen", "skew/rejected")})
                if mode == "train" and self.skew_anchor is None:
                    sums = torch.stack([outputs["gap/chosen"], outputs["gap/rejected"], local[2].float()]).detach()
                    self.anchor_sums = sums if self.anchor_sums is None else self.anchor_sums + sums
        else:
            pairs, policy = local[2], outputs["policy_log_probs"]
            parts = {"dpo_loss": (outputs["dpo_loss"], counts[2], pairs), "kd_loss": (outputs["kd_loss"], counts[0], local[0]),
                     **{name: (outputs[name], 1, pairs) for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracy")},
                     # The answers' summed log-probabilities: what DPO alone is known to pull down on the chosen side.
                     "logps/chosen": (policy[:len(policy) // 2].sum(), 1, pairs),
                     "logps/rejected": (policy[len(policy) // 2:].sum(), 1, pairs)}
        self.log_parts(mode, **parts)
        loss = self.scaled_for_processes(outputs["loss"], mode)
        return (loss, outputs) if return_outputs else loss


def sample_texts(raw, shape: str, data_format: str | None, tokenizer, system_prompt: str | None, rows: int = 64) -> list:
    """The first rows as the models read them (prompt and chosen answer rendered), to check the two tokenizers on."""
    texts = []
    for index in range(min(rows, len(raw))):
        if shape == "preference":
            prompt, chosen, _ = preference_messages(raw[index], system_prompt)
            messages = prompt + chosen
        else:
            messages = prompt_messages(raw[index], data_format, system_prompt)
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def split_eval(tokenized, data_config: dict):
    """(train, eval or None): eval_size pairs split off with the seed, as data.prepare_datasets splits rows."""
    eval_size = data_config.get("eval_size") or 0
    if eval_size == "auto":
        eval_size = max(1, min(500, len(tokenized) // 10))
    rows = max(1, int(round(eval_size * len(tokenized)))) if isinstance(eval_size, float) else int(eval_size)
    if rows >= len(tokenized):
        raise ConfigError(f"dataset.eval_size={data_config['eval_size']} leaves no training pairs out of "
                          f"{len(tokenized)}; lower it.")
    if rows == 0:
        return tokenized, None
    split = tokenized.train_test_split(test_size=rows, seed=data_config["seed"], shuffle=True)
    return split["train"], split["test"]


def prepare_pairs(config: dict, tokenizer, teacher_tokenizer, server: ServedTeacher | None = None) -> tuple:
    """Read the data, check it, build or reuse the pairs of prompts (on the main process, the others waiting), tokenize
    and split them. With a teacher `server`, its start-up checks run first, and it samples the chosen answers (the
    teacher's weights are never loaded here). Returns (train, eval or None, vocab_size, the start-up checks' rows)."""
    import datasets
    from accelerate import PartialState

    data_config, pairs_config = config["dataset"], config["pairs"]
    name, system_prompt, max_length = data_config["name"], data_config.get("system_prompt"), config["tokenizer"]["max_length"]
    raw, shape = load_rows(data_config)
    data_format = None
    if shape == "preference":
        check_preference_rows(raw, name, system_prompt)
    else:
        if not pairs_config["build"]:
            raise ConfigError(f"dataset '{name}' holds prompts without answers and pairs.build is false, so "
                              f"{config['preference']['method']} has no pairs to train on. Set pairs.build: true, or "
                              "give preference rows (prompt, chosen, rejected).")
        data_format = dataset_format(raw, data_config.get("format"))
    if data_config.get("eval_name"):
        raw_eval, eval_shape = load_rows(data_config, data_config["eval_name"], data_config.get("eval_split", "train"))
        if eval_shape != "preference":
            raise ConfigError(f"dataset.eval_name '{data_config['eval_name']}' must hold preference rows (prompt, "
                              "chosen, rejected); use dataset.eval_size to hold out built pairs instead.")
        check_preference_rows(raw_eval, data_config["eval_name"], system_prompt)
    texts = sample_texts(raw, shape, data_format, tokenizer, system_prompt)
    vocab_size = shared_vocab_size(teacher_tokenizer, tokenizer, texts)
    checks = {"texts": texts[:4], "student_ids": [tokenizer(text, add_special_tokens=False)["input_ids"]
                                                  for text in texts[:4]], "max_length": max_length}
    if server is not None:  # before anything is written; names the served model when teacher_server.model is null
        run_startup_checks(server, vocab_size, **checks)
    state = PartialState()
    if shape == "prompts":
        prompts = [prompt_messages(row, data_format, system_prompt) for row in raw]
        path = os.path.join(config["training"]["output_dir"], PAIRS_FILE)
        served = None if server is None else {"url": server.url, "model": server.model}
        settings = pair_settings(config, len(prompts), served)
        check_pairs_file(path, settings)  # before anything is written
        with state.main_process_first():
            found, pairs = read_pairs(path)
            if found != settings or len(pairs) < len(prompts):
                # Loaded whole on the main process (before DeepSpeed is registered), for sampling only.
                teacher = server if server is not None else \
                    load_causal_lm(config["models"]["teacher"], config, trainable=False).to(state.device)
                student = load_causal_lm(config["models"]["student"], config, trainable=False).to(state.device)
                pairs = build_pairs(path, settings, prompts, tokenizer, teacher, student, vocab_size, state.device)
                del teacher, student
            else:
                print_rank0(f"pairs: reusing {path} ({len(pairs)} pairs, same settings)")
        raw = datasets.Dataset.from_list(pairs)
        name = path
    with state.local_main_process_first():
        tokenized, _ = tokenize_pairs(raw, name, tokenizer, max_length, system_prompt)
        train, evaluation = (tokenized, None) if data_config.get("eval_name") else split_eval(tokenized, data_config)
        if data_config.get("eval_name"):
            evaluation, _ = tokenize_pairs(raw_eval, data_config["eval_name"], tokenizer, max_length, system_prompt)
    print_rank0(f"pairs: {len(train)} to train on, {0 if evaluation is None else len(evaluation)} held out")
    return train, evaluation, vocab_size, checks


def main(config: dict) -> PreferenceTrainer:
    """Validate, read or build the pairs, store the reference log-probabilities (dpo_kd), load, train, save. Returns
    the trainer (its state holds the logged terms)."""
    validate(config)
    preference, training = config["preference"], config["training"]
    tokenizer = load_tokenizer(config["models"]["student"], config["tokenizer"]["chat_template"])
    teacher_tokenizer = load_tokenizer(config["models"]["teacher"], config["tokenizer"]["chat_template"])
    server = None
    if config["teacher_server"]["url"] is not None:
        server, _ = served_teacher_from_config(config, tokenizer, texts=[])
    train_dataset, eval_dataset, vocab_size, checks = prepare_pairs(config, tokenizer, teacher_tokenizer, server)
    if preference["method"] == "dpo_kd":
        # The reference is the starting student, in the precision it trains in: at step 0 policy and reference agree.
        from accelerate import PartialState

        device = PartialState().device
        starting = load_causal_lm(config["models"]["student"], config).to(device).eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(training.get("bf16"))):
            batch = training.get("per_device_eval_batch_size", 8)
            train_dataset = add_reference_log_probs(train_dataset, starting, tokenizer.pad_token_id, batch, device)
            if eval_dataset is not None:
                eval_dataset = add_reference_log_probs(eval_dataset, starting, tokenizer.pad_token_id, batch, device)
        del starting
    # Before the models load: the training arguments register DeepSpeed's config, and from_pretrained then partitions.
    args = build_sft_config(config, max_length=config["tokenizer"]["max_length"],
                            eval_strategy=training.get("eval_strategy", "no") if eval_dataset is not None else "no")
    check_launch(args, "distil_dpo.py")
    served = server is not None and uses_teacher(config)  # models.teacher: its tokenizer only
    teacher = load_causal_lm(config["models"]["teacher"], config, trainable=False) \
        if uses_teacher(config) and not served else None
    student = load_causal_lm(config["models"]["student"], config)
    for model_name, model in (("student", student), ("teacher", teacher)):
        if model is not None and output_vocab_size(model) < vocab_size:
            raise ConfigError(f"the {model_name}'s output head has {output_vocab_size(model)} rows, fewer than the "
                              f"{vocab_size} tokens of the tokenizer. Use the tokenizer that was trained with the model.")
    teacher_signal = InProcessTeacher(teacher) if teacher is not None else None
    if served:  # the top-k of every row the student trains on, from the server (teacher_signal.ServedTopK)
        teacher_signal = ServedTopK(server, vocab_size, config["distillation"]["temperature"],
                                    config["teacher_server"]["prefetch"], checks)
    trainer = PreferenceTrainer(
        model=student,
        teacher_signal=teacher_signal,
        distillation=config["distillation"],
        vocab_size=vocab_size,
        preference=preference,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=student_optimizer(config, args),
        data_collator=PairCollator(tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(training["output_dir"], training.get("resume_from_checkpoint"),
                                                                   training.get("overwrite_output_dir")))
    output_dir = save_finished_run(trainer, tokenizer, config)
    print_rank0(f"saved the student, its tokenizer and distillation_config.json to {output_dir}")
    return trainer


if __name__ == "__main__":
    run_cli(main, config)
