"""The losses: reference formulas on full logits first (short, testable, what the kernel must equal), then the
chunked kernel that computes the same values from hidden states and output-head weights without ever holding the
(tokens, vocab) logits. The output heads' arithmetic is in heads.py, the losses across tokenizers in
cross_tokenizer_loss.py, and the student's forward that runs the kernel against the teacher's signal in
teacher_signal.py.

Notation used throughout: p is the teacher's next-token distribution, q the student's, both softmax(logits[:V] / T)
over the real vocabulary V (padded head rows are dropped, never zero-filled); a position counts when its next-token
label is not -100; N is the number of counted tokens in the whole optimizer step (over accumulated micro-batches and
processes), the same normaliser the Trainer gives the cross-entropy as `num_items_in_batch`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from common import ConfigError
from data import next_token_mask
from heads import full_head_tensors, transform_logits_

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
HIDDEN_LOSSES = ("mse", "cosine")
UNIT_NORM_EPS = 1e-6  # teacher_norm unit: 1 / sqrt(var + eps), here and where distil_hidden.py measures the statistics
TEACHER_NORMS = ("rms", "none", "unit")  # hidden_state_loss: what the teacher's states are divided by before the loss

# ---------------------------------------------------------------------------------------------------------------------
# Reference formulas
# ---------------------------------------------------------------------------------------------------------------------


def _mixture_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float | torch.Tensor) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space. `weight_p` is one number, or one per row
    (a tensor of shape (N,): distil_dpo.py's per-pair skew)."""
    if isinstance(weight_p, torch.Tensor):
        weight = weight_p.to(log_p.dtype)[:, None]
        return torch.logaddexp(log_p + weight.log(), log_q + torch.log1p(-weight))
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

    `skew` may be a tensor of shape (N,): one skew per row.
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
    teacher_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Hidden-state loss over L mapped layer pairs and the aligned positions:

        H = 1 / (N * L) * sum_l sum_k d(P_l(s_l,k), t_l,k)

    student_projected[l]: the student's states of pair l at the aligned positions after the pair's projection P_l,
    shape (n, d_t); teacher_hidden[l]: the teacher's states of pair l at the same positions, (n, d_t). d is the mean
    over the d_t units of the squared difference (mse), or 1 - cosine similarity (cosine). N is `num_positions` (the
    aligned positions of the whole optimizer step) or, when None, n. Computed in float32.

    teacher_norm "rms" divides each teacher state by its root mean square unit first, t / sqrt(mean_j t_j^2 + 1e-6):
    the mse is then scale-free (1 for a student that outputs zeros, whatever the teacher's layer or model size), so
    it neither dwarfs nor vanishes against the CE. "unit" standardises each teacher unit over the n compared positions
    instead, (t_j - mean_k t_kj) / sqrt(var_k t_kj + 1e-6): every unit weighs the same, where with "rms" a pretrained
    teacher's few huge units make up nearly the whole target. `teacher_stats[l]` = (mean, 1 / sqrt(var + 1e-6)) of pair
    l, measured once (distil_hidden.py: over the first optimizer step), replaces the n positions' own statistics, so
    the loss of a position no longer depends on which micro-batch it is in. "none" compares the raw states. Cosine
    is unchanged by rms (one scale per state), not by unit (each unit shifted and scaled).
    """
    if teacher_norm not in TEACHER_NORMS:
        raise ConfigError(f"unknown teacher_norm '{teacher_norm}'; choose one of {', '.join(TEACHER_NORMS)}.")
    total = student_projected[0].new_zeros((), dtype=torch.float32)
    for index, (projected, target) in enumerate(zip(student_projected, teacher_hidden)):
        projected, target = projected.float(), target.to(projected.device).float()
        if teacher_norm == "rms":
            target = target * torch.rsqrt(target.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif teacher_norm == "unit":  # each hidden unit standardised: measured statistics, else the batch's own
            mean, inv_std = teacher_stats[index] if teacher_stats is not None else (
                target.mean(0), torch.rsqrt(target.var(0, unbiased=False) + UNIT_NORM_EPS))
            target = (target - mean.to(target)) * inv_std.to(target)
        if loss == "mse":
            total = total + (projected - target).pow(2).mean(-1).sum()
        elif loss == "cosine":
            total = total + (1 - F.cosine_similarity(projected, target, dim=-1)).sum()
        else:
            raise ConfigError(f"unknown hidden-state loss '{loss}'; choose one of {', '.join(HIDDEN_LOSSES)}.")
    num_positions = student_projected[0].shape[0] if num_positions is None else num_positions
    return per_item_mean(total, torch.as_tensor(num_positions, device=total.device).clamp(min=1) * len(student_projected))


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
    skew: float | torch.Tensor  # or one per counted position (N,), sliced per block
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
            block_settings = settings
            if isinstance(settings.skew, torch.Tensor):
                block_settings = dataclasses.replace(settings, skew=settings.skew[start + first : start + last])
            ce_part, kd_part = _loss_on_block(
                logits[first:last], targets[start + first : start + last],
                teacher[first:last] if use_teacher else None, stored, block_settings, needs_grad, kd_scale)
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
    skew: float | torch.Tensor = 0.1,
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

    `skew` (skew_forward_kl, skew_reverse_kl) may be one number or a tensor with one skew per counted position (N,).
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
