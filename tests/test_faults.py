"""Faults: a run killed with SIGKILL after a checkpoint resumes to a bitwise-identical student with the same loss
log; a checkpoint whose save was cut off is never resumed from; a NaN loss stops the run naming the step and the
term, keeping the last good checkpoint, also when a save falls between two logging steps."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_config
from safetensors.torch import load_file

import common
import distil_logits
import losses
from common import TrainingDivergedError, resolve_resume_checkpoint

SLOW_RUN = """
import json, sys, time
sys.path.insert(0, {root!r})
import distil_logits
original = distil_logits.LogitsTrainer.training_step
def slow_training_step(self, *args, **kwargs):
    if self.state.global_step >= 2:  # leave time to be killed between checkpoints
        time.sleep(0.5)
    return original(self, *args, **kwargs)
distil_logits.LogitsTrainer.training_step = slow_training_step
distil_logits.main(json.load(open({config!r})))
"""


def kill_config(assets, output_dir, resume=None):
    config = tiny_config(assets, output_dir)
    config["training"].update(max_steps=6, save_steps=2, save_total_limit=None, eval_steps=3,
                              resume_from_checkpoint=resume)
    return config


def logged_losses(output_dir):
    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    return [(log["step"], log["loss"], log["kd_loss"], log["ce_loss"]) for log in state["log_history"] if "kd_loss" in log]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(assets, tmp_path):
    reference = str(tmp_path / "uninterrupted")
    distil_logits.main(kill_config(assets, reference))

    killed = str(tmp_path / "killed")
    config_path = tmp_path / "killed.json"
    config_path.write_text(json.dumps(kill_config(assets, killed)))
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(root=ROOT, config=str(config_path))],
                               cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isfile(os.path.join(killed, "checkpoint-2", "trainer_state.json")):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.7)  # inside step 3 or 4
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "distillation_config.json"))  # it really died mid-run
    # A save that was cut off: weights written, trainer_state.json not yet.
    partial = os.path.join(killed, "checkpoint-4")
    os.makedirs(partial, exist_ok=True)
    open(os.path.join(partial, "model.safetensors"), "wb").write(b"truncated")

    trainer = distil_logits.main(kill_config(assets, killed, resume=True))
    assert trainer.state.global_step == 6
    assert logged_losses(killed) == logged_losses(reference)  # the log continues where it stopped
    want, got = load_file(os.path.join(reference, "model.safetensors")), load_file(os.path.join(killed, "model.safetensors"))
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_resume_skips_a_checkpoint_cut_off_mid_save(tmp_path, capsys):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert resolve_resume_checkpoint(str(tmp_path), True) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-6" in capsys.readouterr().out
    with pytest.raises(common.ConfigError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-6"))
    assert resolve_resume_checkpoint(str(tmp_path / "empty"), True) is None  # nothing yet: start fresh


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_nan_loss_stops_naming_step_and_term(assets, tmp_path, monkeypatch, logging_steps):
    """logging_steps 10: the NaN/inf check runs at logging steps only, so the save at step 4 must check first."""
    original = losses.chunked_distillation_loss
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        loss, kd_loss, ce_loss = original(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] > 4:  # from the first micro-batch of optimizer step 3
                return loss * math.nan, kd_loss * math.nan, ce_loss
        return loss, kd_loss, ce_loss

    monkeypatch.setattr(losses, "chunked_distillation_loss", poisoned)
    out = str(tmp_path / "out")
    config = tiny_config(assets, out)
    config["training"].update(max_steps=5, save_steps=2, logging_steps=logging_steps)
    with pytest.raises(TrainingDivergedError, match=r"kd_loss became non-finite at optimizer step 3 .*checkpoint-2"):
        distil_logits.main(config)
    # the last good checkpoint is kept and nothing was saved after the bad step
    assert [name for name in os.listdir(out) if name.startswith("checkpoint-")] == ["checkpoint-2"]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
