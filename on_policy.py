"""On-policy distillation (GKD, Agarwal et al. 2024; Qwen3; Thinking Machines 2025): on a sampled micro-batch the
student writes its own completion of each row's prompt, the teacher scores every sampled token, and the student
minimises the per-token divergence on exactly those tokens (KD alone: there is no ground truth to take a CE against).

What lives here is mechanics, shared by nothing else: which micro-batches sample (decided from the seed, the same on
every process and after a resume), the collator that carries each row's prompt, one batched KV-cache generation per
optimizer step for all of its sampled rows, with the student in eval mode and ignoring its checkpoint's
generation_config (ZeRO-3 parameters gathered once per step), the re-labelled batches, a warning when the samples look
degenerate, the optimizer step's micro-batches as the trainer takes them (`OnPolicySampler.step_micro_batches`) and
the loss parts it logs (`on_policy_parts`). distil_logits.py owns the `on_policy` config block and the few trainer
lines that call this.

With `engine: vllm` the completions come from a vLLM server that holds the student's current weights instead of
generate (vllm_engine.py: the client, the weight sync, the local server); everything else here is the same.
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

from common import ConfigError, print_rank0
from data import end_of_turn_id
from losses import DIVERGENCES

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
    if on_policy["divergence"] not in DIVERGENCES:
        raise ConfigError(f"on_policy.divergence {on_policy['divergence']!r} is unknown; choose one of "
                          f"{', '.join(DIVERGENCES)} (reverse_kl is the on-policy objective).")
    for key, meaning in (("temperature", "the loss's temperature on sampled micro-batches; 1 compares the "
                                         "distributions the student samples from"),
                         ("sampling_temperature", "1 samples the student's own distribution")):
        if isinstance(on_policy[key], bool) or not isinstance(on_policy[key], (int, float)) or on_policy[key] <= 0:
            raise ConfigError(f"on_policy.{key} must be > 0 ({meaning}), got {on_policy[key]!r}.")
    if not isinstance(on_policy["top_p"], (int, float)) or not 0 < on_policy["top_p"] <= 1:
        raise ConfigError(f"on_policy.top_p must be in (0, 1] (1: no nucleus cut), got {on_policy['top_p']!r}.")
    check_engine_settings(on_policy)
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


def check_engine_settings(on_policy: dict) -> None:
    """on_policy.engine and its vllm_* keys."""
    if on_policy["engine"] not in ("hf", "vllm"):
        raise ConfigError(f"on_policy.engine must be hf (transformers' generate) or vllm (a vLLM server), got "
                          f"{on_policy['engine']!r}.")
    url = on_policy["vllm_url"]
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise ConfigError(f"on_policy.vllm_url must be null (the script starts a local server) or an http(s) URL such "
                          f"as http://127.0.0.1:8001, got {url!r}.")
    if not isinstance(on_policy["vllm_args"], (list, tuple)) or \
            not all(isinstance(arg, str) for arg in on_policy["vllm_args"]):
        raise ConfigError(f"on_policy.vllm_args must be a list of strings (extra vLLM arguments of the local server), "
                          f"got {on_policy['vllm_args']!r}.")
    timeout = on_policy["vllm_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"on_policy.vllm_timeout_s must be a number of seconds > 0, got {timeout!r}.")
    if on_policy["engine"] == "vllm" and on_policy["fraction"] > 0 and not os.path.isdir(on_policy["vllm_sync_dir"]):
        raise ConfigError(f"on_policy.vllm_sync_dir {on_policy['vllm_sync_dir']!r} is not a folder: the student's "
                          "weights are written there for the vLLM server at each sync (/dev/shm: in memory).")


def samples_this_batch(seed: int, step: int, micro_batch: int, fraction: float) -> bool:
    """Whether micro-batch `micro_batch` of optimizer step `step` samples: a draw with its own RNG, seeded by the
    training seed and the position in the run, so every process (ZeRO-3 gathers collectively) and a resumed run
    decide the same, and the global RNG (dropout, data order) is never touched."""
    if fraction <= 0:
        return False
    return random.Random(f"on-policy:{seed}:{step}:{micro_batch}").random() < fraction


def generation_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step `step`'s one generation on process `rank`: other processes sample other
    completions, a resumed run the same ones."""
    return random.Random(f"on-policy-sample:{seed}:{step}:{rank}").getrandbits(63)


def sampling_warning(settings: dict) -> str | None:
    """The warning for sampling settings that are not neutral (None when they are): the samples then come from a
    sharpened or truncated student, not from the distribution the reverse KL is the divergence of."""
    changed = [f"{key} {settings[key]}" for key in ("sampling_temperature", "top_p") if settings[key] != 1]
    if not changed:
        return None
    return (f"warning: on_policy samples at {' and '.join(changed)}: the completions no longer come from the "
            "student's own distribution, so the on-policy loss on them is no longer an estimate of "
            "KL(student || teacher). Set on_policy.sampling_temperature: 1 and top_p: 1 unless you mean it.")


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


def neutral_generation_config(settings: dict, stop_ids: list[int], pad_token_id: int, max_new_tokens: int):
    """A GenerationConfig that samples from the student's own distribution at `settings["sampling_temperature"]` and
    `top_p`, with every other field that shapes, cuts or stops the samples set to its neutral value.

    generate fills each field left at None from the checkpoint's generation_config, then from its global defaults
    (top_k 50). Fields whose neutral value is a number are set here; the ones whose only neutral value is None
    (min_p, top_h, suppress_tokens, begin_suppress_tokens, bad_words_ids, sequence_bias, forced_bos/eos_token_id,
    exponential_decay_length_penalty, guidance_scale, watermarking_config, stop_strings, max_time) cannot be set
    here, so `sample_completions` hides the checkpoint's generation_config while it generates."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=float(settings["sampling_temperature"]), top_p=float(settings["top_p"]), top_k=0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0, min_new_tokens=0,
        renormalize_logits=False, remove_invalid_values=False, token_healing=False, num_beams=1,
        num_return_sequences=1, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id, use_cache=True,
    )


@contextlib.contextmanager
def without_checkpoint_generation_config(student: torch.nn.Module):
    """The student with a blank generation_config: generate then takes no field from the checkpoint's (a min_p,
    suppress_tokens or max_time saved with the model would otherwise apply), only from the config it is given and
    its global defaults."""
    from transformers import GenerationConfig

    saved = student.generation_config
    student.generation_config = GenerationConfig()
    try:
        yield student
    finally:
        student.generation_config = saved


def sample_completions(student: torch.nn.Module, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                       settings: dict, stop_ids: list[int], pad_token_id: int, vocab_size: int, seed: int,
                       max_new_tokens: int) -> list[list[int]]:
    """Sample one completion per left-padded prompt with the KV cache, from the student's own distribution at
    `settings["sampling_temperature"]` and `top_p` (no top-k, no repetition penalty, nothing from the checkpoint's
    generation_config: `neutral_generation_config`). The global RNG is left as it was (fork_rng): dropout and data
    order do not depend on whether a step sampled. Returns the new tokens of each row (with generate's padding after
    a stop token)."""
    from transformers import LogitsProcessorList

    generation_config = neutral_generation_config(settings, stop_ids, pad_token_id, max_new_tokens)
    head_rows = student.get_output_embeddings().weight.shape[0]
    processors = LogitsProcessorList([_RealVocabulary(vocab_size)] if head_rows > vocab_size else [])
    devices = [prompt_input_ids.device] if prompt_input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), without_checkpoint_generation_config(student):
        torch.manual_seed(seed)
        output = student.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask,
                                  generation_config=generation_config, logits_processor=processors)
    return output[:, prompt_input_ids.shape[1]:].tolist()


def left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one left-padded batch (ids, attention mask), as generate takes them."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(prompt)) + prompt for prompt in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts], device=device)
    return ids, mask


def degenerate_samples(completions: list[list[int]], stop_ids: set[int], ngram: int = 4,
                       max_repeated_share: float = 0.5) -> str | None:
    """What makes a step's sampled completions (as labelled: through the first stop token) look degenerate, or None:
    every one of them ran out of room without an end-of-turn token, or more than `max_repeated_share` of their
    `ngram`-grams repeat one earlier in the same completion ("1 1 1 1 ..."). Either is what a student too weak to
    write a turn samples."""
    reasons = []
    if completions and not any(completion and completion[-1] in stop_ids for completion in completions):
        reasons.append(f"all {len(completions)} completions ran out of room with no end-of-turn token")
    grams = repeated = 0
    for completion in completions:
        seen = set()
        for start in range(len(completion) - ngram + 1):
            gram = tuple(completion[start:start + ngram])
            grams, repeated = grams + 1, repeated + (gram in seen)
            seen.add(gram)
    if grams and repeated / grams > max_repeated_share:
        reasons.append(f"{repeated / grams:.0%} of their {ngram}-grams repeat an earlier one")
    return "; ".join(reasons) or None


class OnPolicySampler:
    """Replaces the sampled micro-batches of an optimizer step by the student's completions (called by the trainer's
    get_batch_samples, before the step's tokens are counted), and keeps the sampling time for the tokens/s log."""

    # A degenerate-samples warning is repeated at most once per this many optimizer steps.
    WARN_EVERY_STEPS = 50

    def __init__(self, settings: dict, tokenizer, vocab_size: int, max_length: int, seed: int, engine=None):
        self.settings = settings
        self.engine = engine  # a vllm_engine.VllmEngine (on_policy.engine: vllm), else None: generate
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_ids = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.seed = seed
        from distillation_trainer import TrainingSpeed  # here: distillation_trainer imports this module (its keys)

        self.speed = TrainingSpeed("sampling_tokens_per_second")
        self.weight_sync_s = None  # seconds spent in weight syncs since the last log (None: no sync)
        self.warned_at_step = None
        warning = sampling_warning(settings)
        if warning:
            print_rank0(warning)

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
        all of them, so a dataset batch is exactly what the plain collator gives.

        All sampled micro-batches of the step are generated together: their rows, in micro-batch order, form one
        left-padded batch and one generate call (seeded by seed, step and process), so the student is gathered (ZeRO-3)
        and decodes once per step, at the step's whole batch instead of micro-batch by micro-batch."""
        prompts = {}
        for index, batch in enumerate(batches):
            prompt_ids, prompt_mask = (batch.pop(key) for key in PROMPT_KEYS)
            if samples_this_batch(self.seed, step, index, self.settings["fraction"]):
                prompts[index] = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        if not prompts:
            return batches
        rows = [prompt for index in prompts for prompt in prompts[index]]
        device = batches[next(iter(prompts))]["input_ids"].device
        prompt_ids, prompt_mask = left_padded(rows, self.pad_token_id, device)
        room = self.max_length - min(len(prompt) for prompt in rows)
        seed, max_new_tokens = generation_seed(self.seed, step, accelerator.process_index), self.settings["max_new_tokens"]
        if self.engine is not None:
            self.sync_engine(step, model_wrapped, accelerator, zero3)
        # On a GPU a CUDA event (TrainingSpeed): the wall clock would also count the previous step's queued kernels.
        start = self.speed.start()
        if self.engine is not None:  # each row up to max_length, as label_completions cuts generate's longer rows
            completions = self.engine.sample(rows, self.settings, self.stop_ids, self.vocab_size, seed,
                                             [min(max_new_tokens, self.max_length - len(prompt)) for prompt in rows])
        else:
            with student_for_generation(model_wrapped, accelerator, zero3) as student, autocast():
                completions = sample_completions(student, prompt_ids, prompt_mask, self.settings, self.stop_ids,
                                                 self.pad_token_id, self.vocab_size, seed, min(max_new_tokens, room))
        out, labelled, first = list(batches), [], 0
        for index, batch_prompts in prompts.items():
            sampled = label_completions(batch_prompts, completions[first:first + len(batch_prompts)],
                                        set(self.stop_ids), self.max_length, self.pad_token_id)
            first += len(batch_prompts)
            for row, prompt, length in zip(sampled["input_ids"].tolist(), batch_prompts,
                                           sampled[COMPLETION_LENGTHS].tolist()):
                labelled.append(row[len(prompt):len(prompt) + length])
            out[index] = {key: value.to(device) for key, value in sampled.items()}
        self.speed.add_tokens(sum(map(len, labelled)), start)
        self.check_health(labelled, step)
        return out

    def sync_engine(self, step: int, model_wrapped, accelerator, zero3: bool) -> None:
        """Make the vLLM server hold the student's weights of optimizer step `step`, unless it already does: every
        process enters (ZeRO-3 gathers collectively), the main process writes and sends, and the others wait for its
        outcome, so a failed sync stops every process with the same line before any of them samples."""
        from vllm_engine import VllmEngineError, student_weights

        if self.engine.synced_step == step:
            return
        weights = student_weights(model_wrapped, accelerator, zero3)
        error = None
        if accelerator.is_main_process:
            try:
                seconds = self.engine.sync(weights, step)
                self.weight_sync_s = (self.weight_sync_s or 0.0) + seconds
            except VllmEngineError as failure:
                error = str(failure)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise VllmEngineError(f"step {step + 1}: {error} The run stops rather than sample from the previous "
                                  "weights; the last checkpoint is intact (resume from it once the server is fixed).")
        self.engine.synced_step = step

    def check_health(self, completions: list[list[int]], step: int) -> None:
        """Warn (main process, its own samples, at most once per WARN_EVERY_STEPS steps) when the step's completions
        look degenerate: training on them teaches the student its own noise."""
        reason = degenerate_samples(completions, set(self.stop_ids))
        if reason is None or (self.warned_at_step is not None and step < self.warned_at_step + self.WARN_EVERY_STEPS):
            return
        self.warned_at_step = step
        print_rank0(f"warning: step {step + 1}: the student's own samples look degenerate ({reason}). A student too "
                    "weak to write a turn learns its own noise on-policy: start from a student that already answers "
                    "(SFT or off-policy KD first, docs/on-policy.md#preconditions), or, if its answers are only "
                    "long, raise on_policy.max_new_tokens.")

    def pop_speeds(self) -> dict[str, float]:
        """This process's sampling tokens/s since the last log (sampled completion tokens per second of the step's
        generation, the ZeRO-3 gather included; with the vLLM engine its requests, the weight sync apart), and
        weight_sync_s (seconds spent in weight syncs, when there was one), then reset. The trainer logs the training
        tokens/s in every mode."""
        speeds = self.speed.pop()
        if self.weight_sync_s is not None:
            speeds["weight_sync_s"], self.weight_sync_s = self.weight_sync_s, None
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
