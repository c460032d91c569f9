"""On-policy distillation (distil_logits.py with on_policy.fraction > 0, on_policy.py): completions are labelled and
prompts are not, a cut-off completion carries no end token, the teacher reads exactly the student's sampled sequence,
prompt-only rows train at fraction 1, a batch of 4 equals 2 x 2 accumulation with unequal completion lengths,
fraction 0 trains bit-identically to a run whose sampling machinery is on but never samples, a resumed run samples
the same completions, bad settings stop before anything is written, and 2-process DDP and ZeRO-3 runs sample and
train on the CPU."""

import json
import os
import shutil

import pytest
import torch
from conftest import CONVERSATIONS, tiny_config
from safetensors.torch import load_file
from transformers import AutoTokenizer

import distil_logits
import on_policy
from common import ConfigError
from data import CHATML_TEMPLATE, tokenize_row

PROMPT_ONLY = [{"conversations": [{"from": "human", "value": "Name a colour."}]},
               {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "A number?"}]}]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def on_policy_config(assets, out, data=None, **on_policy_settings):
    config = tiny_config(assets, out, alpha=0.5, divergence="reverse_kl", temperature=1.0)
    config["dataset"]["eval_size"] = 0
    if data is not None:
        config["dataset"]["name"] = data
    config["on_policy"].update({"fraction": 1.0, "max_new_tokens": 6, **on_policy_settings})
    config["training"].update(save_strategy="no", eval_strategy="no")
    return config


def end_of_turn(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer, on_policy.end_of_turn_id(tokenizer)


def test_completions_are_labelled_through_the_end_token_and_a_cut_one_has_none(assets):
    tokenizer, eot = end_of_turn(assets)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    pad = tokenizer.pad_token_id
    batch = on_policy.label_completions(
        prompts=[[5, 6, 7], [8, 9]],
        completions=[[11, 12, eot, pad, pad], [13, 14, 15, 16, 17]],  # row 2 was cut at max_new_tokens = 5
        stop_ids={eot, tokenizer.eos_token_id}, max_length=64, pad_token_id=pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 11, 12, eot, pad], [8, 9, 13, 14, 15, 16, 17]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 11, 12, eot, -100], [-100, -100, 13, 14, 15, 16, 17]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 7]
    assert batch["completion_lengths"].tolist() == [3, 5]
    # max_length cuts the completion too, and no end token is added where it was cut.
    cut = on_policy.label_completions([[5, 6, 7]], [[11, 12, eot]], {eot}, max_length=5, pad_token_id=pad)
    assert cut["input_ids"].tolist() == [[5, 6, 7, 11, 12]] and cut["labels"].tolist() == [[-100, -100, -100, 11, 12]]


def test_prompt_is_the_conversation_before_the_last_answer(assets):
    tokenizer, _ = end_of_turn(assets)
    two_turns = CONVERSATIONS[1]
    row = tokenize_row(two_turns, tokenizer, "sharegpt", 256, with_prompt=True)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Pick an animal from the sea."},
         {"role": "assistant", "content": "Shark."}, {"role": "user", "content": "Another one?"}],
        tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["prompt_ids"]) == expected
    assert row["input_ids"][:len(row["prompt_ids"])] == row["prompt_ids"]  # a prefix of the whole row
    prompt_only = tokenize_row(PROMPT_ONLY[0], tokenizer, "sharegpt", 256, with_prompt=True)
    assert prompt_only["input_ids"] == prompt_only["prompt_ids"] and prompt_only["labels"] == []
    assert tokenizer.decode(prompt_only["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_padded_head_rows_are_never_sampled(assets):
    """A model whose head is padded beyond the tokenizer (the tiny teacher: 384 rows, 320 tokens) with the padded rows
    made the likeliest still samples real tokens only: the loss could not compare the teacher there. Sampling is
    seeded and leaves the global RNG as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[assets["vocab"]:] *= 50
        assert int(model(torch.tensor([[5, 6, 7]])).logits[0, -1].argmax()) >= assets["vocab"]
    ids, mask = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    state = torch.random.get_rng_state()
    settings = {"sampling_temperature": 1.0, "top_p": 1.0}
    first = on_policy.sample_completions(model, ids, mask, settings, [1], 0, assets["vocab"], 7, 8)
    assert torch.equal(state, torch.random.get_rng_state())
    assert max(max(row) for row in first) < assets["vocab"]
    assert first == on_policy.sample_completions(model, ids, mask, settings, [1], 0, assets["vocab"], 7, 8)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS[:4] + PROMPT_ONLY * 2))
    return str(path)


def test_prompt_only_rows_train_at_fraction_one(assets, tmp_path, mixed_data, monkeypatch):
    """Fraction 1 keeps the prompt-only rows (fraction 0.5 drops them: a dataset batch needs answers). Every
    micro-batch samples, and each step generates once for both of its micro-batches; the teacher reads exactly
    prompt + the student's own completion; the sampled tokens are labelled, the prompt tokens are not; the student's
    weights move."""
    generated, teacher_inputs = [], []
    sample = on_policy.sample_completions

    def record(*args, **kwargs):
        generated.append((args[1].clone(), args[2].clone(), sample(*args, **kwargs)))
        return generated[-1][2]

    monkeypatch.setattr(on_policy, "sample_completions", record)
    label = on_policy.label_completions
    built = []
    monkeypatch.setattr(on_policy, "label_completions", lambda *a, **k: built.append(label(*a, **k)) or built[-1])
    load = distil_logits.load_causal_lm

    def load_and_watch(name, config, trainable=True):
        model = load(name, config, trainable)
        if not trainable:  # the teacher: record the ids it reads
            model.register_forward_pre_hook(lambda m, a, k: teacher_inputs.append(k["input_ids"].clone()),
                                            with_kwargs=True)
        return model

    monkeypatch.setattr(distil_logits, "load_causal_lm", load_and_watch)
    config = on_policy_config(assets, str(tmp_path / "out"), data=mixed_data)
    config["training"]["max_steps"] = 2
    trainer = distil_logits.main(config)
    assert len(trainer.train_dataset) == 8  # 4 answered + 4 prompt-only rows, none dropped
    logs = [log for log in trainer.state.log_history if "kd_loss_on_policy" in log]
    assert len(logs) == 2 and all("kd_loss" not in log and "ce_loss" not in log for log in logs)
    assert all(0 < log["completion_length"] <= 6 and log["sampling_tokens_per_second"] > 0 for log in logs)
    assert len(generated) == 2 and len(built) == 4  # 2 steps x 2 micro-batches, every one sampled, one generate a step
    assert all(len(completions) == 4 for _, _, completions in generated)  # both micro-batches' 2 rows
    # The first two teacher calls are the head check (heads.check_head_matches_forward); then one per micro-batch.
    assert len(teacher_inputs) == 2 + 4
    for micro_batch, (batch, seen) in enumerate(zip(built, teacher_inputs[2:])):
        assert torch.equal(seen.cpu(), batch["input_ids"])
        prompt_ids, prompt_mask, completions = generated[micro_batch // 2]
        rows = slice(2 * (micro_batch % 2), 2 * (micro_batch % 2) + 2)
        for row, (ids, mask, completion) in enumerate(zip(prompt_ids[rows], prompt_mask[rows], completions[rows])):
            prompt = ids[mask.bool()].tolist()
            length = int(batch["completion_lengths"][row])
            assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
            assert batch["input_ids"][row, len(prompt):len(prompt) + length].tolist() == completion[:length]
            assert (batch["labels"][row, :len(prompt)] == -100).all()
            assert batch["labels"][row, len(prompt):len(prompt) + length].tolist() == completion[:length]
    start, end = weights(assets["student"]), weights(config["training"]["output_dir"])
    assert any(not torch.equal(start[name], end[name]) for name in start)
    half = on_policy_config(assets, str(tmp_path / "half"), data=mixed_data, fraction=0.5)
    half["training"]["max_steps"] = 1
    assert len(distil_logits.main(half).train_dataset) == 4  # rows need answers below fraction 1


def test_spectrum_frozen_parameters_stay_put_when_sampling(assets, tmp_path):
    """With Spectrum, the on-policy step trains only the unfrozen parameters (generation runs the whole student)."""
    spectrum = tmp_path / "spectrum.yaml"
    spectrum.write_text("unfrozen_parameters:\n- ^model.layers.1.\n- ^lm_head.weight$\n")
    config = on_policy_config(assets, str(tmp_path / "out"))
    config["spectrum"]["layers_to_unfreeze"] = str(spectrum)
    config["training"]["max_steps"] = 1
    trainer = distil_logits.main(config)
    assert any("kd_loss_on_policy" in log for log in trainer.state.log_history)
    start, end = weights(assets["student"]), weights(str(tmp_path / "out"))
    for name in start:
        trained = name.startswith("model.layers.1.") or name == "lm_head.weight"
        assert torch.equal(start[name], end[name]) != trained, name


def fixed_completions(student, prompt_ids, prompt_mask, settings, stop_ids, pad_token_id, vocab_size, seed,
                      max_new_tokens):
    """Deterministic completions of unequal lengths (1 to 5 tokens, from the prompt's length), ending in the end
    token for even lengths and cut off (no end token) for odd ones."""
    completions = []
    for mask in prompt_mask:
        length = int(mask.sum()) % 5 + 1
        tokens = [40 + i for i in range(length)]
        completions.append(tokens[:-1] + [max(stop_ids)] if length % 2 == 0 else tokens)
    return completions


def sgd_step(assets, out, batch, accumulation, fraction=1.0, max_steps=1):
    config = on_policy_config(assets, out, fraction=fraction)
    config["training"].update(
        max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, optim="sgd",
        learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        activation_checkpointing=True)
    return distil_logits.main(config)


def test_batch_of_4_equals_two_accumulated_batches_of_2_with_unequal_completions(assets, tmp_path, monkeypatch):
    """SGD: equal weights mean equal gradients. The completions differ in length within and across micro-batches, so
    normalising each micro-batch by its own tokens would fail; the step's N (counted after sampling) passes.
    Tolerance: float32 sums in another order (the existing batch-vs-accumulation test uses the same)."""
    lengths = []

    def fixed_and_recorded(*args, **kwargs):
        completions = fixed_completions(*args, **kwargs)
        lengths.append([len(completion) for completion in completions])
        return completions

    monkeypatch.setattr(on_policy, "sample_completions", fixed_and_recorded)
    sgd_step(assets, str(tmp_path / "a"), 4, 1)
    sgd_step(assets, str(tmp_path / "b"), 2, 2)
    assert len(lengths) == 2  # one generation per step: the 2 x 2 run samples its 4 rows together too
    # The 2 x 2 run's micro-batches have unequal token counts, so per-micro-batch means would differ.
    first, second = lengths[1][:2], lengths[1][2:]
    assert lengths[0] == lengths[1] and sum(first) != sum(second) and len(set(first + second)) > 1
    start, a, b = weights(assets["student"]), weights(str(tmp_path / "a")), weights(str(tmp_path / "b"))
    assert any(not torch.equal(start[name], a[name]) for name in start)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_fraction_zero_trains_bit_identically(assets, tmp_path, monkeypatch):
    """Fraction 0 takes today's code path (no prompt collator, no sampler). A fraction so small that no micro-batch
    samples runs all the on-policy machinery (prompt column, collator, get_batch_samples, token count) and must give
    the very same weights and losses, bit for bit."""
    calls = []
    monkeypatch.setattr(on_policy, "sample_completions", lambda *a, **k: calls.append(1))
    plain = sgd_step(assets, str(tmp_path / "plain"), 2, 2, fraction=0.0, max_steps=2)
    assert plain.on_policy is None
    machinery = sgd_step(assets, str(tmp_path / "machinery"), 2, 2, fraction=1e-12, max_steps=2)
    assert machinery.on_policy is not None and calls == []
    for name, value in weights(str(tmp_path / "plain")).items():
        assert torch.equal(value, weights(str(tmp_path / "machinery"))[name]), name
    logged = [[(log["loss"], log["kd_loss"], log["ce_loss"]) for log in trainer.state.log_history if "kd_loss" in log]
              for trainer in (plain, machinery)]
    assert len(logged[0]) == 2 and logged[0] == logged[1]


def test_resume_samples_the_same_completions(assets, tmp_path, monkeypatch):
    """Steps 2 and 3 of an uninterrupted run and of a run resumed from checkpoint-1 sample in the same micro-batches
    (at seed 42 and fraction 0.5: step 1's first, both of step 2's, none of step 3's) and the same tokens: the
    decision is seeded by seed, step and micro-batch, the step's one generation by seed, step and rank, not by the
    global RNG."""
    samples = {}
    sample = on_policy.sample_completions

    def record(*args, **kwargs):
        samples.setdefault(args[7], []).append(sample(*args, **kwargs))
        return samples[args[7]][-1]

    monkeypatch.setattr(on_policy, "sample_completions", record)

    def run(out, resume=None):
        config = on_policy_config(assets, out, fraction=0.5)
        config["training"].update(max_steps=3, save_steps=1, save_strategy="steps", save_total_limit=None,
                                  resume_from_checkpoint=resume)
        return distil_logits.main(config)

    run(str(tmp_path / "full"))
    full = dict(samples)
    samples.clear()
    interrupted = str(tmp_path / "full")
    for name in os.listdir(interrupted):
        if name != "checkpoint-1":
            path = os.path.join(interrupted, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run(interrupted, resume=True)
    assert [len(rows) for value in full.values() for rows in value] == [2, 4]  # step 1: 1 micro-batch, step 2: both
    assert len(samples) == 1  # step 1's sample is not taken again after the resume
    assert samples == {seed: value for seed, value in full.items() if seed in samples}


@pytest.mark.parametrize("change,message", [
    ({"fraction": 1.5}, r"on_policy.fraction must be in \[0, 1\]"),
    ({"max_new_tokens": 0}, "on_policy.max_new_tokens must be an integer >= 1"),
    ({"temperature": 0}, "on_policy.temperature must be > 0"),
    ({"sampling_temperature": 0}, "on_policy.sampling_temperature must be > 0"),
    ({"divergence": "kl"}, "on_policy.divergence 'kl' is unknown"),
    ({"top_p": 0}, r"on_policy.top_p must be in \(0, 1\]"),
])
def test_bad_settings_stop_before_writing(assets, tmp_path, change, message):
    config = on_policy_config(assets, str(tmp_path / "out"), **change)
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not (tmp_path / "out").exists()


def test_sampled_micro_batches_train_on_policys_divergence_and_temperature(assets, tmp_path, monkeypatch):
    """distillation says forward KL at T = 2 and only on_policy.fraction is set: the dataset micro-batch trains
    forward KL at T = 2, the sampled one reverse KL at T = 1 (on_policy's defaults), its kd_loss equal to the
    reference formula on the same batch (losses.logit_distillation_loss, full logits) and not to forward KL at T = 2.
    At seed 42 and fraction 0.5, step 1's first micro-batch samples and its second does not. The teacher's head is
    sharpened (x 50): near-uniform tiny models give about the same T^2-scaled KL in both directions and at both T."""
    from transformers import AutoModelForCausalLM

    from losses import logit_distillation_loss

    sharp = str(tmp_path / "sharp_teacher")
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    with torch.no_grad():
        teacher.get_output_embeddings().weight *= 50
    teacher.save_pretrained(sharp)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), sharp)

    calls = []
    student_loss = distil_logits.student_loss

    def recording(model, inputs, labels, answer, terms):
        outputs = student_loss(model, inputs, labels, answer, terms)
        calls.append((inputs["input_ids"].clone(), labels.clone(), terms, outputs["kd_loss"].detach().clone()))
        return outputs

    monkeypatch.setattr(distil_logits, "student_loss", recording)
    config = on_policy_config({**assets, "teacher": sharp}, str(tmp_path / "out"), fraction=0.5)
    config["distillation"].update(divergence="forward_kl", temperature=2.0)
    config["training"].update(max_steps=1)
    distil_logits.main(config)
    assert [(terms.divergence, terms.temperature, terms.kd_weight) for _, _, terms, _ in calls[-2:]] == [
        ("reverse_kl", 1.0, 1.0), ("forward_kl", 2.0, 0.5)]
    input_ids, labels, terms, kd_loss = calls[-2]
    student, teacher = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (assets["student"], sharp))
    with torch.no_grad():
        logits = [model(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != 0)).logits
                  for model in (student, teacher)]
    reference = {divergence: logit_distillation_loss(*logits, labels, divergence, temperature,
                                                     vocab_size=assets["vocab"],
                                                     num_items_in_batch=terms.num_items_in_batch)
                 for divergence, temperature in (("reverse_kl", 1.0), ("forward_kl", 2.0))}
    torch.testing.assert_close(kd_loss, reference["reverse_kl"], rtol=1e-4, atol=1e-6)
    assert not torch.isclose(kd_loss, reference["forward_kl"], rtol=0.03)


def tokenizer_with_end_of_turn(assets):
    tokenizer, _ = end_of_turn(assets)
    return tokenizer


@pytest.mark.parametrize("settings,warned", [
    ({"sampling_temperature": 0.7, "top_p": 1.0}, "sampling_temperature 0.7"),
    ({"sampling_temperature": 1.0, "top_p": 0.9}, "top_p 0.9"),
    ({"sampling_temperature": 1.0, "top_p": 1.0}, None),
])
def test_sampling_that_is_not_the_students_own_distribution_is_warned_once(assets, capsys, settings, warned):
    on_policy.OnPolicySampler({"fraction": 1.0, "max_new_tokens": 8, **settings}, tokenizer_with_end_of_turn(assets),
                              assets["vocab"], 64, seed=0)
    printed = capsys.readouterr().out
    if warned is None:
        assert printed == ""
    else:
        assert printed.count("warning:") == 1 and warned in printed and "student's own distribution" in printed


def test_degenerate_samples_are_warned_and_healthy_ones_are_not(assets, capsys):
    """A step whose completions all run out of room without an end-of-turn token, or repeat themselves ("1 1 1 ..."),
    warns, at most once per WARN_EVERY_STEPS steps; the tiny data's real answers, ended by <|im_end|>, do not (nor do
    they when some of them are cut)."""
    tokenizer = tokenizer_with_end_of_turn(assets)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [turn["value"] for row in CONVERSATIONS[:4] for turn in row["conversations"] if turn["from"] in ("gpt", "assistant")]
    healthy = [tokenizer(answer, add_special_tokens=False)["input_ids"] + [eot] for answer in answers]
    assert on_policy.degenerate_samples(healthy, {eot}) is None
    assert on_policy.degenerate_samples([healthy[0][:-1]] + healthy[1:], {eot}) is None  # one cut at the cap
    ones = tokenizer("1", add_special_tokens=False)["input_ids"]
    repeated = [ones * 16 for _ in range(4)]
    assert "all 4 completions ran out of room" in on_policy.degenerate_samples(repeated, {eot})
    assert "of their 4-grams repeat" in on_policy.degenerate_samples(repeated, {eot})
    assert on_policy.degenerate_samples([row + [eot] for row in repeated], {eot}).endswith("4-grams repeat an earlier one")
    assert on_policy.degenerate_samples([answer[:-1] for answer in healthy], {eot}).startswith(f"all {len(healthy)} completions")

    sampler = on_policy.OnPolicySampler({"fraction": 1.0, "max_new_tokens": 16, "sampling_temperature": 1.0,
                                         "top_p": 1.0}, tokenizer, assets["vocab"], 64, seed=0)
    for step in range(sampler.WARN_EVERY_STEPS + 1):
        sampler.check_health(healthy, step)
    assert capsys.readouterr().out == ""
    for step in range(sampler.WARN_EVERY_STEPS + 1):
        sampler.check_health(repeated, step)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1] for line in printed] == [" step 1", f" step {sampler.WARN_EVERY_STEPS + 1}"]
    assert all("too weak" in line and "SFT or off-policy KD first" in line for line in printed)


def test_offline_capture_is_refused_with_sampling(assets, tmp_path):
    config = on_policy_config(assets, str(tmp_path / "out"))
    config["offline"].update(mode="capture", capture_dir=str(tmp_path / "capture"))
    with pytest.raises(ConfigError, match="needs the teacher online") as error:
        distil_logits.main(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "capture").exists()


# --- several processes on the CPU (gloo), launched like tests/test_multiprocess.py ------------------------------------

FIXED_COMPLETIONS_LAUNCHER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import distil_logits
import on_policy
from common import run_cli
from test_on_policy import fixed_completions

on_policy.sample_completions = fixed_completions
run_cli(distil_logits.main, distil_logits.config)
"""


def overrides(config, path):
    path.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                             "distillation", "on_policy", "training")}))
    return str(path)


@pytest.mark.slow
def test_ddp_two_processes_match_one_with_unequal_completions(assets, tmp_path, monkeypatch):
    """2 processes x batch 2 = one process x 2 accumulated batches of 2, with the fixed completions of unequal
    lengths: N is the sum over both processes' completions (all-reduced after sampling), so the SGD updates match.
    Tolerance as tests/test_multiprocess.py (float32, another summation order)."""
    from test_multiprocess import launch

    from conftest import ROOT

    monkeypatch.setattr(on_policy, "sample_completions", fixed_completions)
    single = str(tmp_path / "single")
    sgd_step(assets, single, 2, 2, max_steps=2)
    config = on_policy_config(assets, str(tmp_path / "ddp"))
    config["training"].update(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="sgd",
                              learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                              activation_checkpointing=True)
    launcher = tmp_path / "launch_fixed.py"
    launcher.write_text(FIXED_COMPLETIONS_LAUNCHER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    log = launch(["--multi_gpu", "--num_processes", "2"], overrides(config, tmp_path / "ddp.json"), script=str(launcher))
    assert "training on 2 process(es)" in log
    for name, value in weights(single).items():
        torch.testing.assert_close(weights(str(tmp_path / "ddp"))[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero3_two_processes_sample_and_train(assets, tmp_path):
    """ZeRO-3 on 2 processes with real sampling: the student's parameters are gathered for generate (a collective
    every process enters, as the decision is the same on all), the run trains and logs the on-policy parts, and the
    consolidated student loads."""
    from test_multiprocess import launch

    config = on_policy_config(assets, str(tmp_path / "zero3"))
    config["training"].update(max_steps=2, gradient_accumulation_steps=1)
    log = launch(["--config_file", "deepspeed_configs/accelerate_zero3.yaml", "--num_processes", "2"],
                 overrides(config, tmp_path / "zero3.json"))
    assert "training on 2 process(es), DistributedType.DEEPSPEED" in log
    state = json.load(open(tmp_path / "zero3" / "trainer_state.json"))
    logs = [entry for entry in state["log_history"] if "kd_loss_on_policy" in entry]
    assert len(logs) == 2
    assert all(0 < entry["kd_loss_on_policy"] < 10 and 1 <= entry["completion_length"] <= 6 for entry in logs)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "zero3"))
