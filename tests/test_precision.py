"""Precision and tied heads, end to end through distil_logits.main on the CPU: one plain-SGD step of a student whose
head is tied to its embeddings equals an independent full-logits reference (the model's own logits, then
losses.logit_distillation_loss and losses.causal_lm_loss, plain autograd) for forward and reverse KL; `bf16: true`
really autocasts (a bf16-sized difference from that float32 reference, not a float32-sized one); one AdamW step at
lr 2e-5 with `bf16: true` changes at least 99% of the student's matrix weights (float32 master weights), and the
pure-bf16 option keeps the lost part of each update in its Kahan buffers; precision settings that cannot work are
refused before anything is loaded; the saved tied student reloads tied; and 2-process DeepSpeed ZeRO-3, which
gathers the tied head for the loss, trains a tied student as one process does."""

import json
import os

import pytest
import torch
from conftest import CONVERSATIONS, tiny_config
from transformers import AutoModelForCausalLM

import distil_logits
from common import ConfigError
from data import next_token_mask
from losses import causal_lm_loss, logit_distillation_loss


@pytest.fixture(scope="module")
def tied_student(assets, tmp_path_factory):
    """The tiny student of conftest with its head tied to its input embeddings (Qwen2-1.5B's layout)."""
    import shutil

    from transformers import AutoConfig

    folder = str(tmp_path_factory.mktemp("tied_student"))
    model_config = AutoConfig.from_pretrained(assets["student"])
    model_config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(model_config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(folder)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), folder)
    return folder


@pytest.fixture(scope="module")
def four_rows(tmp_path_factory):
    """The four distinct conversations: one batch of 4 is the whole dataset, so one step sees exactly these rows."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS[:4]))
    return str(path)


def one_step_config(assets, student, rows, output_dir, **training):
    """One optimizer step over all four rows in one micro-batch, no clipping, no schedule, no evaluation."""
    config = tiny_config(assets, output_dir)
    config["dataset"].update(name=rows, eval_size=0)
    config["models"]["student"] = student
    config["training"].update(max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", eval_strategy="no",
                              bf16=False, activation_checkpointing=True)
    config["training"].update(training)
    return config


def reference_sgd_step(trainer, student_path, teacher_path, config) -> dict:
    """Parameters after one plain-SGD step computed independently of the chunked loss: float32 models from disk, their
    full logits on the trainer's one batch, the reference loss formulas, and autograd."""
    distillation, lr = config["distillation"], config["training"]["learning_rate"]
    batch = trainer.data_collator(list(trainer.train_dataset))
    labels = batch.pop("labels")
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student_logits = student(**batch, use_cache=False).logits
    with torch.no_grad():
        teacher_logits = teacher(**batch, use_cache=False).logits
    count = next_token_mask(labels).sum()
    alpha = distillation["alpha"]
    kd = logit_distillation_loss(student_logits, teacher_logits, labels, distillation["divergence"],
                                 distillation["temperature"], trainer.vocab_size, count)
    loss = alpha * kd + (1 - alpha) * causal_lm_loss(student_logits, labels, count)
    loss.backward()
    return {name: (p.detach() - lr * p.grad, p.detach().clone()) for name, p in student.named_parameters()}


def update_error(trainer, reference) -> float:
    """Worst relative difference of the updates, max |got - reference| / max |reference| per parameter (tied ones
    counted once), after allowing for the float32 rounding of the new weights on each side (eps |w| in all): an update
    of 5e-5 on a weight of 0.07 is itself rounded at ~1e-4 relative."""
    got = dict(trainer.model.named_parameters())
    assert set(got) == set(reference)
    worst = 0.0
    for name, (want, before) in reference.items():
        got_update, want_update = got[name].detach().float() - before, want - before
        rounding = torch.finfo(torch.float32).eps * want.abs()
        excess = ((got_update - want_update).abs() - rounding).clamp(min=0)
        worst = max(worst, (excess.max() / want_update.abs().max()).item())
    return worst


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_tied_student_sgd_step_equals_full_logits_reference(assets, tied_student, four_rows, tmp_path, divergence):
    """The chunked loss's gradient on the shared embedding/head matrix is the sum of both uses' gradients."""
    config = one_step_config(assets, tied_student, four_rows, str(tmp_path / "out"), optim="sgd", learning_rate=0.5,
                             weight_decay=0.0)
    config["distillation"]["divergence"] = divergence
    trainer = distil_logits.main(config)
    model = trainer.model
    assert model.is_gradient_checkpointing  # the shipped default, recomputing each block in backward
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # float32 on both sides: the chunked and full-logits gradients agree within 1e-5 (test_chunked_loss.py).
    error = update_error(trainer, reference_sgd_step(trainer, tied_student, assets["teacher"], config))
    assert error < 1e-5  # measured 3e-7 (forward KL) and 4e-7 (reverse KL)
    reloaded = AutoModelForCausalLM.from_pretrained(config["training"]["output_dir"])
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight,
                               rtol=0, atol=0)


def test_bf16_autocasts_on_the_cpu(assets, tied_student, four_rows, tmp_path):
    """`bf16: true` on the CPU autocasts the student (float32 weights): its SGD step differs from the float32 reference
    by bf16 rounding (eps 7.8e-3, so ~1e-3 to 1e-2 in the gradients), not by float32 rounding (~1e-6)."""
    config = one_step_config(assets, tied_student, four_rows, str(tmp_path / "out"), optim="sgd", learning_rate=0.5,
                             weight_decay=0.0, bf16=True)
    trainer = distil_logits.main(config)
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # float32 master weights
    error = update_error(trainer, reference_sgd_step(trainer, tied_student, assets["teacher"], config))
    print(f"bf16 SGD update error against the float32 reference: {error:.3g}")
    # measured 1.28e-2 (2026-12-04, with or without activation checkpointing), against 3e-7 for float32: half to twice
    assert 6e-3 < error < 2.6e-2, error


def matrix_fraction_changed(before: dict, after: dict) -> float:
    changed = total = 0
    for name, value in before.items():
        if value.ndim >= 2:
            changed += (after[name].float() != value.float()).sum().item()
            total += value.numel()
    return changed / total


def test_bf16_adamw_step_changes_almost_every_weight(assets, tied_student, four_rows, tmp_path, monkeypatch):
    """At lr 2e-5 an AdamW step is ~2e-5 per weight, below half a bf16 ulp of a weight of ~0.02 (6e-5): bf16 weights
    (the behaviour before: the student loaded in bf16, torch's AdamW) keep most of them unchanged; float32 master
    weights (ulp ~2e-9) change in every entry with a gradient or weight decay."""
    import common

    before = {name: p.detach().clone() for name, p in AutoModelForCausalLM.from_pretrained(tied_student).named_parameters()}
    config = one_step_config(assets, tied_student, four_rows, str(tmp_path / "out"), learning_rate=2e-5, bf16=True)
    master = matrix_fraction_changed(before, dict(distil_logits.main(config).model.named_parameters()))
    model_dtype = common.model_dtype
    monkeypatch.setattr(common, "model_dtype", lambda config, trainable=True: torch.bfloat16 if trainable
                        else model_dtype(config, trainable))
    config = one_step_config(assets, tied_student, four_rows, str(tmp_path / "old"), learning_rate=2e-5, bf16=True)
    rounded_before = {name: value.to(torch.bfloat16) for name, value in before.items()}
    old = matrix_fraction_changed(rounded_before, dict(distil_logits.main(config).model.named_parameters()))
    print(f"share of matrix weights one AdamW step at lr 2e-5 changes: float32 master {master:.4f}, bf16 weights {old:.4f}")
    assert master >= 0.99 and old < 0.5


def test_bf16_student_weights_keep_the_lost_update_in_kahan_buffers(assets, tied_student, four_rows, tmp_path):
    """model_config.student_dtype: bfloat16 trains bf16 weights with optimi's AdamW and Kahan summation: the rounded
    weights move in a fraction of entries, weight + compensation (the update actually applied) in nearly all."""
    pytest.importorskip("optimi", reason="torch-optimi is in requirements.txt; this environment lacks it")
    loaded = AutoModelForCausalLM.from_pretrained(tied_student, dtype=torch.bfloat16)
    before = {name: p.detach().clone() for name, p in loaded.named_parameters()}
    config = one_step_config(assets, tied_student, four_rows, str(tmp_path / "out"), learning_rate=2e-5, bf16=True)
    config["model_config"]["student_dtype"] = "bfloat16"
    trainer = distil_logits.main(config)
    assert type(trainer.optimizer.optimizer).__module__.startswith("optimi")
    parameters = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in parameters.values())
    compensated = {name: p.detach().float() + trainer.optimizer.state[p]["kahan_comp"].float()
                   for name, p in parameters.items()}
    rounded, applied = matrix_fraction_changed(before, parameters), matrix_fraction_changed(before, compensated)
    print(f"share of matrix weights changed by one Kahan-summed AdamW step: rounded {rounded:.4f}, with buffer {applied:.4f}")
    assert rounded < 0.9 and applied >= 0.99


@pytest.mark.parametrize("settings,message", [
    ({"model_config": {"student_dtype": "float16"}}, "student_dtype must be float32 or bfloat16"),
    ({"model_config": {"student_dtype": "bfloat16"}}, "needs training.bf16: true"),
    ({"model_config": {"student_dtype": "bfloat16"}, "training": {"bf16": True, "optim": "sgd"}}, "Kahan"),
    ({"training": {"fp16": True}}, "fp16 needs a CUDA device"),
])
def test_unusable_precision_is_refused_before_loading(assets, tmp_path, settings, message):
    if "fp16" in settings.get("training", {}) and torch.cuda.is_available():
        pytest.skip("fp16 runs where CUDA exists")
    config = tiny_config(assets, str(tmp_path / "out"))
    config["training"]["bf16"] = False
    config["models"]["student"] = str(tmp_path / "never-loaded")
    for key, values in settings.items():
        config[key] = {**config[key], **values}
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not os.path.exists(config["training"]["output_dir"])


@pytest.mark.slow
def test_zero3_two_processes_train_a_tied_student_as_one_process(assets, tied_student, tmp_path):
    """Under ZeRO-3 the tied matrix is partitioned; the loss gathers it as the head (maybe_gather_lm_head_ctx) while
    the embedding lookup gathers it too, and both gradients must reach the one partitioned parameter: the same losses
    and weights as one process (1e-4, as tests/test_multiprocess.py allows for ZeRO-3's reductions), saved tied."""
    from test_multiprocess import assert_same_run, launch, overrides_file

    single, _ = overrides_file(assets, tmp_path, "single", accumulation=4)
    single["models"]["student"] = tied_student
    distil_logits.main(single)
    zero3, path = overrides_file(assets, tmp_path, "zero3", accumulation=2)
    overrides = json.load(open(path))
    overrides["models"]["student"] = tied_student
    json.dump(overrides, open(path, "w"))
    log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2"], path)
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in log
    assert_same_run(zero3["training"]["output_dir"], single["training"]["output_dir"], 1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(zero3["training"]["output_dir"])
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


@pytest.fixture(scope="module")
def bf16_valued_student(assets, tmp_path_factory):
    """The tiny student with every weight rounded to bf16 and saved in float32: loaded as float32 or as bfloat16 it
    starts from the same values."""
    import shutil

    folder = str(tmp_path_factory.mktemp("bf16_valued_student"))
    model = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), folder)
    return folder


def accumulated_gradients(config: dict, monkeypatch, names: dict | None = None) -> dict[str, torch.Tensor]:
    """The student's gradients as the optimizer receives them at the first step (float32 copies), by name; `names`, if
    given, receives each parameter's name."""
    import transformers

    gradients = {}

    class KeepGradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not gradients:
                gradients.update({name: p.grad.detach().float().clone() for name, p in model.named_parameters()
                                  if p.grad is not None})
                if names is not None:
                    names.update({p: name for name, p in model.named_parameters()})

    monkeypatch.setattr(transformers.trainer, "DEFAULT_CALLBACKS",
                        [*transformers.trainer.DEFAULT_CALLBACKS, KeepGradients])
    distil_logits.main(config)
    return gradients


def test_bf16_student_accumulates_eight_micro_batches_in_float32(assets, bf16_valued_student, tmp_path, monkeypatch):
    """student_dtype: bfloat16, 8 micro-batches of one row. The gradient handed to the optimizer must be the float32 sum
    of the 8 micro-batches' bf16 gradients rounded once to bf16 (recorded as each arrives); autograd's own
    accumulation rounds the running sum at every micro-batch and misses it in most entries. Both are also compared
    with the same step on float32 weights (bf16 autocast, float32 .grad), numbers printed."""
    pytest.importorskip("optimi", reason="torch-optimi is in requirements.txt; this environment lacks it")
    import distillation_trainer

    def config(name, dtype):
        settings = one_step_config(assets, bf16_valued_student, assets["data"], str(tmp_path / name), bf16=True,
                                   per_device_train_batch_size=1, gradient_accumulation_steps=8, learning_rate=0.0,
                                   activation_checkpointing=False)
        settings["model_config"]["student_dtype"] = dtype
        return settings

    micro_batches = {}
    accumulate = distillation_trainer.Float32GradientAccumulation.accumulate

    def recording(self, parameter):
        micro_batches.setdefault(parameter, []).append(parameter.grad.double().clone())
        accumulate(self, parameter)

    reference = accumulated_gradients(config("float32", "float32"), monkeypatch)
    monkeypatch.setattr(distillation_trainer.Float32GradientAccumulation, "accumulate", recording)
    names = {}
    got = accumulated_gradients(config("bf16", "bfloat16"), monkeypatch, names)
    monkeypatch.setattr(distillation_trainer.Float32GradientAccumulation, "__init__",
                        lambda self, model, accelerator: None)  # autograd's own accumulation, in bf16
    in_bf16 = accumulated_gradients(config("bf16_sum", "bfloat16"), monkeypatch)

    assert set(got) == set(reference) == set(in_bf16) == {names[p] for p in micro_batches}
    assert all(len(grads) == 8 for grads in micro_batches.values())
    rounded_once = {names[p]: sum(grads).to(torch.bfloat16).float() for p, grads in micro_batches.items()}

    def share_equal(gradients):
        return (sum(int((gradients[name] == want).sum()) for name, want in rounded_once.items())
                / sum(want.numel() for want in rounded_once.values()))

    def error(gradients):
        return sum(((gradients[name] - want).norm() / want.norm()).item() for name, want in reference.items()) / len(reference)

    print(f"8 bf16 micro-batches: entries equal to the float32 sum rounded once: float32 accumulation "
          f"{share_equal(got):.4f}, bf16 accumulation {share_equal(in_bf16):.4f}; mean relative error against float32 "
          f"weights: {error(got):.3e} and {error(in_bf16):.3e}")
    assert share_equal(got) == 1.0 and share_equal(in_bf16) < 0.9 and error(got) < error(in_bf16)
