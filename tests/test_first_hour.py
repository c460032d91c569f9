"""What a new user meets in a first hour with the scripts (issue 14), one group per numbered item:
1. tokenizers are the same only when they give the same ids for the same text (a student tokenizer with the
   teacher's first ids but fewer merges is refused; one family's tokenizer with extra tokens at the end is not);
2. an output_dir holding an unfinished run's checkpoints is refused unless resume or overwrite is set, and Ctrl-C
   ends with one line saying how to resume;
3. a misspelt or deleted key in the edited `config` dict is one error naming it and the nearest known key, checked
   before the data is tokenized or a model is loaded; the same suggestion for a YAML override;
5. eval_size "auto" (10% of the rows, at least 1, at most 500) and a warmup_steps override that replaces the dict's warmup_ratio;
6. dropped rows are warned about with their count, reason and file rows; a bad row's error names the file and row;
7. the override file, DDP commands, offline capture config and every other YAML block of README.md and docs/*.md
   work as written;
8. the flash-attention and DeepSpeed accelerator lines are printed once or not at all on the CPU (the model card is
   checked in test_distil_logits.py's end-to-end test).
Item 4 (setup.sh on a stock Python) is tests/test_setup.py."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from transformers import AutoTokenizer

import alignment
import common
import distil_dpo
import distil_hidden
import distil_logits
from common import (
    ConfigError,
    build_sft_config,
    check_config_keys,
    check_output_dir,
    deep_merge,
    load_overrides,
    resolve_resume_checkpoint,
    run_cli,
)
from alignment import shared_vocab_size, tokens_by_id
from data import CHATML_TEMPLATE, check_eval_size, prepare_datasets, rendered_texts

# --- 1. tokenizer identity --------------------------------------------------------------------------------------------


def tokenizer_copy(assets, tmp_path, name: str, edit) -> str:
    """A copy of the student folder whose tokenizer.json has been changed by `edit(definition)`."""
    folder = tmp_path / name
    shutil.copytree(assets["student"], folder)
    definition = json.load(open(folder / "tokenizer.json"))
    edit(definition)
    json.dump(definition, open(folder / "tokenizer.json", "w"))
    return str(folder)


def fewer_merges(keep: int):
    """Keep ids [0, keep) and only the merges whose result is one of them: the same first ids, fewer merges."""
    def edit(definition):
        model = definition["model"]
        model["vocab"] = {token: index for token, index in model["vocab"].items() if index < keep}
        merges = [merge if isinstance(merge, list) else merge.split(" ") for merge in model["merges"]]
        model["merges"] = [merge for merge in merges if "".join(merge) in model["vocab"]]
        definition["added_tokens"] = [token for token in definition["added_tokens"] if token["id"] < keep]
    return edit


def loaded(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_same_first_ids_with_fewer_merges_is_refused(assets, tmp_path):
    teacher = loaded(assets["teacher"])
    keep = len(teacher) - 20
    student_path = tokenizer_copy(assets, tmp_path, "fewer-merges", fewer_merges(keep))
    student = loaded(student_path)
    # The case the old id -> string check let through: every shared id is the same token.
    assert len(student) == keep and tokens_by_id(teacher, keep) == tokens_by_id(student, keep)
    texts = rendered_texts({"name": assets["data"]}, student)
    assert len(teacher(texts[0])["input_ids"]) < len(student(texts[0])["input_ids"])
    with pytest.raises(ConfigError, match=r"merges differ .*; e\.g\. row 0 of the dataset .* use distil_hidden\.py"):
        shared_vocab_size(teacher, student, texts)
    config = tiny_config(assets, str(tmp_path / "out"))
    config["models"]["student"] = student_path
    with pytest.raises(ConfigError, match="do not give the same ids for the same text"):
        distil_logits.main(config)
    assert not (tmp_path / "out").exists()
    assert not alignment.same_tokenization(teacher, student, texts)


def test_extra_tokens_at_the_end_are_the_legitimate_case(assets, tmp_path, capsys):
    student = loaded(assets["tokenizer"])
    teacher = loaded(assets["tokenizer"])
    teacher.add_special_tokens({"additional_special_tokens": ["<|tool_call|>", "<|tool_result|>"]})
    texts = rendered_texts({"name": assets["data"]}, student)
    assert shared_vocab_size(teacher, student, texts) == len(student) == len(teacher) - 2
    assert f"compared over the {len(student)} shared ids" in capsys.readouterr().out
    # The same tokenizer (the tests' teacher has a padded head, 384 rows, over the same tokenizer) passes silently.
    assert shared_vocab_size(student, loaded(assets["tokenizer"]), texts) == len(student)


def test_a_difference_only_the_data_shows_names_the_row(assets):
    student = loaded(assets["tokenizer"])
    teacher = loaded(assets["tokenizer"])
    teacher.add_tokens(["octopus"])  # beyond the shared range, but it changes how row 1 is split
    texts = rendered_texts({"name": assets["data"]}, student)
    with pytest.raises(ConfigError, match=r"row 1 of the dataset \('<\|im_start\|>system"):
        shared_vocab_size(teacher, student, texts)


# --- 2. unfinished runs and Ctrl-C ------------------------------------------------------------------------------------


def fake_checkpoint(folder, step: int) -> str:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    (path / "trainer_state.json").write_text("{}")
    return str(path)


def test_output_dir_with_checkpoints_is_refused_unless_resume_or_overwrite(assets, tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 10)
    config = tiny_config(assets, str(out))
    with pytest.raises(ConfigError, match=r"holds checkpoints of an unfinished run \(newest: checkpoint-10\)\. Set "
                                          r"training\.resume_from_checkpoint: true"):
        distil_logits.main(config)
    assert sorted(os.listdir(out)) == ["checkpoint-10"]
    for key in ("resume_from_checkpoint", "overwrite_output_dir"):
        check_output_dir(deep_merge(config, {"training": {key: True}}))
    # Starting again over them deletes them: the Trainer's rotation would otherwise keep the old, higher-numbered ones.
    (out / "distillation_config.json").write_text("{}")  # an old finished run's marker goes too
    assert resolve_resume_checkpoint(str(out), None, overwrite=True) is None
    assert os.listdir(out) == []


@pytest.mark.parametrize("saved", [True, False])
def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys, saved):
    out = tmp_path / "out"

    def interrupted_main(config):
        if saved:
            fake_checkpoint(out, 4)
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["my_run.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted_main, {"training": {"output_dir": str(out)}})
    assert exit_info.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    if saved:
        assert lines[0] == (f"interrupted: the newest complete checkpoint is {out}/checkpoint-4. Launch again with "
                            "training.resume_from_checkpoint: true to continue from it.")
    else:
        assert lines[0].startswith("interrupted: no checkpoint was saved yet")


@pytest.mark.slow
def test_ctrl_c_in_a_real_run(assets, tmp_path):
    """SIGINT, as Ctrl-C sends it, to a CLI run that has saved a checkpoint: one line, exit 130, no traceback."""
    import signal
    import time

    out = tmp_path / "out"
    config = tiny_config(assets, str(out))
    config["training"].update(max_steps=10_000, save_steps=2, eval_strategy="no", disable_tqdm=True)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({key: config[key] for key in ("dataset", "models", "tokenizer", "model_config",
                                                                  "training")}))
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "distil_logits.py"), "--config", str(overrides)],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    deadline = time.time() + 300
    while not common.complete_checkpoints(str(out)) and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"interrupted: the newest complete checkpoint is {re.escape(str(out))}/checkpoint-\d+\. "
                        r"Launch again with training\.resume_from_checkpoint: true to continue from it\.", last), last


# --- 3. the edited config dict ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [distil_logits, distil_hidden])
def test_config_keys_come_from_the_config_dict(script):
    """CONFIG_KEYS is derived from the script's dict: the dict passes; a key dropped from or added to any section is
    refused; `training` needs only output_dir and takes any SFTConfig field."""
    check_config_keys(script.config, script.CONFIG_KEYS)
    for section, value in script.config.items():
        if not isinstance(value, dict) or section == "training":
            continue
        edited = json.loads(json.dumps(script.config))
        edited[section].pop(next(iter(value)))
        with pytest.raises(ConfigError, match=rf"config key '{section}\.{next(iter(value))}' is missing"):
            check_config_keys(edited, script.CONFIG_KEYS)
        edited[section].update(next_key=1, **value)
        with pytest.raises(ConfigError, match=rf"unknown config key '{section}\.next_key'"):
            check_config_keys(edited, script.CONFIG_KEYS)
    edited = json.loads(json.dumps(script.config))
    edited["training"] = {"output_dir": "out", "max_grad_norm": 0.5}
    check_config_keys(edited, script.CONFIG_KEYS)
    edited["training"].pop("output_dir")
    with pytest.raises(ConfigError, match="'training.output_dir' is missing"):
        check_config_keys(edited, script.CONFIG_KEYS)


def test_the_old_template_key_names_the_new_one(assets, tmp_path):
    """distil_hidden.py's tokenizer.student_chat_template is tokenizer.chat_template now, as in distil_logits.py: a
    config or an override file that still uses the old name gets one line naming the new key."""
    config = tiny_config(assets, str(tmp_path / "out"), distil_hidden)
    config["tokenizer"]["student_chat_template"] = config["tokenizer"].pop("chat_template")
    with pytest.raises(ConfigError, match=r"^config key 'tokenizer\.student_chat_template' is now called "
                                          r"'tokenizer\.chat_template'\. Rename it in your config\.$"):
        distil_hidden.main(config)
    path = tmp_path / "old.yaml"
    path.write_text("tokenizer:\n  student_chat_template: null\n")
    with pytest.raises(ConfigError, match="is now called 'tokenizer.chat_template'"):
        load_overrides(distil_hidden.config, ["--config", str(path)])
    assert not os.path.exists(tmp_path / "out")


def nothing_loaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")
    for name in ("load_tokenizer", "prepare_datasets", "load_causal_lm"):
        monkeypatch.setattr(distil_logits, name, refuse)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["distillation"].__setitem__("temprature", c["distillation"].pop("temperature")),
     r"unknown config key 'distillation\.temprature'\. Did you mean 'temperature'\?"),
    (lambda c: c["distillation"].pop("temperature"), r"config key 'distillation\.temperature' is missing"),
    (lambda c: c["dataset"].__setitem__("eval_szie", c["dataset"].pop("eval_size")), "Did you mean 'eval_size'"),
    (lambda c: c.__setitem__("distilation", c.pop("distillation")), "Did you mean 'distillation'"),
    (lambda c: c["training"].__setitem__("learnig_rate", 1e-4), "Did you mean 'learning_rate'"),
    (lambda c: c["training"].__setitem__("per_device_batch_size", 2), "'training.per_device_batch_size'"),
])
def test_a_typo_in_the_dict_is_one_error_before_anything_loads(assets, tmp_path, monkeypatch, edit, message):
    config = tiny_config(assets, str(tmp_path / "out"))
    edit(config)
    nothing_loaded(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        distil_logits.main(config)


def test_an_override_typo_suggests_the_key(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text("distillation:\n  temprature: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'distillation\.temprature'\. Did you mean 'temperature'"):
        load_overrides(distil_logits.config, ["--config", str(path)])


# --- 5. small datasets and warm-up overrides --------------------------------------------------------------------------


def text_rows(tmp_path, count: int) -> str:
    path = tmp_path / f"rows{count}.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(count)))
    return str(path)


@pytest.mark.parametrize("rows,eval_rows", [(30, 3), (9, 1), (5020, 500)])  # at least 1: the run was set up to evaluate
def test_auto_eval_size_is_ten_percent_at_most_500(assets, tmp_path, rows, eval_rows):
    assert distil_logits.config["dataset"]["eval_size"] == distil_hidden.config["dataset"]["eval_size"] == "auto"
    tokenizer = loaded(assets["tokenizer"])
    train, evaluation, stats = prepare_datasets({"name": text_rows(tmp_path, rows), "seed": 0, "eval_size": "auto"},
                                                tokenizer, 16)
    assert stats["eval"] == eval_rows and stats["train"] == rows - eval_rows
    assert (evaluation is None) == (eval_rows == 0)


def test_bad_eval_size_is_refused():
    for value in ("10%", -1, 1.5, True):
        with pytest.raises(ConfigError, match="dataset.eval_size must be"):
            check_eval_size(value)


def test_warmup_steps_override_replaces_the_dicts_warmup_ratio(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text(f"training:\n  warmup_steps: 10\n  output_dir: {tmp_path / 'out'}\n")
    merged = load_overrides(distil_logits.config, ["--config", str(path)])
    assert "warmup_ratio" not in merged["training"] and merged["training"]["warmup_steps"] == 10
    assert build_sft_config(merged).warmup_steps == 10
    back = deep_merge(merged, {"training": {"warmup_ratio": 0.2}})
    assert "warmup_steps" not in back["training"] and build_sft_config(back).warmup_steps == 0.2
    with pytest.raises(ConfigError, match="not both"):  # both set in one place is still ambiguous
        build_sft_config(deep_merge(merged, {"training": {"warmup_ratio": 0.2, "warmup_steps": 10}}))


# --- 6. dropped rows and bad rows -------------------------------------------------------------------------------------

ANSWERED = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
UNANSWERED = {"conversations": [{"from": "human", "value": "Hello?"}]}


def write_rows(tmp_path, rows) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_dropped_rows_are_warned_with_count_reason_and_file_rows(assets, tmp_path, capsys):
    name = write_rows(tmp_path, [ANSWERED, UNANSWERED, ANSWERED, UNANSWERED, UNANSWERED, ANSWERED])
    prepare_datasets({"name": name, "seed": 0, "eval_size": 0}, loaded(assets["tokenizer"]), 512)
    assert (f"warning: dropped 3 of 6 rows of '{name}' with no trainable token: 3 with no assistant turn "
            "(line 2, line 4, line 5)") in capsys.readouterr().out  # the file's lines, counting from 1


def test_unknown_role_names_the_file_and_the_row(assets, tmp_path):
    bad = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}
    name = write_rows(tmp_path, [ANSWERED, ANSWERED, bad, ANSWERED])
    with pytest.raises(ConfigError, match=rf"dataset '{re.escape(name)}', line 3: unknown ShareGPT role 'narrator'"):
        prepare_datasets({"name": name, "seed": 1, "eval_size": 0}, loaded(assets["tokenizer"]), 512)


# --- 7. the README's examples (README.md and docs/*.md) ------------------------------------------------------------


def documents() -> dict[str, str]:
    """README.md and every docs/*.md, by path relative to the repository root."""
    paths = ["README.md"] + sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return {path: open(os.path.join(ROOT, path), encoding="utf-8").read() for path in paths}


def doc_section(title: str) -> str:
    """The section of README.md or docs/*.md under the heading that starts with `title` (any level), up to the next
    heading of the same or a higher level. Exactly one heading may match, so a moved section is still found."""
    found = []
    for path, text in documents().items():
        # Headings are searched in a copy whose code blocks are blanked (a YAML comment is not a heading).
        masked = re.sub(r"```.*?```", lambda block: re.sub(r"[^\n]", " ", block.group()), text, flags=re.S)
        for match in re.finditer(rf"(?m)^(#+) {re.escape(title)}", masked):
            following = re.search(rf"(?m)^#{{1,{len(match.group(1))}}} ", masked[match.end():])
            found.append((path, text[match.start(): match.end() + following.start() if following else len(text)]))
    assert len(found) == 1, f"expected one heading '{title}' in README.md and docs/, found {[p for p, _ in found]}"
    return found[0][1]


def yaml_blocks(section: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


def test_readme_override_file_merges_into_the_script_config(tmp_path):
    blocks = yaml_blocks(doc_section("Running your own experiment"))
    assert blocks, "the README shows no override file"
    import yaml

    override = yaml.safe_load(blocks[0])
    assert "gradient_accumulation_steps" in override.get("training", {}), "name the accumulation in the example"
    path = tmp_path / "overrides.yaml"
    path.write_text(blocks[0])
    merged = load_overrides(distil_logits.config, ["--config", str(path)])
    assert merged != distil_logits.config
    check_config_keys(merged, distil_logits.CONFIG_KEYS)


def test_every_yaml_block_in_the_docs_is_a_valid_override(tmp_path):
    """Each YAML block of README.md and docs/*.md parses and merges into one script's `config` (distil_logits.py,
    distil_hidden.py or distil_dpo.py) with known keys."""
    import yaml

    checked = 0
    for path, text in documents().items():
        for index, block in enumerate(yaml_blocks(text)):
            assert isinstance(yaml.safe_load(block), dict), f"{path}, YAML block {index + 1} is not a mapping"
            file = tmp_path / f"block{checked}.yaml"
            file.write_text(block)
            errors = []
            for script in (distil_logits, distil_hidden, distil_dpo):
                try:
                    check_config_keys(load_overrides(script.config, ["--config", str(file)]), script.CONFIG_KEYS)
                    break
                except ConfigError as error:
                    errors.append(f"{script.__name__}: {error}")
            else:
                raise AssertionError(f"{path}, YAML block {index + 1} fits no script: {errors}")
            checked += 1
    assert checked >= 3  # the override file, the capture config, the on-policy recipe


def test_readme_multi_process_commands_say_multi_gpu_or_name_a_config_file():
    launches = [(path, line) for path, text in documents().items()
                for line in re.findall(r"accelerate launch[^\n`|]*", text)]
    assert {path for path, _ in launches} >= {"README.md", os.path.join("docs", "offline.md")}
    for path, line in launches:
        if "--num_processes" in line:
            assert "--multi_gpu" in line or "--config_file" in line, f"{path}: {line}"


def test_readme_capture_config_is_complete(tmp_path):
    blocks = yaml_blocks(doc_section("Capture, then train"))
    assert blocks, "the docs show no capture config"
    import yaml

    capture = yaml.safe_load(blocks[0])
    assert capture["offline"]["mode"] == "capture"
    for section, key in (("models", "teacher"), ("models", "student"), ("dataset", "name"),
                         ("distillation", "temperature"), ("tokenizer", "chat_template")):
        assert key in capture.get(section, {}), f"{section}.{key} missing from the docs' capture config"
    path = tmp_path / "capture.yaml"
    path.write_text(blocks[0])
    distil_logits.validate(load_overrides(distil_logits.config, ["--config", str(path)]))


# --- 8. noise ---------------------------------------------------------------------------------------------------------


def test_flash_attention_warning_once_and_only_on_a_gpu(monkeypatch, capsys):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed: there is nothing to warn about")
    except ImportError:
        pass
    monkeypatch.setattr(common, "_warned_once", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.attention_implementation(True) == "sdpa"
    assert "flash-attn" not in capsys.readouterr().out  # no GPU: sdpa is the only choice, nothing to fix
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for _ in range(2):  # teacher and student
        assert common.attention_implementation(True) == "sdpa"
    assert capsys.readouterr().out.count("flash-attn is not installed") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed detects CUDA here and prints nothing to silence")
def test_deepspeed_accelerator_line_is_silenced_on_the_cpu():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}

    def output_of(code: str) -> str:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        return result.stdout + result.stderr

    assert "Setting accelerator to CPU" in output_of("import deepspeed")  # what every run printed before
    assert "Setting accelerator" not in output_of("import common, deepspeed")


@pytest.mark.parametrize("script,part", [(distil_logits, "kd_loss"), (distil_hidden, "hidden_loss")])
def test_start_names_the_rows_per_step_and_the_log_has_tokens_per_second(assets, tmp_path, capsys, script, part):
    """A run says at start how many rows an optimizer step trains (per-device batch x gradient_accumulation_steps x
    processes), and every training log carries this process's training_tokens_per_second, in every mode."""
    trainer = script.main(tiny_config(assets, str(tmp_path / "out"), script))
    assert ("an optimizer step is 2 rows per device x 2 micro-batches (gradient_accumulation_steps) x 1 process(es) "
            "= 4 rows") in capsys.readouterr().out
    logs = [log for log in trainer.state.log_history if part in log and "eval_" + part not in log]
    assert len(logs) == 3 and all(log["training_tokens_per_second"] > 0 for log in logs)
