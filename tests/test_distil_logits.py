"""distil_logits.main end to end on tiny models: losses logged and finite, parameters that must change (trainable)
and must not (Spectrum-frozen, teacher), a saved student that loads and generates, plain SFT without a teacher,
one step at batch 4 equal to two accumulated steps at batch 2, resume from a checkpoint, the model card, and bad
input stopped before anything is written."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import distil_logits
from common import ConfigError, deep_merge, load_overrides
from data import CHATML_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_end_to_end_with_spectrum(assets, tmp_path):
    spectrum = tmp_path / "spectrum.yaml"
    spectrum.write_text("unfrozen_parameters:\n- ^model.layers.1.\n- ^lm_head.weight$\n")
    config = tiny_config(assets, str(tmp_path / "out"))
    config["spectrum"]["layers_to_unfreeze"] = str(spectrum)
    before = weights(assets["student"])
    trainer = distil_logits.main(config)

    logs = trainer.state.log_history
    train_logs = [log for log in logs if "kd_loss" in log]
    eval_logs = [log for log in logs if "eval_kd_loss" in log]
    assert train_logs and eval_logs
    for log in train_logs:
        assert math.isfinite(log["loss"]) and log["kd_loss"] > 0 and log["ce_loss"] > 0
        # logged parts are per-token means; the total is their alpha mix (alpha 0.5)
    assert all(math.isfinite(log["eval_ce_loss"]) and log["eval_kd_loss"] > 0 for log in eval_logs)

    out = config["training"]["output_dir"]
    after = weights(out)
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        should_change = name.startswith("model.layers.1.") or name == "lm_head.weight"
        assert changed == should_change, name
    teacher_on_disk = weights(assets["teacher"])
    for name, parameter in trainer.teacher.named_parameters():
        assert torch.equal(parameter.detach().cpu(), teacher_on_disk[name]), name
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())

    saved = json.load(open(os.path.join(out, "distillation_config.json")))
    assert saved["distillation"]["alpha"] == 0.5
    # The model card names the teacher, the student and the method, not TRL's "fine-tuned version of [None]".
    card = open(os.path.join(out, "README.md")).read()
    assert f"- Teacher: `{assets['teacher']}`" in card and f"- Student: `{assets['student']}`" in card
    assert "logit distillation: loss = 0.5 * KD + 0.5 * CE, KD = forward_kl at temperature 2.0" in card
    assert "[None]" not in card and "trained with SFT" not in card
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE  # the tokenizer's own (chat_template: None)
    student = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit that is red."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    # The saved generation_config stops at <|im_end|> as well as at <|endoftext|> (test_chat_template.py).
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert student.generation_config.eos_token_id == stops
    assert len(generated) == 5 or (1 <= len(generated) < 5 and generated[-1] in stops)


def test_saved_tokenizer_round_trips_next_to_a_qwen2_config(assets):
    """AutoTokenizer can rebuild a tokenizer saved beside a qwen2 config with Qwen2's own class: ids must not move."""
    original = AutoTokenizer.from_pretrained(assets["tokenizer"])
    beside_model = AutoTokenizer.from_pretrained(assets["student"])
    text = "<|im_start|>user\nSay café and 日本, ok?\n\n  Two  spaces.<|im_end|>\n"
    assert original(text)["input_ids"] == beside_model(text)["input_ids"]


def test_alpha_zero_is_plain_sft_without_teacher(assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"), alpha=0.0)
    config["models"]["teacher"] = str(tmp_path / "no-such-teacher")  # never loaded
    trainer = distil_logits.main(config)
    assert trainer.teacher is None
    logs = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert logs and all(log["kd_loss"] == 0 and log["loss"] == pytest.approx(log["ce_loss"], rel=1e-2) for log in logs)


def sgd_step(assets, out, batch, accumulation):
    config = tiny_config(assets, out, alpha=0.5, divergence="jsd")
    config["dataset"]["eval_size"] = 0
    config["training"].update(
        max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, optim="sgd",
        learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no",
    )
    distil_logits.main(config)
    return weights(out)


def test_one_batch_of_4_equals_two_accumulated_batches_of_2(assets, tmp_path):
    """With SGD the update is the gradient, so equal weights mean equal gradients. The rows have different numbers of
    trained tokens, so a per-micro-batch mean would fail this."""
    start = weights(assets["student"])
    single = sgd_step(assets, str(tmp_path / "a"), 4, 1)
    accumulated = sgd_step(assets, str(tmp_path / "b"), 2, 2)
    assert any(not torch.equal(start[name], single[name]) for name in start)
    for name in single:
        torch.testing.assert_close(single[name], accumulated[name], rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_matches_uninterrupted_run(assets, tmp_path):
    def run(out, resume=None):
        config = tiny_config(assets, out)
        config["dataset"]["eval_size"] = 0
        config["training"].update(max_steps=4, save_steps=2, save_total_limit=None, resume_from_checkpoint=resume)
        return distil_logits.main(config)

    full = str(tmp_path / "full")
    run(full)
    interrupted = str(tmp_path / "interrupted")
    run(interrupted)
    # Pretend the run died after checkpoint-2: only that checkpoint is left.
    import shutil

    shutil.rmtree(os.path.join(interrupted, "checkpoint-4"))
    for name in os.listdir(interrupted):
        if not name.startswith("checkpoint-"):
            path = os.path.join(interrupted, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    trainer = run(interrupted, resume=True)
    assert trainer.state.global_step == 4
    for name, value in weights(full).items():
        torch.testing.assert_close(value, weights(interrupted)[name], rtol=1e-6, atol=1e-7)


def test_finished_run_is_not_overwritten(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "distillation_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        distil_logits.main(tiny_config(assets, str(out)))


def mismatched_student(assets, tmp_path):
    """The student with a tokenizer whose ids are shuffled relative to the teacher's."""
    import shutil

    folder = tmp_path / "other-student"
    shutil.copytree(assets["student"], folder)
    data = json.load(open(folder / "tokenizer.json"))
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    a, b = tokens[100], tokens[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(data, open(folder / "tokenizer.json", "w"))
    return str(folder)


@pytest.mark.parametrize("change,message", [
    (lambda c, a, t: c["distillation"].update(temperature=0), "temperature must be > 0"),
    (lambda c, a, t: c["distillation"].update(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda c, a, t: c["distillation"].update(divergence="kl"), "unknown divergence 'kl'"),
    (lambda c, a, t: c["dataset"].update(name=str(t / "missing.jsonl")), "does not exist"),
    (lambda c, a, t: c["spectrum"].update(layers_to_unfreeze=str(t / "missing.yaml")), "Spectrum file"),
    (lambda c, a, t: c["training"].update(learning_rat=1e-3), "unknown config key 'training.learning_rat'"),
    (lambda c, a, t: c["models"].update(student=mismatched_student(a, t)), "Set distillation.cross_tokenizer"),
    (lambda c, a, t: c["tokenizer"].update(max_length=4), "max_length=4"),
])
def test_bad_input_stops_before_writing(assets, tmp_path, change, message):
    config = tiny_config(assets, str(tmp_path / "out"))
    change(config, assets, tmp_path)
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_in_one_line(assets, tmp_path):
    overrides = tmp_path / "override.yaml"
    overrides.write_text(f"dataset:\n  name: {tmp_path / 'missing.jsonl'}\nmodels:\n  teacher: {assets['teacher']}\n"
                         f"  student: {assets['student']}\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "distil_logits.py"), "--config", str(overrides)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: dataset file")
    assert "Traceback" not in result.stderr


def test_config_overrides_deep_merge_and_reject_unknown_keys(tmp_path):
    base = {"distillation": {"alpha": 0.5, "temperature": 2.0}, "training": {"output_dir": "x"}}
    merged = deep_merge(base, {"distillation": {"alpha": 0.1}, "training": {"max_steps": 3}})
    assert merged == {"distillation": {"alpha": 0.1, "temperature": 2.0}, "training": {"output_dir": "x", "max_steps": 3}}
    with pytest.raises(ConfigError, match="unknown config key 'distillation.alhpa'"):
        deep_merge(base, {"distillation": {"alhpa": 0.1}})
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"distillation": {"temperature": 1.0}}))
    assert load_overrides(base, ["--config", str(path)])["distillation"] == {"alpha": 0.5, "temperature": 1.0}
