"""The student's on-policy completions from a vLLM server (`on_policy.engine: vllm`), and the weight sync that keeps
that server on the student's current weights.

    engine = VllmEngine("http://127.0.0.1:8001", timeout_s=600)     # a server started by scripts/serve_student.sh
    engine.check(head_rows=output_vocab_size(student))   # one line per problem, before training
    engine.sync(student_weights(model_wrapped, accelerator, zero3), step)      # after each optimizer step that samples
    completions = engine.sample(prompts, settings, stop_ids, vocab_size, seed, max_tokens)

How the weights travel: the trainer (main process) writes the student's parameters, under their checkpoint names,
to one safetensors file in `sync_dir` (/dev/shm: tmpfs, so no disk), then asks the server through its
`/collective_rpc` endpoint (`VLLM_SERVER_DEV_MODE=1`) to run `reload_from_file` of the worker extension
scripts/vllm_weight_sync.py, which reloads the served model in place with vLLM's own `reload_weights` and answers the
step written in the file's metadata; the trainer checks it is the step it wrote, then resets the server's prefix
cache (its cached KV blocks were computed by the old weights). Measured on the CPU: docs/on-policy.md.

`LocalVllmServer` starts that server on a free port of 127.0.0.1 (`on_policy.vllm_url: null`) and stops it with its
whole process group. Every failure is one VllmEngineError line (a ConfigError, so the scripts print it and exit).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import torch

from common import ConfigError

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "vllm_weight_sync.WeightSyncExtension"


class VllmEngineError(ConfigError):
    """The student's vLLM server is unreachable, serves another model, or failed a sync or a request: one line."""


def _message(data: bytes) -> str:
    """A vLLM or FastAPI error answer's message, on one line."""
    try:
        decoded = json.loads(data)
    except ValueError:
        return " ".join(data[:300].decode(errors="replace").split())
    if isinstance(decoded, dict):
        error = decoded.get("error")
        decoded = (error.get("message") if isinstance(error, dict) else error) or decoded.get("detail") or decoded
    return " ".join(str(decoded).split())[:400]


class VllmEngine:
    """Client of the vLLM server that holds the student: sampling requests (one per row, in parallel: the server
    batches them), weight syncs, and the start-up checks. `synced_step` is the optimizer step whose weights the
    server holds (None before the first sync)."""

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 600.0, sync_dir: str = "/dev/shm",
                 max_workers: int = 16):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise VllmEngineError(f"on_policy.vllm_url {url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8001.")
        self.url = url.rstrip("/").removesuffix("/v1")
        self._https, self._host, self._port = parsed.scheme == "https", parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/").removesuffix("/v1")
        self.model, self.timeout_s = model, timeout_s
        self.sync_dir = sync_dir
        self.weights_path = None  # the file the trainer writes, made at the first sync
        self.synced_step = None
        self.head_rows = None  # the student's output rows, set by `check`
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="vllm-engine")

    # --- HTTP ---------------------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None, retries: int = 0) -> tuple[int, bytes]:
        """(status, body) of one request on a fresh connection; connection failures and 5xx answers are retried
        `retries` times (1 s apart), then the last one is returned or raised as OSError."""
        payload = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self.timeout_s)
            try:
                connection.request(method, self._prefix + path, body=payload,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                status, data = response.status, response.read()
                if status < 500 or attempt == retries:
                    return status, data
            except (OSError, http.client.HTTPException):
                if attempt == retries:
                    raise
            finally:
                connection.close()
            time.sleep(1.0)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: dict | None = None, what: str = "", retries: int = 0) -> dict:
        try:
            status, data = self._call(method, path, body, retries)
        except (OSError, http.client.HTTPException) as error:
            raise VllmEngineError(f"the student's vLLM server {self.url} did not answer {method} {path}{what} "
                                  f"({type(error).__name__}: {error}).") from None
        if status != 200:
            raise VllmEngineError(f"the student's vLLM server {self.url} refused {method} {path}{what}: HTTP {status}: "
                                  f"{_message(data)}")
        return json.loads(data) if data else {}

    # --- Start-up checks ----------------------------------------------------------------------------------------------

    def check(self, head_rows: int) -> None:
        """One VllmEngineError line, before training, when the server is unreachable, serves another model name or
        another vocabulary than the student's `head_rows` output rows, or cannot take weight syncs."""
        self.head_rows = head_rows
        try:
            status, data = self._call("GET", "/v1/models")
        except (OSError, http.client.HTTPException) as error:
            raise VllmEngineError(f"on_policy.vllm_url {self.url} does not answer ({type(error).__name__}: {error}). "
                                  f"Start the student's server with: bash scripts/serve_student.sh STUDENT --port "
                                  f"{self._port or 80}, or set on_policy.vllm_url: null to let the script start one.")\
                from None
        if status != 200:
            raise VllmEngineError(f"{self.url} answered GET /v1/models with HTTP {status}: {_message(data)}. Is it a "
                                  "vLLM server?")
        names = [entry["id"] for entry in json.loads(data)["data"]]
        if self.model is None and len(names) == 1:
            self.model = names[0]
        if self.model not in names:
            raise VllmEngineError(f"the student's vLLM server {self.url} serves {', '.join(names)}, not one model the "
                                  "student can be synced into: serve only the student.")
        # The served vocabulary: vLLM refuses a prompt id at or above its model's vocabulary size.
        for token, accepted in ((head_rows - 1, True), (head_rows, False)):
            status, data = self._call("POST", "/v1/completions", {"model": self.model, "prompt": [token],
                                                                 "max_tokens": 1})
            if (status == 200) != accepted:
                raise VllmEngineError(
                    f"the model served at {self.url} has another vocabulary than the student's {head_rows} output rows "
                    f"(prompt id {token} {'refused' if accepted else 'accepted'}: {_message(data)[:120]}): serve the "
                    "student (models.student) there.")
        status, data = self._call("POST", "/collective_rpc", {"method": "weight_sync_ready"})
        if status == 404:
            raise VllmEngineError(f"the student's vLLM server {self.url} has no /collective_rpc endpoint, which the "
                                  "weight sync needs: start it with VLLM_SERVER_DEV_MODE=1 (scripts/serve_student.sh "
                                  "does).")
        if status != 200:
            raise VllmEngineError(f"the student's vLLM server {self.url} cannot take weight syncs ({_message(data)}): "
                                  f"start it with --worker-extension-cls {EXTENSION} and scripts/ on PYTHONPATH "
                                  "(scripts/serve_student.sh does).")

    # --- Weight sync --------------------------------------------------------------------------------------------------

    def sync(self, weights: dict[str, torch.Tensor], step: int) -> float:
        """Write `weights` (checkpoint names -> tensors) for optimizer step `step` and make the server load them; any
        failure is one VllmEngineError line (the run stops: it must never sample from the previous weights). Returns
        the seconds it took."""
        from safetensors.torch import save_file

        start = time.perf_counter()
        if self.weights_path is None:
            if not os.path.isdir(self.sync_dir):
                raise VllmEngineError(f"on_policy.vllm_sync_dir {self.sync_dir} is not a folder; use /dev/shm or a "
                                      "folder the vLLM server can read.")
            folder = tempfile.mkdtemp(prefix="distil-vllm-sync-", dir=self.sync_dir)
            self.weights_path = os.path.join(folder, "student.safetensors")
        partial = self.weights_path + ".partial"
        try:
            save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}, partial,
                      metadata={"step": str(step)})
            os.replace(partial, self.weights_path)  # the server never reads a half-written file
        except OSError as error:
            raise VllmEngineError(f"could not write the student's weights to {self.weights_path} for the vLLM server "
                                  f"({error}); free space there or set on_policy.vllm_sync_dir.") from None
        answer = self._json("POST", "/collective_rpc", {"method": "reload_from_file", "args": [self.weights_path]},
                            " (the weight sync)")
        loaded = answer.get("results") or [{}]
        errors = [result["error"] for result in loaded if isinstance(result, dict) and "error" in result]
        if errors:
            raise VllmEngineError(f"the student's vLLM server {self.url} could not load the weights of step {step}: "
                                  f"{' '.join(errors[0].split())[:400]}. Is it serving the student (models.student)?")
        if any(result.get("step") != str(step) or result.get("tensors") != len(weights) for result in loaded):
            raise VllmEngineError(f"the student's vLLM server {self.url} answered the weight sync of step {step} with "
                                  f"{loaded}: it did not load the weights just written. Is {self.sync_dir} the same "
                                  "folder on its machine?")
        if not self._json("POST", "/reset_prefix_cache", what=" (after the weight sync)").get("success", True):
            raise VllmEngineError(f"the student's vLLM server {self.url} could not reset its prefix cache after the "
                                  "weight sync (requests still running?): its cached prompts would use old weights.")
        self.synced_step = step
        return time.perf_counter() - start

    # --- Sampling -----------------------------------------------------------------------------------------------------

    def request_body(self, prompt: list[int], settings: dict, stop_ids: list[int], max_tokens: int, seed: int,
                     allowed: list[int] | None) -> dict:
        """The completions request of one prompt: the student's own distribution at `settings["sampling_temperature"]`
        and `top_p`, every other sampling field at its neutral value (so a server's --generation-config defaults do
        not apply), stopping only at `stop_ids` (ignore_eos: not at the model's own EOS unless listed)."""
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
                "temperature": float(settings["sampling_temperature"]), "top_p": float(settings["top_p"]), "top_k": 0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "min_tokens": 0, "ignore_eos": True, "stop_token_ids": list(stop_ids), "return_token_ids": True,
                **({"allowed_token_ids": allowed} if allowed is not None else {})}

    def _sample_one(self, body: dict) -> list[int]:
        answer = self._json("POST", "/v1/completions", body, f" (a sampling request of {len(body['prompt'])} prompt "
                            "tokens)", retries=2)
        return list(answer["choices"][0]["token_ids"])

    def sample(self, prompts: list[list[int]], settings: dict, stop_ids: list[int], vocab_size: int, seed: int,
               max_tokens: list[int]) -> list[list[int]]:
        """One completion per prompt (its new token ids, through the first stop token), row i seeded by a draw from
        `seed` and i, so a resumed run samples the same tokens. Head rows beyond the tokenizer's `vocab_size` are never
        sampled (allowed_token_ids, sent only when the head is padded)."""
        allowed = list(range(vocab_size)) if (self.head_rows or vocab_size) > vocab_size else None
        seeds = random.Random(seed)
        bodies = [self.request_body(prompt, settings, stop_ids, cap, seeds.getrandbits(63), allowed)
                  for prompt, cap in zip(prompts, max_tokens)]
        return list(self._pool.map(self._sample_one, bodies))

    def prompt_log_probs(self, row: list[int]) -> torch.Tensor:
        """The served model's log-probability of each token of `row` after the first, given the ones before (raw
        log-softmax with serve_teacher.sh's --logprobs-mode raw_logprobs): what test and check compare."""
        answer = self._json("POST", "/v1/completions", {"model": self.model, "prompt": row, "max_tokens": 1,
                                                        "prompt_logprobs": 1})
        positions = answer["choices"][0]["prompt_logprobs"][1:]
        return torch.tensor([entries[str(token)]["logprob"] for entries, token in zip(positions, row[1:])])

    def close(self) -> None:
        """Stop the request threads and delete the weights file."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.weights_path is not None:  # /dev/shm is memory: the student's copy must not outlive the run
            for path in (self.weights_path, self.weights_path + ".partial"):
                if os.path.exists(path):
                    os.remove(path)
            try:
                os.rmdir(os.path.dirname(self.weights_path))
            except OSError:
                pass
            self.weights_path = None


def student_weights(model_wrapped: torch.nn.Module, accelerator, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The student's parameters under their checkpoint names, as CPU copies on the main process (None elsewhere).
    Under ZeRO-3 every parameter is gathered once for the whole copy (a collective: every process calls this)."""
    student = accelerator.unwrap_model(model_wrapped)
    main = accelerator.is_main_process

    def copy() -> dict[str, torch.Tensor] | None:  # named_parameters lists a tied head once, as vLLM loads it
        return {name: param.detach().to("cpu", copy=True) for name, param in student.named_parameters()} if main \
            else None

    if not zero3:
        return copy()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model_wrapped.parameters())):
        return copy()


def exit_on_sigterm():
    """While a local server runs, SIGTERM (what a scheduler or a launcher sends a process it stops) raises SystemExit in
    the main thread instead of killing it outright, so that the caller's `finally` stops the server's processes (and
    deletes the student's copy in /dev/shm). Only where SIGTERM still has its default action; returns the handler to
    restore, or None where nothing was changed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, raise_exit)


class LocalVllmServer:
    """A vLLM server of the student on a free port of 127.0.0.1, started by scripts/serve_student.sh in its own
    process group from .venv-vllm, its output in `log_path`; `stop` ends the whole group."""

    def __init__(self, student: str, log_path: str, extra_args: list[str], timeout_s: float):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url, self.log_path = f"http://127.0.0.1:{self.port}", log_path
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                ["bash", os.path.join(ROOT, "scripts", "serve_student.sh"), student, *extra_args],
                cwd=ROOT, env={**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        probe = VllmEngine(self.url, timeout_s=5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise VllmEngineError(f"the local vLLM server of the student exited with code "
                                          f"{self.process.returncode} while starting: {self.last_line()} (whole log: "
                                          f"{log_path}).")
                if time.monotonic() - start > timeout_s:
                    self.stop()
                    raise VllmEngineError(f"the local vLLM server of the student did not answer within "
                                          f"on_policy.vllm_timeout_s={timeout_s} s (log: {log_path}).")
                try:
                    if probe._call("GET", "/health")[0] == 200:
                        break
                except (OSError, http.client.HTTPException):
                    pass
                time.sleep(1)
        finally:
            probe.close()
        self.start_s = time.monotonic() - start
        self._previous_sigterm = exit_on_sigterm()

    def last_line(self) -> str:
        with open(self.log_path, errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1][:300]

    def stop(self) -> None:
        """SIGTERM to the server's process group (the API server, its engine and worker), SIGKILL after 30 s."""
        if getattr(self, "_previous_sigterm", None) is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        deadline = time.monotonic() + 30
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                self.process.poll()
                os.killpg(self.process.pid, 0)  # raises once every process of the group has exited
                time.sleep(0.2)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start_vllm_engine(on_policy: dict, student_path: str, student: torch.nn.Module, max_length: int, output_dir: str,
                      synced: bool) -> tuple[VllmEngine, LocalVllmServer | None]:
    """The engine of the on_policy block, checked before training: the server at on_policy.vllm_url, or (vllm_url
    null) a local one the main process starts from `student_path` (returned, for the caller to stop). `synced`: the
    loaded `student` is the one that samples first (no resume, no ZeRO-3 partitioning): it is synced now, which also
    proves the server holds the same architecture, and the first sampling step needs no sync. A failure on the main
    process is one VllmEngineError line on every process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from common import output_vocab_size

    state = PartialState()
    server, url, error = None, on_policy["vllm_url"], None
    engine = None
    if state.is_main_process:
        try:
            if url is None:
                args = list(on_policy["vllm_args"])
                if not any(arg.startswith("--max-model-len") for arg in args):
                    args += ["--max-model-len", str(max_length)]
                server = LocalVllmServer(student_path, os.path.join(output_dir, "vllm-student-server.log"), args,
                                         on_policy["vllm_timeout_s"])
                url = server.url
                print(f"started the student's vLLM server at {url} in {server.start_s:.0f} s (log: "
                      f"{server.log_path})", flush=True)
            engine = VllmEngine(url, timeout_s=on_policy["vllm_timeout_s"], sync_dir=on_policy["vllm_sync_dir"])
            engine.check(output_vocab_size(student))
            if synced:
                engine.sync(dict(student.named_parameters()), 0)
        except VllmEngineError as failure:
            error = str(failure)
            if engine is not None:
                engine.close()
            if server is not None:
                server.stop()
    if state.num_processes > 1:
        url, model, error = broadcast_object_list([url, engine.model if engine else None, error])
    if error is not None:
        raise VllmEngineError(error)
    if engine is None:  # the other processes only sample; the main process syncs
        engine = VllmEngine(url, model, timeout_s=on_policy["vllm_timeout_s"], sync_dir=on_policy["vllm_sync_dir"])
        engine.head_rows = output_vocab_size(student)
    if synced:
        engine.synced_step = 0
    return engine, server
