"""Logit distillation across tokenizers (distil_logits.py, `distillation.cross_tokenizer`): the reference formulas
on full logits first (sorted L1, the per-pair terms of `uld` and `hybrid`, the loss over aligned pairs), then the
chunked path that computes the same KD from the two models' final hidden states and output heads, a checkpointed
chunk of aligned pairs at a time, so that neither model's (pairs, vocabulary) logits outlive their chunk.

The pairs (which student position faces which teacher position, and the following tokens of a piece that one side
writes with several tokens) come from alignment.py; teacher_signal.CrossTokenizerTeacher gathers them per batch.
Notation as in losses.py.

What the published methods compute, and where this differs:
- ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"; TRL's
  `trl.experimental.gold.ULDLoss` without `use_extended_uld`): the L1 distance between the two next-token
  distributions sorted in descending order (the narrower zero-padded), at temperature 1, with the answer positions
  of the two sequences paired by index. `uld` here computes the same distance at T = 1 (no T^2), but at the pairs
  alignment.py finds by character offsets, where both sides predict the same next text.
- GOLD (TRL's `ULDLoss` with `uld_use_hybrid_loss`, trl/experimental/gold/gold_trainer.py): a divergence on the
  exact-match shared vocabulary plus that sorted L1 on the rest. Its matched term takes the shared entries straight
  from the full softmax, not renormalised over them. `hybrid` here takes D between the two distributions conditioned
  on the shared vocabulary and weights it by the teacher's mass there, p(S) * D(p|S, q|S): for forward KL the part of
  KL(p || q) that lies within S. GOLD also merges the tokens of a piece that one side writes with several tokens into
  one "distribution" (the first position's times the following tokens' probabilities); only its entry at the
  observed token is a probability of that text, so this module compares only that scalar (`piece_divergence`).
"""

from __future__ import annotations

import math

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
# A piece probability of 1 would make log(1 - P) infinite in the binary divergence; no trained model gives a whole
# piece more than this.
_MAX_PIECE_PROBABILITY = 1 - 1e-6


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


def piece_divergence(student_piece_log_prob: torch.Tensor, teacher_piece_log_prob: torch.Tensor, method: str,
                     divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per pair (M,), the distance between the two models' probabilities P_s, P_t of the same next piece of text
    (log-probabilities (M,), each the sum of its tokens' log-probabilities at T = 1), as two-point distributions
    {the piece, anything else}: `uld` their L1 distance 2 |P_t - P_s|, `hybrid` D({P_t, 1 - P_t}, {P_s, 1 - P_s}).

    This is the one probability both sides give to the same event when one of them needs several tokens for the
    piece: the rest of the first token's distribution is over other, shorter or longer, pieces on each side. The
    binary divergence is the "approximate likelihood matching" of Minixhofer et al. 2025 (arXiv 2503.20083) for one
    piece at a time."""
    log_p = teacher_piece_log_prob.clamp(max=math.log(_MAX_PIECE_PROBABILITY))
    log_q = student_piece_log_prob.clamp(max=math.log(_MAX_PIECE_PROBABILITY))
    if method == "uld":
        return 2 * (log_p.exp() - log_q.exp()).abs()

    def two_point(log_probability):
        return torch.stack([log_probability, torch.log(-torch.expm1(log_probability))], -1)

    return token_divergence(two_point(log_q), two_point(log_p), divergence, beta, skew)


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    method: str,
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    top_k: int | None = None,
    pieces: dict | None = None,
) -> torch.Tensor:
    """Per aligned pair, the KD term between the student's (M, Vs) and the teacher's (M, Vt) next-token logits over
    their own real vocabularies (float32). Returns (M,); the loss is their sum over N.

    At a pair whose next token is the same text on both sides, with p, q the two next-token distributions (p^T at
    temperature T):

    uld     sorted_l1(p^1, q^1)                                                        (T = 1, no T^2, as ULD)
    hybrid  T^2 * matched_weight * p^T(S) * D(p^T|S, q^T|S) + unmatched_weight * sorted_l1(p^1 off S, q^1 off S)

    S is the exact-match shared vocabulary (`shared_ids` = (student ids, teacher ids), paired in order), p|S the
    distribution conditioned on S, p(S) the teacher's mass there and D the configured `token_divergence`: for forward
    KL the first term is the part of KL(p^T || q^T) inside S, so a teacher that puts little mass on shared tokens
    weighs little there (GOLD's matched term is not renormalised either; its weight is the matched share of the
    vocabulary). The sorted L1 is a distance between probabilities, not a KL gradient at a temperature: it is taken
    at T = 1 and not scaled by T^2.

    `pieces` (None: no pair covers a piece of several tokens): {"merged": (M,) bool, true where a side needs several
    tokens for the next piece; "student_next", "teacher_next": (M,) each side's next token; "student_rest",
    "teacher_rest": (M,) the log-probabilities (T = 1) of each side's following tokens of the piece, 0 for one token}.
    At merged pairs the term is matched_weight * piece_divergence (hybrid) or piece_divergence (uld) instead.
    """
    if method not in CROSS_TOKENIZER_METHODS:
        raise ConfigError(f"unknown distillation.cross_tokenizer '{method}'; choose null, {' or '.join(CROSS_TOKENIZER_METHODS)}.")
    student_log_probs, teacher_log_probs = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    p, q = teacher_log_probs.exp(), student_log_probs.exp()
    if method == "uld":
        per_pair = sorted_l1(p, q, top_k)
    else:
        student_ids, teacher_ids = (ids.to(p.device) for ids in shared_ids)  # a no-op for the trainer's (on the device)
        matched = torch.zeros_like(p[:, 0])
        if student_ids.numel():
            if temperature == 1:
                student_tempered, teacher_tempered = student_log_probs, teacher_log_probs
            else:
                student_tempered = F.log_softmax(student_logits / temperature, -1)
                teacher_tempered = F.log_softmax(teacher_logits / temperature, -1)
            teacher_shared, student_shared = teacher_tempered[:, teacher_ids], student_tempered[:, student_ids]
            teacher_mass = teacher_shared.logsumexp(-1)
            matched = teacher_mass.exp() * token_divergence(student_shared.log_softmax(-1),
                                                            teacher_shared - teacher_mass[:, None], divergence, beta, skew)
        p_rest = p.index_fill(1, teacher_ids, 0.0)  # zeros sort last: the same as dropping the shared columns
        q_rest = q.index_fill(1, student_ids, 0.0)
        per_pair = temperature**2 * matched_weight * matched + unmatched_weight * sorted_l1(p_rest, q_rest, top_k)
    if pieces is None:
        return per_pair
    # Always computed and selected per pair: no host read of `merged` (a device sync per chunk on a GPU).
    student_piece = student_log_probs.gather(1, pieces["student_next"][:, None])[:, 0] + pieces["student_rest"]
    teacher_piece = teacher_log_probs.gather(1, pieces["teacher_next"][:, None])[:, 0] + pieces["teacher_rest"]
    piece = piece_divergence(student_piece, teacher_piece, method, divergence, beta, skew)
    return torch.where(pieces["merged"], (matched_weight if method == "hybrid" else 1.0) * piece, per_pair)


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
    **weights,
) -> torch.Tensor:
    """KD across tokenizers from the full logits (M, heads) of both models at the M aligned pairs:

        KD = 1 / N * sum_k cross_tokenizer_divergence(s_k[:Vs], t_k[:Vt])   (T^2 on the hybrid's matched term only)

    N = `num_items_in_batch` (the step's counted student tokens) or, when None, M. `weights` go to
    `cross_tokenizer_divergence` (matched_weight, unmatched_weight, beta, skew, top_k, pieces)."""
    per_pair = cross_tokenizer_divergence(student_logits[:, :student_vocab].float(), teacher_logits[:, :teacher_vocab].float(),
                                          method, shared_ids, divergence, temperature, **weights)
    return per_item_mean(per_pair.sum(), per_pair.shape[0] if num_items_in_batch is None else num_items_in_batch)

# ---------------------------------------------------------------------------------------------------------------------
# Logit KD across tokenizers, chunk by chunk: autograd with one checkpoint per chunk of aligned positions
# ---------------------------------------------------------------------------------------------------------------------


def _real_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 transform: tuple[float, float | None], vocab: int) -> torch.Tensor:
    """The logits over the real vocabulary [0, vocab) in float32 for a chunk of hidden states, differentiably."""
    logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
    return transform_logits(logits, transform)[:, :vocab]


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
    log-softmaxes at T = 1 and at T, probabilities and zero-padded copies, the sorted values and their int64 sort
    indices; an estimate). Unlike the kernel's estimate there is no CPU block: every temporary spans the whole chunk."""
    return max(16, int(memory_budget_mb * 2**20 / (vocab * 100)) // 16 * 16)


def chunked_token_log_probs(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None],
                            targets: torch.Tensor, vocab: int, chunk: int) -> torch.Tensor:
    """log softmax(logits[:vocab])[target] (T = 1) per row of `hidden` (P, H): the probabilities of a piece's
    following tokens. Differentiable through `_checkpointed` chunks."""
    weight, bias = full_head_tensors(head)

    def chunk_log_probs(hidden_chunk, weight, bias, targets_chunk):
        return F.log_softmax(_real_logits(hidden_chunk, weight, bias, transform, vocab), -1).gather(
            1, targets_chunk[:, None])[:, 0]

    parts = [_checkpointed(chunk_log_probs, hidden[start:start + chunk], weight, bias, targets[start:start + chunk])
             for start in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def chunked_cross_tokenizer_kd(student_hidden: torch.Tensor, student_head: torch.nn.Module, cross: dict,
                               temperature: float, student_vocab: int, divergence: str, beta: float, skew: float,
                               memory_budget_mb: float) -> torch.Tensor:
    """sum_k cross_tokenizer_divergence over the aligned pairs of a micro-batch (the caller divides by N), equal to
    `cross_tokenizer_loss` * N without either model's (tokens, vocabulary) logits.

    `student_hidden` is the student's last hidden state (batch, seq, H). `cross` (built by
    teacher_signal.CrossTokenizerTeacher) holds the aligned pairs' rows / positions, the teacher's final hidden
    states there, its head and transform, the method and its settings, and `pieces`: None, or the pairs that cover a
    piece of several tokens ("merged"), each side's next token and the following tokens of those pieces
    (continuation_*, with the teacher's hidden states at its continuations). Per chunk of pairs, both heads run and
    the divergence is taken under one checkpoint.
    """
    teacher_head, teacher_transform = cross["teacher_head"], cross["teacher_transform"]
    teacher_vocab, transform = cross["teacher_vocab"], cross["student_transform"]
    weight, bias = full_head_tensors(student_head)
    teacher_weight, teacher_bias = full_head_tensors(teacher_head)
    pairs = cross["rows"].numel()
    chunk = cross_tokenizer_chunk_tokens(max(student_vocab, teacher_vocab), memory_budget_mb)
    pieces = cross.get("pieces")
    zeros = torch.zeros(pairs, dtype=torch.float32, device=student_hidden.device)
    student_rest = teacher_rest = zeros
    if pieces is not None:
        def rest_log_prob(hidden, head, head_transform, side, vocab):
            log_probs = chunked_token_log_probs(hidden, head, head_transform, pieces[f"{side}continuation_targets"],
                                                vocab, chunk)
            return zeros.index_add(0, pieces[f"{side}continuation_owner"], log_probs)

        with torch.no_grad():
            teacher_rest = rest_log_prob(pieces["teacher_continuation_hidden"], teacher_head, teacher_transform,
                                         "teacher_", teacher_vocab)
        student_rest = rest_log_prob(student_hidden[pieces["continuation_rows"], pieces["continuation_positions"]],
                                     student_head, transform, "", student_vocab)
    first = student_hidden[cross["rows"], cross["positions"]]
    settings = dict(method=cross["method"], shared_ids=cross["shared_ids"], divergence=divergence,
                    temperature=temperature, matched_weight=cross["matched_weight"],
                    unmatched_weight=cross["unmatched_weight"], beta=beta, skew=skew, top_k=cross["top_k"])

    def chunk_divergence(hidden_chunk, weight, bias, student_rest_chunk, start):
        end = start + hidden_chunk.shape[0]
        with torch.no_grad():
            teacher = _real_logits(cross["teacher_hidden"][start:end], teacher_weight, teacher_bias, teacher_transform,
                                   teacher_vocab)
        student = _real_logits(hidden_chunk, weight, bias, transform, student_vocab)
        chunk_pieces = None if pieces is None else {
            "merged": pieces["merged"][start:end], "student_next": pieces["student_next"][start:end],
            "teacher_next": pieces["teacher_next"][start:end], "student_rest": student_rest_chunk,
            "teacher_rest": teacher_rest[start:end]}
        return cross_tokenizer_divergence(student, teacher, pieces=chunk_pieces, **settings).sum()

    total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for start in range(0, pairs, chunk):
        total = total + _checkpointed(chunk_divergence, first[start:start + chunk], weight, bias,
                                      student_rest[start:start + chunk], start)
    return total
