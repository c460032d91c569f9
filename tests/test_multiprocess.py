"""Several processes on the CPU (gloo): 2-process DDP matches a 1-process run with the same global batch (loss
trajectory and final weights), also when the Trainer passes no num_items_in_batch (a model with
accepts_loss_kwargs=False, normalised per micro-batch), and 2-process DeepSpeed ZeRO-3 with the shipped config partitions the teacher on
each process, trains to the same losses and saves one consolidated student that loads with from_pretrained; under
ZeRO-3 the start-up head check runs too, and refuses a teacher whose logits are not its head's."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distil_logits

pytestmark = pytest.mark.slow  # every test here launches two processes


def overrides_file(assets, tmp_path, name, accumulation, **training):
    """Plain SGD without clipping (an AdamW update or a clipped gradient would hide a constant scale error in the
    gradients), at a learning rate whose updates dwarf the tolerances, with activation checkpointing on as shipped."""
    config = tiny_config(assets, str(tmp_path / name))
    config["training"].update(gradient_accumulation_steps=accumulation, save_strategy="no", eval_strategy="no",
                              optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0,
                              lr_scheduler_type="constant", activation_checkpointing=True)
    config["training"].update(training)
    config["dataset"]["eval_size"] = 0
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                             "distillation", "training")}))
    return config, str(path)


def launch(args, config_path, script=os.path.join(ROOT, "distil_logits.py")):
    command = [sys.executable, "-m", "accelerate.commands.launch", *args, script, "--config", config_path]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(output_dir):
    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    return [(log["loss"], log["kd_loss"], log["ce_loss"]) for log in state["log_history"] if "kd_loss" in log]


@pytest.fixture(scope="module")
def single_process(assets, tmp_path_factory):
    """The reference: one process, batch 2, 4 accumulated micro-batches (global batch 8)."""
    tmp_path = tmp_path_factory.mktemp("single")
    config, _ = overrides_file(assets, tmp_path, "single", accumulation=4)
    distil_logits.main(config)
    return config["training"]["output_dir"]


def assert_same_run(output_dir, reference_dir, tolerance):
    got, want = losses(output_dir), losses(reference_dir)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=tolerance, abs=tolerance)
    want_weights = load_file(os.path.join(reference_dir, "model.safetensors"))
    got_weights = load_file(os.path.join(output_dir, "model.safetensors"))
    for name, value in want_weights.items():
        torch.testing.assert_close(got_weights[name], value, rtol=tolerance, atol=tolerance)


def test_ddp_two_processes_match_one(assets, tmp_path, single_process):
    """2 processes x batch 2 x 2 accumulated = global batch 8, the same rows per step as the reference."""
    config, path = overrides_file(assets, tmp_path, "ddp", accumulation=2)
    log = launch(["--multi_gpu", "--num_processes", "2"], path)
    assert "training on 2 process(es)" in log
    assert_same_run(config["training"]["output_dir"], single_process, 1e-5)


def test_zero3_two_processes_shard_the_teacher(assets, tmp_path, single_process):
    config, path = overrides_file(assets, tmp_path, "zero3", accumulation=2)
    log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2"], path)
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in log
    held = {int(rank): (int(a.replace(",", "")), int(b.replace(",", "")))
            for rank, a, b in re.findall(r"teacher on rank (\d): holds ([\d,]+) of ([\d,]+) parameters", log)}
    assert set(held) == {0, 1}
    for rank, (local, total) in held.items():
        assert local <= total // 2 + 64, f"rank {rank} holds {local} of {total}: the teacher is not partitioned"
    output_dir = config["training"]["output_dir"]
    assert_same_run(output_dir, single_process, 1e-4)
    student = AutoModelForCausalLM.from_pretrained(output_dir)  # one consolidated checkpoint
    generated = student.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)[0, 3:]
    stops = student.generation_config.eos_token_id  # the saved config also stops at the end of a turn
    stops = stops if isinstance(stops, list) else [stops]
    assert len(generated) == 3 or (1 <= len(generated) < 3 and int(generated[-1]) in stops)


# distil_logits.py with a student (and teacher) that declare accepts_loss_kwargs=False, as some models do: the Trainer
# then counts no tokens and passes num_items_in_batch=None, and compute_loss falls back to per-micro-batch counts.
FALLBACK_LAUNCHER = """
import sys
sys.path.insert(0, {root!r})
import distil_logits
from common import run_cli

load_causal_lm = distil_logits.load_causal_lm


def load_without_loss_kwargs(*args, **kwargs):
    model = load_causal_lm(*args, **kwargs)
    model.accepts_loss_kwargs = False
    return model


distil_logits.load_causal_lm = load_without_loss_kwargs
run_cli(distil_logits.main, distil_logits.config)
"""


def test_ddp_without_num_items_in_batch_matches_one_process(assets, tmp_path, monkeypatch):
    """Without num_items_in_batch each micro-batch is normalised by its own token count; the loss is still multiplied
    by the process count for DDP's averaging, so the normaliser must count the processes too, or the gradients are
    twice as large on 2 processes. The 1-process run uses the same fallback and the same micro-batches. Plain SGD
    without clipping: AdamW's update (and a clipped gradient) would hide a scale error."""
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    config, _ = overrides_file(assets, tmp_path, "fallback_single", accumulation=4, **sgd)
    load_causal_lm = distil_logits.load_causal_lm

    def load_without_loss_kwargs(*args, **kwargs):
        model = load_causal_lm(*args, **kwargs)
        model.accepts_loss_kwargs = False
        return model

    monkeypatch.setattr(distil_logits, "load_causal_lm", load_without_loss_kwargs)
    trainer = distil_logits.main(config)
    assert trainer.model_accepts_loss_kwargs is False
    ddp_config, path = overrides_file(assets, tmp_path, "fallback_ddp", accumulation=2, **sgd)
    launcher = tmp_path / "distil_logits_without_loss_kwargs.py"
    launcher.write_text(FALLBACK_LAUNCHER.format(root=ROOT))
    log = launch(["--multi_gpu", "--num_processes", "2"], path, script=str(launcher))
    assert "training on 2 process(es)" in log
    assert_same_run(ddp_config["training"]["output_dir"], config["training"]["output_dir"], 1e-5)


# distil_logits.py with a teacher whose forward scales its logits after the head (something heads.head_transform does
# not know): the start-up head check must refuse it, under ZeRO-3 as in every engine.
WRONG_HEAD_LAUNCHER = """
import sys
sys.path.insert(0, {root!r})
import torch
import distil_logits
from common import run_cli

load_causal_lm = distil_logits.load_causal_lm


class ScaledHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.7


def load_with_a_scaled_teacher_head(name, config, trainable=True):
    model = load_causal_lm(name, config, trainable)
    if not trainable:
        model.get_output_embeddings().__class__ = ScaledHead
    return model


distil_logits.load_causal_lm = load_with_a_scaled_teacher_head
run_cli(distil_logits.main, distil_logits.config)
"""


def test_zero3_head_check_refuses_a_wrong_teacher_head(assets, tmp_path):
    """The student's check passes through ZeRO-3's gathering, then the teacher's (in its own engine) finds the factor
    1.7 and stops the run in one line before the first optimizer step; skipping the check under ZeRO-3 would train."""
    config, path = overrides_file(assets, tmp_path, "zero3_wrong_head", accumulation=2)
    launcher = tmp_path / "distil_logits_wrong_head.py"
    launcher.write_text(WRONG_HEAD_LAUNCHER.format(root=ROOT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2", str(launcher), "--config", path]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0, result.stdout[-2000:]
    assert "error: the teacher's logits differ from its final hidden state" in result.stderr, result.stderr[-3000:]
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in result.stdout + result.stderr
    assert not os.path.exists(os.path.join(config["training"]["output_dir"], "model.safetensors"))
