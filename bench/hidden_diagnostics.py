"""Measurements for cross-tokenizer hidden-state KD (used by bench/cross_tokenizer_hidden.py --diagnose):

- alignment: the share of the student's predicting positions that get a teacher position, and what the compared
  positions predict (the same next token string on both sides, a template / special token on either side, the first
  position of a span whose state sits on a template token);
- scale: per mapped layer, the teacher's mean squared hidden unit at the compared positions (the mse hidden loss of a
  student that outputs zeros), and the hidden loss and CE of the run;
- gradients: on the student's own weights (not the projections), the norm of the gradient of H and of CE, the
  weighted norms alpha * |dH| and (1 - alpha) * |dCE|, and the cosine between dH and dCE, at init and after training.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

import distil_hidden


def alignment_report(trainer, teacher_name: str) -> dict:
    student_tokenizer = trainer.processing_class
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name)
    special_student = set(student_tokenizer.all_special_ids)
    special_teacher = set(teacher_tokenizer.all_special_ids)
    counts = dict(predicting=0, aligned=0, same_next=0, special_next=0, template_state=0, next_pair_aligned=0)
    for row in trainer.train_dataset:
        ids, labels, teacher_ids = row["input_ids"], row["labels"], row["teacher_input_ids"]
        counts["predicting"] += sum(label != -100 for label in labels[1:])
        pairs = set(zip(row["student_positions"], row["teacher_positions"]))
        for s, t in zip(row["student_positions"], row["teacher_positions"]):
            counts["aligned"] += 1
            counts["next_pair_aligned"] += (s + 1, t + 1) in pairs  # what positions: same_next_token keeps
            student_next, teacher_next = ids[s + 1], teacher_ids[t + 1]
            if student_tokenizer.decode([student_next]) == teacher_tokenizer.decode([teacher_next]):
                counts["same_next"] += 1
            if student_next in special_student or teacher_next in special_teacher:
                counts["special_next"] += 1
            if labels[s] == -100:  # the compared state sits on a template token (the header before the reply)
                counts["template_state"] += 1
    aligned = max(counts["aligned"], 1)
    report = {
        "aligned share of predicting positions": counts["aligned"] / max(counts["predicting"], 1),
        "same next token string": counts["same_next"] / aligned,
        "next token special (end-of-turn marker)": counts["special_next"] / aligned,
        "state on a template token (span start)": counts["template_state"] / aligned,
        "kept by positions=same_next_token": counts["next_pair_aligned"] / aligned,
    }
    return report


def _student_parameters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(distil_hidden.PROJECTIONS_ATTRIBUTE)]


def gradient_report(trainer, batches: int = 2) -> dict:
    """Gradients of H and CE on the student's weights, summed over the first `batches` training batches."""
    model, saved = trainer.model, trainer.distillation
    was_training = model.training
    model.eval()  # per-batch normalisers (no optimizer-step count); no dropout in these models either way
    loader = iter(trainer.get_train_dataloader())
    data = [next(loader) for _ in range(batches)]
    parameters = _student_parameters(model)
    grads, values = {}, {}
    for part, alpha in (("hidden", 1.0), ("ce", 0.0)):
        trainer.distillation = {**saved, "alpha": alpha}
        model.zero_grad(set_to_none=True)
        total = 0.0
        for batch in data:
            loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
            loss.backward()
            total += (loss if part == "hidden" else outputs["ce_loss"]).item()
        values[part] = total / batches
        grads[part] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
    trainer.distillation = saved
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    trainer.loss_log.pop_means("eval")
    alpha = saved["alpha"]
    g_h, g_ce = grads["hidden"].norm().item(), grads["ce"].norm().item()
    return {
        "H": values["hidden"], "CE": values["ce"], "|dH|": g_h, "|dCE|": g_ce,
        "alpha*|dH|": alpha * g_h, "(1-alpha)*|dCE|": (1 - alpha) * g_ce,
        "cos(dH, dCE)": torch.nn.functional.cosine_similarity(grads["hidden"], grads["ce"], dim=0).item(),
    }


def teacher_scale_report(trainer, batches: int = 2) -> dict:
    """Per mapped teacher layer: mean over compared positions of the teacher's mean squared hidden unit."""
    loader = iter(trainer.get_train_dataloader())
    sums: dict[int, float] = {}
    count = 0
    for _ in range(batches):
        batch = next(loader)
        rows, _, teacher_positions = trainer.aligned_positions(batch)
        hidden = trainer.teacher_hidden_states(batch)
        for _, layer in trainer.layer_pairs:
            sums[layer] = sums.get(layer, 0.0) + hidden[layer][rows, teacher_positions].float().pow(2).mean(-1).sum().item()
        count += rows.numel()
    return {f"teacher layer {layer} mean square": value / max(count, 1) for layer, value in sums.items()}


class DiagnosedTrainer(distil_hidden.HiddenStatesTrainer):
    """HiddenStatesTrainer that prints the measurements above before and after training."""

    teacher_name = None

    def train(self, *args, **kwargs):
        if not self.shared_tokenizer:
            print("DIAG alignment:", {k: round(v, 3) for k, v in alignment_report(self, self.teacher_name).items()},
                  flush=True)
        print("DIAG teacher scale:", {k: round(v, 3) for k, v in teacher_scale_report(self).items()}, flush=True)
        print("DIAG gradients at init:", {k: round(v, 4) for k, v in gradient_report(self).items()}, flush=True)
        result = super().train(*args, **kwargs)
        print("DIAG gradients after training:", {k: round(v, 4) for k, v in gradient_report(self).items()}, flush=True)
        logs = [(log["step"], round(log["hidden_loss"], 4), round(log["ce_loss"], 4))
                for log in self.state.log_history if "hidden_loss" in log and "ce_loss" in log]
        print("DIAG (step, hidden_loss, ce_loss) over training:", logs, flush=True)
        return result


def run_with_diagnostics(config: dict):
    original = distil_hidden.HiddenStatesTrainer
    DiagnosedTrainer.teacher_name = config["models"]["teacher"]
    distil_hidden.HiddenStatesTrainer = DiagnosedTrainer
    try:
        return distil_hidden.main(config)
    finally:
        distil_hidden.HiddenStatesTrainer = original
