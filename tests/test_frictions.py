"""A newcomer's frictions (issue 18, item 7) and two smaller items of issue 19 (item 11), one test or group each:
- a capture shows its progress in positions/s;
- a local model path that does not exist is one error saying so (not the Hub's repo-id error), ~ is expanded, and a
  checkpoint that needs its own code (trust_remote_code) is one line, not a traceback;
- resuming a student with a tied output head does not warn that lm_head.weight is missing (a head that is really
  missing still does);
- a finished run's saved config does not resume, and the finished-run refusal suggests what trains;
- the model card gives the real command, and, trained from a capture, the teacher the capture's manifest records;
- `accelerate launch --num_processes 2` without --multi_gpu, which starts one process, is refused;
- a file's rows are named by their line, counting from 1;
- a training.* typo made in the --config file names that file;
- the memory report says when the teacher's weights are memory-mapped rather than resident;
- the card and distillation_config.json keep the model and data names the user gave (relative, or under ~).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import transformers
from conftest import ROOT, tiny_config
from test_offline import offline_config

import common
import distil_hidden
import distil_logits
import distributed
from common import ConfigError, check_output_dir, load_causal_lm, load_overrides, load_tokenizer
from finished_run import model_card, save_finished_run
import data
from projections import model_shape

# --- progress of a capture --------------------------------------------------------------------------------------------


def test_capture_shows_progress_in_positions_per_second(assets, tmp_path, capfd):
    distil_logits.main(offline_config(assets, tmp_path, "capture"))
    assert re.search(r"capture \(rank 0 of 1\): 100%.*positions/s", capfd.readouterr().err)


# --- model names: missing folders, ~, remote code ---------------------------------------------------------------------


def test_a_missing_local_model_folder_says_so(assets, tmp_path, monkeypatch):
    shutil.copytree(assets["teacher"], tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^model folder '\./teachr' does not exist\. Did you mean '\./teacher'\?"):
        load_tokenizer("./teachr")
    with pytest.raises(ConfigError, match=r"^model folder '/no/such/student' does not exist"):
        load_causal_lm("/no/such/student", tiny_config(assets, str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=r"^model folder 'models/qwen/teacher' does not exist"):
        model_shape("models/qwen/teacher")  # two slashes: no Hub id has them
    with pytest.raises(ConfigError, match=r"is a file; give the folder"):
        model_shape(os.path.join(assets["teacher"], "config.json"))


def test_a_model_under_home_is_found(assets, tmp_path, monkeypatch):
    shutil.copytree(assets["student"], tmp_path / "models" / "student")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_shape("~/models/student") == model_shape(assets["student"])
    assert len(load_tokenizer("~/models/student")) == assets["vocab"]


def test_a_model_that_needs_remote_code_is_one_line(assets, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(assets["student"], folder)
    model_config = json.loads((folder / "config.json").read_text())
    model_config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                             "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (folder / "config.json").write_text(json.dumps(model_config))
    for load in (lambda: model_shape(str(folder)),
                 lambda: load_causal_lm(str(folder), tiny_config(assets, str(tmp_path / "out")))):
        with pytest.raises(ConfigError, match=r"needs Python code shipped with the checkpoint \(trust_remote_code\)") as error:
            load()
        assert "\n" not in str(error.value)


# --- resuming a tied student ------------------------------------------------------------------------------------------


def tiny_model(tied: bool):
    model_config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(model_config)


@pytest.mark.parametrize("trainer_class", [distil_logits.LogitsTrainer, distil_hidden.HiddenStatesTrainer])
def test_resuming_a_tied_student_does_not_warn_of_its_head(trainer_class, tmp_path, monkeypatch):
    import safetensors.torch

    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", warnings.append)
    trainer = object.__new__(trainer_class)  # only the load-result handling runs
    for tied in (True, False):
        model = tiny_model(tied)
        model.save_pretrained(tmp_path / str(tied))
        state_dict = safetensors.torch.load_file(tmp_path / str(tied) / "model.safetensors")
        if not tied:  # a head that is really missing must still be reported
            state_dict.pop("lm_head.weight")
        trainer.model = model
        load_result = model.load_state_dict(state_dict, False)
        assert load_result.missing_keys == ["lm_head.weight"]
        trainer._issue_warnings_after_load(load_result)
    assert len(warnings) == 1 and "lm_head.weight" in warnings[0]  # the untied model's, not the tied one's


# --- a finished run: its saved config, the refusal, the model card ----------------------------------------------------


def test_a_finished_runs_saved_config_does_not_resume(assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"))
    config["training"]["resume_from_checkpoint"] = True
    os.makedirs(tmp_path / "out")
    trainer = types.SimpleNamespace(save_state=lambda: None, save_model=lambda folder: None,
                                    accelerator=types.SimpleNamespace(is_main_process=True),
                                    state=types.SimpleNamespace(log_history=[]))
    save_finished_run(trainer, types.SimpleNamespace(save_pretrained=lambda folder: None, chat_template=None), config)
    saved = json.loads((tmp_path / "out" / "distillation_config.json").read_text())
    assert saved["training"]["resume_from_checkpoint"] is None
    assert '"resume_from_checkpoint": null' in (tmp_path / "out" / "README.md").read_text()
    assert config["training"]["resume_from_checkpoint"] is True  # the caller's config is left as it was


def test_the_finished_run_refusal_suggests_what_trains(assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"))
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "distillation_config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        check_output_dir(config)
    assert "another output_dir" in str(error.value) and "overwrite_output_dir: true" in str(error.value)
    assert "resume" not in str(error.value)  # no checkpoint: resuming would start over
    checkpoint = tmp_path / "out" / "checkpoint-6"
    os.makedirs(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"to train it further, raise training\.num_train_epochs \(or max_steps\) and "
                                          r"set training\.resume_from_checkpoint: true \(it continues from checkpoint-6\)"):
        check_output_dir(config)


@pytest.mark.parametrize("script", [distil_logits, distil_hidden])
def test_the_model_card_gives_the_command_that_relaunches_the_saved_config(script, assets, tmp_path):
    config = tiny_config(assets, str(tmp_path / "out"), script)
    card = model_card(config)
    assert f"python {script.__name__}.py --config distillation_config.json" in card
    assert "Run `distil-" not in card
    path = tmp_path / "distillation_config.json"
    path.write_text(json.dumps(config, indent=2, default=str))
    assert load_overrides(script.config, ["--config", str(path)]) == config  # the saved file is a valid --config


def test_the_offline_model_card_names_the_captured_teacher(assets, tmp_path):
    config = offline_config(assets, tmp_path, "train")
    os.makedirs(tmp_path / "capture")
    (tmp_path / "capture" / "manifest.json").write_text(json.dumps({"teacher": "org/the-captured-teacher"}))
    config["models"]["teacher"] = "org/configured-but-never-loaded"
    card = model_card(config)
    assert "- Teacher: `org/the-captured-teacher` (read from the capture" in card
    assert "- Teacher: `org/configured-but-never-loaded`" not in card


# --- launching --------------------------------------------------------------------------------------------------------


def test_launcher_command_lines_are_read(monkeypatch):
    asked = distributed.launch_processes_asked
    assert asked(["python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "distil_logits.py"]) == 2
    assert asked([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=4", "x.py"]) == 4
    assert asked(["python", "/venv/bin/accelerate", "launch", "distil_logits.py", "--num_processes", "2"]) is None
    assert asked(["python", "distil_logits.py"]) is None
    monkeypatch.setattr(distributed, "parent_command_line", lambda: ["accelerate", "launch", "--num_processes", "2", "x"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_launch(types.SimpleNamespace(n_gpu=0), "x.py")  # two processes, as asked
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match=r"--num_processes 2 but started x\.py as 1 process"):
        distributed.check_launch(types.SimpleNamespace(n_gpu=0), "x.py")


def test_num_processes_without_multi_gpu_is_refused(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(f"import sys, types\nsys.path.insert(0, {ROOT!r})\nimport common, distributed\n"
                      "common.run_cli(lambda config: distributed.check_launch(types.SimpleNamespace(n_gpu=0), "
                      "'distil_logits.py'), {})\n")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", str(driver)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})  # no default accelerate config
    # The script exits 2 with one line; accelerate's launcher then fails with its own traceback (exit status 1).
    assert result.returncode != 0
    assert ("error: accelerate launch was given --num_processes 2 but started distil_logits.py as 1 process"
            in result.stderr), result.stderr[-2000:]


# --- row numbers, override files, the memory report -------------------------------------------------------------------


def test_rows_of_a_json_lines_file_are_named_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}\n')  # the loader skips blank lines
    assert data.row_names(str(path), [0, 1, 2]) == ["line 1", "line 3", "line 5"]
    array = tmp_path / "rows.json"
    array.write_text('[{"text": "a"},\n {"text": "b"}]\n')
    assert data.row_names(str(array), [1]) == ["row 1 (counting from 0)"]


def test_a_training_typo_in_the_override_file_names_the_file(tmp_path):
    path = tmp_path / "my_experiment.yaml"
    path.write_text("training:\n  learning_rat: 0.001\n")
    with pytest.raises(ConfigError, match=rf"^--config file '{re.escape(str(path))}': unknown config key "
                                          r"'training\.learning_rat'.*Did you mean 'learning_rate'\?"):
        load_overrides(distil_logits.config, ["--config", str(path)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_memory_report_says_when_the_teacher_is_memory_mapped(assets, tmp_path, capsys):
    config = tiny_config(assets, str(tmp_path / "out"))  # bf16 off: float32 weights, the file's own dtype, stay mapped
    before = distributed.peak_memory_mib()
    teacher = load_causal_lm(assets["teacher"], config, trainable=False)
    distributed.print_memory_report("teacher loaded", before)
    size_mib = sum(parameter.numel() * 4 for parameter in teacher.parameters()) / 2**20
    mapped = re.search(r"\+([\d.]+) MiB of safetensors files memory-mapped, not yet resident", capsys.readouterr().out)
    assert mapped and float(mapped.group(1)) >= round(size_mib, 1)  # the whole file: the weights and their header


# --- names written as given -------------------------------------------------------------------------------------------


def test_the_card_and_saved_config_keep_the_names_given(assets, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(assets["student"], home / "student")
    shutil.copytree(assets["teacher"], tmp_path / "run" / "teacher")
    shutil.copy(assets["data"], tmp_path / "run" / "chat.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "run")
    config = tiny_config(assets, "./out", student="~/student")
    config["models"]["teacher"] = "./teacher"
    config["dataset"].update(name="./chat.jsonl", eval_size=0)
    config["training"].update(max_steps=1, save_steps=10)
    distil_logits.main(config)
    saved = json.loads(open("out/distillation_config.json").read())
    assert saved["models"] == {"teacher": "./teacher", "student": "~/student"} and saved["dataset"]["name"] == "./chat.jsonl"
    card = open("out/README.md").read()
    assert "- Student: `~/student`" in card and "- Teacher: `./teacher`" in card
    assert str(tmp_path) not in card + json.dumps(saved)
