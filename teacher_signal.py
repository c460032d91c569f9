"""What the teacher says about a batch, and the student's loss against it.

The trainers ask one object, a `TeacherSignal`, for the teacher's side of every micro-batch:

    signal.setup(trainer)           once, when the trainer is built: put the teacher where the student's engine runs
    signal.prepare(batches)         an optimizer step's micro-batches, before the first of them trains
    answer = signal.signal(batch, mode)   per micro-batch: what the student's loss compares it with

One implementation per source of the teacher's knowledge:
- `InProcessTeacher`: the teacher runs next to the student on the student's own tokens;
- `CapturedTopK`: `offline.mode: train`, the teacher's top-k stored by a capture (offline.py); no teacher loaded;
- `CrossTokenizerTeacher`: `distillation.cross_tokenizer`, the teacher reads its own tokenization of each row.
- `ServedTopK`: `teacher_server.url`, the teacher's top-k log-probabilities from a vLLM server (served_teacher.py);
  its `prepare` sends the step's first micro-batches so that they are answered while the student trains, and its
  `signal` waits for the answer and returns a `TopK`, as a capture does. No teacher weights in this process.

An answer is one of `TeacherHidden`, `TopK`, `AlignedPairs` (or `NoTeacher`), and knows the student's loss against
it: `answer.student_loss(...)` runs inside the student's own forward (`add_distillation_forward`), where DDP and
DeepSpeed's hooks run, and calls the chunked kernels of losses.py and cross_tokenizer_loss.py.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch

import losses
from alignment import span_continuations
from cross_tokenizer_loss import chunked_cross_tokenizer_kd, sorted_l1_top_k
from data import next_token_mask
from distributed import place_teacher, teacher_head_for_loss
from heads import (add_hidden_states_forward, check_head_matches_forward, final_layer, gathered_head, head_transform,
                   teacher_hidden_at_counted_positions)
from on_policy import NOT_MODEL_INPUTS as ON_POLICY_KEYS
from projections import projection_key
from served_teacher import ServedTeacher, counted_topk, rows_to_send, run_startup_checks

# Batch keys that are never the student's model inputs, besides every `teacher_*` and `student_*` key (alignment.py).
NOT_MODEL_INPUTS = ("labels", "capture_row", *ON_POLICY_KEYS)


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of a model forward on the student's tokens: the batch without labels, the teacher's
    columns, the alignment, the capture row numbers and the on-policy prompts."""
    inputs = {key: value for key, value in batch.items()
              if key not in NOT_MODEL_INPUTS and not key.startswith(("teacher_", "student_"))}
    inputs["use_cache"] = False
    return inputs


# ---------------------------------------------------------------------------------------------------------------------
# Answers: what the teacher said about one micro-batch, and the student's loss against it
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossTerms:
    """How one micro-batch's loss weighs and normalises its terms: kd_weight * KD + ce_weight * CE, each summed over
    the counted positions and divided by `num_items_in_batch` (the step's N); the rest as in
    losses.chunked_distillation_loss."""

    kd_weight: float
    ce_weight: float
    num_items_in_batch: int | torch.Tensor
    divergence: str
    temperature: float
    vocab_size: int
    memory_budget_mb: float
    beta: float = 0.5
    skew: float = 0.1


class NoTeacher:
    """No teacher signal (plain SFT, or distil_hidden.py without its logit term): the kernel computes CE only."""

    def teacher_head(self) -> torch.nn.Module | None:
        """The teacher's output head that the loss multiplies by (gathered with the student's under ZeRO-3)."""
        return None

    def kernel_teacher(self) -> dict:
        """The teacher's arguments of losses.chunked_distillation_loss."""
        return {"teacher_hidden": None, "teacher_head": None, "teacher_transform": (1.0, None), "stored_topk": None}

    def student_loss(self, hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None], *,
                     labels: torch.Tensor, terms: LossTerms) -> dict:
        """{loss (with gradients), kd_loss, ce_loss} of the student's final hidden states (batch, seq, H) and head."""
        with gathered_head(head, self.teacher_head()):  # ZeRO-3 partitions the heads; gathered for the loss only
            loss, kd_loss, ce_loss = self._kernel(hidden, head, transform, labels, terms)
        return {"loss": loss, "kd_loss": kd_loss, "ce_loss": ce_loss}

    def _kernel(self, hidden, head, transform, labels, terms: LossTerms):
        mask = next_token_mask(labels)
        # Through the module attribute, so that a test or benchmark can swap the kernel.
        return losses.chunked_distillation_loss(
            hidden[:, :-1][mask], head, targets=labels[:, 1:][mask], student_transform=transform,
            kd_weight=terms.kd_weight, ce_weight=terms.ce_weight, num_items_in_batch=terms.num_items_in_batch,
            divergence=terms.divergence, temperature=terms.temperature, vocab_size=terms.vocab_size, beta=terms.beta,
            skew=terms.skew, memory_budget_mb=terms.memory_budget_mb, **self.kernel_teacher())


@dataclasses.dataclass
class TeacherHidden(NoTeacher):
    """The teacher's final hidden states at the counted positions (N, Ht), its output head and `head_transform`: the
    kernel builds the teacher's logits chunk by chunk next to the student's."""

    hidden: torch.Tensor
    head: torch.nn.Module
    transform: tuple[float, float | None]

    def teacher_head(self) -> torch.nn.Module:
        return self.head

    def kernel_teacher(self) -> dict:
        return {"teacher_hidden": self.hidden, "teacher_head": self.head, "teacher_transform": self.transform,
                "stored_topk": None}


@dataclasses.dataclass
class TopK(NoTeacher):
    """The teacher's top-k at the counted positions, at the distillation temperature: ids (N, k), log-probabilities
    (N, k) and the mass outside them (N,). KD is taken over the k tokens plus one bucket for the rest."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail: torch.Tensor

    def kernel_teacher(self) -> dict:
        return {**super().kernel_teacher(), "stored_topk": (self.ids, self.log_probs, self.tail)}


@dataclasses.dataclass
class AlignedPairs(NoTeacher):
    """A teacher with another tokenizer: the aligned pairs of the micro-batch and everything
    cross_tokenizer_loss.chunked_cross_tokenizer_kd reads (`pairs`, built by `CrossTokenizerTeacher.signal`). The
    kernel computes CE; KD is taken over the pairs."""

    pairs: dict

    def teacher_head(self) -> torch.nn.Module:
        return self.pairs["teacher_head"]

    def student_loss(self, hidden, head, transform, *, labels, terms: LossTerms) -> dict:
        with gathered_head(head, self.teacher_head()):
            loss, _, ce_loss = self._kernel(hidden, head, transform, labels, terms)  # no teacher here: CE only
            kd_sum = chunked_cross_tokenizer_kd(
                hidden, head, {**self.pairs, "student_transform": transform}, terms.temperature, terms.vocab_size,
                terms.divergence, terms.beta, terms.skew, terms.memory_budget_mb)
            # T^2 is inside kd_sum, on the hybrid's matched term only (cross_tokenizer_divergence)
            kd_loss = losses.per_item_mean(kd_sum, terms.num_items_in_batch)
            loss = loss + terms.kd_weight * kd_loss
        return {"loss": loss, "kd_loss": kd_loss.detach(), "ce_loss": ce_loss}


def add_distillation_forward(model: torch.nn.Module, projections_attribute: str | None = None) -> None:
    """Let `model(..., student_loss=f)` run the backbone and return f(final hidden states, output head, head
    transform) instead of building logits, and `model(..., project_hidden={...})` also return projected intermediate
    states (distil_hidden.py).

    The loss and the projections run inside the model's forward on purpose: DDP and DeepSpeed hook the forward
    (gradient sync, ZeRO-3 parameter gathering), and a loss computed outside it on the raw head weight would bypass
    them. Without these arguments the forward is the original one, so generation and saving are unchanged. Call it
    through `student_loss`.
    """
    original_forward = model.forward
    transform = head_transform(model)

    def forward(self, *args, student_loss=None, project_hidden: dict | None = None, **kwargs):
        if student_loss is None and project_hidden is None:
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
        if student_loss is not None:
            result.update(student_loss(outputs.last_hidden_state, self.get_output_embeddings(), transform))
        return result

    model.forward = types.MethodType(forward, model)


def student_loss(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, answer: NoTeacher | None,
                 terms: LossTerms, project_hidden: dict | None = None) -> dict:
    """Run the student (patched by `add_distillation_forward`) on `inputs` and return its loss parts against the
    teacher's `answer` (None: no teacher): `loss` (kd_weight * KD + ce_weight * CE, with gradients), `kd_loss`,
    `ce_loss`, and `projected_hidden` when `project_hidden` is given."""
    answer = NoTeacher() if answer is None else answer
    return model(**inputs, project_hidden=project_hidden,
                 student_loss=functools.partial(answer.student_loss, labels=labels, terms=terms))


# ---------------------------------------------------------------------------------------------------------------------
# Sources: where the teacher's signal comes from
# ---------------------------------------------------------------------------------------------------------------------


class TeacherSignal:
    """What the teacher says about each micro-batch: the interface the trainers call (module docstring)."""

    module = placed = None  # the bare teacher and what the engine runs, for a source that holds one in-process

    def setup(self, trainer) -> None:
        """Once, from the trainer's __init__ (its accelerator exists, the models are not yet prepared)."""

    def prepare(self, batches: list[dict]) -> None:
        """The coming optimizer step's micro-batches (after on-policy sampling replaced any), before the first of them
        trains; `signal` is then called for them in this order. Evaluation batches are never prepared. An in-process
        source computes nothing ahead."""

    def signal(self, batch: dict, mode: str) -> NoTeacher:
        """The teacher's answer for a collated micro-batch; `mode` is "train" or "eval"."""
        raise NotImplementedError

    def check_head(self, batch: dict, mixed_precision: bool) -> None:
        """At the first step: the teacher's part of the head check (heads.check_head_matches_forward), if it runs an
        output head's weights in this process."""

    def pop_logs(self) -> dict[str, float]:
        """What the trainer logs about this source since its last log (a remote teacher's wait), per optimizer step."""
        return {}


class InProcessTeacher(TeacherSignal):
    """The teacher in the training processes, reading the student's tokens: its final hidden states at the counted
    positions and its head (`TeacherHidden`). `needs_head=False` (distil_hidden.py without a logit term) places it
    for its hidden states only."""

    def __init__(self, teacher: torch.nn.Module, needs_head: bool = True):
        self.module, self.needs_head = teacher, needs_head
        self.head, self.transform, self.final_layer = None, (1.0, None), final_layer(teacher)

    def setup(self, trainer) -> None:
        add_hidden_states_forward(self.module)  # before any wrapping, so that the engines call the patched forward
        self.placed = place_teacher(self.module, trainer)
        if self.needs_head:
            self.head = teacher_head_for_loss(self.module, trainer.accelerator.device)
            self.transform = head_transform(self.module)

    def hidden_states(self, inputs: dict, layers: list[int]) -> tuple:
        """The teacher's hidden states at these `hidden_layers` indices (None at the others); the backbone only."""
        with torch.no_grad():
            return self.placed(**inputs, hidden_layers=layers)

    def signal(self, batch: dict, mode: str) -> TeacherHidden:
        hidden = teacher_hidden_at_counted_positions(self.placed, model_inputs(batch), batch["labels"], self.final_layer)
        return TeacherHidden(hidden, self.head, self.transform)

    def head_check_row(self, batch: dict) -> torch.Tensor:
        return batch["input_ids"][:1, :16]

    def check_head(self, batch: dict, mixed_precision: bool) -> None:
        if self.head is not None:
            check_head_matches_forward(self.placed, self.module, self.head_check_row(batch), "teacher", mixed_precision)


class CapturedTopK(TeacherSignal):
    """`offline.mode: train`: the teacher's stored top-k of each row (offline.TopKReader per split, read by the
    `capture_row` column of offline.CaptureRowCollator); the teacher is never loaded."""

    def __init__(self, readers: dict, vocab_size: int):
        self.readers, self.vocab_size = readers, vocab_size

    @classmethod
    def from_capture(cls, config: dict, tokenizer, vocab_size: int, splits: dict) -> "CapturedTopK":
        """Open config["offline"]["capture_dir"] for the datasets in `splits`, refusing a capture that does not match
        this run (its manifest against this config, tokenizer and data). `vocab_size` becomes the capture's."""
        from offline import TopKCapture, TopKCodec, capture_settings, check_capture_manifest

        capture = TopKCapture(config["offline"]["capture_dir"])
        manifest = capture.manifest()
        expected = capture_settings(config, tokenizer, manifest["vocab_size"] if manifest else vocab_size, splits)
        check_capture_manifest(manifest, expected, capture.folder, for_training=True)
        codec = TopKCodec(manifest["vocab_size"], manifest["top_k"])
        return cls({split: capture.load(split, dataset, codec) for split, dataset in splits.items()},
                   manifest["vocab_size"])

    def signal(self, batch: dict, mode: str) -> TopK:
        return TopK(*self.readers[mode].batch(batch["capture_row"].tolist(), batch["labels"].device))


class ServedTopK(TeacherSignal):
    """`teacher_server.url`: the teacher's top-k from a vLLM server (served_teacher.ServedTeacher), in the capture's
    form (`TopK`), so that the loss takes the same top-k path as `offline.mode: train`. This process holds no teacher.

    Requests go out ahead of need: `prepare` sends the step's first 1 + `prefetch` micro-batches, and each `signal`
    sends the one `prefetch` places further before waiting for its own, so that `prefetch` micro-batches are answered
    while the student trains on the current one. Each process sends only the rows of its own micro-batches.
    `checks`: run_startup_checks's texts, student_ids and max_length (the first rendered rows), run in `setup`."""

    def __init__(self, teacher: ServedTeacher, vocab_size: int, temperature: float, prefetch: int, checks: dict):
        self.teacher, self.vocab_size, self.temperature, self.prefetch = teacher, vocab_size, temperature, prefetch
        self.checks = checks
        self.pending: list[list[list[int]]] = []  # the prepared micro-batches' rows, in training order
        self.futures: list = []  # their requests, sent for the first len(futures) of them
        self.steps = 0  # optimizer steps prepared since the last log

    def setup(self, trainer) -> None:
        self.device = trainer.accelerator.device
        run_startup_checks(self.teacher, self.vocab_size, **self.checks)

    def _send_ahead(self, count: int) -> None:
        while len(self.futures) < min(count, len(self.pending)):
            self.futures.append(self.teacher.submit(self.pending[len(self.futures)]))

    def prepare(self, batches: list[dict]) -> None:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} prepared micro-batches were never trained on")
        self.pending = [rows_to_send(batch["input_ids"], batch.get("attention_mask")) for batch in batches]
        self.futures, self.steps = [], self.steps + 1
        self._send_ahead(1 + self.prefetch)

    def signal(self, batch: dict, mode: str) -> TopK:
        rows = rows_to_send(batch["input_ids"], batch.get("attention_mask"))
        if mode == "eval" or not self.pending:  # evaluation batches are never prepared: asked when reached
            answers = self.teacher.wait(self.teacher.submit(rows))
        else:
            self._send_ahead(1 + self.prefetch)
            sent, future = self.pending.pop(0), self.futures.pop(0)
            self._send_ahead(self.prefetch)
            if sent != rows:  # never another micro-batch's answer
                raise RuntimeError("the micro-batch being trained is not the next prepared one")
            answers = self.teacher.wait(future)
        return TopK(*counted_topk(answers, batch["labels"], self.teacher.top_k, self.temperature, self.vocab_size,
                                  batch["labels"].device))

    def pop_logs(self) -> dict[str, float]:
        steps, self.steps = max(self.steps, 1), 0
        return {"teacher_wait_s": self.teacher.pop_wait_s() / steps}


class CrossTokenizerTeacher(InProcessTeacher):
    """`distillation.cross_tokenizer`: the teacher reads its own tokenization of each row (alignment.PairedCollator of
    alignment.tokenize_row_for_logits rows), and KD is taken over the aligned pairs (`AlignedPairs`).

    `shared_ids` are alignment.shared_vocabulary's (student ids, teacher ids), `student_vocab` and `teacher_vocab`
    the two tokenizers' sizes, `distillation` the config block (method and hybrid weights)."""

    def __init__(self, teacher: torch.nn.Module, shared_ids: tuple, student_vocab: int, teacher_vocab: int,
                 distillation: dict):
        super().__init__(teacher)
        self.shared_ids, self.distillation = shared_ids, distillation
        self.student_vocab, self.teacher_vocab = student_vocab, teacher_vocab

    def setup(self, trainer) -> None:
        # On the device once, not copied there at every chunk of every step.
        self.shared_ids = tuple(ids.to(trainer.accelerator.device) for ids in self.shared_ids)
        super().setup(trainer)

    def head_check_row(self, batch: dict) -> torch.Tensor:
        return batch["teacher_input_ids"][:1, :16]

    def signal(self, batch: dict, mode: str) -> AlignedPairs:
        """The aligned pairs and the teacher's final hidden states there (backbone only, on its own tokens); with
        `cross_tokenizer_max_piece_tokens` > 1 also each side's next token and the following tokens of pieces that a
        side writes with several tokens, with the teacher's hidden states at those."""
        valid = batch["student_positions"] >= 0
        rows, positions = valid.nonzero(as_tuple=True)[0], batch["student_positions"][valid]
        teacher_positions = batch["teacher_positions"][valid]
        teacher_hidden = self.hidden_states({"input_ids": batch["teacher_input_ids"], "use_cache": False,
                                             "attention_mask": batch["teacher_attention_mask"]},
                                            [self.final_layer])[self.final_layer]
        distillation = self.distillation
        pieces = None
        if distillation["cross_tokenizer_max_piece_tokens"] > 1:
            student_tokens, teacher_tokens = batch["student_span_tokens"][valid], batch["teacher_span_tokens"][valid]
            owner, continuation_rows, continuation_positions, targets = span_continuations(
                rows, positions, student_tokens, batch["input_ids"])
            teacher_owner, teacher_rows, teacher_continuation, teacher_targets = span_continuations(
                rows, teacher_positions, teacher_tokens, batch["teacher_input_ids"])
            pieces = {
                "merged": (student_tokens > 1) | (teacher_tokens > 1),
                "student_next": batch["input_ids"][rows, positions + 1],
                "teacher_next": batch["teacher_input_ids"][rows, teacher_positions + 1],
                "continuation_owner": owner, "continuation_rows": continuation_rows,
                "continuation_positions": continuation_positions, "continuation_targets": targets,
                "teacher_continuation_hidden": teacher_hidden[teacher_rows, teacher_continuation],
                "teacher_continuation_owner": teacher_owner, "teacher_continuation_targets": teacher_targets,
            }
        return AlignedPairs({
            "rows": rows, "positions": positions, "pieces": pieces,
            "teacher_hidden": teacher_hidden[rows, teacher_positions],
            "teacher_head": self.head, "teacher_transform": self.transform,
            "teacher_vocab": self.teacher_vocab, "shared_ids": self.shared_ids,
            "method": distillation["cross_tokenizer"],
            "top_k": sorted_l1_top_k(self.student_vocab, self.teacher_vocab),
            "matched_weight": distillation["hybrid_matched_weight"],
            "unmatched_weight": distillation["hybrid_unmatched_weight"],
        })
