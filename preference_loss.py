"""The preference losses of distil_dpo.py: reference formulas on full logits first (short, what the tests compare
with), then the student's side as distil_dpo.py runs it inside the student's forward, without ever holding the
(tokens, vocabulary) logits.

A micro-batch holds P pairs as 2P rows: rows [0, P) are the chosen responses (prompt + chosen), rows [P, 2P) the
rejected ones, in the same order. Labels are -100 everywhere but on the response, so a row's counted positions
(data.next_token_mask) are exactly its response tokens.

- `distillm2` (DistiLLM-2, Ko et al. 2025): (2 - mix) * skew forward KL on the chosen rows + mix * skew reverse KL
  on the rejected rows, both through losses.chunked_distillation_loss; with the adaptive skew (`adaptive_skew`), each
  answer's skew comes from the teacher-student probability gap on it against an anchor.
- `dpo_kd`: DPO's sigmoid loss on the responses' summed log-probabilities (through TRL's chunked log-prob kernel,
  `trl.kernels.ChunkedLogProbFunction`) + alpha * KD on the chosen rows (losses.chunked_distillation_loss).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import losses
from data import next_token_mask
from heads import full_head_tensors, gathered_head

METHODS = ("distillm2", "dpo_kd")
SKEW_FLOOR = 0.01  # DistiLLM-2's lower clip of the adaptive skew
# Vocabulary columns per tile of TRL's log-prob kernel (its own default, trl.trainer.utils).
LOG_PROB_TILE = 32768

# ---------------------------------------------------------------------------------------------------------------------
# Reference formulas (full logits)
# ---------------------------------------------------------------------------------------------------------------------


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum over its counted positions of log softmax(logits_i)[label_{i+1}] (the whole head, at T = 1):
    log pi(response | prompt). Shape (rows,)."""
    mask = next_token_mask(labels)
    log_probs = F.log_softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:].clamp(min=0)
    per_token = log_probs.gather(-1, targets[..., None])[..., 0]
    return (per_token * mask).sum(-1)


def dpo_sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair loss -log sigmoid(beta * ((c - c_ref) - (r - r_ref))) from summed response log-probabilities,
    and the implicit rewards beta * (c - c_ref), beta * (r - r_ref) (detached). Shapes (P,)."""
    chosen_reward = beta * (chosen - reference_chosen)
    rejected_reward = beta * (rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def distillm2_mix(step: int, max_steps: int, gradual: bool) -> float:
    """DistiLLM-2's weight of the rejected term: 1, or with `gradual` 1 + 0.5 * min(1, 2 * step / max_steps) (it
    reaches 1.5 half-way through training; the chosen term weighs 2 - mix)."""
    if not gradual or max_steps <= 0:
        return 1.0
    return 1.0 + 0.5 * min(1.0, 2.0 * step / max_steps)


def probability_gap(teacher_mean_log_probs: torch.Tensor, student_mean_log_probs: torch.Tensor) -> torch.Tensor:
    """Per answer, exp(mean log p) - exp(mean log q): the teacher's minus the student's per-token geometric-mean
    probability of the answer's tokens (DistiLLM-2's sentence-level gap)."""
    return teacher_mean_log_probs.exp() - student_mean_log_probs.exp()


def adaptive_skew(gap: torch.Tensor, anchor: float | None, base: float) -> torch.Tensor:
    """DistiLLM-2's per-answer skew: clip(1 - (1 - base) * anchor / (gap + 1e-5), SKEW_FLOOR, base), detached; `base`
    for every answer while no anchor is measured yet (None). An answer whose gap is at or above the anchor keeps the
    base skew; a smaller gap (teacher and student closer on it) gets a smaller one, down to SKEW_FLOOR."""
    gap = gap.detach().float()
    if anchor is None:
        return torch.full_like(gap, base)
    return (1 - (1 - base) * anchor / (gap + 1e-5)).clamp(SKEW_FLOOR, base)


def distillm2_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        skew_chosen: float, skew_rejected: float, mix: float = 1.0, temperature: float = 1.0,
                        vocab_size: int | None = None, skew_anchor: tuple[float, float] | None = None) -> dict:
    """The distillm2 loss of one whole batch from full logits (rows as in the module docstring):
    chosen_kl = T^2 / N_c * sum skew_forward_kl, rejected_kl = T^2 / N_r * sum skew_reverse_kl,
    loss = (2 - mix) * chosen_kl + mix * rejected_kl.

    With `skew_anchor` (anchor of the chosen gaps, anchor of the rejected gaps), each answer has its own skew
    (`adaptive_skew`) from its gap, taken on the models' whole-head log-probabilities at T = 1: the chosen answer's
    gap is teacher minus student, the rejected answer's student minus teacher. Written as a loop over answers, each
    with one scalar skew."""
    pairs = labels.shape[0] // 2
    if skew_anchor is None:
        chosen_kl = losses.logit_distillation_loss(student_logits[:pairs], teacher_logits[:pairs], labels[:pairs],
                                                   "skew_forward_kl", temperature, vocab_size, skew=skew_chosen)
        rejected_kl = losses.logit_distillation_loss(student_logits[pairs:], teacher_logits[pairs:], labels[pairs:],
                                                     "skew_reverse_kl", temperature, vocab_size, skew=skew_rejected)
        return {"loss": (2 - mix) * chosen_kl + mix * rejected_kl, "chosen_kl": chosen_kl, "rejected_kl": rejected_kl}
    mask = next_token_mask(labels)
    tokens = mask.sum(-1)
    with torch.no_grad():
        student_mean = sequence_log_probs(student_logits, labels) / tokens
        teacher_mean = sequence_log_probs(teacher_logits, labels) / tokens
    gaps = torch.cat([probability_gap(teacher_mean[:pairs], student_mean[:pairs]),
                      probability_gap(student_mean[pairs:], teacher_mean[pairs:])])
    skews = torch.cat([adaptive_skew(gaps[:pairs], skew_anchor[0], skew_chosen),
                       adaptive_skew(gaps[pairs:], skew_anchor[1], skew_rejected)])
    sums = []
    for row in range(labels.shape[0]):
        divergence = "skew_forward_kl" if row < pairs else "skew_reverse_kl"
        sums.append(losses.logit_distillation_loss(student_logits[row:row + 1], teacher_logits[row:row + 1],
                                                   labels[row:row + 1], divergence, temperature, vocab_size,
                                                   num_items_in_batch=1, skew=float(skews[row])))
    chosen_kl = torch.stack(sums[:pairs]).sum() / tokens[:pairs].sum()
    rejected_kl = torch.stack(sums[pairs:]).sum() / tokens[pairs:].sum()
    return {"loss": (2 - mix) * chosen_kl + mix * rejected_kl, "chosen_kl": chosen_kl, "rejected_kl": rejected_kl,
            "skews": skews, "gaps": gaps}


def dpo_kd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                     reference_log_probs: torch.Tensor, beta: float, alpha: float, divergence: str = "forward_kl",
                     temperature: float = 1.0, vocab_size: int | None = None, jsd_beta: float = 0.5,
                     skew: float = 0.1) -> dict:
    """The dpo_kd loss of one whole batch from full logits: mean over pairs of the DPO sigmoid loss + alpha * KD on
    the chosen rows (T^2 / N_c * sum D(p, q)). `reference_log_probs` (2P,) are the starting student's summed response
    log-probabilities, chosen rows first."""
    pairs = labels.shape[0] // 2
    policy = sequence_log_probs(student_logits, labels)
    per_pair, chosen_reward, rejected_reward = dpo_sigmoid_loss(policy[:pairs], policy[pairs:],
                                                                reference_log_probs[:pairs], reference_log_probs[pairs:], beta)
    kd_loss = torch.zeros(())
    if alpha and teacher_logits is not None:
        kd_loss = losses.logit_distillation_loss(student_logits[:pairs], teacher_logits[:pairs], labels[:pairs],
                                                 divergence, temperature, vocab_size, beta=jsd_beta, skew=skew)
    dpo_loss = per_pair.mean()
    return {"loss": dpo_loss + alpha * kd_loss, "dpo_loss": dpo_loss, "kd_loss": kd_loss,
            "rewards/chosen": chosen_reward.mean(), "rewards/rejected": rejected_reward.mean(),
            "rewards/accuracy": (chosen_reward > rejected_reward).float().mean()}


# ---------------------------------------------------------------------------------------------------------------------
# The student's side, inside its forward (teacher_signal.add_distillation_forward)
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreferenceTerms:
    """The settings and normalisers of one micro-batch's preference loss. `chosen_tokens`, `rejected_tokens` and
    `pairs` are the whole optimizer step's counts (all accumulated micro-batches, all processes), so that 2 x 2
    accumulated pairs train exactly as a batch of 4."""

    method: str
    chosen_tokens: torch.Tensor | int
    rejected_tokens: torch.Tensor | int
    pairs: torch.Tensor | int
    temperature: float
    vocab_size: int
    memory_budget_mb: float
    beta: float = 0.1  # dpo_kd: DPO's beta
    alpha: float = 1.0  # dpo_kd: weight of KD on the chosen rows
    divergence: str = "forward_kl"  # dpo_kd: the KD divergence
    jsd_beta: float = 0.5
    skew: float = 0.1  # dpo_kd with a skew divergence
    skew_chosen: float = 0.1  # distillm2
    skew_rejected: float = 0.1  # distillm2
    mix: float = 1.0  # distillm2: weight of the rejected term (distillm2_mix)
    adaptive_skew: bool = False  # distillm2: one skew per answer (adaptive_skew), from its gap and the anchor
    skew_anchor: tuple[float, float] | None = None  # distillm2: (chosen, rejected) anchors; None: not measured yet


def response_log_probs(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None],
                       targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per counted position (N,), differentiable, from hidden states (N, H) through
    TRL's chunked kernel: the logits exist one (tokens, tile) block at a time, and its backward gathers a ZeRO-3 head
    again."""
    from trl.kernels import ChunkedLogProbFunction

    weight, bias = full_head_tensors(head)
    scale, softcap = transform
    return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, LOG_PROB_TILE, softcap, scale,
                                       ("log_probs",))[0]


def answer_skews(counted: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None], teacher,
                 targets: torch.Tensor, mask: torch.Tensor, terms: PreferenceTerms) -> tuple:
    """The adaptive skews of one micro-batch, one per counted position (its answer's), for the chosen and the rejected
    positions, and their sums per side for the log and the anchor: {"gap/chosen", "gap/rejected", "skew/chosen",
    "skew/rejected"} (sums over this micro-batch's pairs). Both models' log-probabilities of the answer tokens come
    from TRL's chunked kernel, without gradients (the skew is a coefficient, not a path for gradients)."""
    if not hasattr(teacher, "hidden"):
        # The gap needs log p(y_i) of every answer token; a top-k holds it only when the token is among the k.
        raise ValueError("the adaptive skew needs the teacher's hidden states (an in-process teacher), not a top-k")
    pairs = mask.shape[0] // 2
    rows = mask.nonzero()[:, 0]
    tokens = mask.sum(-1).clamp(min=1)
    with torch.no_grad():
        def mean_log_probs(hidden, model_head, model_transform):
            per_token = response_log_probs(hidden, model_head, model_transform, targets).float()
            return per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token) / tokens

        student_mean = mean_log_probs(counted.detach(), head, transform)
        teacher_mean = mean_log_probs(teacher.hidden, teacher.head, teacher.transform)
    anchor = terms.skew_anchor or (None, None)
    gap_chosen = probability_gap(teacher_mean[:pairs], student_mean[:pairs])
    gap_rejected = probability_gap(student_mean[pairs:], teacher_mean[pairs:])
    skew_chosen = adaptive_skew(gap_chosen, anchor[0], terms.skew_chosen)
    skew_rejected = adaptive_skew(gap_rejected, anchor[1], terms.skew_rejected)
    chosen_count = int(mask[:pairs].sum())
    per_position = (skew_chosen[rows[:chosen_count]], skew_rejected[rows[chosen_count:] - pairs])
    return (*per_position, {"gap/chosen": gap_chosen.sum(), "gap/rejected": gap_rejected.sum(),
                            "skew/chosen": skew_chosen.sum(), "skew/rejected": skew_rejected.sum()})


def teacher_part(teacher, part: slice) -> dict:
    """losses.chunked_distillation_loss's teacher arguments for some of the counted positions: the teacher's hidden
    states there (teacher_signal.TeacherHidden, an in-process teacher) or its top-k there (teacher_signal.TopK, a
    served teacher: KD over the k ids plus one bucket for the rest, as distil_logits.py trains from a server)."""
    arguments = teacher.kernel_teacher()
    if arguments["stored_topk"] is not None:
        arguments["stored_topk"] = tuple(tensor[part] for tensor in arguments["stored_topk"])
    else:
        arguments["teacher_hidden"] = arguments["teacher_hidden"][part]
    return arguments


def preference_student_loss(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None], *,
                            labels: torch.Tensor, teacher, reference_log_probs: torch.Tensor | None,
                            terms: PreferenceTerms) -> dict:
    """The loss and its logged parts for the student's final hidden states (2P, seq, H) and head, against the
    teacher's answer (teacher_signal.TeacherHidden at the counted positions, or a served teacher's teacher_signal.TopK
    there, or None) and, for dpo_kd, the starting student's summed log-probabilities (2P,). Returns {loss (with
    gradients), and detached parts}."""
    mask = next_token_mask(labels)
    pairs = labels.shape[0] // 2
    counted = hidden[:, :-1][mask]
    targets = labels[:, 1:][mask]
    # Counted positions run row by row, so the chosen rows' positions come first.
    chosen_count = int(mask[:pairs].sum())
    kernel = dict(temperature=terms.temperature, vocab_size=terms.vocab_size, student_transform=transform,
                  memory_budget_mb=terms.memory_budget_mb, ce_weight=0.0)
    chosen_part, rejected_part = slice(0, chosen_count), slice(chosen_count, None)
    with gathered_head(head, None if teacher is None else teacher.teacher_head()):
        if terms.method == "distillm2":
            skew_chosen, skew_rejected, adaptive = terms.skew_chosen, terms.skew_rejected, {}
            if terms.adaptive_skew:
                skew_chosen, skew_rejected, adaptive = answer_skews(counted, head, transform, teacher, targets, mask,
                                                                    terms)
            chosen_loss, chosen_kl, _ = losses.chunked_distillation_loss(
                counted[chosen_part], head, targets=targets[chosen_part], kd_weight=2 - terms.mix,
                num_items_in_batch=terms.chosen_tokens, divergence="skew_forward_kl", skew=skew_chosen,
                **teacher_part(teacher, chosen_part), **kernel)
            rejected_loss, rejected_kl, _ = losses.chunked_distillation_loss(
                counted[rejected_part], head, targets=targets[rejected_part], kd_weight=terms.mix,
                num_items_in_batch=terms.rejected_tokens, divergence="skew_reverse_kl", skew=skew_rejected,
                **teacher_part(teacher, rejected_part), **kernel)
            return {"loss": chosen_loss + rejected_loss, "chosen_kl": chosen_kl, "rejected_kl": rejected_kl,
                    **adaptive}
        per_token = response_log_probs(counted, head, transform, targets)
        rows = mask.nonzero()[:, 0]
        policy = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token.float())
        reference = reference_log_probs.to(policy)
        per_pair, chosen_reward, rejected_reward = dpo_sigmoid_loss(policy[:pairs], policy[pairs:], reference[:pairs],
                                                                    reference[pairs:], terms.beta)
        dpo_loss = losses.per_item_mean(per_pair.sum(), terms.pairs)
        loss, kd_loss = dpo_loss, dpo_loss.new_zeros(())
        if terms.alpha and teacher is not None:
            kd_part, kd_loss, _ = losses.chunked_distillation_loss(
                counted[chosen_part], head, targets=targets[chosen_part], kd_weight=terms.alpha,
                num_items_in_batch=terms.chosen_tokens, divergence=terms.divergence, beta=terms.jsd_beta,
                skew=terms.skew, **teacher_part(teacher, chosen_part), **kernel)
            loss = loss + kd_part
    return {"loss": loss, "dpo_loss": dpo_loss.detach(), "kd_loss": kd_loss,
            "rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
            "rewards/accuracy": (chosen_reward > rejected_reward).float().sum(),
            "policy_log_probs": policy.detach()}
