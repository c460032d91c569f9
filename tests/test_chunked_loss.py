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
from conftest import tiny_config, watch_output_heads


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
    # CPU, float32 heads, forward KL: 2 buffers x 4 bytes per logit once a chunk outgrows one softmax block, whose
    # 2 float32 temporaries take CPU_BLOCK_BYTES each: (1 GiB - 16 MiB) / (8 bytes * 151936) = 869.9 -> 864.
    assert chunk_tokens_for_budget(151936, 1024) == 864
    # CUDA (a block is the whole chunk), bf16 buffers: 2 x 2 bytes + 4 float32 temporaries x 4 bytes = 20 bytes.
    assert chunk_tokens_for_budget(151936, 1024, torch.bfloat16, "cuda") == 352  # 1 GiB / (20 * 151936) = 353
    assert chunk_tokens_for_budget(151936, 1024, torch.float32, "cuda") == 432  # 2 x 4 + 2 x 4 = 16 bytes: 441
    assert chunk_tokens_for_budget(151936, 1024, torch.float32, "cuda", "jsd") == 144  # + 8 autograd temporaries: 147
    assert chunk_tokens_for_budget(151936, 1) == 16  # never below 16


def _tiny_problem(seed=0, tokens=40, hidden_size=16, vocab=96, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator))
    hidden = (torch.randn(tokens, hidden_size, generator=generator)).to(dtype).requires_grad_()
    teacher_head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator) * 1.5)
    teacher_hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return hidden, head, teacher_hidden, teacher_head, targets


def _float64_reference(logits, teacher_logits, targets, divergence, temperature, kd_weight, num_items):
    """kd_weight * KD + (1 - kd_weight) * CE from given logits, in float64, summed over tokens and divided by
    num_items; the logits are leaves of the graph, so the caller can chain gradients to the hidden states."""
    labels = torch.cat([torch.full((1,), -100), targets])[None]  # one leading row so every token counts
    student = torch.nn.functional.pad(logits.double(), (0, 0, 0, 1))[None]
    teacher = torch.nn.functional.pad(teacher_logits.double(), (0, 0, 0, 1))[None]
    kd = logit_distillation_loss(student, teacher, labels, divergence, temperature, num_items_in_batch=num_items)
    ce = causal_lm_loss(student, labels, num_items)
    return kd_weight * kd + (1 - kd_weight) * ce, kd


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_autocast_does_not_lower_the_softmax_arithmetic(divergence):
    """Under bf16 autocast the head matmuls run in bf16 (as the model's own head would), and everything after them
    in float32: the KD value equals a float64 computation on the same bf16 logits to float32 precision (autocast
    lowering the einsum to bf16 would be off by ~1e-3), and the gradients are within bf16 rounding."""
    hidden, head, teacher_hidden, teacher_head, targets = _tiny_problem()
    num_items = 57
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, kd, _ = chunked_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, 0.7, 0.3,
                                                num_items, divergence, 2.0)
    loss.backward()
    logits = (hidden.detach().bfloat16() @ head.weight.detach().bfloat16().t()).double().requires_grad_()
    teacher_logits = (teacher_hidden.bfloat16() @ teacher_head.weight.bfloat16().t()).double()
    want, want_kd = _float64_reference(logits, teacher_logits, targets, divergence, 2.0, 0.7, num_items)
    want.backward()
    want_hidden_grad = logits.grad @ head.weight.detach().double()
    assert abs(kd.item() - want_kd.item()) / want_kd.item() < 1e-5
    assert abs(loss.item() - want.item()) / want.item() < 1e-5
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert relative_error(hidden.grad.double(), want_hidden_grad) < 2e-2  # the logit gradient is stored in bf16


def test_fp16_gradients_survive_a_large_token_count_and_loss_scale():
    """fp16 heads and hidden states, N = 262,144 tokens in the step and GradScaler's initial scale 65,536: the
    per-logit gradient (~1e-10 once divided by N) would underflow fp16; it is kept unnormalised in the buffer and
    1/N and the scale are applied in float32. Gradients match a float64 reference within fp16 rounding."""
    hidden, head, teacher_hidden, teacher_head, targets = _tiny_problem(dtype=torch.float16)
    num_items, scale = 262_144, 65_536.0
    loss, _, _ = chunked_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, 0.5, 0.5, num_items,
                                           "reverse_kl", 1.0)
    (loss * scale).backward()
    logits = (hidden.detach().double() @ head.weight.detach().double().t()).requires_grad_()
    weight = head.weight.detach().double().requires_grad_()
    want, _ = _float64_reference(hidden.detach().double() @ weight.t(), teacher_hidden.double() @
                                 teacher_head.weight.double().t(), targets, "reverse_kl", 1.0, 0.5, num_items)
    (want * scale).backward()
    del logits
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()
    assert (head.weight.grad == 0).float().mean().item() == 0  # no entry lost to underflow
    assert relative_error(head.weight.grad.double(), weight.grad) < 3e-2


def test_no_gradient_work_in_evaluation_or_for_a_frozen_head(monkeypatch):
    """torch.no_grad() (evaluation) builds no gradient at all, and a frozen head (Spectrum) gets no (vocab, hidden)
    gradient accumulator, while the hidden states' gradient stays exact."""
    import losses

    hidden, head, teacher_hidden, teacher_head, targets = _tiny_problem()
    accumulated = []
    original = losses._addmm_fp32
    monkeypatch.setattr(losses, "_addmm_fp32", lambda *args: accumulated.append(1) or original(*args))
    written = []
    original_write = losses._write_logit_gradient
    monkeypatch.setattr(losses, "_write_logit_gradient", lambda *args: written.append(1) or original_write(*args))
    with torch.no_grad():
        loss, _, _ = chunked_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, 0.5, 0.5)
    assert not loss.requires_grad and written == [] and accumulated == []
    head.weight.requires_grad_(False)
    loss, _, _ = chunked_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, 0.5, 0.5)
    loss.backward()
    assert written and accumulated == [] and head.weight.grad is None
    got = hidden.grad.clone()
    hidden.grad = None
    want, _ = _float64_reference(hidden @ head.weight.t(), teacher_hidden @ teacher_head.weight.t(), targets,
                                 "forward_kl", 1.0, 0.5, targets.shape[0])
    want.backward()
    assert relative_error(got, hidden.grad) < 1e-5


def test_tied_head_gradient_equals_plain_autograd():
    """A head tied to the input embeddings (the default student's case) gets the sum of both paths' gradients."""
    torch.manual_seed(0)
    vocab, hidden_size = 64, 16
    embedding = torch.nn.Embedding(vocab, hidden_size)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    head.weight = embedding.weight  # tied, as tie_word_embeddings does
    mixer = torch.nn.Linear(hidden_size, hidden_size)
    teacher_head = torch.nn.Linear(24, vocab, bias=False)
    ids, targets, teacher_hidden = torch.randint(0, vocab, (30,)), torch.randint(0, vocab, (30,)), torch.randn(30, 24)
    grads = []
    for chunked in (True, False):
        embedding.zero_grad()
        hidden = torch.tanh(mixer(embedding(ids)))
        if chunked:
            loss, _, _ = chunked_distillation_loss(hidden, head, teacher_hidden, teacher_head, targets, 0.6, 0.4, 50,
                                                   "forward_kl", 2.0, memory_budget_mb=0.01)
        else:
            loss, _ = _float64_reference(head(hidden), teacher_head(teacher_hidden), targets, "forward_kl", 2.0, 0.6, 50)
        loss.backward()
        grads.append(embedding.weight.grad.clone())
    assert relative_error(grads[0], grads[1].float()) < 1e-5


def test_a_head_transform_the_loss_does_not_know_is_refused(assets):
    """A model whose forward does something between backbone and head that head_transform does not know (here a
    factor of 1.7) is refused with one clear error, instead of training on other logits."""
    from transformers import AutoModelForCausalLM

    from common import ConfigError
    from heads import add_hidden_states_forward, check_head_matches_forward

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.7

    model = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    add_hidden_states_forward(model)
    ids = torch.tensor([[5, 9, 17, 33, 40, 41]])
    check_head_matches_forward(model, model, ids, "student")  # the plain model passes
    scaled = ScaledHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    scaled.weight = model.lm_head.weight
    model.lm_head = scaled
    with pytest.raises(ConfigError, match="student's logits differ .* heads.head_transform"):
        check_head_matches_forward(model, model, ids, "student")


def test_training_never_calls_an_output_head(assets, tmp_path, monkeypatch):
    """Neither model builds (tokens, vocab) logits in a run: their output heads' forwards are called only by the
    one-time head check at the first step, on one row of at most 16 tokens."""
    calls = watch_output_heads(distil_logits, monkeypatch)
    trainer = distil_logits.main(tiny_config(assets, str(tmp_path / "out")))
    assert trainer.state.global_step == 3 and any("eval_kd_loss" in log for log in trainer.state.log_history)
    assert len(calls) == 2 and all(shape[:2] == (1, 16) for shape in calls), calls  # student and teacher, once


def test_packed_batch_gives_the_same_loss_as_padded_rows(assets):
    """Padding-free packing (TRL's collator, position_ids restart per row, no attention mask) must keep rows from
    attending to each other: the KD and CE sums equal those of the same rows padded into a batch."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from heads import add_hidden_states_forward, teacher_hidden_at_counted_positions
    from teacher_signal import LossTerms, TeacherHidden, add_distillation_forward, student_loss

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
                student, batch, labels, TeacherHidden(teacher_hidden, teacher.get_output_embeddings(), (1.0, None)),
                LossTerms(kd_weight=0.5, ce_weight=0.5, num_items_in_batch=30, divergence="forward_kl",
                          temperature=2.0, vocab_size=assets["vocab"], memory_budget_mb=512))

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
