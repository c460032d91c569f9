"""distil_dpo.py on tiny models: both losses (distillm2, dpo_kd) and their gradients against the full-logits formulas
of preference_loss.py and against a hand-written DPO formula; one step at batch 4 equal to two accumulated steps at
batch 2; pairs for prompts built into output_dir/pairs.jsonl, deterministic, continued after an interruption, reused
on a rerun and refused with other settings; the reference log-probabilities stored once, not recomputed per step;
the one-line refusals, before anything is written; an end-to-end run whose saved student loads back, with a model
card that names the method."""

import copy
import functools
import json
import math
import os

import pytest
import torch
from conftest import CONVERSATIONS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import distil_dpo
import on_policy
import preference_data
from common import ConfigError, load_tokenizer
from data import CHATML_TEMPLATE
from heads import add_hidden_states_forward, final_layer, head_transform, teacher_hidden_at_counted_positions
from preference_data import PairCollator, build_pairs, pair_settings, read_pairs, tokenize_pair
from preference_loss import (PreferenceTerms, adaptive_skew, distillm2_reference, dpo_kd_reference,
                             preference_student_loss, sequence_log_probs)
from teacher_signal import TeacherHidden, add_distillation_forward


def preference_rows(conversational: bool = False) -> list[dict]:
    """Pairs from the shared conversations: a row's answer is chosen, the next row's answer rejected (lengths differ)."""
    firsts = [(row["conversations"][-2]["value"], row["conversations"][-1]["value"]) for row in CONVERSATIONS[:4]]
    rows = []
    for index, (prompt, answer) in enumerate(firsts * 3):
        rejected = firsts[(index + 1) % 4][1] + " no" * (index % 3)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": answer}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preference")
    paths = {}
    for name, conversational in (("standard", False), ("conversational", True)):
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in preference_rows(conversational))
    return paths


def dpo_config(assets, output_dir, data, method="dpo_kd", **preference):
    config = copy.deepcopy(distil_dpo.config)
    config["dataset"].update(name=data, eval_size=0, seed=0)
    config["models"].update(teacher=assets["teacher"], student=assets["student"])
    config["tokenizer"]["max_length"] = 64
    config["model_config"]["use_flash_attention"] = False
    config["preference"].update(method=method, **preference)
    config["pairs"].update(max_new_tokens=6, batch_size=4)
    config["training"].update(
        output_dir=output_dir, num_train_epochs=1, max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.0, activation_checkpointing=False,
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, bf16=False)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# The losses against their formulas
# ---------------------------------------------------------------------------------------------------------------------


def tiny_batch(assets):
    tokenizer = load_tokenizer(assets["student"], CHATML_TEMPLATE)
    rows = [tokenize_pair(row, tokenizer, 64) for row in preference_rows()[:3]]
    return PairCollator(tokenizer.pad_token_id)(rows)


def models(assets):
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    return student, teacher


def chunked_loss(assets, batch, terms, reference=None):
    """The loss as the trainer runs it: inside the patched student's forward, against the teacher's hidden states."""
    student, teacher = models(assets)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    add_hidden_states_forward(teacher)
    hidden = teacher_hidden_at_counted_positions(teacher, inputs, batch["labels"], final_layer(teacher))
    answer = TeacherHidden(hidden, teacher.get_output_embeddings(), head_transform(teacher))
    add_distillation_forward(student)
    outputs = student(**inputs, use_cache=False, student_loss=functools.partial(
        preference_student_loss, labels=batch["labels"], teacher=answer, reference_log_probs=reference, terms=terms))
    outputs["loss"].backward()
    return outputs, {name: p.grad.clone() for name, p in student.named_parameters()}


def full_logits_loss(assets, batch, formula):
    student, teacher = models(assets)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    outputs = formula(student(**inputs).logits, teacher_logits)
    outputs["loss"].backward()
    return outputs, {name: p.grad.clone() for name, p in student.named_parameters()}


def counts(batch):
    mask = batch["labels"][:, 1:] != -100
    pairs = mask.shape[0] // 2
    return int(mask[:pairs].sum()), int(mask[pairs:].sum()), pairs


def assert_same_gradients(got, want):
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_distillm2_equals_its_full_logits_formula(assets):
    batch, vocab = tiny_batch(assets), assets["vocab"]
    chosen, rejected, pairs = counts(batch)
    # Unequal skews, a mix other than 1 and T != 1, so that a swapped term, weight or missing T^2 shows.
    settings = dict(skew_chosen=0.1, skew_rejected=0.3, mix=1.25, temperature=2.0)
    terms = PreferenceTerms(method="distillm2", chosen_tokens=chosen, rejected_tokens=rejected, pairs=pairs,
                            vocab_size=vocab, memory_budget_mb=1, **settings)
    got, got_grads = chunked_loss(assets, batch, terms)
    want, want_grads = full_logits_loss(assets, batch, lambda s, t: distillm2_reference(
        s, t, batch["labels"], vocab_size=vocab, **settings))
    for key in ("loss", "chosen_kl", "rejected_kl"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key
    assert float(want["loss"]) == pytest.approx(0.75 * float(want["chosen_kl"]) + 1.25 * float(want["rejected_kl"]))
    assert_same_gradients(got_grads, want_grads)


def test_adaptive_skew_is_distillm2s_clipped_formula():
    gaps = torch.tensor([0.2, 0.1, -0.3, 0.24, 0.6])
    # 1 - (1 - base) * anchor / (gap + 1e-5), clipped to [0.01, base], written out per answer.
    want = [1 - 0.5 * 0.25 / (0.2 + 1e-5), 0.01, 0.5, 1 - 0.5 * 0.25 / (0.24 + 1e-5), 0.5]
    torch.testing.assert_close(adaptive_skew(gaps, 0.25, 0.5), torch.tensor(want))
    assert 0.01 < want[0] < 0.5 and 0.01 < want[3] < 0.5  # two answers between the clips
    torch.testing.assert_close(adaptive_skew(gaps, None, 0.1), torch.full((5,), 0.1))  # no anchor yet: the base


def test_distillm2_with_adaptive_skews_equals_its_per_answer_formula(assets):
    """One skew per answer from its gap and the anchors: the kernel (per-position skew tensors, log-probabilities
    through TRL's kernel) against a loop over answers with one scalar skew each, on full logits."""
    batch, vocab = tiny_batch(assets), assets["vocab"]
    chosen, rejected, pairs = counts(batch)
    settings = dict(skew_chosen=0.4, skew_rejected=0.3, mix=1.25, temperature=2.0)
    # Anchors at the gaps' means: some answers keep the base skew, the others get smaller ones.
    probe, _ = full_logits_loss(assets, batch, lambda s, t: distillm2_reference(
        s, t, batch["labels"], vocab_size=vocab, skew_anchor=(0.0, 0.0), **settings))
    anchor = (float(probe["gaps"][:pairs].mean()), float(probe["gaps"][pairs:].mean()))
    want, want_grads = full_logits_loss(assets, batch, lambda s, t: distillm2_reference(
        s, t, batch["labels"], vocab_size=vocab, skew_anchor=anchor, **settings))
    skews = want["skews"]
    assert len(set(skews[:pairs].tolist())) > 1 and len(set(skews[pairs:].tolist())) > 1, skews
    assert float(skews.min()) < 0.3 and float(skews[:pairs].max()) == pytest.approx(0.4)
    terms = PreferenceTerms(method="distillm2", chosen_tokens=chosen, rejected_tokens=rejected, pairs=pairs,
                            vocab_size=vocab, memory_budget_mb=1, adaptive_skew=True, skew_anchor=anchor, **settings)
    got, got_grads = chunked_loss(assets, batch, terms)
    # The tiny models' answer probabilities are ~1/vocab, so gaps and anchors are ~1e-4 and a float32 rounding of a
    # gap moves its skew by ~1e-5 relative: the values are compared at 1e-4.
    for key in ("loss", "chosen_kl", "rejected_kl"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4), key
    assert float(got["skew/chosen"]) == pytest.approx(float(skews[:pairs].sum()), rel=1e-4)
    assert float(got["skew/rejected"]) == pytest.approx(float(skews[pairs:].sum()), rel=1e-4)
    assert float(got["gap/chosen"]) == pytest.approx(float(want["gaps"][:pairs].sum()), rel=1e-3)
    assert_same_gradients(got_grads, want_grads)
    # The per-answer skews change the loss: with the base skews everywhere it differs.
    fixed, _ = full_logits_loss(assets, batch, lambda s, t: distillm2_reference(s, t, batch["labels"], vocab_size=vocab,
                                                                                **settings))
    assert abs(float(fixed["loss"]) - float(want["loss"])) > 1e-4


def test_dpo_kd_equals_its_full_logits_formula_and_a_hand_written_dpo(assets):
    batch, vocab = tiny_batch(assets), assets["vocab"]
    chosen, rejected, pairs = counts(batch)
    reference = torch.tensor([-30.0, -20.0, -25.0, -31.0, -22.0, -24.0])  # not the policy's: the rewards are not 0
    settings = dict(beta=0.3, alpha=0.7, divergence="reverse_kl", temperature=1.5)
    terms = PreferenceTerms(method="dpo_kd", chosen_tokens=chosen, rejected_tokens=rejected, pairs=pairs,
                            vocab_size=vocab, memory_budget_mb=1, **settings)
    got, got_grads = chunked_loss(assets, batch, terms, reference)
    want, want_grads = full_logits_loss(assets, batch, lambda s, t: dpo_kd_reference(
        s, t, batch["labels"], reference, vocab_size=vocab, **settings))
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    assert float(got["dpo_loss"]) == pytest.approx(float(want["dpo_loss"]), rel=1e-5)
    assert float(got["kd_loss"]) == pytest.approx(float(want["kd_loss"]), rel=1e-5)
    assert float(got["rewards/chosen"]) / pairs == pytest.approx(float(want["rewards/chosen"]), rel=1e-5)
    assert_same_gradients(got_grads, want_grads)

    # DPO by hand: a token loop over each answer's log-probabilities.
    student, _ = models(assets)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    summed = []
    for row in range(batch["labels"].shape[0]):
        total = 0.0
        for position in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][row, position + 1])
            if target != -100:
                total += float(torch.log_softmax(logits[row, position].double(), -1)[target])
        summed.append(total)
    torch.testing.assert_close(sequence_log_probs(logits, batch["labels"]), torch.tensor(summed).float(), rtol=1e-5,
                               atol=1e-4)
    hand = sum(-math.log(1 / (1 + math.exp(-0.3 * ((summed[i] - reference[i]) - (summed[i + pairs] - reference[i + pairs])))))
               for i in range(pairs)) / pairs
    assert float(got["dpo_loss"]) == pytest.approx(hand, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Training through main()
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["distillm2", "dpo_kd"])
def test_one_batch_of_4_pairs_equals_two_accumulated_batches_of_2(assets, preference_files, tmp_path, method):
    """With SGD the update is the gradient. The answers have different lengths, so a per-micro-batch mean of tokens
    or pairs would fail this."""
    def sgd_step(out, batch, accumulation):
        config = dpo_config(assets, str(tmp_path / out), preference_files["standard"], method)
        config["training"].update(max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                  optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0,
                                  lr_scheduler_type="constant")
        distil_dpo.main(config)
        return load_file(os.path.join(tmp_path / out, "model.safetensors"))

    start = load_file(os.path.join(assets["student"], "model.safetensors"))
    single, accumulated = sgd_step("a", 4, 1), sgd_step("b", 2, 2)
    assert any(not torch.equal(start[name], single[name]) for name in start)
    for name in single:
        torch.testing.assert_close(single[name], accumulated[name], rtol=1e-5, atol=1e-6)


def test_dpo_kd_end_to_end_stores_the_reference_once_and_saves_a_student_that_loads(assets, preference_files, tmp_path,
                                                                                   monkeypatch):
    calls = {"reference": 0, "student loads": 0}
    original_reference, original_load = distil_dpo.add_reference_log_probs, distil_dpo.load_causal_lm

    def count_reference(*args, **kwargs):
        calls["reference"] += 1
        return original_reference(*args, **kwargs)

    def count_loads(name, *args, **kwargs):
        calls["student loads"] += name == assets["student"]
        return original_load(name, *args, **kwargs)

    monkeypatch.setattr(distil_dpo, "add_reference_log_probs", count_reference)
    monkeypatch.setattr(distil_dpo, "load_causal_lm", count_loads)
    out = str(tmp_path / "out")
    config = dpo_config(assets, out, preference_files["conversational"], "dpo_kd", alpha=0.5)
    config["dataset"]["eval_size"] = 2
    config["training"].update(max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = distil_dpo.main(config)

    # Stored once per split before training (4 steps, 2 evaluations): no reference model is kept.
    assert calls == {"reference": 2, "student loads": 2}
    assert "student_reference_chosen" in trainer.train_dataset.column_names
    logs = [log for log in trainer.state.log_history if "dpo_loss" in log]
    assert len(logs) == 4
    assert logs[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    assert logs[0]["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    for log in logs:
        assert all(math.isfinite(log[key]) for key in ("loss", "dpo_loss", "kd_loss", "rewards/chosen",
                                                        "rewards/rejected", "rewards/accuracy", "logps/chosen"))
        assert log["kd_loss"] > 0
    assert logs[-1]["dpo_loss"] < math.log(2) and logs[-1]["rewards/accuracy"] > 0.5
    assert any("eval_dpo_loss" in log for log in trainer.state.log_history)

    card = open(os.path.join(out, "README.md")).read()
    assert "preference distillation, dpo_kd: loss = DPO sigmoid loss (beta 0.1" in card and "distil_dpo.py" in card
    tokenizer = AutoTokenizer.from_pretrained(out)
    student = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit that is red."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert student.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 4


def test_distillm2_measures_the_skew_anchor_on_the_first_step_and_keeps_it_in_checkpoints(assets, preference_files,
                                                                                          tmp_path):
    out = str(tmp_path / "out")
    config = dpo_config(assets, out, preference_files["standard"], "distillm2", skew_chosen=0.5, skew_rejected=0.5)
    config["training"].update(max_steps=3, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2)
    trainer = distil_dpo.main(config)
    logs = [log for log in trainer.state.log_history if "skew/chosen" in log]
    assert len(logs) == 3
    # Step 1 trains with the base skews and measures the anchors: its logged mean gaps (per pair, over the step).
    assert logs[0]["skew/chosen"] == pytest.approx(0.5) and logs[0]["skew/rejected"] == pytest.approx(0.5)
    assert trainer.skew_anchor == pytest.approx((logs[0]["gap/chosen"], logs[0]["gap/rejected"]), rel=1e-4)
    assert any(log["skew/chosen"] < 0.5 - 1e-4 or log["skew/rejected"] < 0.5 - 1e-4 for log in logs[1:])
    with open(os.path.join(out, "checkpoint-2", distil_dpo.SKEW_ANCHOR_FILE)) as handle:
        assert tuple(json.load(handle)["skew_anchor"]) == pytest.approx(trainer.skew_anchor)
    card = open(os.path.join(out, "README.md")).read()
    assert "adaptive skew clipped to [0.01, 0.5]" in card and "m rising from 1 to 1.5" in card

    # A resume reads the anchors back rather than measuring them on its first step.
    config["training"].update(resume_from_checkpoint=os.path.join(out, "checkpoint-2"), overwrite_output_dir=True)
    resumed = distil_dpo.main(config)
    assert resumed.skew_anchor == pytest.approx(trainer.skew_anchor)
    last = [log for log in resumed.state.log_history if "skew/chosen" in log][-1]
    assert last["skew/chosen"] == pytest.approx(logs[-1]["skew/chosen"], rel=1e-4)


def test_plain_dpo_loads_no_teacher(assets, preference_files, tmp_path, monkeypatch):
    loaded = []
    original = distil_dpo.load_causal_lm
    monkeypatch.setattr(distil_dpo, "load_causal_lm", lambda name, *a, **k: loaded.append(name) or original(name, *a, **k))
    trainer = distil_dpo.main(dpo_config(assets, str(tmp_path / "out"), preference_files["standard"], "dpo_kd", alpha=0))
    assert assets["teacher"] not in loaded and trainer.teacher is None
    assert all(log["kd_loss"] == 0 for log in trainer.state.log_history if "kd_loss" in log)


# ---------------------------------------------------------------------------------------------------------------------
# Pairs for prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_pairs_are_built_once_then_reused_and_other_settings_are_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = dpo_config(assets, str(out), assets["data"], "distillm2")
    trainer = distil_dpo.main(config)
    settings, pairs = read_pairs(str(out / "pairs.jsonl"))
    assert settings["sampling"] == {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 42, "batch_size": 4}
    assert len(pairs) == len(CONVERSATIONS)
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
    assert any(pair["chosen"] != pair["rejected"] for pair in pairs)  # two models sampled
    assert [log for log in trainer.state.log_history if "chosen_kl" in log]

    def no_build(*args, **kwargs):
        raise AssertionError("pairs were built again")

    monkeypatch.setattr(distil_dpo, "build_pairs", no_build)
    config["training"]["overwrite_output_dir"] = True
    distil_dpo.main(config)
    assert read_pairs(str(out / "pairs.jsonl"))[1] == pairs

    config["pairs"]["temperature"] = 0.7
    before = sorted(os.listdir(out))
    with pytest.raises(ConfigError, match=r"pairs.jsonl holds pairs built with other settings \(sampling"):
        distil_dpo.main(config)
    assert sorted(os.listdir(out)) == before


def test_pair_building_is_deterministic_and_continues_after_an_interruption(assets, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(assets["student"], CHATML_TEMPLATE)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    config = dpo_config(assets, str(tmp_path), assets["data"])
    config["pairs"]["batch_size"] = 3
    prompts = [[{"role": "user", "content": row["conversations"][-2]["value"]}] for row in CONVERSATIONS[:7]]
    settings = pair_settings(config, len(prompts))
    build = functools.partial(build_pairs, settings=settings, prompts=prompts, tokenizer=tokenizer, teacher=teacher,
                              student=student, vocab_size=assets["vocab"], device="cpu")
    whole = build(str(tmp_path / "whole.jsonl"))
    assert whole == build(str(tmp_path / "again.jsonl"))
    # Interrupted inside the second batch, mid-line: the first batch is kept, the rest sampled again.
    lines = open(tmp_path / "whole.jsonl").read().splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    calls = []
    sample = on_policy.sample_completions
    monkeypatch.setattr(on_policy, "sample_completions", lambda *args, **kwargs: calls.append(args[1].shape[0])
                        or sample(*args, **kwargs))
    resumed = build(str(tmp_path / "cut.jsonl"))
    assert resumed == whole and read_pairs(str(tmp_path / "cut.jsonl")) == (settings, whole)
    assert calls == [3, 3, 1, 1]  # batches 2 and 3 (teacher and student each), not batch 1


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------


def foreign_student(assets, tmp_path):
    """The student with a tokenizer whose ids are shuffled relative to the teacher's."""
    import shutil

    folder = tmp_path / "other-student"
    shutil.copytree(assets["student"], folder)
    data = json.load(open(folder / "tokenizer.json"))
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    vocab[tokens[100]], vocab[tokens[101]] = vocab[tokens[101]], vocab[tokens[100]]
    json.dump(data, open(folder / "tokenizer.json", "w"))
    return str(folder)


def without_answer(tmp_path, key="rejected"):
    rows = preference_rows()
    rows[2][key] = ""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("change,message", [
    (lambda c, a, t: c["dataset"].update(name=without_answer(t)), r"bad.jsonl', line 3: the row has no rejected"),
    (lambda c, a, t: c["dataset"].update(name=without_answer(t, "chosen")), r"bad.jsonl', line 3: the row has no chosen"),
    (lambda c, a, t: (c["dataset"].update(name=a["data"]), c["pairs"].update(build=False)),
     "holds prompts without answers and pairs.build is false, so dpo_kd has no pairs"),
    (lambda c, a, t: c["preference"].update(method="dpo"), "unknown preference.method 'dpo'"),
    (lambda c, a, t: c["preference"].update(beta=0), r"preference.beta must be > 0"),
    (lambda c, a, t: c["preference"].update(beta=-0.1), r"preference.beta must be > 0"),
    (lambda c, a, t: c["models"].update(student=foreign_student(a, t)), "tokenizers do not give the same ids"),
    (lambda c, a, t: c["preference"].update(skew_chosen=1.0), "preference.skew_chosen must be strictly between"),
    (lambda c, a, t: c["training"].update(packing=True), "needs training.packing: false"),
])
def test_bad_input_stops_before_writing(assets, preference_files, tmp_path, change, message):
    config = dpo_config(assets, str(tmp_path / "out"), preference_files["standard"])
    change(config, assets, tmp_path)
    with pytest.raises(ConfigError, match=message):
        distil_dpo.main(config)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_bad_method_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    overrides = tmp_path / "override.yaml"
    overrides.write_text("preference:\n  method: dpo\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "distil_dpo.py"), "--config", str(overrides)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: unknown preference.method 'dpo'; choose one of distillm2, dpo_kd."


def test_text_data_and_rows_without_a_prompt_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a text dataset has no prompts"):
        preference_data.data_shape(["text"])
    with pytest.raises(ConfigError, match="need a 'prompt' column"):
        preference_data.data_shape(["chosen", "rejected"])
    with pytest.raises(ConfigError, match="no 'rejected' column"):
        preference_data.data_shape(["prompt", "chosen"])
    assert preference_data.data_shape(["prompt", "chosen", "rejected"]) == "preference"
    assert preference_data.data_shape(["conversations"]) == "prompts"


# ---------------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo_kd", "distillm2"])
def test_ddp_two_processes_match_one(assets, preference_files, tmp_path, method):
    """2 processes x 2 pairs x 2 accumulated = 1 process x 2 pairs x 4 accumulated: the same 8 pairs per step, the
    same SGD updates (plain SGD without clipping, so a wrong normaliser shows as a scale error). distillm2 trains two
    steps: the second uses the adaptive skews, whose anchors the first step measured over both processes."""
    import subprocess
    import sys

    from conftest import ROOT

    def run(name, accumulation, launch_args):
        config = dpo_config(assets, str(tmp_path / name), preference_files["standard"], method, alpha=0.5)
        config["training"].update(max_steps=2 if method == "distillm2" else 1, gradient_accumulation_steps=accumulation,
                                  optim="sgd", learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0,
                                  lr_scheduler_type="constant")
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args,
                   os.path.join(ROOT, "distil_dpo.py"), "--config", str(path)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(os.path.join(tmp_path / name, "model.safetensors")), result.stdout + result.stderr

    single, single_log = run("single", 4, ["--num_processes", "1"])
    double, log = run("ddp", 2, ["--multi_gpu", "--num_processes", "2"])
    assert "training on 2 process(es)" in log
    if method == "distillm2":
        anchors = [line for line in single_log.splitlines() if "adaptive skew: anchors" in line]
        assert anchors and anchors == [line for line in log.splitlines() if "adaptive skew: anchors" in line]
    start = load_file(os.path.join(assets["student"], "model.safetensors"))
    assert any(not torch.equal(start[name], single[name]) for name in start)
    for name, value in single.items():
        torch.testing.assert_close(double[name], value, rtol=1e-5, atol=1e-6)
