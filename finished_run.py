"""A finished run's folder: the student saved in its checkpoint's dtype (not the float32 master weights), its
tokenizer, a generation_config that stops at the chat template's end of turn, distillation_config.json (the resolved
config; its presence marks the run finished) and the model card (README.md) that names the teacher, the method and
the last logged losses. Both scripts call `save_finished_run`."""

from __future__ import annotations

import json
import os

import torch

from common import SAVE_DTYPES, model_source


def save_finished_run(trainer, tokenizer, config: dict) -> str:
    """Save the student, its tokenizer (with the chat template used), a generation_config that stops at the
    template's end of turn, trainer_state.json (the logged losses) and distillation_config.json (the resolved config,
    whose presence marks the run finished). Returns output_dir."""
    output_dir = config["training"]["output_dir"]
    # Saved without the resume: relaunched as is, the saved config must not silently continue this run.
    config = {**config, "training": {**config["training"], "resume_from_checkpoint": None}}
    trainer.save_state()
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        cast_saved_weights(output_dir, saved_student_dtype(config))
        tokenizer.save_pretrained(output_dir)
        stop_at_end_of_turn(output_dir, tokenizer)
        with open(os.path.join(output_dir, "distillation_config.json"), "w") as handle:
            json.dump(config, handle, indent=2, default=str)
        with open(os.path.join(output_dir, "README.md"), "w") as handle:
            handle.write(model_card(config, trainer.state.log_history))
    return output_dir


def stop_at_end_of_turn(folder: str, tokenizer) -> None:
    """Add the chat template's end-of-turn token (<|im_end|>, <|eot_id|>) to the eos_token_id of the saved
    generation_config.json: the checkpoint's own stops at its end-of-sequence token only (Qwen2's base models at
    <|endoftext|>), so the student would talk past the end of its turn. Text data with no template: left as saved."""
    if not tokenizer.chat_template:
        return
    from transformers import GenerationConfig

    from data import end_of_turn_id

    path = os.path.join(folder, "generation_config.json")
    generation = GenerationConfig.from_pretrained(folder) if os.path.isfile(path) else GenerationConfig()
    stops = generation.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if not stops and tokenizer.eos_token_id is not None:
        stops = [tokenizer.eos_token_id]
    generation.eos_token_id = list(dict.fromkeys(stops + [end_of_turn_id(tokenizer)]))
    generation.save_pretrained(folder)


def saved_student_dtype(config: dict) -> torch.dtype | None:
    """The dtype the finished student is saved in: training.save_dtype, else the dtype the student checkpoint's
    config.json names (bf16 for most released models), else None (kept as trained)."""
    if config["training"].get("save_dtype"):
        return SAVE_DTYPES[config["training"]["save_dtype"]]
    from transformers import PretrainedConfig

    values, _ = PretrainedConfig.get_config_dict(model_source(config["models"]["student"]))
    name = values.get("dtype") or values.get("torch_dtype")
    return SAVE_DTYPES.get(str(name).removeprefix("torch."))


def cast_saved_weights(folder: str, dtype: torch.dtype | None) -> None:
    """Rewrite the floating-point tensors of a saved model (model*.safetensors) in `dtype`, and config.json's dtype.
    The Trainer saves what it trains: float32 master weights (twice a bf16 checkpoint's size) under DDP or one
    device, 16-bit copies under ZeRO-3. One file at a time, written beside the old one and renamed over it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(name for name in os.listdir(folder) if name.startswith("model") and name.endswith(".safetensors"))
    if dtype is None or not files:
        return
    total_bytes = 0
    for name in files:
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        changed = any(value.is_floating_point() and value.dtype != dtype for value in tensors.values())
        tensors = {key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items()}
        total_bytes += sum(value.numel() * value.element_size() for value in tensors.values())
        if changed:
            save_file(tensors, path + ".tmp", metadata=metadata)
            os.replace(path + ".tmp", path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            index = json.load(handle)
        index.setdefault("metadata", {})["total_size"] = total_bytes
        with open(index_path, "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as handle:
        model_config = json.load(handle)
    model_config["dtype"] = str(dtype).removeprefix("torch.")
    with open(config_path, "w") as handle:
        handle.write(json.dumps(model_config, indent=2, sort_keys=True) + "\n")


def distillation_uses_teacher(config: dict) -> bool:
    """False for plain SFT (alpha = 0, and no logit term in distil_hidden.py) and plain DPO (distil_dpo.py)."""
    if "preference" in config:
        return config["preference"]["method"] == "distillm2" or config["preference"]["alpha"] > 0
    return config["distillation"]["alpha"] > 0 or bool(config["distillation"].get("kd_weight"))


def describe_method(config: dict) -> str:
    """The distillation method and its settings in one sentence, from the resolved config."""
    distillation = config["distillation"]
    kd = (f"{distillation['divergence']} at temperature {distillation['temperature']} (times T^2)"
          if "divergence" in distillation else "")
    if "preference" in config:  # distil_dpo.py
        return describe_preference(config["preference"], kd, config["distillation"]["temperature"])
    if not distillation_uses_teacher(config):
        return "supervised fine-tuning (alpha = 0: cross-entropy only, no teacher)"
    if "layer_map" in distillation:  # distil_hidden.py
        text = (f"hidden-state distillation: loss = {distillation['alpha']} * {distillation['loss']} between projected "
                f"student and teacher hidden states (layer map {distillation['layer_map']}) + "
                f"{1 - distillation['alpha']:g} * CE")
        if distillation.get("alpha_schedule") == "linear_decay":
            text += ", alpha falling linearly to 0 by the last step"
        return text + (f" + {distillation['kd_weight']} * logit KD, {kd}" if distillation.get("kd_weight") else "")
    alpha = distillation["alpha"]
    offline = (config.get("offline") or {}).get("mode")
    source = f", the teacher's top-{config['offline']['top_k']} read from a capture" if offline == "train" else ""
    on_policy = config.get("on_policy") or {}
    fraction = on_policy.get("fraction") or 0
    sampled = (f"; on {fraction:.0%} of micro-batches KD alone on the student's own samples (on-policy: "
               f"{on_policy.get('divergence')} at temperature {on_policy.get('temperature')})") if fraction else ""
    cross = distillation.get("cross_tokenizer")
    across = f", across tokenizers ({cross}: aligned by character offset)" if cross else ""
    return f"logit distillation: loss = {alpha} * KD + {1 - alpha:g} * CE, KD = {kd}{across}{source}{sampled}"


def describe_preference(preference: dict, kd: str, temperature: float) -> str:
    """distil_dpo.py's method and settings in one sentence."""
    if preference["method"] == "distillm2":
        mix = "rising from 1 to 1.5 over the first half of training" if preference["gradual_mix"] else "1"
        adaptive = preference.get("adaptive_skew")
        skew = ("per answer, DistiLLM-2's adaptive skew clipped to [0.01, {}]" if adaptive else "skew {}").format
        return (f"preference distillation, DistiLLM-2: loss = (2 - m) * skew forward KL ({skew(preference['skew_chosen'])}) "
                f"on the teacher's answers + m * skew reverse KL ({skew(preference['skew_rejected'])}) on the "
                f"student's, m {mix}, temperature {temperature}")
    teacher = f" + {preference['alpha']} * KD on the chosen answers, KD = {kd}" if preference["alpha"] > 0 else ""
    return (f"preference distillation, dpo_kd: loss = DPO sigmoid loss (beta {preference['beta']}, reference: the "
            f"starting student){teacher}")


def model_card(config: dict, log_history: list[dict] = ()) -> str:
    """README.md for a finished run: the student, the teacher, the method, the data, the last logged losses and the
    resolved config (replacing TRL's SFT card, which knows none of these)."""
    models, dataset = config["models"], config["dataset"]
    teacher_used = distillation_uses_teacher(config)
    local = os.path.isdir(os.path.expanduser(str(models["student"])))
    header = ["---", "library_name: transformers", "tags: [distillation]"]
    if not local:
        header.append(f"base_model: {models['student']}")
    lines = header + ["---", "", f"# {os.path.basename(os.path.normpath(config['training']['output_dir']))}", "",
                      f"- Student: `{models['student']}`"]
    offline = config.get("offline") or {}
    if teacher_used and offline.get("mode") == "train":
        # The teacher that made the capture, as its manifest records it: the configured one is never loaded.
        manifest_path = os.path.join(str(offline.get("capture_dir")), "manifest.json")
        teacher = models["teacher"]
        if os.path.isfile(manifest_path):
            with open(manifest_path) as handle:
                teacher = json.load(handle).get("teacher", teacher)
        lines.append(f"- Teacher: `{teacher}` (read from the capture `{offline.get('capture_dir')}`)")
    elif teacher_used:
        lines.append(f"- Teacher: `{models['teacher']}`")
    lines += [f"- Method: {describe_method(config)}",
              f"- Data: `{dataset['name']}` (split {dataset.get('split')}, format {dataset.get('format')})"]
    last = {}
    for entry in log_history:
        last.update({key: value for key, value in entry.items() if key.endswith("loss") and isinstance(value, (int, float))})
    if last:
        lines.append("- Last logged losses: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(last.items())))
    script = ("distil_dpo.py" if "preference" in config else
              "distil_hidden.py" if "layer_map" in config["distillation"] else "distil_logits.py")
    lines += ["", f"Made with {script} (project `{config.get('project_name')}`). To run it again, set another "
              f"training.output_dir in `distillation_config.json` and run `python {script} --config "
              "distillation_config.json`. The student loads with `AutoModelForCausalLM.from_pretrained` on this folder. "
              "The resolved config:", "",
              "```json", json.dumps(config, indent=2, default=str), "```", ""]
    return "\n".join(lines)
