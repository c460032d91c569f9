"""Logit distillation across tokenizers (distil_logits.py, `distillation.cross_tokenizer`): the reference formulas
on full logits first (sorted L1, the uld and hybrid divergences, the loss over aligned pairs), then the chunked path
that computes the same KD from the two models' final hidden states and output heads, a checkpointed chunk of aligned
pairs at a time, so that neither model's (pairs, vocabulary) logits outlive their chunk.

The pairs (which student position faces which teacher position, and the merged spans' following tokens) come from
alignment.py; teacher_signal.CrossTokenizerTeacher gathers them per batch. Notation as in losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import ConfigError
from heads import full_head_tensors, transform_logits
from losses import per_item_mean, token_divergence

CROSS_TOKENIZER_METHODS = ("uld", "hybrid")
# The sorted L1 compares the top SORTED_L1_TOP_K of each distribution (plus the tails' mass difference) once a
# vocabulary is larger than 16x that: with a full sort of 32k entries per position the loss took 6.1x, then 3.9x the
# same-tokenizer kernel's time, with the top 256 2.6x, then 3.3x (two runs of bench/loss_bench.py on a shared machine,
# docs/cross-tokenizer.md). Smaller vocabularies are sorted whole.
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
# Logit KD across tokenizers, chunk by chunk: autograd with one checkpoint per chunk of aligned positions
# ---------------------------------------------------------------------------------------------------------------------


def _scaled_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      transform: tuple[float, float | None], vocab: int, temperature: float) -> torch.Tensor:
    """log_softmax(logits[:, :vocab] / T) in float32 for a chunk of hidden states, differentiably (no in-place ops)."""
    logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
    return F.log_softmax(transform_logits(logits, transform)[:, :vocab] / temperature, -1)


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
