"""The chunked loss (from hidden states and head weights, never the full logits) equals the reference loss on full
logits: loss, KD and CE values and the gradients to the student's hidden states, head weight and bias, within
1e-5 relative in float32, for every divergence, with masking, temperature, vocabulary slicing, a logit scale and
soft-capping, and several chunk sizes. Also: a training run never calls either model's output head."""

import pytest
import torch

import distil_logits
from losses import (
    DIVERGENCES,
    causal_lm_loss,
    chunk_tokens_for_budget,
    chunked_distillation_loss,
    logit_distillation_loss,
)
from conftest import tiny_config


def transform(x, scale, softcap):
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def reference(student_hidden, student_head, teacher_hidden, teacher_head, labels, kd_weight, ce_weight, **kw):
    """Full logits for a (batch, seq) layout, then the reference functions of losses.py."""
    student_logits = transform(student_head(student_hidden), kw["scale"], kw["softcap"])
    teacher_logits = transform(teacher_head(teacher_hidden), 1.3, kw["softcap"])
    kd = logit_distillation_loss(student_logits, teacher_logits, labels, kw["divergence"], kw["temperature"],
                                 kw["vocab_size"], kw["num_items"])
    ce = causal_lm_loss(student_logits, labels, kw["num_items"])
    return kd_weight * kd + ce_weight * ce, kd, ce


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,softcap,scale,bias", [(1.0, None, 1.0, False), (2.0, None, 0.5, True),
                                                            (0.7, 4.0, 1.0, True)])
@pytest.mark.parametrize("token_block", [None, 5])
def test_chunked_equals_reference(divergence, temperature, softcap, scale, bias, token_block, monkeypatch):
    import losses

    if token_block:  # softmax arithmetic on blocks of 5 tokens inside each chunk, as it runs on large vocabularies
        monkeypatch.setattr(losses, "CPU_BLOCK_BYTES", token_block * 4 * 96)
    torch.manual_seed(0)
    batch, seq, student_size, teacher_size, head_size, teacher_head_size, vocab = 3, 29, 16, 24, 96, 128, 80
    student_head = torch.nn.Linear(student_size, head_size, bias=bias)
    teacher_head = torch.nn.Linear(teacher_size, teacher_head_size, bias=True)
    with torch.no_grad():
        teacher_head.weight.mul_(3)
    student_hidden = torch.randn(batch, seq, student_size, requires_grad=True)
    teacher_hidden = torch.randn(batch, seq, teacher_size)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :9] = -100
    labels[2, -6:] = -100
    mask = labels[:, 1:] != -100
    num_items = int(mask.sum()) + 11  # as if other micro-batches of the step counted more tokens
    settings = dict(divergence=divergence, temperature=temperature, vocab_size=vocab, num_items=num_items,
                    scale=scale, softcap=softcap)

    want, want_kd, want_ce = reference(student_hidden, student_head, teacher_hidden, teacher_head, labels, 0.6, 0.4,
                                       **settings)
    want.backward()
    want_grads = [student_hidden.grad.clone(), student_head.weight.grad.clone()]
    if bias:
        want_grads.append(student_head.bias.grad.clone())
    for budget in (0.05, 1.0):  # 16 tokens per chunk, and everything in one chunk
        student_hidden.grad = None
        student_head.zero_grad()
        got, got_kd, got_ce = chunked_distillation_loss(
            student_hidden[:, :-1][mask], student_head, teacher_hidden[:, :-1][mask], teacher_head,
            labels[:, 1:][mask], 0.6, 0.4, num_items, divergence, temperature, vocab,
            student_transform=(scale, softcap), teacher_transform=(1.3, softcap), memory_budget_mb=budget,
        )
        got.backward()
        got_grads = [student_hidden.grad, student_head.weight.grad] + ([student_head.bias.grad] if bias else [])
        for a, b in ((got, want), (got_kd, want_kd), (got_ce, want_ce)):
            assert relative_error(a.detach(), b.detach()) < 1e-5
        for a, b in zip(got_grads, want_grads):
            assert relative_error(a, b) < 1e-5
        assert want_kd.item() > 1e-3  # teacher and student differ: a zero KD would not pass for a match


def test_no_grad_path_and_empty_batch():
    head = torch.nn.Linear(8, 32)
    with torch.no_grad():
        loss, kd, ce = chunked_distillation_loss(torch.randn(5, 8), head, torch.randn(5, 8), torch.nn.Linear(8, 32),
                                                 torch.randint(0, 32, (5,)), 0.5, 0.5)
    assert torch.isfinite(loss) and kd > 0 and ce > 0
    hidden = torch.randn(0, 8, requires_grad=True)
    loss, _, _ = chunked_distillation_loss(hidden, head, torch.randn(0, 8), torch.nn.Linear(8, 32),
                                           torch.zeros(0, dtype=torch.long), 0.5, 0.5, num_items_in_batch=0)
    loss.backward()
    assert loss.item() == 0 and head.weight.grad.abs().sum() == 0


def test_chunk_size_comes_from_the_memory_budget():
    assert chunk_tokens_for_budget(151936, 1024) == 208  # 1 GiB / (8 copies * 4 bytes * 151936) = 220 -> 208
    assert chunk_tokens_for_budget(32768, 1024) == 1024
    assert chunk_tokens_for_budget(151936, 1) == 16  # never below 16


def test_training_never_calls_an_output_head(assets, tmp_path, monkeypatch):
    """Neither model builds (tokens, vocab) logits in a run: their output heads' forwards are never called."""
    calls = []
    original = distil_logits.load_causal_lm

    def load_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
        return model

    monkeypatch.setattr(distil_logits, "load_causal_lm", load_and_watch)
    trainer = distil_logits.main(tiny_config(assets, str(tmp_path / "out")))
    assert trainer.state.global_step == 3 and any("eval_kd_loss" in log for log in trainer.state.log_history)
    assert calls == []


def test_packed_batch_gives_the_same_loss_as_padded_rows(assets):
    """Padding-free packing (TRL's collator, position_ids restart per row, no attention mask) must keep rows from
    attending to each other: the KD and CE sums equal those of the same rows padded into a batch."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from losses import add_distillation_forward, add_hidden_states_forward, student_loss, teacher_hidden_at_counted_positions

    # float64 backbones: packed and padded attention then differ by summation order only (~1e-15 relative), where
    # float32 sdpa differs by ~1e-7 per hidden value, and a KL of 0.01 built from log-probabilities of size ~6
    # (log 320) magnifies that to ~1e-5 relative: the float32 comparison fails by chance in some builds.
    student = AutoModelForCausalLM.from_pretrained(assets["student"]).double().eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).double().eval()
    add_distillation_forward(student)
    add_hidden_states_forward(teacher)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (9, 14, 6):
        ids = torch.randint(3, assets["vocab"], (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})

    def loss_of(batch):
        labels = batch.pop("labels")
        batch["use_cache"] = False
        with torch.no_grad():
            teacher_hidden = teacher_hidden_at_counted_positions(teacher, batch, labels, 3)
            return student_loss(
                student, batch, labels, teacher_hidden=teacher_hidden, teacher_head=teacher.get_output_embeddings(),
                teacher_transform=(1.0, None), kd_weight=0.5, ce_weight=0.5, num_items_in_batch=30,
                divergence="forward_kl", temperature=2.0, vocab_size=assets["vocab"], memory_budget_mb=512)

    padded = loss_of(DataCollatorForLanguageModeling(pad_token_id=0)(rows))
    packed_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    packed = loss_of(packed_batch)
    # The chunked loss then sees the same positions in the same order and computes in float32 at the least: the two
    # differ by a few float32 roundings (eps 6e-8) of those 1e-15 input differences, far below 1e-6.
    for name in ("loss", "kd_loss", "ce_loss"):
        assert packed[name].item() == pytest.approx(padded[name].item(), rel=1e-6), name


def test_second_backward_through_the_loss_is_refused():
    """Gradients are scaled in place in backward: a retained graph must not silently scale them twice."""
    head = torch.nn.Linear(8, 32)
    hidden = torch.randn(5, 8, requires_grad=True)
    loss, _, _ = chunked_distillation_loss(hidden, head, None, None, torch.randint(0, 32, (5,)), 0.0, 1.0)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
