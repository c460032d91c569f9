"""Packing (TRL's padding-free batches) against padded rows: the same rows give the same KD and CE losses whether the
collator flattens them into one packed row (position_ids restarting at 0 per row, cu_seq_lens_q/k and max_length_q/k,
no attention_mask) or pads them, under sdpa on the CPU and under flash_attention_2 on CUDA (skipped without CUDA or
flash-attn; scripts/gpu_check.sh runs this file on a lent GPU). A packed row stripped of its row boundaries must
differ, so the comparison can fail."""

import pytest
import torch
from conftest import CONVERSATIONS
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from data import CHATML_TEMPLATE, next_token_mask, tokenize_row
from heads import add_hidden_states_forward, final_layer, head_transform, teacher_hidden_at_counted_positions
from teacher_signal import LossTerms, TeacherHidden, add_distillation_forward, student_loss


def flash_attention_missing() -> str | None:
    if not torch.cuda.is_available():
        return "flash_attention_2 needs a CUDA device (none here); scripts/gpu_check.sh runs this test on one"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed (setup.sh installs it where CUDA exists)"
    return None


# float32 sdpa: the packed and padded computations are the same sums in another order, so they agree to float32
# rounding (~1e-6 relative per operation, a few layers deep). bf16 flash-attention: each rounding is up to 2^-9
# relative and the two kernels (varlen vs padded) order their sums differently, so a few bf16 ulps: 2e-2.
SETTINGS = [
    pytest.param("sdpa", "cpu", torch.float32, 1e-4, id="sdpa-cpu"),
    pytest.param("flash_attention_2", "cuda", torch.bfloat16, 2e-2, id="flash_attention_2-cuda",
                 marks=pytest.mark.skipif(flash_attention_missing() is not None, reason=str(flash_attention_missing()))),
]


def losses_of(batch, student, teacher, vocab_size):
    labels = batch.pop("labels")
    teacher_hidden = teacher_hidden_at_counted_positions(teacher, batch, labels, final_layer(teacher))
    with torch.no_grad():
        outputs = student_loss(
            student, dict(batch), labels, TeacherHidden(teacher_hidden, teacher.get_output_embeddings(),
                                                        head_transform(teacher)),
            LossTerms(kd_weight=0.5, ce_weight=0.5, num_items_in_batch=next_token_mask(labels).sum(),
                      divergence="forward_kl", temperature=2.0, vocab_size=vocab_size, memory_budget_mb=16),
        )
    return outputs["kd_loss"].float().item(), outputs["ce_loss"].float().item(), int(next_token_mask(labels).sum())


@pytest.mark.parametrize("attention,device,dtype,tolerance", SETTINGS)
def test_packed_batch_matches_padded_rows(assets, attention, device, dtype, tolerance):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tokenizer.chat_template = CHATML_TEMPLATE
    rows = [tokenize_row(row, tokenizer, "sharegpt", 64) for row in CONVERSATIONS[:4]]
    assert len({len(row["input_ids"]) for row in rows}) > 1, "rows of different lengths, so padding matters"

    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device)
        return model.eval()

    teacher, student = load(assets["teacher"]), load(assets["student"])
    add_hidden_states_forward(teacher)
    add_distillation_forward(student)

    def collate(padding_free):
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(rows)
        return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}

    packed, padded = collate(True), collate(False)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed and "cu_seq_lens_q" in packed
    packed_losses = losses_of(dict(packed), student, teacher, assets["vocab"])
    padded_losses = losses_of(padded, student, teacher, assets["vocab"])
    assert packed_losses[2] == padded_losses[2]  # the same counted positions
    assert packed_losses[:2] == pytest.approx(padded_losses[:2], rel=tolerance)

    # Control: the same packed row without its boundaries attends across rows and must not match.
    crossed = {key: packed[key] for key in ("input_ids", "labels")}
    crossed["position_ids"] = torch.arange(packed["input_ids"].shape[1], device=device)[None]
    crossed_losses = losses_of(crossed, student, teacher, assets["vocab"])
    assert crossed_losses[:2] != pytest.approx(padded_losses[:2], rel=10 * tolerance)
