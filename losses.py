"""The losses: reference formulas on full logits first (short, testable, what the kernel must equal), then the
chunked kernel that computes the same values from hidden states and output-head weights without ever holding the
(tokens, vocab) logits, and the forward patches that run it inside the model's forward.

Notation used throughout: p is the teacher's next-token distribution, q the student's, both softmax(logits[:V] / T)
over the real vocabulary V (padded head rows are dropped, never zero-filled); a position counts when its next-token
label is not -100; N is the number of counted tokens in the whole optimizer step (over accumulated micro-batches and
processes), the same normaliser the Trainer gives the cross-entropy as `num_items_in_batch`.
"""

from __future__ import annotations

import dataclasses
import math
import types

import torch
import torch.nn.functional as F

from common import ConfigError, print_rank0
from data import next_token_mask
from projections import projection_key

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
HIDDEN_LOSSES = ("mse", "cosine")
TEACHER_NORMS = ("rms", "none")  # hidden_state_loss: what the teacher's states are divided by before the loss

# ---------------------------------------------------------------------------------------------------------------------
# Reference formulas
# ---------------------------------------------------------------------------------------------------------------------


def _mixture_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def token_divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-row divergence between teacher distribution p and student distribution q, given as log-probabilities of
    shape (N, V). Returns shape (N,).

    forward_kl      KL(p || q) = sum_v p_v (log p_v - log q_v)
    reverse_kl      KL(q || p)
    jsd             beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q   (beta in (0, 1))
    tvd             0.5 * sum_v |p_v - q_v|
    skew_forward_kl KL(p || skew * p + (1 - skew) * q)                                            (DistiLLM, skew in (0, 1))
    skew_reverse_kl KL(q || skew * q + (1 - skew) * p)
    """
    log_p, log_q = teacher_log_probs, student_log_probs
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _mixture_log_probs(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "skew_forward_kl":
        return _kl(log_p, _mixture_log_probs(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _mixture_log_probs(log_q, log_p, skew))
    raise ConfigError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}.")


def per_item_mean(total: torch.Tensor, num_items: int | torch.Tensor) -> torch.Tensor:
    """total / num_items, with num_items at least 1: the one normaliser of every loss here."""
    return total / torch.as_tensor(num_items, device=total.device).clamp(min=1)


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Knowledge-distillation loss from full logits (batch, seq, vocab) of student and teacher.

        KD = T^2 / N * sum_{i : labels[i+1] != -100} D(softmax(t_i[:V] / T), softmax(s_i[:V] / T))

    where D is `token_divergence`, V = `vocab_size` and N = `num_items_in_batch` or, when None, the counted tokens of
    this batch. Softmax math runs in float32.
    """
    mask = next_token_mask(labels)
    vocab_size = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    # Select counted positions before the float32 upcast: the (tokens, vocab) copies are the memory bill.
    student = student_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    teacher = teacher_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    per_token = token_divergence(F.log_softmax(student, -1), F.log_softmax(teacher, -1), divergence, beta, skew)
    return per_item_mean(per_token.sum() * temperature**2, mask.sum() if num_items_in_batch is None else num_items_in_batch)


def causal_lm_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy over the counted positions, summed in float32 and divided by N as in
    `logit_distillation_loss` (so the two mix consistently under gradient accumulation)."""
    mask = next_token_mask(labels)
    logits = student_logits[:, :-1][mask].float()
    total = F.cross_entropy(logits, labels[:, 1:][mask], reduction="sum")
    return per_item_mean(total, mask.sum() if num_items_in_batch is None else num_items_in_batch)


def topk_bucket_divergence(
    student_scaled_logits: torch.Tensor, ids: torch.Tensor, teacher_log_probs: torch.Tensor, tail: torch.Tensor,
    divergence: str, beta: float = 0.5, skew: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence on k + 1 buckets: the teacher's k stored tokens, and one bucket for all other tokens.

    Teacher buckets: exp(teacher_log_probs) and `tail` (its mass outside the top-k). Student buckets: q at the same
    ids, and q_rest = the student's mass on every other token, computed as a log-sum-exp over those tokens (not
    1 - sum, which cancels catastrophically when the top-k holds nearly everything). `student_scaled_logits` are the
    student's logits over the real vocabulary divided by the temperature. Returns shape (N,).
    """
    log_normaliser = torch.logsumexp(student_scaled_logits, -1, keepdim=True)
    student_topk = student_scaled_logits.gather(1, ids) - log_normaliser
    others = student_scaled_logits.scatter(1, ids, float("-inf"))
    student_rest = torch.logsumexp(others, -1, keepdim=True) - log_normaliser
    student_buckets = torch.cat([student_topk, student_rest], 1)
    teacher_buckets = torch.cat([teacher_log_probs, tail.clamp(min=0).log()[:, None]], 1)
    return token_divergence(student_buckets, teacher_buckets, divergence, beta, skew)


def topk_distribution(logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: int | None = None):
    """The top-k of softmax(logits[:, :V] / T) for logits (N, V): (ids (N, k), log-probabilities (N, k), tail (N,)),
    the tail being the mass outside the top-k. This is what an offline capture stores (before quantisation)."""
    vocab_size = vocab_size or logits.shape[-1]
    log_probs = F.log_softmax(logits[:, :vocab_size].float() / temperature, -1)
    top_log_probs, ids = log_probs.topk(k, -1)
    if k == vocab_size:
        return ids, top_log_probs, torch.zeros_like(top_log_probs[:, 0])
    # The tail as a log-sum-exp over the other tokens, for the same reason as in topk_bucket_divergence.
    tail = torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), -1).exp()
    return ids, top_log_probs, tail


def topk_distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, teacher_log_probs: torch.Tensor,
    tail: torch.Tensor, divergence: str = "forward_kl", temperature: float = 1.0, vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None, beta: float = 0.5, skew: float = 0.1,
) -> torch.Tensor:
    """Offline KD from full student logits (batch, seq, vocab): T^2 / N * sum over counted positions of
    `topk_bucket_divergence`, the teacher's top-k given at the counted positions in order."""
    mask = next_token_mask(labels)
    vocab_size = vocab_size or student_logits.shape[-1]
    student = student_logits[:, :-1][mask][:, :vocab_size].float() / temperature
    per_token = topk_bucket_divergence(student, ids, teacher_log_probs, tail, divergence, beta, skew)
    return per_item_mean(per_token.sum() * temperature**2, mask.sum() if num_items_in_batch is None else num_items_in_batch)


def hidden_state_loss(
    student_projected: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    loss: str = "mse",
    num_positions: int | torch.Tensor | None = None,
    teacher_norm: str = "none",
) -> torch.Tensor:
    """Hidden-state loss over L mapped layer pairs and the aligned positions:

        H = 1 / (N * L) * sum_l sum_k d(P_l(s_l,k), t_l,k)

    student_projected[l]: the student's states of pair l at the aligned positions after the pair's projection P_l,
    shape (n, d_t); teacher_hidden[l]: the teacher's states of pair l at the same positions, (n, d_t). d is the mean
    over the d_t units of the squared difference (mse), or 1 - cosine similarity (cosine). N is `num_positions` (the
    aligned positions of the whole optimizer step) or, when None, n. Computed in float32.

    teacher_norm "rms" divides each teacher state by its root mean square unit first, t / sqrt(mean_j t_j^2 + 1e-6):
    the mse is then scale-free (1 for a student that outputs zeros, whatever the teacher's layer or model size), so
    it neither dwarfs nor vanishes against the CE. "none" compares the raw states. Cosine ignores it (scale-free).
    """
    if teacher_norm not in TEACHER_NORMS:
        raise ConfigError(f"unknown teacher_norm '{teacher_norm}'; choose one of {', '.join(TEACHER_NORMS)}.")
    total = student_projected[0].new_zeros((), dtype=torch.float32)
    for projected, target in zip(student_projected, teacher_hidden):
        projected, target = projected.float(), target.to(projected.device).float()
        if teacher_norm == "rms":
            target = target * torch.rsqrt(target.pow(2).mean(-1, keepdim=True) + 1e-6)
        if loss == "mse":
            total = total + (projected - target).pow(2).mean(-1).sum()
        elif loss == "cosine":
            total = total + (1 - F.cosine_similarity(projected, target, dim=-1)).sum()
        else:
            raise ConfigError(f"unknown hidden-state loss '{loss}'; choose one of {', '.join(HIDDEN_LOSSES)}.")
    num_positions = student_projected[0].shape[0] if num_positions is None else num_positions
    return per_item_mean(total, torch.as_tensor(num_positions, device=total.device).clamp(min=1) * len(student_projected))


CROSS_TOKENIZER_METHODS = ("uld", "hybrid")
# The sorted L1 compares the top SORTED_L1_TOP_K of each distribution (plus the tails' mass difference) once a
# vocabulary is larger than 16x that: with a full sort of 32k entries per position the loss took 6.1x, then 3.9x the
# same-tokenizer kernel's time, with the top 256 2.6x, then 3.3x (two runs of bench/loss_bench.py on a shared machine,
# README). Smaller vocabularies are sorted whole.
SORTED_L1_TOP_K = 256


def sorted_l1_top_k(*vocab_sizes: int) -> int | None:
    """The `top_k` of `sorted_l1` for distributions over these vocabularies (None: the full sort)."""
    return SORTED_L1_TOP_K if max(vocab_sizes) > 16 * SORTED_L1_TOP_K else None


def sorted_l1(teacher_probs: torch.Tensor, student_probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ULD's distance per row: sum_j |sort(p)_j - sort(q)_j|, both sorted in descending order and the narrower one
    zero-padded to the wider (Wasserstein-1 with uniform cost between the two vocabularies). Shapes (M, Vt), (M, Vs);
    returns (M,).

    top_k: compare only the k largest of each side, plus one term |(mass of p beyond its top-k) - (that of q)|, a
    lower bound of the tails' exact contribution (each tail is below the k-th probability). None: the full sort."""
    width = max(teacher_probs.shape[-1], student_probs.shape[-1])
    p = F.pad(teacher_probs, (0, width - teacher_probs.shape[-1]))
    q = F.pad(student_probs, (0, width - student_probs.shape[-1]))
    if top_k is None or top_k >= width:
        return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)
    top_p, top_q = p.topk(top_k, -1).values, q.topk(top_k, -1).values
    tails = (p.sum(-1) - top_p.sum(-1)) - (q.sum(-1) - top_q.sum(-1))
    return (top_p - top_q).abs().sum(-1) + tails.abs()


def cross_tokenizer_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    method: str,
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    student_span_log_prob: torch.Tensor | None = None,
    teacher_span_log_prob: torch.Tensor | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    top_k: int | None = None,
    merged: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per aligned pair, the distance between the student's (M, Vs) and the teacher's (M, Vt) next-token
    log-probabilities over their own real vocabularies (at temperature T). Returns (M,).

    The compared distributions are the merged-span ones: exp(log_probs + span_log_prob), where span_log_prob (M,)
    is the log-probability of the span's actual following tokens (0 for a span of one token, the default).

    uld     sorted_l1(p~, q~) over the two whole vocabularies
    hybrid  matched_weight * D(p~_S / p~(S), q~_S / q~(S)) + unmatched_weight * sorted_l1(p~ off S, q~ off S)

    S is the exact-match shared vocabulary (`shared_ids` = (student ids, teacher ids), paired in order), D the
    configured `token_divergence`; renormalised over S, the span factors cancel in the first term. At merged pairs
    (`merged` (M,) true: a side needs several tokens for the span) a token's string is not what its entry stands for
    (the teacher's "1" carries the span "12" that the student writes as one token), so hybrid uses
    unmatched_weight * sorted_l1(p~, q~) over the whole vocabularies there, as uld does.
    """
    student_span = 0 if student_span_log_prob is None else student_span_log_prob[:, None]
    teacher_span = 0 if teacher_span_log_prob is None else teacher_span_log_prob[:, None]
    p, q = (teacher_log_probs + teacher_span).exp(), (student_log_probs + student_span).exp()
    if method == "uld":
        return sorted_l1(p, q, top_k)
    if method != "hybrid":
        raise ConfigError(f"unknown distillation.cross_tokenizer '{method}'; choose null, {' or '.join(CROSS_TOKENIZER_METHODS)}.")
    student_ids, teacher_ids = (ids.to(p.device) for ids in shared_ids)  # a no-op for the trainer's (on the device)
    matched = torch.zeros_like(p[:, 0])
    if student_ids.numel():
        matched = token_divergence(torch.log_softmax(student_log_probs[:, student_ids], -1),
                                   torch.log_softmax(teacher_log_probs[:, teacher_ids], -1), divergence, beta, skew)
    p_rest = p.index_fill(1, teacher_ids, 0.0)  # zeros sort last: the same as dropping the shared columns
    q_rest = q.index_fill(1, student_ids, 0.0)
    hybrid = matched_weight * matched + unmatched_weight * sorted_l1(p_rest, q_rest, top_k)
    if merged is None or not bool(merged.any()):
        return hybrid
    return torch.where(merged, unmatched_weight * sorted_l1(p, q, top_k), hybrid)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    method: str,
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    student_span_log_prob: torch.Tensor | None = None,
    teacher_span_log_prob: torch.Tensor | None = None,
    **weights,
) -> torch.Tensor:
    """KD across tokenizers from the full logits (M, heads) of both models at the M aligned pairs:

        KD = T^2 / N * sum_k cross_tokenizer_divergence(log_softmax(s_k[:Vs] / T), log_softmax(t_k[:Vt] / T))

    N = `num_items_in_batch` (the step's counted student tokens) or, when None, M. `weights` go to
    `cross_tokenizer_divergence` (matched_weight, unmatched_weight, beta, skew, top_k, merged)."""
    student = F.log_softmax(student_logits[:, :student_vocab].float() / temperature, -1)
    teacher = F.log_softmax(teacher_logits[:, :teacher_vocab].float() / temperature, -1)
    per_pair = cross_tokenizer_divergence(student, teacher, method, shared_ids, divergence,
                                          student_span_log_prob=student_span_log_prob,
                                          teacher_span_log_prob=teacher_span_log_prob, **weights)
    return per_item_mean(per_pair.sum() * temperature**2, per_pair.shape[0] if num_items_in_batch is None else num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# Output heads: what a model does between its last hidden state and its logits
# ---------------------------------------------------------------------------------------------------------------------


def head_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) that the model applies between its output head and its logits:
    logits = softcap * tanh(scale * (h W^T + b) / softcap), or scale * (h W^T + b) without soft-capping."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None):
        scale = 1.0 / text_config.logits_scaling  # Granite divides its logits by logits_scaling
    return float(1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)


def transform_logits_(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """Apply logits = softcap * tanh(scale * raw / softcap) (or scale * raw) in place; return d logits / d raw when it
    is not a constant."""
    if softcap is None:
        if scale != 1.0:
            logits.mul_(scale)
        return None
    capped = logits.mul_(scale / softcap).tanh_()
    slope = (1 - capped.square()).mul_(scale)
    capped.mul_(softcap)
    return slope


def head_logits(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None]) -> torch.Tensor:
    """float32 logits of a few rows of hidden states, exactly as the chunked loss builds them (no gradient)."""
    weight, bias = full_head_tensors(head)
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    transform_logits_(logits, *transform)
    return logits


def check_head_matches_forward(model: torch.nn.Module, unwrapped: torch.nn.Module, input_ids: torch.Tensor,
                               name: str, mixed_precision: bool = False) -> None:
    """Stop with one clear error when the model's own logits differ from what the chunked loss builds from its final
    hidden state (head weight and bias, then `head_transform`): a model that does anything else between its backbone
    and its head would otherwise train on a different loss without anyone noticing.

    `model` is what the engine runs (DDP / DeepSpeed wrapper, or the model itself), patched by
    `add_hidden_states_forward`; `unwrapped` is the bare model; `mixed_precision` is true when the engine autocasts
    the forward (training.bf16 / fp16). Runs two short forwards in eval mode. The tolerance allows bf16/fp16 rounding
    of logits, far below the effect of a missing scale or soft-cap on a real model's logits.
    """
    head, transform, last = unwrapped.get_output_embeddings(), head_transform(unwrapped), final_layer(unwrapped)
    if hasattr(head.weight, "ds_id"):
        # ZeRO-3 records the order modules run in and prefetches by it: a forward that calls the head would make it
        # prefetch the head into the training steps' own gather of it, which fails. The same model is checked in
        # one-process and DDP runs.
        print_rank0(f"head check of the {name} skipped under ZeRO-3 (it runs without ZeRO-3)")
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=input_ids, use_cache=False).logits.float()
            hidden = model(input_ids=input_ids, hidden_layers=[last])[last]
            # accelerate's mixed precision returns float32 outputs even from a bf16 model
            got = head_logits(hidden.to(head.weight.dtype), head, transform)
    finally:
        model.train(was_training)
    # Under mixed precision accelerate autocasts inside the forward and returns float32 outputs: the model's logits
    # are then bf16/fp16 products although every dtype seen here is float32.
    low_precision = (mixed_precision or hidden.dtype != torch.float32 or head.weight.dtype != torch.float32
                     or torch.is_autocast_enabled(hidden.device.type))
    error = ((got - expected).abs().max() / expected.std().clamp(min=1e-6)).item()
    if not error <= (5e-2 if low_precision else 1e-3):
        raise ConfigError(
            f"the {name}'s logits differ from its final hidden state through its output head (scale {transform[0]}, "
            f"soft-cap {transform[1]}) by {error:.3g} of their spread on a short row: {type(unwrapped).__name__} does "
            "something between backbone and head that losses.head_transform does not know, so the chunked loss would "
            "train on other logits. Add that transform to losses.head_transform."
        )


def full_head_tensors(head: torch.nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of an output head; FSDP2 shards them as DTensors, gathered here (differentiably) for the loss."""
    if head is None:
        return None, None
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return weight, bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


# ---------------------------------------------------------------------------------------------------------------------
# The chunked kernel: the same loss chunk by chunk over tokens, gradients computed during the forward
# ---------------------------------------------------------------------------------------------------------------------


def chunk_tokens_for_budget(vocab: int, memory_budget_mb: float, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu", divergence: str = "forward_kl") -> int:
    """Tokens per chunk so that what the chunked kernel holds fits in `memory_budget_mb`: at least 16 and a multiple
    of 16 so the matrix products keep an efficient shape.

    Per (token, vocabulary entry) of a chunk it holds the two reused logit buffers (student, teacher) in the matmul
    `dtype`, and the float32 temporaries of the softmax arithmetic on a block of tokens: the two log-softmaxes, a
    float32 copy of each buffer when the buffers are bf16/fp16, and for the divergences differentiated with autograd
    (all but forward and reverse KL) about 8 more. On CUDA a block is the whole chunk; on the CPU a block is at most
    CPU_BLOCK_BYTES per temporary, so beyond one block the temporaries stop growing with the chunk.
    """
    device = torch.device(device)
    budget = memory_budget_mb * 2**20
    buffers = 2 * torch.empty((), dtype=dtype).element_size()
    temporaries = 2 + (2 if buffers < 8 else 0) + (0 if divergence in ("forward_kl", "reverse_kl") else 8)
    chunk = budget / (vocab * (buffers + 4 * temporaries))
    block = block_tokens(vocab, device)
    if chunk > block:
        chunk = max(block, (budget - temporaries * CPU_BLOCK_BYTES) / (vocab * buffers))
    return max(16, int(chunk) // 16 * 16)


# Bytes of one float32 (block, vocab) temporary on the CPU; a block holds 2 (the two log-softmaxes) besides its rows
# of the two logit buffers. Smaller blocks stay in cache but multiply the operations, each a parallel region whose
# threads must all meet; 1 to 16 MiB measured within ~5% of each other (bench/loss_bench.py --block-kib).
CPU_BLOCK_BYTES = 8 * 2**20


def block_tokens(vocab: int, device: torch.device) -> int:
    """Tokens of a chunk processed together by the softmax arithmetic: CPU_BLOCK_BYTES per float32 temporary on the
    CPU, unlimited on CUDA (where per-kernel launch cost dominates and a chunk is already sized for memory)."""
    if device.type != "cpu":
        return 1 << 30
    return max(1, CPU_BLOCK_BYTES // (4 * vocab))


def _addmm_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator (float32) += a @ b without a rounded or temporary (vocab, hidden) product."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b.float())
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(a.float(), b.float())


def _mm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (float32) = a @ b, accumulated in float32 where the hardware can."""
    if a.dtype == torch.float32:
        torch.mm(a, b.float(), out=out)
    elif out.device.type == "cuda":
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(a @ b)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Everything the kernel needs besides its tensors (see `chunked_distillation_loss` for the meaning)."""

    kd_weight: float
    ce_weight: float
    num_items_in_batch: int | torch.Tensor
    needs_grad: bool  # grad mode was on and an input of the student requires grad (off in evaluation)
    matmul_dtype: torch.dtype | None  # autocast's dtype when the caller ran under autocast, else the heads' own
    divergence: str
    temperature: float
    vocab_size: int
    beta: float
    skew: float
    student_transform: tuple[float, float | None]
    teacher_transform: tuple[float, float | None]
    chunk_tokens: int
    stored_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _kd_against_teacher(scaled: torch.Tensor, teacher_block: torch.Tensor, settings: LossSettings,
                        needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KD summed over one block of tokens, and its gradient d sum / d (s / T) (None without gradients).

    `scaled` is the student's block over the real vocabulary, already divided by T; `teacher_block` the teacher's raw
    logits (float32). Both are overwritten. Forward and reverse KL use closed forms that need no (block, vocab)
    temporary beyond the two log-softmaxes; the other divergences differentiate `token_divergence` with autograd.
    """
    transform_logits_(teacher_block, *settings.teacher_transform)
    vocab, temperature = settings.vocab_size, settings.temperature
    log_p = F.log_softmax(teacher_block[:, :vocab].div_(temperature), -1)
    if settings.divergence not in ("forward_kl", "reverse_kl"):
        with torch.enable_grad():
            leaf = scaled.detach().requires_grad_(needs_grad)
            block_sum = token_divergence(F.log_softmax(leaf, -1), log_p, settings.divergence, settings.beta,
                                         settings.skew).sum()
            grad = torch.autograd.grad(block_sum, leaf)[0] if needs_grad else None
        return block_sum.detach(), grad
    # log q over the scaled logits and q over the teacher's logits (free once log p is taken).
    q = teacher_block[:, :vocab]
    top = scaled.amax(-1, keepdim=True)
    total = torch.sub(scaled, top, out=q).exp_().sum(-1, keepdim=True)
    q.div_(total)
    log_q = scaled.sub_(total.log_().add_(top))
    if settings.divergence == "forward_kl":
        diff = torch.sub(log_p, log_q, out=log_q)
        p = log_p.exp_()
        block_sum = torch.einsum("ij,ij->i", p, diff).sum()
        return block_sum, (q.sub_(p) if needs_grad else None)  # dKL(p||q)/d(s/T) = q - p
    diff = torch.sub(log_q, log_p, out=log_p)
    per_token = torch.einsum("ij,ij->i", q, diff)[:, None]
    # dKL(q||p)/d(s/T) = q * (log q - log p - KL)
    return per_token.sum(), (diff.sub_(per_token).mul_(q) if needs_grad else None)


def _kd_against_stored_topk(scaled: torch.Tensor, stored: tuple, settings: LossSettings,
                            needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KD summed over one block against the teacher's stored top-k buckets, and d sum / d (s / T)."""
    ids, teacher_log_probs, tail = stored
    with torch.enable_grad():
        leaf = scaled.detach().requires_grad_(needs_grad)
        block_sum = topk_bucket_divergence(leaf, ids, teacher_log_probs, tail, settings.divergence, settings.beta,
                                           settings.skew).sum()
        grad = torch.autograd.grad(block_sum, leaf)[0] if needs_grad else None
    return block_sum.detach(), grad


def _write_logit_gradient(raw, s, log_probs, targets, grad_kd, slope, kd_scale, ce_scale, logit_scale) -> None:
    """Overwrite the block's logits `raw` with N * d loss / d raw logits: ce_scale * (softmax(s) - onehot(target)) plus
    kd_scale times the KD gradient, through the head transform's slope."""
    grad = torch.exp(log_probs, out=s).mul_(ce_scale)
    grad[torch.arange(s.shape[0], device=s.device), targets] -= ce_scale
    if grad_kd is not None:
        grad[:, : grad_kd.shape[1]].add_(grad_kd, alpha=kd_scale)
    if slope is not None:
        grad.mul_(slope)
    elif logit_scale != 1.0:
        grad.mul_(logit_scale)
    if grad is not raw:
        raw.copy_(grad)


class _ChunkedDistillationLoss(torch.autograd.Function):
    """kd_weight * KD + ce_weight * CE from hidden states, gradients computed chunk by chunk during the forward.

    Memory: two (chunk, vocab) logit buffers, one per head, allocated once per call and reused by every chunk; the
    student's is overwritten in place with d loss / d logits. When the buffer is float32, `buffer.float()` is the
    buffer itself, so the softmax arithmetic writes over it too; in lower precision it works on a float32 copy of each
    block. The softmax arithmetic runs on blocks of tokens (`block_tokens`) so that it stays in the CPU's cache.

    Precision: the head matmuls run in `matmul_dtype` (autocast's bf16 / fp16 when the caller autocasts, as the
    model's own head would); everything after them runs in float32 with autocast switched off, so that no einsum or
    reduction is lowered. The logit gradient is written without the 1/N normaliser (its entries are O(1), so fp16
    buffers neither underflow nor lose the small ones), and 1/N and the caller's gradient scale (GradScaler's 65,536
    under fp16) are applied in float32 in backward, to float32 accumulators for the hidden states and the head.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, settings: LossSettings):
        with torch.autocast(student_hidden.device.type, enabled=False):
            return _chunked_forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, targets, settings)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("backward ran twice through the chunked distillation loss (retain_graph=True): its "
                               "gradients are computed in the forward and scaled in place, so a second pass would be "
                               "wrong. Recompute the loss instead.")
        ctx.backward_done = True
        # In place and in float32: a scaled copy would hold a second (vocab, hidden) gradient while autograd assigns it.
        scale = grad_loss.float() / ctx.num_items_in_batch
        grads = [None if grad is None else grad.mul_(scale).to(dtype)
                 for grad, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)]
        return (*grads, None, None, None, None, None)


def _loss_on_block(raw, targets, teacher_raw, stored, settings: LossSettings, needs_grad: bool, kd_scale: float):
    """(sum of log q(target), sum of KD) over one block of tokens; with gradients, `raw` (the student's logits of the
    block) is overwritten with N * d loss / d logits."""
    temperature = settings.temperature
    s = raw.float()  # a view when the buffer is float32: the gradient then overwrites the logits in place
    slope = transform_logits_(s, *settings.student_transform)
    log_probs = F.log_softmax(s, -1)
    ce_part = log_probs.gather(1, targets[:, None]).sum()
    kd_part, grad_kd = 0.0, None
    if teacher_raw is not None or stored is not None:
        scaled = s[:, : settings.vocab_size]  # s itself is not needed any more: the CE's log-softmax is taken
        if teacher_raw is not None:
            if temperature != 1:
                scaled.div_(temperature)
            kd_part, grad_kd = _kd_against_teacher(scaled, teacher_raw.float(), settings, needs_grad)
        else:
            kd_part, grad_kd = _kd_against_stored_topk(scaled / temperature, stored, settings, needs_grad)
    if needs_grad:
        _write_logit_gradient(raw, s, log_probs, targets, grad_kd, slope, kd_scale, settings.ce_weight,
                              settings.student_transform[0])
    return ce_part, kd_part


def _chunked_forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                     targets, settings: LossSettings):
    """The body of `_ChunkedDistillationLoss.forward` (autocast off)."""
    device, tokens, temperature = student_hidden.device, student_hidden.shape[0], settings.temperature
    num_items_in_batch = torch.as_tensor(settings.num_items_in_batch, dtype=torch.float32, device=device).clamp(min=1)
    needs_hidden_grad, needs_weight_grad, needs_bias_grad = (settings.needs_grad and needed
                                                             for needed in ctx.needs_input_grad[:3])
    needs_grad = needs_hidden_grad or needs_weight_grad or needs_bias_grad
    use_teacher = settings.kd_weight != 0 and settings.stored_topk is None
    use_topk = settings.kd_weight != 0 and settings.stored_topk is not None
    # The heads in the matmul dtype: a copy only when autocast asks for a dtype the weights are not stored in.
    weight = student_weight.to(settings.matmul_dtype or student_weight.dtype)
    hidden_all = student_hidden.to(weight.dtype)
    if use_teacher:
        teacher_weight = teacher_weight.to(settings.matmul_dtype or teacher_weight.dtype)
        teacher_hidden = teacher_hidden.to(teacher_weight.dtype)
    bias = None if student_bias is None else student_bias.to(weight.dtype)
    teacher_bias = None if teacher_bias is None or not use_teacher else teacher_bias.to(teacher_weight.dtype)
    kd_scale = settings.kd_weight * temperature  # d(T^2 * D)/ds = T * dD/d(s/T); 1/N is applied in backward
    kd_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros_like(kd_sum)
    chunk = min(settings.chunk_tokens, max(tokens, 1))
    student_logits = torch.empty((chunk, weight.shape[0]), dtype=weight.dtype, device=device)
    teacher_logits = (torch.empty((chunk, teacher_weight.shape[0]), dtype=teacher_weight.dtype, device=device)
                      if use_teacher else None)
    grad_hidden = torch.empty(student_hidden.shape, dtype=torch.float32, device=device) if needs_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if needs_weight_grad else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device) if needs_bias_grad else None
    block = block_tokens(weight.shape[0], device)
    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        hidden, logits = hidden_all[start:end], student_logits[: end - start]
        _project(hidden, weight, bias, logits)
        if use_teacher:
            teacher = _project(teacher_hidden[start:end], teacher_weight, teacher_bias, teacher_logits[: end - start])
        for first in range(0, end - start, block):
            last = min(first + block, end - start)
            stored = None if not use_topk else tuple(x[start + first : start + last] for x in settings.stored_topk)
            ce_part, kd_part = _loss_on_block(
                logits[first:last], targets[start + first : start + last],
                teacher[first:last] if use_teacher else None, stored, settings, needs_grad, kd_scale)
            ce_sum -= ce_part
            kd_sum += kd_part
        if needs_grad:
            _accumulate_head_gradients(logits, hidden, weight, None if grad_hidden is None else grad_hidden[start:end],
                                       grad_weight, grad_bias)
    del student_logits, teacher_logits
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype,
                        None if student_bias is None else student_bias.dtype)
    ctx.num_items_in_batch = num_items_in_batch
    kd_loss, ce_loss = kd_sum * temperature**2 / num_items_in_batch, ce_sum / num_items_in_batch
    ctx.mark_non_differentiable(kd_loss, ce_loss)
    return settings.kd_weight * kd_loss + settings.ce_weight * ce_loss, kd_loss, ce_loss


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = hidden @ weight^T + bias, written into a reused logit buffer."""
    torch.mm(hidden, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def _accumulate_head_gradients(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias) -> None:
    """grad_hidden = g @ W, grad_weight += g^T @ h, grad_bias += sum g (float32 accumulators; None: not needed), for
    one chunk's logit gradient g."""
    if grad_hidden is not None:
        _mm_fp32(grad_hidden, grad_logits, weight)
    if grad_weight is not None:
        _addmm_fp32(grad_weight, grad_logits.t(), hidden)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0, dtype=torch.float32))


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.nn.Module | None,
    targets: torch.Tensor,
    kd_weight: float,
    ce_weight: float,
    num_items_in_batch: int | torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    student_transform: tuple[float, float | None] = (1.0, None),
    teacher_transform: tuple[float, float | None] = (1.0, None),
    memory_budget_mb: float = 512,
    stored_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_weight * KD + ce_weight * CE, equal to `logit_distillation_loss` and `causal_lm_loss`, without the full
    logits. Returns (loss, kd_loss, ce_loss); only the first carries gradients.

    `student_hidden` (N, Hs) and `teacher_hidden` (N, Ht) are the final hidden states at the N counted positions
    (already shifted: position i predicts targets[i]); the heads are the models' output-embedding modules (weight
    and optional bias), with `*_transform` = (logit scale, soft-cap) from `head_transform`. The chunk size comes from
    `memory_budget_mb` (see `chunk_tokens_for_budget`). KD uses the first `vocab_size` logits; CE uses all of them,
    as the model's own loss does.

    Offline distillation passes `stored_topk` = (ids (N, k), log-probabilities (N, k), tail mass (N,)) at temperature
    T instead of the teacher's hidden states and head: KD is then `topk_bucket_divergence`, the divergence over the
    k stored tokens plus one bucket for everything else.
    """
    student_weight, student_bias = full_head_tensors(student_head)
    teacher_weight, teacher_bias = full_head_tensors(teacher_head)
    if teacher_head is None and stored_topk is None:
        kd_weight = 0.0
    device_type = student_hidden.device.type
    # Inside an autograd Function grad mode is always off, so whether to build gradients is decided here: never in
    # evaluation (no_grad), whatever requires_grad says.
    needs_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (student_hidden, student_weight, student_bias))
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    settings = LossSettings(
        needs_grad=needs_grad, matmul_dtype=matmul_dtype,
        kd_weight=float(kd_weight), ce_weight=float(ce_weight), divergence=divergence, temperature=float(temperature),
        vocab_size=vocab_size or student_weight.shape[0], beta=beta, skew=skew,
        num_items_in_batch=targets.shape[0] if num_items_in_batch is None else num_items_in_batch,
        student_transform=student_transform, teacher_transform=teacher_transform,
        chunk_tokens=chunk_tokens_for_budget(student_weight.shape[0], memory_budget_mb, matmul_dtype or student_weight.dtype,
                                             student_hidden.device, divergence),
        stored_topk=stored_topk,
    )
    return _ChunkedDistillationLoss.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, targets, settings
    )


# ---------------------------------------------------------------------------------------------------------------------
# Logit KD across tokenizers, chunk by chunk: autograd with one checkpoint per chunk of aligned positions
# ---------------------------------------------------------------------------------------------------------------------


def _scaled_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      transform: tuple[float, float | None], vocab: int, temperature: float) -> torch.Tensor:
    """log_softmax(logits[:, :vocab] / T) in float32 for a chunk of hidden states, differentiably (no in-place ops)."""
    logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
    scale, softcap = transform
    logits = logits * scale if softcap is None else softcap * torch.tanh(logits * (scale / softcap))
    return F.log_softmax(logits[:, :vocab] / temperature, -1)


def _checkpointed(function, *tensors):
    """function(*tensors), keeping none of its temporaries for backward when gradients are built (they are
    recomputed chunk by chunk then): the (chunk, vocabulary) logits never outlive their chunk."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)


def cross_tokenizer_chunk_tokens(vocab: int, memory_budget_mb: float) -> int:
    """Aligned pairs per chunk of `chunked_cross_tokenizer_kd` (at least 16, a multiple of 16): about 100 bytes per
    (pair, vocabulary entry) are live at once in a chunk's forward or its recomputation (both sides' float32 logits,
    log-softmaxes, probabilities and zero-padded copies, the sorted values and their int64 sort indices). Unlike the
    kernel's estimate there is no CPU block: every temporary spans the whole chunk."""
    return max(16, int(memory_budget_mb * 2**20 / (vocab * 100)) // 16 * 16)


def chunked_token_log_probs(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None],
                            targets: torch.Tensor, temperature: float, vocab: int, chunk: int) -> torch.Tensor:
    """log softmax(logits[:vocab] / T)[target] per row of `hidden` (P, H): the probabilities of a merged span's
    following tokens. Differentiable through `_checkpointed` chunks."""
    weight, bias = full_head_tensors(head)

    def chunk_log_probs(hidden_chunk, weight, bias, targets_chunk):
        return _scaled_log_probs(hidden_chunk, weight, bias, transform, vocab, temperature).gather(
            1, targets_chunk[:, None])[:, 0]

    parts = [_checkpointed(chunk_log_probs, hidden[start:start + chunk], weight, bias, targets[start:start + chunk])
             for start in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def chunked_cross_tokenizer_kd(student_hidden: torch.Tensor, student_head: torch.nn.Module, cross: dict,
                               temperature: float, student_vocab: int, divergence: str, beta: float, skew: float,
                               memory_budget_mb: float) -> torch.Tensor:
    """sum_k cross_tokenizer_divergence over the aligned pairs of a micro-batch (times nothing: the caller scales by
    T^2 / N), equal to `cross_tokenizer_loss` * N / T^2 without either model's (tokens, vocabulary) logits.

    `student_hidden` is the student's last hidden state (batch, seq, H). `cross` (built by distil_logits.py) holds
    the aligned pairs' rows / positions, the merged spans' following tokens on each side (continuation_*), the
    teacher's final hidden states at its positions and continuations, its head and transform, and the method and
    its settings. Per chunk of pairs, both heads run and the divergence is taken under one checkpoint.
    """
    teacher_head, teacher_transform = cross["teacher_head"], cross["teacher_transform"]
    teacher_vocab, transform = cross["teacher_vocab"], cross["student_transform"]
    weight, bias = full_head_tensors(student_head)
    teacher_weight, teacher_bias = full_head_tensors(teacher_head)
    pairs = cross["rows"].numel()
    chunk = cross_tokenizer_chunk_tokens(max(student_vocab, teacher_vocab), memory_budget_mb)

    def span_log_prob(hidden, head, head_transform, side, vocab):
        log_probs = chunked_token_log_probs(hidden, head, head_transform, cross[f"{side}continuation_targets"],
                                            temperature, vocab, chunk)
        return torch.zeros(pairs, dtype=torch.float32, device=student_hidden.device).index_add(
            0, cross[f"{side}continuation_owner"], log_probs)

    with torch.no_grad():
        teacher_span = span_log_prob(cross["teacher_continuation_hidden"], teacher_head, teacher_transform, "teacher_",
                                     teacher_vocab)
    student_span = span_log_prob(student_hidden[cross["continuation_rows"], cross["continuation_positions"]],
                                 student_head, transform, "", student_vocab)
    first = student_hidden[cross["rows"], cross["positions"]]
    settings = dict(method=cross["method"], shared_ids=cross["shared_ids"], divergence=divergence,
                    matched_weight=cross["matched_weight"], unmatched_weight=cross["unmatched_weight"], beta=beta,
                    skew=skew, top_k=cross["top_k"])

    def chunk_divergence(hidden_chunk, weight, bias, student_span_chunk, start):
        end = start + hidden_chunk.shape[0]
        with torch.no_grad():
            teacher = _scaled_log_probs(cross["teacher_hidden"][start:end], teacher_weight, teacher_bias,
                                        teacher_transform, teacher_vocab, temperature)
        student = _scaled_log_probs(hidden_chunk, weight, bias, transform, student_vocab, temperature)
        return cross_tokenizer_divergence(student, teacher, student_span_log_prob=student_span_chunk,
                                          teacher_span_log_prob=teacher_span[start:end],
                                          merged=cross["merged"][start:end], **settings).sum()

    total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, pairs, chunk):
        total = total + _checkpointed(chunk_divergence, first[start:start + chunk], weight, bias,
                                      student_span[start:start + chunk], start)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Forward patches: the loss and the hidden states come out of the model's own forward, where the engines' hooks run
# ---------------------------------------------------------------------------------------------------------------------


def add_hidden_states_forward(model: torch.nn.Module) -> None:
    """Let `model(..., hidden_layers=[...])` return the backbone's hidden states at those `output_hidden_states`
    indices (a tuple indexed like `output_hidden_states`, None at the other indices; index num_hidden_layers is the
    final hidden state after the last norm), without the output head. Going through the model's own forward keeps
    the DeepSpeed and FSDP hooks that gather sharded parameters."""
    original_forward = model.forward

    def forward(self, *args, hidden_layers: list[int] | None = None, **kwargs):
        if hidden_layers is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, output_hidden_states=list(hidden_layers), **kwargs).hidden_states

    model.forward = types.MethodType(forward, model)


def final_layer(model: torch.nn.Module) -> int:
    """The `hidden_layers` index of a model's final hidden state (its number of blocks)."""
    return model.config.get_text_config().num_hidden_layers


def teacher_hidden_at_counted_positions(teacher: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                                        last: int) -> torch.Tensor:
    """The teacher's final hidden states (`hidden_layers` index `last`, from `final_layer` of the unwrapped teacher)
    at the positions whose next-token label counts, shape (N, Ht). Needs `add_hidden_states_forward(teacher)`: only
    the backbone runs, the logits are built chunk by chunk in the loss."""
    with torch.no_grad():
        hidden = teacher(**inputs, hidden_layers=[last])[last]
    return hidden[:, :-1][next_token_mask(labels)]


def add_distillation_forward(model: torch.nn.Module, projections_attribute: str | None = None) -> None:
    """Let `model(..., distillation={...})` run the backbone and the chunked loss instead of building logits, and
    `model(..., project_hidden={...})` also return projected intermediate states (distil_hidden.py).

    The loss and the projections run inside the model's forward on purpose: DDP and DeepSpeed hook the forward
    (gradient sync, ZeRO-3 parameter gathering), and a loss computed outside it on the raw head weight would bypass
    them. Without these arguments the forward is the original one, so generation and saving are unchanged. Call it
    through `student_loss`, which names every argument.
    """
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    original_forward = model.forward
    transform = head_transform(model)

    def forward(self, *args, distillation: dict | None = None, project_hidden: dict | None = None, **kwargs):
        if distillation is None and project_hidden is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if project_hidden is not None:
            kwargs["output_hidden_states"] = sorted({student_layer for student_layer, _ in project_hidden["layer_pairs"]})
        outputs = self.base_model(*args, **kwargs)
        result = {}
        if project_hidden is not None:
            projections = getattr(self, projections_attribute)
            rows, positions = project_hidden["rows"], project_hidden["positions"]
            result["projected_hidden"] = [projections[projection_key(s, t)](outputs.hidden_states[s][rows, positions])
                                          for s, t in project_hidden["layer_pairs"]]
        if distillation is not None:
            options = dict(distillation)
            labels, cross = options.pop("labels"), options.pop("cross_tokenizer", None)
            mask = next_token_mask(labels)
            head, teacher_head = self.get_output_embeddings(), options["teacher_head"]
            teacher_params = () if teacher_head is None else (teacher_head.weight, getattr(teacher_head, "bias", None))
            # Under ZeRO-3 the heads are partitioned; gather them for the loss only.
            with maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None), *teacher_params):
                loss, kd_loss, ce_loss = chunked_distillation_loss(
                    outputs.last_hidden_state[:, :-1][mask], head, targets=labels[:, 1:][mask],
                    student_transform=transform,
                    **(options if cross is None else {**options, "teacher_head": None, "teacher_hidden": None}),
                )
                if cross is not None:  # the teacher reads its own tokens: KD over the aligned pairs (alignment.py)
                    temperature = options["temperature"]
                    kd_sum = chunked_cross_tokenizer_kd(
                        outputs.last_hidden_state, head, {**cross, "student_transform": transform}, temperature,
                        options["vocab_size"], options["divergence"], options["beta"], options["skew"],
                        options["memory_budget_mb"])
                    kd_loss = per_item_mean(kd_sum * temperature**2, options["num_items_in_batch"])
                    loss = loss + options["kd_weight"] * kd_loss
                    kd_loss = kd_loss.detach()
            result.update(loss=loss, kd_loss=kd_loss, ce_loss=ce_loss)
        return result

    model.forward = types.MethodType(forward, model)


def student_loss(
    model: torch.nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.nn.Module | None,
    teacher_transform: tuple[float, float | None],
    kd_weight: float,
    ce_weight: float,
    num_items_in_batch: int | torch.Tensor,
    divergence: str,
    temperature: float,
    vocab_size: int,
    memory_budget_mb: float,
    beta: float = 0.5,
    skew: float = 0.1,
    stored_topk: tuple | None = None,
    project_hidden: dict | None = None,
    cross_tokenizer: dict | None = None,
) -> dict:
    """Run the student (patched by `add_distillation_forward`) on `inputs` and return its loss parts: `loss`
    (kd_weight * KD + ce_weight * CE, with gradients), `kd_loss`, `ce_loss`, and `projected_hidden` when
    `project_hidden` is given. The keyword arguments are those of `chunked_distillation_loss`; `cross_tokenizer` (a
    teacher with another tokenizer, see `chunked_cross_tokenizer_kd`) replaces the position-by-position KD."""
    return model(**inputs, project_hidden=project_hidden, distillation={
        "labels": labels, "teacher_hidden": teacher_hidden, "teacher_head": teacher_head,
        "teacher_transform": teacher_transform, "kd_weight": kd_weight, "ce_weight": ce_weight,
        "num_items_in_batch": num_items_in_batch, "divergence": divergence, "temperature": temperature,
        "vocab_size": vocab_size, "beta": beta, "skew": skew, "memory_budget_mb": memory_budget_mb,
        "stored_topk": stored_topk, "cross_tokenizer": cross_tokenizer,
    })
