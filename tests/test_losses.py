"""The logit-distillation loss: every divergence against a direct float64 formula, zero for identical inputs,
masking and the next-token shift, temperature scaling, normalisation by num_items_in_batch, vocabulary slicing of a
padded output head, and the cross-entropy that it is mixed with."""

import math

import pytest
import torch

from common import ConfigError
from losses import DIVERGENCES, causal_lm_loss, logit_distillation_loss, token_divergence


def direct(p: list[float], q: list[float], divergence: str, beta: float, skew: float) -> float:
    """The divergence written out term by term from probabilities (teacher p, student q)."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if divergence == "skew_forward_kl":
        return kl(p, [skew * x + (1 - skew) * y for x, y in zip(p, q)])
    if divergence == "skew_reverse_kl":
        return kl(q, [skew * y + (1 - skew) * x for x, y in zip(p, q)])
    raise AssertionError(divergence)


def make_batch(seed=0, batch=2, seq=7, vocab=11, padded_teacher_vocab=None):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator) * 2
    teacher = torch.randn(batch, seq, padded_teacher_vocab or vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return student, teacher, labels


def reference_loss(student, teacher, labels, divergence, temperature, vocab, beta=0.5, skew=0.1, count=None):
    total, counted = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(teacher[b, i, :vocab].double() / temperature, -1).tolist()
            q = torch.softmax(student[b, i, :vocab].double() / temperature, -1).tolist()
            total += direct(p, q, divergence, beta, skew)
            counted += 1
    return total * temperature**2 / (count or counted)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_divergence_matches_direct_formula(divergence, temperature):
    student, teacher, labels = make_batch()
    got = logit_distillation_loss(student, teacher, labels, divergence, temperature, beta=0.3, skew=0.2)
    want = reference_loss(student, teacher, labels, divergence, temperature, 11, beta=0.3, skew=0.2)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert want > 1e-3  # the inputs differ, so a loss stuck at zero would fail


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero(divergence):
    student, _, labels = make_batch()
    loss = logit_distillation_loss(student, student.clone(), labels, divergence, 2.0)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_positions_do_not_count(divergence):
    """Changing logits at positions whose next-token label is -100 changes nothing; changing a counted one does."""
    student, teacher, labels = make_batch()
    base = logit_distillation_loss(student, teacher, labels, divergence, 1.0)
    changed = teacher.clone()
    changed[0, :2] += 5.0  # predict labels[0, 1:3], all -100
    changed[1, -2:] += 5.0  # the last position predicts nothing; the one before predicts a -100 label
    assert logit_distillation_loss(student, changed, labels, divergence, 1.0).item() == pytest.approx(base.item(), rel=1e-6)
    changed[0, 2, 0] += 5.0  # predicts labels[0, 3], counted
    assert logit_distillation_loss(student, changed, labels, divergence, 1.0).item() != pytest.approx(base.item(), rel=1e-6)


def test_normalised_by_num_items_in_batch():
    student, teacher, labels = make_batch()
    counted = int((labels[:, 1:] != -100).sum())
    per_batch = logit_distillation_loss(student, teacher, labels, "forward_kl", 2.0)
    global_norm = logit_distillation_loss(student, teacher, labels, "forward_kl", 2.0, num_items_in_batch=3 * counted)
    assert global_norm.item() == pytest.approx(per_batch.item() / 3, rel=1e-6)


def test_padded_teacher_vocabulary_is_sliced_not_zero_filled():
    """A teacher head padded beyond the tokenizer: the padded rows must not take part, whatever their values."""
    student, teacher, labels = make_batch(vocab=11, padded_teacher_vocab=64)
    teacher[..., 11:] = 30.0  # junk in the padding rows would dominate a softmax over all 64
    got = logit_distillation_loss(student, teacher, labels, "forward_kl", 1.0, vocab_size=11)
    want = reference_loss(student, teacher, labels, "forward_kl", 1.0, 11)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_bf16_logits_use_float32_math():
    student, teacher, labels = make_batch()
    got = logit_distillation_loss(student.bfloat16(), teacher.bfloat16(), labels, "forward_kl", 2.0)
    assert got.dtype == torch.float32
    want = reference_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels, "forward_kl", 2.0, 11)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_gradient_flows_to_student_only():
    student, teacher, labels = make_batch()
    student.requires_grad_(True)
    logit_distillation_loss(student, teacher, labels, "jsd", 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert student.grad[0, :2].abs().sum() == 0  # masked positions get no gradient


def test_cross_entropy_matches_torch_and_normalisation():
    student, _, labels = make_batch()
    want = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert causal_lm_loss(student, labels).item() == pytest.approx(want.item(), rel=1e-6)
    counted = int((labels[:, 1:] != -100).sum())
    assert causal_lm_loss(student, labels, 2 * counted).item() == pytest.approx(want.item() / 2, rel=1e-6)


def test_unknown_divergence_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown divergence"):
        token_divergence(torch.zeros(1, 3), torch.zeros(1, 3), "kl_forward")
