"""On-policy distillation (GKD, Agarwal et al. 2024; Qwen3; Thinking Machines 2025): on a sampled micro-batch the
student writes its own completion of each row's prompt, the teacher scores every sampled token, and the student
minimises the per-token divergence on exactly those tokens (KD alone: there is no ground truth to take a CE against).

What lives here is mechanics, shared by nothing else: which micro-batches sample (decided from the seed, the same on
every process and after a resume), the collator that carries each row's prompt, batched KV-cache generation with the
student in eval mode (ZeRO-3 parameters gathered once per generation), the re-labelled batch, the optimizer step's
micro-batches as the trainer takes them (`OnPolicySampler.step_micro_batches`) and the loss parts it logs
(`on_policy_parts`). distil_logits.py owns the `on_policy` config block and the few trainer lines that call this.
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import torch

from common import ConfigError
from data import end_of_turn_id

# Batch keys that carry the prompt and the sampled completions to the trainer; never passed to a model.
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")
COMPLETION_LENGTHS = "completion_lengths"
NOT_MODEL_INPUTS = PROMPT_KEYS + (COMPLETION_LENGTHS,)


def check_on_policy(on_policy: dict, config: dict) -> None:
    """The on_policy block's values and its combinations with the rest of the config, before anything is loaded."""
    fraction = on_policy["fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"on_policy.fraction must be in [0, 1] (0: off, 1: every batch samples), got {fraction!r}.")
    if isinstance(on_policy["max_new_tokens"], bool) or not isinstance(on_policy["max_new_tokens"], int) \
            or on_policy["max_new_tokens"] < 1:
        raise ConfigError(f"on_policy.max_new_tokens must be an integer >= 1, got {on_policy['max_new_tokens']!r}.")
    if not isinstance(on_policy["temperature"], (int, float)) or on_policy["temperature"] <= 0:
        raise ConfigError(f"on_policy.temperature must be > 0 (1 samples the student's own distribution), got "
                          f"{on_policy['temperature']!r}.")
    if not isinstance(on_policy["top_p"], (int, float)) or not 0 < on_policy["top_p"] <= 1:
        raise ConfigError(f"on_policy.top_p must be in (0, 1] (1: no nucleus cut), got {on_policy['top_p']!r}.")
    if fraction == 0:
        return
    if config["offline"]["mode"]:
        raise ConfigError("on_policy.fraction > 0 needs the teacher online (it scores the student's own samples); set "
                          "offline.mode: null or on_policy.fraction: 0.")
    if config["distillation"]["alpha"] == 0:
        raise ConfigError("on_policy.fraction > 0 needs a teacher (distillation.alpha > 0); alpha 0 is plain SFT.")
    if config["distillation"]["cross_tokenizer"]:
        raise ConfigError("on_policy.fraction > 0 needs a teacher that shares the student's tokenizer (it scores the "
                          "student's own tokens); set distillation.cross_tokenizer: null or on_policy.fraction: 0.")
    if config["training"].get("packing"):
        raise ConfigError("on_policy.fraction > 0 needs training.packing: false (each row's prompt is sampled from).")
    if config["training"].get("fsdp") or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("on_policy.fraction > 0 is not implemented under FSDP (generation would need the sharded "
                          "student gathered); launch with DDP or DeepSpeed ZeRO-3 instead.")


def samples_this_batch(seed: int, step: int, micro_batch: int, fraction: float) -> bool:
    """Whether micro-batch `micro_batch` of optimizer step `step` samples: a draw with its own RNG, seeded by the
    training seed and the position in the run, so every process (ZeRO-3 gathers collectively) and a resumed run
    decide the same, and the global RNG (dropout, data order) is never touched."""
    if fraction <= 0:
        return False
    return random.Random(f"on-policy:{seed}:{step}:{micro_batch}").random() < fraction


def generation_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The torch seed of one generation: other processes sample other completions, a resumed run the same ones."""
    return random.Random(f"on-policy-sample:{seed}:{step}:{micro_batch}:{rank}").getrandbits(63)


class PromptCollator:
    """TRL's padding collator (what SFTTrainer builds), plus each row's prompt left-padded for generation."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad_token_id = pad_token_id
        self.collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate([{key: example[key] for key in ("input_ids", "labels")} for example in examples])
        prompts = [example["prompt_ids"] for example in examples]
        width = max(len(prompt) for prompt in prompts)
        batch["prompt_input_ids"] = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts])
        batch["prompt_attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return batch


def label_completions(prompts: list[list[int]], completions: list[list[int]], stop_ids: set[int], max_length: int,
                      pad_token_id: int) -> dict:
    """The batch the student trains on: each prompt followed by its completion, right-padded, with labels on the
    completion only. A completion is kept up to and including the first stop token it emitted (what generate
    pads with after it is dropped); one without a stop token was cut at max_new_tokens (or max_length) and is
    labelled as it is, with no end token added."""
    rows, labels, lengths = [], [], []
    for prompt, completion in zip(prompts, completions):
        kept = []
        for token in completion:
            kept.append(int(token))
            if token in stop_ids:
                break
        kept = kept[: max(0, max_length - len(prompt))]
        rows.append(list(prompt) + kept)
        labels.append([-100] * len(prompt) + kept)
        lengths.append(len(kept))
    width = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([label + [-100] * (width - len(label)) for label in labels]),
        COMPLETION_LENGTHS: torch.tensor(lengths),
    }


class _RealVocabulary:
    """A logits processor that never samples a row by which the output head is padded beyond the tokenizer: the
    teacher could not be compared there (the loss uses the real-vocabulary slice only)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size:] = -float("inf")
        return scores


@contextlib.contextmanager
def student_for_generation(model_wrapped: torch.nn.Module, accelerator, zero3: bool):
    """The bare student in eval mode (no dropout), its train mode restored after. Under ZeRO-3 every parameter is
    gathered once for the whole generation (a collective: every process enters together) and the engine's
    per-module hooks are lifted, so decoding does not gather layer by layer at every token (TRL's
    unwrap_model_for_generation does the same, but also toggles gradient checkpointing, which eval mode already
    turns off in transformers' layers)."""
    student = accelerator.unwrap_model(model_wrapped)
    was_training = student.training
    student.eval()
    try:
        if zero3:
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            with deepspeed.zero.GatheredParameters(list(model_wrapped.parameters())):
                remove_hooks(model_wrapped)
                try:
                    yield student
                finally:
                    add_hooks(model_wrapped)
        else:
            yield student
    finally:
        student.train(was_training)


def sample_completions(student: torch.nn.Module, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                       settings: dict, stop_ids: list[int], pad_token_id: int, vocab_size: int, seed: int,
                       max_new_tokens: int) -> list[list[int]]:
    """Sample one completion per left-padded prompt with the KV cache, from the student's own distribution at
    `settings["temperature"]` and `top_p` (no top-k, no repetition penalty, whatever the model's generation_config
    says). The global RNG is left as it was (fork_rng): dropout and data order do not depend on whether a batch
    sampled. Returns the new tokens of each row (with generate's padding after a stop token)."""
    from transformers import GenerationConfig, LogitsProcessorList

    generation_config = GenerationConfig(
        do_sample=True, temperature=float(settings["temperature"]), top_p=float(settings["top_p"]), top_k=0,
        min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
        max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_token_id, use_cache=True,
    )
    head_rows = student.get_output_embeddings().weight.shape[0]
    processors = LogitsProcessorList([_RealVocabulary(vocab_size)] if head_rows > vocab_size else [])
    devices = [prompt_input_ids.device] if prompt_input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        output = student.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask,
                                  generation_config=generation_config, logits_processor=processors)
    return output[:, prompt_input_ids.shape[1]:].tolist()


class OnPolicySampler:
    """Replaces the sampled micro-batches of an optimizer step by the student's completions (called by the trainer's
    get_batch_samples, before the step's tokens are counted), and keeps the sampling time for the tokens/s log."""

    def __init__(self, settings: dict, tokenizer, vocab_size: int, max_length: int, seed: int):
        self.settings = settings
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_ids = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.seed = seed
        self.sampled_tokens = 0
        self.sampling_seconds = 0.0

    def step_micro_batches(self, trainer, epoch_iterator, num_batches: int, device) -> tuple[list, object]:
        """The Trainer's get_batch_samples, except that the micro-batches that sample are replaced by the student's
        completions before num_items_in_batch (N) is counted, so completions of any length weigh per token across
        the whole step."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        accelerator = trainer.accelerator
        zero3 = trainer.is_deepspeed_enabled and accelerator.state.deepspeed_plugin.zero_stage == 3
        batches = self.replace(batches, trainer.state.global_step, trainer.model_wrapped, accelerator, zero3,
                               accelerator.autocast)
        return batches, trainer._get_num_items_in_batch(batches, device)

    def replace(self, batches: list[dict], step: int, model_wrapped, accelerator, zero3: bool, autocast) -> list[dict]:
        """`batches` with every sampled one re-built from the student's completions; the prompt keys are dropped from
        all of them, so a dataset batch is exactly what the plain collator gives."""
        out = []
        for index, batch in enumerate(batches):
            prompt_ids, prompt_mask = (batch.pop(key) for key in PROMPT_KEYS)
            if not samples_this_batch(self.seed, step, index, self.settings["fraction"]):
                out.append(batch)
                continue
            prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
            room = self.max_length - min(len(prompt) for prompt in prompts)
            start = time.perf_counter()
            with student_for_generation(model_wrapped, accelerator, zero3) as student, autocast():
                completions = sample_completions(
                    student, prompt_ids, prompt_mask, self.settings, self.stop_ids, self.pad_token_id,
                    self.vocab_size, generation_seed(self.seed, step, index, accelerator.process_index),
                    min(self.settings["max_new_tokens"], room))
            self.sampling_seconds += time.perf_counter() - start
            sampled = label_completions(prompts, completions, set(self.stop_ids), self.max_length, self.pad_token_id)
            self.sampled_tokens += int(sampled[COMPLETION_LENGTHS].sum())
            out.append({key: value.to(batch["input_ids"].device) for key, value in sampled.items()})
        return out

    def pop_speeds(self) -> dict[str, float]:
        """This process's sampling tokens/s since the last log (sampled completion tokens per second of generate),
        then reset. The trainer logs the training tokens/s in every mode."""
        speeds = {}
        if self.sampling_seconds > 0:
            speeds["sampling_tokens_per_second"] = self.sampled_tokens / self.sampling_seconds
        self.sampled_tokens = 0
        self.sampling_seconds = 0.0
        return speeds


def on_policy_parts(outputs: dict, inputs: dict, num_items_in_batch, batch_tokens: torch.Tensor) -> dict:
    """The loss parts of a micro-batch in an on-policy run (common.LossPartLog's name -> (value, normaliser, items)):
    sampled and dataset micro-batches are logged apart (kd_loss_on_policy against kd_loss and ce_loss), and a part
    with no tokens in the logging interval is left out; completion_length is the mean sampled tokens per row."""
    sampled = COMPLETION_LENGTHS in inputs
    lengths = inputs[COMPLETION_LENGTHS].float() if sampled else batch_tokens.new_zeros(1).float()
    return dict(kd_loss=(outputs["kd_loss"], num_items_in_batch, batch_tokens * (not sampled)),
                ce_loss=(outputs["ce_loss"], num_items_in_batch, batch_tokens * (not sampled)),
                kd_loss_on_policy=(outputs["kd_loss"], num_items_in_batch, batch_tokens * sampled),
                completion_length=(lengths.mean(), lengths.numel() * sampled, lengths.numel() * sampled))
