"""The teacher served by vLLM: the top-k log-probabilities of token-id rows, asked of an OpenAI-compatible server.

Start a server with `bash scripts/serve_teacher.sh MODEL` (its own environment, .venv-vllm), then:

    teacher = ServedTeacher("http://127.0.0.1:8000", top_k=64)
    run_startup_checks(teacher, student_vocab_size=len(tokenizer), texts=rendered_texts, student_ids=rendered_ids)
    future = teacher.submit(rows)                  # rows: lists of token ids, answered while the student trains
    answers = teacher.wait(future)                 # one PromptTopK per row; the wait is counted in teacher_wait_s
    ids, log_probs, tail = counted_topk(answers, labels, top_k, temperature, vocab_size)   # what the loss reads

One request per row to /v1/completions: the row as a list of ids (`prompt`), `prompt_logprobs: k`, `max_tokens: 1`
(vLLM refuses 0; the one generated token is ignored). vLLM answers, for every position t >= 1, the k most likely ids of
token t given tokens < t, as raw log-softmax values when the server runs with `--logprobs-mode raw_logprobs`
(serve_teacher.sh's default; vLLM never applies sampling settings such as temperature to prompt log-probabilities).
The JSON answer holds an id, a log-probability, a rank and the decoded token per entry, about 68 bytes; vLLM 0.32 has
no smaller format on this endpoint (`return_tokens_as_token_ids` changes only sampled tokens, and the token-only
/inference/v1/generate endpoint answers prompt log-probabilities in the same JSON). serve_teacher.sh adds gzip
(level 1) to the server, which the client asks for with `compress=True`: about 4x fewer bytes on the wire.

`counted_topk` turns the answers into the offline capture's top-k form (offline.TopKReader.batch): ids, log-probs at
the distillation temperature, and the mass outside them, at the counted positions in the order the loss counts them.
At temperature 1 it equals the in-process capture; at other temperatures the mass outside the top k can only be
estimated (see topk_at_temperature), so distil_logits.py refuses a served teacher at T != 1 (check_teacher_server).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.client
import itertools
import json
import os
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from common import ConfigError


class TeacherServerError(ConfigError):
    """The teacher server is unreachable, misconfigured or stays down: one line naming the URL and the fix.

    A ConfigError, so that the scripts print it as one line and exit; a trainer catches it to stop cleanly. `reason`:
    the last connection error, when the server did not answer."""

    reason: str = ""


@dataclasses.dataclass
class PromptTopK:
    """The server's answer for one row of L tokens: at each position t < L - 1, the k most likely ids of token t + 1
    given tokens <= t, most likely first, and their raw log-probabilities (temperature 1, over the served model's whole
    vocabulary, padding ids included). `wire_bytes`: the answer's size on the wire."""

    ids: torch.Tensor  # (L - 1, k) int64
    log_probs: torch.Tensor  # (L - 1, k) float32
    wire_bytes: int


class ServedTeacher:
    """Client of one vLLM OpenAI-compatible server: concurrent requests, retries with exponential backoff, and the
    counters a trainer logs (`teacher_wait_s`, bytes on the wire per position).

    url: e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted). model: the served model name; None takes the server's
    only model. top_k: log-probabilities asked per position (the server's --max-logprobs must allow it). api_key: sent
    as a bearer token (vLLM's --api-key); never printed. timeout_s: the longest silence of the server while connecting
    or answering (a long row's answer may take longer in all). max_retries: tries after the first failure of a
    request, waiting backoff_s, 2 backoff_s, 4 backoff_s... (at most 30 s) in between. max_workers: requests in flight
    at once. compress: ask for gzip answers (served by serve_teacher.sh's middleware; a server without it answers
    plain JSON).
    """

    def __init__(self, url: str, model: str | None = None, top_k: int = 64, api_key: str | None = None,
                 timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 0.5, max_workers: int = 8,
                 compress: bool = True):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise TeacherServerError(f"teacher_server.url {url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000.")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/').removesuffix('/v1')}"
        self._https, self._host, self._port = parsed.scheme == "https", parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/").removesuffix("/v1")
        self.top_k, self.timeout_s, self.max_retries, self.backoff_s = top_k, timeout_s, max_retries, backoff_s
        self.compress = compress
        self._headers = {"Content-Type": "application/json", **({"Accept-Encoding": "gzip"} if compress else {}),
                         **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="served-teacher")
        self._lock = threading.Lock()
        self.teacher_wait_s = 0.0  # time the caller spent blocked in `wait`, summed; see pop_wait_s
        self.requests = self.retries = self.wire_bytes = self.positions = 0
        self.model = model  # None: the server's only model (vLLM's default); check_model_served names it

    # --- HTTP -------------------------------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection (one per worker thread, reopened after any failure)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = self._local.connection = kind(self._host, self._port, timeout=self.timeout_s)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._local.connection = None

    def _call(self, method: str, path: str, body: dict | None = None, retry: bool = True) -> tuple[int, bytes, int]:
        """(status, decoded body, bytes on the wire) of one request; connection failures, 5xx and 429 answers are
        retried with backoff, then raise TeacherServerError naming the URL. 4xx answers are returned to the caller."""
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        start, attempts = time.monotonic(), 1 + (self.max_retries if retry else 0)
        for attempt in range(attempts):
            try:
                connection = self._connection()
                connection.request(method, self._prefix + path, body=payload, headers=self._headers)
                response = connection.getresponse()
                raw = response.read()
                if response.status >= 500 or response.status == 429:
                    error = f"HTTP {response.status}: {_server_message(raw)}"
                else:
                    gzipped = response.getheader("Content-Encoding") == "gzip"
                    data = zlib.decompress(raw, 16 + zlib.MAX_WBITS) if gzipped else raw
                    return response.status, data, len(raw)
            except (OSError, http.client.HTTPException) as exception:  # refused, reset, timed out, closed mid-answer
                self._drop_connection()
                error = f"{type(exception).__name__}: {exception}".rstrip(": ")
            if attempt + 1 < attempts:
                with self._lock:
                    self.retries += 1
                time.sleep(min(self.backoff_s * 2**attempt, 30.0))
        failure = TeacherServerError(
            f"teacher server {self.url} did not answer {method} {path} after {attempts} tries in "
            f"{time.monotonic() - start:.0f} s ({error}). Check that it runs (start it with: {self.start_command()}) and "
            "that teacher_server.url points to it; a checkpointed run resumes once it is back.")
        failure.reason = error
        raise failure

    def _json(self, method: str, path: str, body: dict | None = None, retry: bool = True) -> dict:
        status, data, _ = self._call(method, path, body, retry)
        if status != 200:
            raise TeacherServerError(f"teacher server {self.url} refused {method} {path}: HTTP {status}: "
                                     f"{_server_message(data)}")
        return json.loads(data)

    def start_command(self) -> str:
        """The command that starts a server at this URL (on its own machine when the host is another)."""
        local = self._host in ("127.0.0.1", "localhost", "::1")
        return (f"bash scripts/serve_teacher.sh {self.model or 'TEACHER'} --port {self._port or 80}"
                + ("" if local else " --host 0.0.0.0"))

    # --- What the server serves ---------------------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        """The model names the server answers to (GET /v1/models)."""
        return [entry["id"] for entry in self._json("GET", "/v1/models", retry=False)["data"]]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The server tokenizer's ids of `text` (POST /tokenize)."""
        body = {"prompt": text, "add_special_tokens": add_special_tokens, **self._model_field()}
        return self._json("POST", "/tokenize", body)["tokens"]

    # --- Top-k log-probabilities ---------------------------------------------------------------------------------------

    def request_body(self, row: list[int], k: int | None = None, **sampling) -> dict:
        """The completions request for the prompt log-probabilities of one row."""
        return {"prompt": list(row), "max_tokens": 1, "prompt_logprobs": k or self.top_k, **self._model_field(),
                **sampling}

    def _model_field(self) -> dict:
        return {} if self.model is None else {"model": self.model}

    def row_topk(self, row: list[int], k: int | None = None, **sampling) -> PromptTopK:
        """One row's answer, in this thread (see `submit` for concurrent rows)."""
        if len(row) < 2:
            raise ValueError(f"a row needs at least 2 tokens to have a next-token distribution, got {len(row)}")
        k = k or self.top_k
        status, data, wire_bytes = self._call("POST", "/v1/completions", self.request_body(row, k, **sampling))
        if status != 200:
            message = _server_message(data)
            too_long = any(word in message for word in ("max_tokens", "context"))
            hint = (f"; a row of {len(row)} tokens needs --max-model-len {len(row) + 1} or more on the server (one "
                    "generated token follows the row)" if too_long else "")
            raise TeacherServerError(f"teacher server {self.url} refused a row of {len(row)} tokens: HTTP {status}: "
                                     f"{message}{hint}")
        ids, log_probs = parse_prompt_logprobs(data, k, len(row))
        with self._lock:
            self.requests += 1
            self.wire_bytes += wire_bytes
            self.positions += len(row) - 1
        return PromptTopK(torch.from_numpy(ids), torch.from_numpy(log_probs), wire_bytes)

    def submit(self, rows: list[list[int]]) -> concurrent.futures.Future:
        """Send one request per row, concurrently, and return at once: a future of the rows' PromptTopK, in order.
        Call `wait` on it; a failure (after the retries) is raised there."""
        futures = [self._pool.submit(self.row_topk, list(row)) for row in rows]
        combined: concurrent.futures.Future = concurrent.futures.Future()
        remaining = [len(futures)]

        def done(_):
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                if any(f.cancelled() for f in futures):  # close() was called
                    combined.set_exception(TeacherServerError(f"requests to teacher server {self.url} were cancelled"))
                    return
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    combined.set_exception(errors[0])
                else:
                    combined.set_result([f.result() for f in futures])

        if not futures:
            combined.set_result([])
        for future in futures:
            future.add_done_callback(done)
        return combined

    def wait(self, future: concurrent.futures.Future) -> list[PromptTopK]:
        """The result of `submit`, counting the time blocked here in `teacher_wait_s`."""
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.teacher_wait_s += time.perf_counter() - start

    def sample(self, row: list[int], max_tokens: int, temperature: float, top_p: float, seed: int,
               stop_ids: list[int]) -> list[int]:
        """One completion of the token-id row `row`, sampled by the server (temperature, top_p, the request's own
        `seed`, so that a rerun draws the same tokens): its token ids, ending with the stop token when one was drawn
        (vLLM's `return_token_ids`). distil_dpo.py's chosen answers."""
        body = {"prompt": list(row), "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "stop_token_ids": list(stop_ids), "return_token_ids": True, **self._model_field()}
        status, data, wire_bytes = self._call("POST", "/v1/completions", body)
        if status != 200:
            raise TeacherServerError(f"teacher server {self.url} refused to sample after a prompt of {len(row)} "
                                     f"tokens: HTTP {status}: {_server_message(data)}")
        tokens = json.loads(data)["choices"][0].get("token_ids")
        if tokens is None:
            raise TeacherServerError(f"teacher server {self.url} answered a completion without its token_ids: it "
                                     "does not take vLLM's return_token_ids (vLLM 0.10 or newer does).")
        with self._lock:
            self.requests += 1
            self.wire_bytes += wire_bytes
        return [int(token) for token in tokens]

    def sample_rows(self, rows: list[list[int]], seeds: list[int], **sampling) -> list[list[int]]:
        """`sample` for each row with its own seed, concurrently; the completions in the rows' order."""
        futures = [self._pool.submit(self.sample, list(row), seed=seed, **sampling) for row, seed in zip(rows, seeds)]
        return [future.result() for future in futures]

    def top_k_rows(self, rows: list[list[int]]) -> list[PromptTopK]:
        """`wait(submit(rows))`."""
        return self.wait(self.submit(rows))

    def pop_wait_s(self) -> float:
        """teacher_wait_s since the last call (per step, for the trainer's log)."""
        waited, self.teacher_wait_s = self.teacher_wait_s, 0.0
        return waited

    def stats(self) -> dict:
        """Counters since the client was made: requests, retries, positions, bytes on the wire (per position)."""
        return {"requests": self.requests, "retries": self.retries, "positions": self.positions,
                "wire_bytes": self.wire_bytes, "wire_bytes_per_position": self.wire_bytes / max(self.positions, 1)}

    def close(self) -> None:
        """Cancel what has not started and stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _server_message(data: bytes) -> str:
    """The error message of a vLLM error answer, on one line."""
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = data[:300].decode(errors="replace")
    message = decoded
    if isinstance(decoded, dict):  # vLLM's {"error": {"message": ...}}, or FastAPI's {"detail": ...}
        error = decoded.get("error")
        message = (error.get("message") if isinstance(error, dict) else error) or decoded.get("detail") or decoded
    return " ".join(str(message).split())[:400]


def parse_prompt_logprobs(data: bytes, k: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A completions answer's prompt log-probabilities as arrays: ids (length - 1, k) int64 and log-probs
    (length - 1, k) float32, most likely first.

    vLLM gives position t (t >= 1) as {id: {logprob, rank, decoded_token}} holding the top k and, when it is not among
    them, the prompt's own token t with its rank; position 0 is null. Entries above rank k are dropped."""
    positions = json.loads(data)["choices"][0]["prompt_logprobs"]
    if positions is None or len(positions) != length:
        raise TeacherServerError(f"the teacher server answered {0 if positions is None else len(positions)} prompt "
                                 f"positions for a row of {length} tokens: it does not return prompt_logprobs as "
                                 "vLLM's completions endpoint does.")
    ids = np.empty((length - 1, k), dtype=np.int64)
    log_probs = np.empty((length - 1, k), dtype=np.float32)
    ranks = np.empty((length - 1, k), dtype=np.int64)
    for t, entries in enumerate(positions[1:]):
        top = [(value["rank"], int(key), value["logprob"]) for key, value in entries.items()
               if value["rank"] is not None and value["rank"] <= k]
        if len(top) != k:
            # The prompt's token tied with the k-th: sort by rank and keep k. Fewer than k: the vocabulary is smaller.
            top = sorted(top)[:k]
            if len(top) < k:
                raise TeacherServerError(f"the teacher server answered {len(top)} log-probabilities at a position, "
                                         f"{k} were asked: is top_k above the served vocabulary?")
        ranks[t], ids[t], log_probs[t] = zip(*top)
    # vLLM lists the prompt's own token first when it is in the top k; rank order puts the most likely first.
    order = np.argsort(ranks, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(log_probs, order, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The server's answers in the offline capture's top-k form
# ---------------------------------------------------------------------------------------------------------------------


def topk_at_temperature(ids: torch.Tensor, raw_log_probs: torch.Tensor, k: int, temperature: float,
                        vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k over the real vocabulary at the distillation temperature, from a server's raw top-K (K >= k):
    (ids (N, k), log-probabilities (N, k), tail (N,)), as losses.topk_distribution computes from full logits.

    ids, raw_log_probs: (N, K), most likely first, raw log-softmax over the served vocabulary (padding ids included).
    1. Real vocabulary: ids >= vocab_size (a model family's padding of its embedding matrix) are dropped and the rest
       renormalised by the padding mass among the K, as topk_distribution slices logits[:, :vocab_size]. Padding mass
       outside the K is unknown and taken as 0: exact for trained models, whose padding ids carry no mass, and
       whenever the K hold every padding id the server ranks above the k-th real id.
    2. Temperature: the top k and the rest of the mass r (one bucket) are raised to the power 1 / T and renormalised,
       p_i^(1/T) / (sum_j p_j^(1/T) + r^(1/T)), as DistillKit's served teacher does. Exact at T = 1 (the k values and
       the tail equal the capture's) and at any T when k is the whole vocabulary. Below it, r^(1/T) is the least the
       tempered rest can be (all of r on one token): the real rest is spread over many tokens, each gaining from 1 / T.
       On Zipf-like logits over 151,936 ids at T = 2 (tests/test_served_teacher.py) the tempered tail comes out 0.01
       instead of 0.27 at k = 64, log-probabilities are off by up to 0.34 nats and the KD loss by about 50%. So
       check_teacher_server refuses T != 1 with a served teacher (capture in-process for another temperature).
    Computed in float64, returned as float32 (ids int64).
    """
    ids, raw = ids.long(), raw_log_probs.double()
    real = ids < vocab_size
    short = (real.sum(1) < k).nonzero()
    if short.numel():
        position = int(short[0, 0])
        raise TeacherServerError(
            f"the teacher server's top {ids.shape[1]} at position {position} holds only {int(real[position].sum())} ids "
            f"of the real vocabulary (< {vocab_size}): the served model ranks its padding ids high. Ask for more "
            f"log-probabilities than teacher_server.top_k={k} (the padding ids are dropped), or serve a trained model.")
    # Real ids first, each group still most likely first (a stable sort of the padding flags).
    chosen = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices[:, :k]
    ids_k, log_probs = ids.gather(1, chosen), raw.gather(1, chosen)
    padding_mass = torch.where(real, torch.zeros_like(raw), raw.exp()).sum(1)
    log_probs = log_probs - torch.log1p(-padding_mass.clamp(max=1 - 1e-12))[:, None]
    # The rest as 1 - sum, in log space: -expm1(logsumexp) keeps its digits while the top k hold little mass. A rest
    # within the float32 rounding of the k values is noise, and 1 / T > 1 powers would inflate it (1e-7 -> 3e-4 at
    # T = 2): it is taken as 0.
    rest = -torch.expm1(torch.logsumexp(log_probs, 1).clamp(max=0))
    rounding = 4 * 2.0**-24 * (log_probs.exp() * log_probs.abs()).sum(1)
    log_rest = torch.log((rest - rounding).clamp(min=0))
    scaled, scaled_rest = log_probs / temperature, log_rest / temperature
    log_norm = torch.logaddexp(torch.logsumexp(scaled, 1), scaled_rest)
    return ids_k, (scaled - log_norm[:, None]).float(), (scaled_rest - log_norm).exp().float()


def counted_topk(answers: list[PromptTopK], labels: torch.Tensor, k: int, temperature: float, vocab_size: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k at the counted positions of a micro-batch, in the order the loss counts them (row by row,
    position by position, `next_token_mask`): ids (N, k), log-probabilities (N, k) at `temperature` and the tail (N,),
    the form offline.TopKReader.batch returns and losses' stored-top-k path reads.

    answers[i] is the answer for row i of the batch as sent: its first L_i tokens (right padding after them).
    """
    mask = (labels[:, 1:] != -100).cpu()  # data.next_token_mask, on the CPU where the answers are
    if len(answers) != mask.shape[0]:
        raise ValueError(f"{len(answers)} answers for a batch of {mask.shape[0]} rows")
    ids, log_probs = [], []
    for row, answer in enumerate(answers):
        sent = answer.ids.shape[0]
        if mask[row, sent:].any():
            raise ValueError(f"row {row} counts positions past the {sent + 1} tokens sent to the teacher server: send "
                             "each row up to its last labelled token (right padding only)")
        ids.append(answer.ids[mask[row, :sent]])
        log_probs.append(answer.log_probs[mask[row, :sent]])
    ids_k, log_probs_k, tail = topk_at_temperature(torch.cat(ids), torch.cat(log_probs), k, temperature, vocab_size)
    return ids_k.to(device), log_probs_k.to(device), tail.to(device)


def rows_to_send(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The rows of a right-padded batch without their padding: what `submit` sends."""
    lengths = (attention_mask.sum(1) if attention_mask is not None else
               torch.full((input_ids.shape[0],), input_ids.shape[1]))
    return [input_ids[row, : int(length)].tolist() for row, length in enumerate(lengths)]


def prefetched(teacher: ServedTeacher, batches: Iterable[list[list[int]]], depth: int) -> Iterator[list[PromptTopK]]:
    """The answers of `batches` (each a list of rows) in order, keeping the next `depth` batches' requests in flight
    while the caller works on the current one (depth 0: each batch is asked when it is reached)."""
    batches = iter(batches)
    pending = collections.deque(teacher.submit(rows) for rows in itertools.islice(batches, depth + 1))
    while pending:
        future = pending.popleft()
        following = next(batches, None)
        if following is not None:
            pending.append(teacher.submit(following))
        yield teacher.wait(future)


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks: each raises one TeacherServerError line that names the fix, before any training
# ---------------------------------------------------------------------------------------------------------------------


def check_reachable(teacher: ServedTeacher) -> None:
    """The server answers GET /v1/models, and takes the API key (one try: a server that is not up yet is a mistake at
    start-up, not a fault to wait out)."""
    try:
        status, data, _ = teacher._call("GET", "/v1/models", retry=False)
    except TeacherServerError as error:
        raise TeacherServerError(f"teacher_server.url {teacher.url} does not answer ({error.reason}). Start the server "
                                 f"with: {teacher.start_command()}, wait for it to print that it is ready, or fix the "
                                 "URL.") from None
    if status == 401:
        sent = "the one sent" if "Authorization" in teacher._headers else "none was sent"
        raise TeacherServerError(f"teacher server {teacher.url} refuses the API key ({sent}): set "
                                 "teacher_server.api_key_env to the environment variable that holds the key given to "
                                 "vLLM's --api-key.")
    if status != 200:
        raise TeacherServerError(f"teacher server {teacher.url} answered GET /v1/models with HTTP {status}: "
                                 f"{_server_message(data)}. Is it a vLLM server?")


def check_model_served(teacher: ServedTeacher) -> None:
    """teacher.model is one of the names the server serves; None becomes the server's only model."""
    names = teacher.served_models()
    if teacher.model is None:
        if len(names) != 1:
            raise TeacherServerError(f"teacher server {teacher.url} serves {len(names)} models ({', '.join(names)}): "
                                     "set teacher_server.model to one of them.")
        teacher.model = names[0]
    if teacher.model not in names:
        raise TeacherServerError(f"teacher server {teacher.url} does not serve model {teacher.model!r}; it serves: "
                                 f"{', '.join(names)}. Set teacher_server.model to one of them (or null when it serves "
                                 "one), or start the server with --served-model-name.")


def check_max_model_len(teacher: ServedTeacher, max_length: int) -> None:
    """The server takes rows of `max_length` tokens (tokenizer.max_length): its --max-model-len holds them plus the one
    token each request generates."""
    served = {entry["id"]: entry.get("max_model_len") for entry in teacher._json("GET", "/v1/models")["data"]}
    limit = served.get(teacher.model) if teacher.model is not None else next(iter(served.values()), None)
    if limit is not None and limit < max_length + 1:
        raise TeacherServerError(f"teacher server {teacher.url} takes at most {limit} tokens per request (its "
                                 f"--max-model-len), but rows of tokenizer.max_length={max_length} need "
                                 f"{max_length + 1}: restart it with --max-model-len {max_length + 1} or more.")


def check_max_logprobs(teacher: ServedTeacher, k: int | None = None) -> None:
    """The server answers k log-probabilities per position (its --max-logprobs is at least k)."""
    k = k or teacher.top_k
    status, data, _ = teacher._call("POST", "/v1/completions", teacher.request_body([0, 0], k))
    if status == 400 and "logprobs" in _server_message(data).lower():
        raise TeacherServerError(f"teacher server {teacher.url} refuses {k} log-probabilities per position "
                                 f"({_server_message(data)}): restart it with --max-logprobs {k} or more "
                                 "(serve_teacher.sh passes 256), or lower teacher_server.top_k.")
    if status != 200:
        raise TeacherServerError(f"teacher server {teacher.url} refused a 2-token request: HTTP {status}: "
                                 f"{_server_message(data)}")


def check_vocabulary(teacher: ServedTeacher, student_vocab_size: int) -> None:
    """The served model's vocabulary holds every id of the student's real vocabulary (vLLM refuses a prompt id at or
    above its model's vocabulary size, so the largest student id is sent as a prompt)."""
    largest = student_vocab_size - 1
    status, data, _ = teacher._call("POST", "/v1/completions", teacher.request_body([largest, largest], 1))
    if status == 400 and "vocab" in _server_message(data).lower():
        raise TeacherServerError(f"the model served at {teacher.url} has a smaller vocabulary than the student's real "
                                 f"vocabulary of {student_vocab_size} ids ({_server_message(data)}): serve a teacher "
                                 "with the student's tokenizer (or use distillation.cross_tokenizer with an "
                                 "in-process teacher).")
    if status != 200:
        raise TeacherServerError(f"teacher server {teacher.url} refused a 2-token request: HTTP {status}: "
                                 f"{_server_message(data)}")


def check_same_tokenizer(teacher: ServedTeacher, texts: list[str], student_ids: list[list[int]],
                         add_special_tokens: bool = False) -> None:
    """The server's tokenizer gives the student's ids for each text (the first rendered rows, say): the ids the
    trainer sends mean the same tokens to the teacher."""
    for row, (text, ids) in enumerate(zip(texts, student_ids)):
        served = teacher.tokenize(text, add_special_tokens)
        if served != list(ids):
            at = next((i for i, (a, b) in enumerate(zip(served, ids)) if a != b), min(len(served), len(ids)))
            raise TeacherServerError(
                f"the tokenizer of the model served at {teacher.url} gives other ids than the student's for row {row} "
                f"(first difference at token {at}: server {served[at:at + 3]}, student {list(ids[at:at + 3])}): serve "
                "a teacher that shares the student's tokenizer (models.teacher's tokenizer must be the served one).")


def check_raw_log_probs(teacher: ServedTeacher, row: list[int], tolerance: float = 1e-4) -> None:
    """The server returns the model's raw log-softmax: at every position the top-k log-probabilities sum to at most 1,
    and a request's sampling settings (temperature, top_k, top_p) change none of them. A server started with
    --logprobs-mode raw_logits or processed_logits returns logits, which fail the first test."""
    plain = teacher.row_topk(row)
    tempered = teacher.row_topk(row, temperature=0.5, top_k=5, top_p=0.5)
    mass = torch.logsumexp(plain.log_probs.double(), 1).max().item()
    problem = None
    if mass > tolerance:
        problem = f"the top {teacher.top_k} log-probabilities of a position sum to exp({mass:.3g}) > 1: they are logits"
    elif not (torch.equal(plain.ids, tempered.ids) and torch.allclose(plain.log_probs, tempered.log_probs, atol=1e-6)):
        problem = "a request's temperature, top_k and top_p change them: they are processed, not raw"
    if problem:
        raise TeacherServerError(f"teacher server {teacher.url} does not return raw log-probabilities ({problem}). "
                                 "Restart it with --logprobs-mode raw_logprobs (serve_teacher.sh's default).")


def run_startup_checks(teacher: ServedTeacher, student_vocab_size: int, texts: list[str],
                       student_ids: list[list[int]], max_length: int | None = None,
                       add_special_tokens: bool = False) -> None:
    """Every start-up check, in the order a user would fix them; `texts` and `student_ids` are the first rendered rows
    and the student tokenizer's ids of them, `max_length` the longest row the trainer sends."""
    check_reachable(teacher)
    check_model_served(teacher)
    if max_length is not None:
        check_max_model_len(teacher, max_length)
    check_max_logprobs(teacher)
    check_vocabulary(teacher, student_vocab_size)
    check_same_tokenizer(teacher, texts, student_ids, add_special_tokens)
    probe = next((ids for ids in student_ids if len(ids) >= 2), None)
    if probe is not None:
        check_raw_log_probs(teacher, list(probe)[:64])


# ---------------------------------------------------------------------------------------------------------------------
# The scripts' `teacher_server` block (distil_logits.py, distil_dpo.py)
# ---------------------------------------------------------------------------------------------------------------------


def check_server_block(server: dict) -> None:
    """The values of a `teacher_server` block with a url (distil_logits.py's and distil_dpo.py's), before anything is
    loaded or written."""
    if not isinstance(server["url"], str) or not server["url"].startswith(("http://", "https://")):
        raise ConfigError(f"teacher_server.url must be null or an http(s) URL such as http://127.0.0.1:8000, got "
                          f"{server['url']!r}.")
    for key, low in (("top_k", 1), ("max_retries", 0), ("prefetch", 0)):
        if isinstance(server[key], bool) or not isinstance(server[key], int) or server[key] < low:
            raise ConfigError(f"teacher_server.{key} must be an integer >= {low}, got {server[key]!r}.")
    if isinstance(server["timeout_s"], bool) or not isinstance(server["timeout_s"], (int, float)) \
            or server["timeout_s"] <= 0:
        raise ConfigError(f"teacher_server.timeout_s must be a number of seconds > 0, got {server['timeout_s']!r}.")
    for key in ("model", "api_key_env"):
        if server[key] is not None and not isinstance(server[key], str):
            raise ConfigError(f"teacher_server.{key} must be null or a string, got {server[key]!r}.")
    if server["api_key_env"] and server["api_key_env"] not in os.environ:
        raise ConfigError(f"teacher_server.api_key_env names the environment variable {server['api_key_env']}, which "
                          "is not set: export it with the server's --api-key (the key never goes in the config).")


def check_teacher_server(config: dict) -> None:
    """The teacher_server block's values and its combinations with the rest of the config (validate_config's step),
    before anything is loaded or written."""
    server = config["teacher_server"]
    if server["url"] is None:
        return
    check_server_block(server)
    distillation, offline = config["distillation"], config["offline"]
    if distillation["alpha"] == 0:
        raise ConfigError("teacher_server.url is set but distillation.alpha is 0 (plain SFT asks no teacher); set "
                          "teacher_server.url: null or alpha > 0.")
    if distillation["temperature"] != 1:
        # The server answers the top k at T = 1; the tempered mass outside them needs every logit (topk_at_temperature).
        raise ConfigError(f"teacher_server.url needs distillation.temperature: 1 (got {distillation['temperature']}): "
                          "the server's top-k at T = 1 cannot give the exact tempered distribution; use T = 1 or an "
                          "in-process teacher (docs/served-teacher.md).")
    if distillation["cross_tokenizer"]:
        raise ConfigError("teacher_server.url needs a teacher that shares the student's tokenizer; set "
                          "distillation.cross_tokenizer: null, or teacher_server.url: null for an in-process teacher.")
    if offline["mode"] == "train":
        raise ConfigError("offline.mode: train reads the teacher from the capture; set teacher_server.url: null (a "
                          "capture through the server is offline.mode: capture).")
    if offline["mode"] == "capture" and server["top_k"] < offline["top_k"]:
        raise ConfigError(f"teacher_server.top_k={server['top_k']} is below offline.top_k={offline['top_k']}: the "
                          "capture stores offline.top_k ids per position from the server's answer; raise "
                          "teacher_server.top_k.")
    if config["training"].get("packing"):
        raise ConfigError("teacher_server.url needs training.packing: false (the server would read a packed row as one "
                          "sequence, across its documents).")


def served_teacher_from_config(config: dict, tokenizer, max_workers: int = 8,
                               texts: list[str] | None = None) -> tuple[ServedTeacher, dict]:
    """The client of config["teacher_server"], and run_startup_checks's keyword arguments for it: `texts` (default: the
    first rendered rows of the dataset) and the student tokenizer's ids of them."""
    from data import rendered_texts

    server = config["teacher_server"]
    teacher = ServedTeacher(server["url"], model=server["model"], top_k=server["top_k"],
                            api_key=os.environ[server["api_key_env"]] if server["api_key_env"] else None,
                            timeout_s=server["timeout_s"], max_retries=server["max_retries"], max_workers=max_workers)
    texts = rendered_texts(config["dataset"], tokenizer, rows=4) if texts is None else texts
    student_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return teacher, {"texts": texts, "student_ids": student_ids, "max_length": config["tokenizer"]["max_length"]}
