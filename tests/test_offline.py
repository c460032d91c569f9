"""Offline distillation: the compact top-k record (size and reconstruction KL), the sparse loss against the
reference on full logits for every divergence, capture then train without loading the teacher, resume of an
interrupted capture, a capture on 2 processes under ZeRO-3 that shards the teacher and stores what one process
does, and each bad input (missing or truncated shard, manifest mismatch, k larger than the vocabulary, a capture made
with another tokenizer)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_distil_logits import mismatched_student

import distil_logits
from common import ConfigError
from losses import (
    DIVERGENCES,
    causal_lm_loss,
    chunked_distillation_loss,
    topk_distillation_loss,
    topk_distribution,
)
from offline import TopKCodec


def reconstruction_kl(codec, logits, k):
    ids, log_probs, tail = topk_distribution(logits, k)
    got_ids, got_log_probs, got_tail = codec.decode(codec.encode(ids.numpy(), log_probs.numpy()))
    order = np.argsort(ids.numpy(), 1)
    assert (np.take_along_axis(ids.numpy(), order, 1) == got_ids).all()  # ids are exact
    p = np.concatenate([np.take_along_axis(log_probs.double().exp().numpy(), order, 1), tail.double().numpy()[:, None]], 1)
    q = np.concatenate([np.exp(got_log_probs.astype(np.float64)), got_tail.astype(np.float64)[:, None]], 1)
    assert np.allclose(q.sum(1), 1, atol=1e-5)
    return np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0).sum(1).mean()


def test_record_is_160_bytes_at_k64_on_the_qwen2_vocabulary_and_reconstructs_within_1e3_kl():
    codec = TopKCodec(151936, 64)
    assert codec.record_bytes == 160
    torch.manual_seed(0)
    ranks = torch.arange(1, 151937).float().log()
    for temperature in (1.0, 2.0):
        gaussian = torch.randn(32, 151936) * 10 / temperature  # entropy about 1.2 nats at T = 1
        zipf = torch.stack([-2.5 * ranks[torch.randperm(151936)] + 0.3 * torch.randn(151936) for _ in range(32)]) / temperature
        for logits in (gaussian, zipf):
            assert reconstruction_kl(codec, logits, 64) < 1e-3


def test_small_vocabulary_and_odd_k_round_trip():
    codec = TopKCodec(320, 15)
    logits = torch.randn(40, 320) * 3
    assert reconstruction_kl(codec, logits, 15) < 1e-3


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_chunked_loss_equals_reference_on_full_logits(divergence):
    """With the exact top-k values (no quantisation), the chunked offline loss equals the top-k loss computed from
    full student logits: values and gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 70)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    labels = torch.randint(0, 64, (2, 13))
    labels[0, :4] = -100
    mask = labels[:, 1:] != -100
    ids, log_probs, tail = topk_distribution((torch.randn(2, 13, 64) * 3)[:, :-1][mask], 8, 2.0)
    logits = head(hidden)
    want = 0.6 * topk_distillation_loss(logits, labels, ids, log_probs, tail, divergence, 2.0, 64, 30) + \
        0.4 * causal_lm_loss(logits, labels, 30)
    want.backward()
    want_grad = hidden.grad.clone()
    hidden.grad = None
    got, _, _ = chunked_distillation_loss(hidden[:, :-1][mask], head, None, None, labels[:, 1:][mask], 0.6, 0.4, 30,
                                          divergence, 2.0, 64, stored_topk=(ids, log_probs, tail), memory_budget_mb=0.01)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert ((hidden.grad - want_grad).abs().max() / want_grad.abs().max()).item() < 1e-5


def test_topk_loss_with_every_token_equals_the_full_loss():
    """k = V: the top-k loss is the ordinary loss (the tail bucket is empty)."""
    from losses import logit_distillation_loss

    torch.manual_seed(1)
    student, teacher = torch.randn(2, 9, 20), torch.randn(2, 9, 20) * 2
    labels = torch.randint(0, 20, (2, 9))
    mask = labels[:, 1:] != -100
    ids, log_probs, tail = topk_distribution(teacher[:, :-1][mask], 20, 1.5)
    sparse = topk_distillation_loss(student, labels, ids, log_probs, tail, "forward_kl", 1.5)
    assert sparse.item() == pytest.approx(logit_distillation_loss(student, teacher, labels, "forward_kl", 1.5).item(), rel=1e-5)


def offline_config(assets, tmp_path, mode, **offline):
    config = tiny_config(assets, str(tmp_path / "out"), temperature=2.0)
    config["offline"].update(mode=mode, capture_dir=str(tmp_path / "capture"), top_k=16, shard_rows=4, **offline)
    return config


@pytest.fixture
def captured(assets, tmp_path):
    manifest = distil_logits.main(offline_config(assets, tmp_path, "capture"))
    return tmp_path, manifest


def test_capture_then_train_without_the_teacher(assets, captured):
    tmp_path, manifest = captured
    assert manifest["complete"] and manifest["top_k"] == 16 and manifest["rows"] == {"train": 12, "eval": 4}
    assert not os.path.exists(tmp_path / "out")  # capturing trains nothing
    config = offline_config(assets, tmp_path, "train")
    config["models"]["teacher"] = str(tmp_path / "no-such-teacher")  # never loaded
    trainer = distil_logits.main(config)
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert trainer.teacher is None and logs and all(log["kd_loss"] > 0 and np.isfinite(log["loss"]) for log in logs)
    assert any(log.get("eval_kd_loss", 0) > 0 for log in trainer.state.log_history)


def test_interrupted_capture_resumes(assets, captured):
    tmp_path, _ = captured
    folder = tmp_path / "capture"
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".parquet"))
    before = {name: (folder / name).read_bytes() for name in shards}
    os.remove(folder / shards[1])  # as if the run died before writing it
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    distil_logits.main(offline_config(assets, tmp_path, "capture"))
    assert sorted(name for name in os.listdir(folder) if name.endswith(".parquet")) == shards
    import pyarrow.parquet as pq

    rewritten = pq.read_table(folder / shards[1]).to_pydict()
    original = pq.read_table(__import__("io").BytesIO(before[shards[1]])).to_pydict()
    assert rewritten == original  # the same rows, the same records


@pytest.mark.parametrize("damage,message", [
    ("delete_shard", "lacks .* rows of its train split"),
    ("truncate_shard", "truncated or corrupt"),
    ("max_length", "tokenizer.max_length differs"),
    ("temperature", "temperature differs"),
    ("other_tokenizer", "another tokenizer"),
    ("incomplete", "not complete"),
])
def test_bad_capture_is_one_clear_error(assets, captured, damage, message):
    tmp_path, _ = captured
    folder = tmp_path / "capture"
    config = offline_config(assets, tmp_path, "train")
    shard = folder / sorted(name for name in os.listdir(folder) if name.startswith("train-"))[0]
    if damage == "delete_shard":
        os.remove(shard)
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:50])
    elif damage == "max_length":
        config["tokenizer"]["max_length"] = 48
    elif damage == "temperature":
        config["distillation"]["temperature"] = 1.0
    elif damage == "other_tokenizer":
        config["models"]["student"] = mismatched_student(assets, tmp_path)
    elif damage == "incomplete":
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not os.path.exists(tmp_path / "out")


def test_top_k_larger_than_the_vocabulary(assets, tmp_path):
    config = offline_config(assets, tmp_path, "capture")
    config["offline"]["top_k"] = 100000
    with pytest.raises(ConfigError, match="larger than the vocabulary"):
        distil_logits.main(config)
    assert not os.path.exists(tmp_path / "capture")


def capture_records(folder) -> dict:
    """{(split, row): the row's records} of a capture folder, whichever process's shard holds them."""
    import pyarrow.parquet as pq

    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(folder, name)).to_pydict()
            found.update({(name.split("-")[0], row): records for row, records in zip(table["row"], table["records"])})
    return found


@pytest.mark.slow  # launches two processes
def test_zero3_capture_on_two_processes_shards_the_teacher_and_equals_one_process(assets, tmp_path):
    """accelerate launch with the shipped ZeRO-3 config: each process holds about half the teacher's parameters
    (before: the whole teacher per process), and the records of every row equal those of a 1-process capture (one
    row per forward in both, so that no batch padding differs). The first split has 12 rows over 2 processes of
    batch 1, the eval split 4: equal counts; one row is pre-written so that rank 0 has one batch fewer and must pad."""
    from test_multiprocess import launch

    one = offline_config(assets, tmp_path / "one", "capture", capture_batch_size=1)
    distil_logits.main(one)
    want = capture_records(one["offline"]["capture_dir"])
    two = offline_config(assets, tmp_path / "two", "capture", capture_batch_size=1)
    two_dir = two["offline"]["capture_dir"]
    os.makedirs(two_dir)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Row 0 (rank 0's) already captured, as after an interrupted run: rank 0 has 5 train rows left, rank 1 has 6.
    pq.write_table(pa.table({"row": pa.array([0], pa.int64()), "records": pa.array([want[("train", 0)]], pa.binary())}),
                   os.path.join(two_dir, "train-r000-00000.parquet"))
    path = tmp_path / "two.json"
    path.write_text(json.dumps({key: two[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                          "distillation", "training", "offline")}))
    log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2"], str(path))
    held = {int(rank): (int(a.replace(",", "")), int(b.replace(",", ""))) for rank, a, b in
            re.findall(r"capture teacher on rank (\d): holds ([\d,]+) of ([\d,]+) parameters", log)}
    assert set(held) == {0, 1}, log[-3000:]
    for rank, (local, total) in held.items():
        assert local <= total // 2 + 64, f"rank {rank} holds {local} of {total}: the teacher is not partitioned"
    assert json.loads(open(os.path.join(two_dir, "manifest.json")).read())["complete"]
    got = capture_records(two_dir)
    assert sorted(got) == sorted(want) and len(want) == 16
    assert all(got[key] == want[key] for key in want)


def test_capture_placement_settings():
    """What the capture teacher's placement is computed from: each process's share of its node's GPUs for
    device_map="auto", and the shipped ZeRO-3 config turned into an inference config with no "auto" left (which
    deepspeed.initialize refuses) and no optimizer."""
    from conftest import ROOT

    from distributed import capture_gpus, launched_deepspeed_config, zero3_inference_config

    assert capture_gpus(0, 1, 8) == list(range(8))  # one process per node: all its GPUs
    assert capture_gpus(1, 2, 8) == [4, 5, 6, 7]
    assert capture_gpus(3, 8, 8) == [3]  # one process per GPU: its own
    assert capture_gpus(0, 1, 0) == []
    shipped = launched_deepspeed_config({"deepspeed": os.path.join(ROOT, "deepspeed_configs", "zero3.json")})
    config = zero3_inference_config({**shipped, "optimizer": {"type": "AdamW"}}, 64, 2, 4, {"bf16": True})
    assert "auto" not in json.dumps(config) and "optimizer" not in config
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"], config["bf16"]["enabled"],
            config["fp16"]["enabled"], config["zero_optimization"]["stage3_param_persistence_threshold"]) == (2, 8, True, False, 640)
    assert launched_deepspeed_config({}) is None
