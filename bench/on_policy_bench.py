"""On-policy distillation step: distil_logits.py (on_policy.fraction 1, reverse KL), sampling with generate or with a
vLLM server (on_policy.engine: vllm), next to TRL 1.16's experimental GKDTrainer (lmbda 1, beta 1 = reverse KL), same
tiny models, prompts, batch, sampling and completion length.

    python bench/on_policy_bench.py                       # all, each in a fresh process; writes bench/output/on_policy_32.json
    python bench/on_policy_bench.py --batch 8 --max-new-tokens 64 --steps 5
    python bench/on_policy_bench.py --batch 1 --accumulation 8 --variant ours   # the dict's default step shape, ours only
    python bench/on_policy_bench.py --variants ours,ours_vllm --max-new-tokens 512   # generate against vLLM

Variants: ours (activation checkpointing off, generate), ours_vllm (the same, sampling from a local vLLM server that
the script starts from .venv-vllm and syncs each step; its start is not timed), gkd (GKDTrainer with
gradient_checkpointing off, so it generates with the KV cache as ours does), gkd_default (GKDTrainer's default
gradient_checkpointing=True: it then generates without the KV cache and recomputes activations in backward).

Per variant: the median wall time of an optimizer step after the first (`--accumulation` micro-batches of `--batch`
rows: sample, teacher and student forward, backward, AdamW, and the Trainer's logging; from one step's end to the
next), the completion tokens it trained on, completion tokens per second of the whole step, and
the peak resident memory (VmHWM) grown during training over the resident size before it (CPU), or
torch.cuda.max_memory_allocated (GPU); and the sampling alone: completion tokens per second of the generation (ours:
the logged sampling_tokens_per_second; GKDTrainer: its generate_on_policy_outputs timed), and ours_vllm's weight
sync seconds per step. The vLLM server's memory is its own processes' and is not in the RSS column. Both variants stop sampling at the same tokens (<|im_end|>, <|endoftext|>): the
student's generation_config lists both, which is where GKDTrainer reads its stop tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def peak_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM"))


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def build_assets(folder: str, rows: int) -> dict:
    """Tokenizer, student (Qwen2, hidden 64, 2 layers), teacher (hidden 128, 4 layers), both with the tokenizer's
    vocabulary (GKDTrainer refuses different sizes), and `rows` demo conversations in ShareGPT and messages form. The
    student has 2 heads of 32 (vLLM's CPU attention takes head sizes of 32 and up) and both take 1,024 positions."""
    import demo_data
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    paths = {name: os.path.join(folder, name) for name in ("tokenizer", "student", "teacher")}
    paths.update(sharegpt=os.path.join(folder, "prompts.jsonl"), messages=os.path.join(folder, "messages.jsonl"))
    if all(os.path.exists(path) for path in paths.values()):
        return paths
    conversations = demo_data.make_conversations(rows, seed=0)
    demo_data.train_tokenizer([demo_data.render_chatml(row["conversations"]) for row in conversations],
                              paths["tokenizer"], 512)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for name, hidden, layers, seed in (("student", 64, 2, 2), ("teacher", 128, 4, 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=2 if name == "student" else 4, num_key_value_heads=1 if name == "student" else 2,
            max_position_embeddings=1024, tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
        model.generation_config.eos_token_id = stops
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    demo_data.write_jsonl(conversations, paths["sharegpt"])
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    demo_data.write_jsonl([{"messages": [{"role": roles[turn["from"]], "content": turn["value"]}
                                         for turn in row["conversations"]]} for row in conversations], paths["messages"])
    return paths


class StepClock:
    """Each optimizer step's wall time, from the end of the previous step to the end of this one: ours samples in
    get_batch_samples, before the Trainer's on_step_begin, GKDTrainer inside training_step, so on_step_begin would
    leave our sampling out. The first step has no previous end and is not timed (it also pays for warm-up). Completion
    tokens are added by the variant as it labels them (per micro-batch) and summed per step at its end."""

    def __init__(self):
        self.ends, self.times, self.tokens, self.step_tokens = [], [], 0, []
        self.sampled, self.sampling, self.sync = [], None, []  # GKD's (tokens, seconds) per generate; the results

    def on_step_begin(self, *args, **kwargs):
        pass

    def on_step_end(self, *args, **kwargs):
        self.ends.append(time.perf_counter())
        self.step_tokens.append(self.tokens)
        self.tokens = 0
        if len(self.ends) > 1:
            self.times.append(self.ends[-1] - self.ends[-2])

    def add_tokens(self, tokens: int) -> None:
        self.tokens += tokens


def run_ours(paths: dict, args, output_dir: str, engine: str = "hf") -> dict:
    import distil_logits
    import on_policy
    from transformers import TrainerCallback

    clock = StepClock()
    label = on_policy.label_completions
    on_policy.label_completions = lambda *a, **k: (lambda b: clock.add_tokens(int(b["completion_lengths"].sum()))
                                                   or b)(label(*a, **k))
    config = copy.deepcopy(distil_logits.config)
    config["dataset"].update(name=paths["sharegpt"], eval_size=0, seed=0)
    config["models"].update(teacher=paths["teacher"], student=paths["student"])
    config["tokenizer"]["max_length"] = 1024
    config["model_config"]["use_flash_attention"] = False
    config["distillation"].update(alpha=1.0, divergence="reverse_kl", temperature=1.0)
    # Sampling at the defaults (temperature 1, top_p 1), whatever the keys are called in the checkout measured.
    config["on_policy"].update(fraction=1.0, max_new_tokens=args.max_new_tokens)
    if engine == "vllm":  # a local server (vllm_url null), float32 as the student, no graph capture on the CPU
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        config["on_policy"].update(engine="vllm", vllm_url=None, vllm_args=[] if torch.cuda.is_available() else
                                   ["--dtype", "float32", "--enforce-eager"])
    config["training"].update(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              gradient_accumulation_steps=args.accumulation, learning_rate=1e-4, warmup_ratio=0.0, save_strategy="no",
                              eval_strategy="no", activation_checkpointing=False, bf16=torch.cuda.is_available(),
                              overwrite_output_dir=True, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)

    class Clock(TrainerCallback):
        on_step_begin, on_step_end = clock.on_step_begin, clock.on_step_end

    original_init = distil_logits.LogitsTrainer.__init__

    def init_with_clock(self, *a, **k):
        original_init(self, *a, **k)
        self.add_callback(Clock())
        reset_peak()
        self.rss_before = peak_rss_mib()

    distil_logits.LogitsTrainer.__init__ = init_with_clock
    trainer = distil_logits.main(config)
    logs = [entry for entry in trainer.state.log_history if "sampling_tokens_per_second" in entry][1:]
    clock.sampling = statistics.median(entry["sampling_tokens_per_second"] for entry in logs)
    clock.sync = [entry["weight_sync_s"] for entry in logs if "weight_sync_s" in entry]
    clock.rss_before = trainer.rss_before
    return clock


def run_gkd(paths: dict, args, output_dir: str, checkpointing: bool = False) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from data import CHATML_TEMPLATE

    clock = StepClock()
    generate = GKDTrainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        start = time.perf_counter()
        ids, mask, labels = generate(model, inputs, generation_config)
        tokens = int((labels != -100).sum())
        clock.sampled.append((tokens, time.perf_counter() - start))
        clock.add_tokens(tokens)
        return ids, mask, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(counted)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    tokenizer.chat_template = CHATML_TEMPLATE
    gkd_args = GKDConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                         gradient_accumulation_steps=args.accumulation, learning_rate=1e-4, lmbda=1.0, beta=1.0, temperature=1.0,
                         max_new_tokens=args.max_new_tokens, max_length=1024, save_strategy="no", report_to="none",
                         use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), logging_steps=1,
                         disable_tqdm=True, dataloader_num_workers=0, seed=42,
                         # TRL's default is True, and GKDTrainer then generates without the KV cache
                         gradient_checkpointing=checkpointing)

    class Clock(TrainerCallback):
        on_step_begin, on_step_end = clock.on_step_begin, clock.on_step_end

    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(paths["student"]),
                         teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]), args=gkd_args,
                         train_dataset=datasets.load_dataset("json", data_files=paths["messages"], split="train"),
                         processing_class=tokenizer, callbacks=[Clock()])
    reset_peak()
    rss_before = peak_rss_mib()
    trainer.train()
    sampled = clock.sampled[args.accumulation:]  # after the first step, as the step times
    clock.sampling = sum(tokens for tokens, _ in sampled) / sum(seconds for _, seconds in sampled)
    clock.rss_before = rss_before
    return clock


def measure(variant: str, args) -> dict:
    torch.set_num_threads(args.threads)
    paths = build_assets(os.path.join(args.output, "on_policy_assets_h32"), 256)
    output_dir = os.path.join(args.output, f"on_policy_{variant}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if variant.startswith("ours"):
        clock = run_ours(paths, args, output_dir, engine="vllm" if variant == "ours_vllm" else "hf")
    else:
        clock = run_gkd(paths, args, output_dir, checkpointing=variant == "gkd_default")
    times, tokens, rss_before = clock.times, clock.step_tokens, clock.rss_before
    timed = list(zip(times, tokens[1:]))  # times[i] is step i + 1
    step = statistics.median(t for t, _ in timed)
    result = {"variant": variant, "step_seconds_median": step,
              "completion_tokens_per_step": statistics.mean(n for _, n in timed),
              "completion_tokens_per_second": sum(n for _, n in timed) / sum(t for t, _ in timed),
              "sampling_tokens_per_second": clock.sampling,
              "weight_sync_s_median": statistics.median(clock.sync) if clock.sync else None}
    if torch.cuda.is_available():
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_growth_mib"] = peak_rss_mib() - rss_before
    return result


VARIANTS = ("ours", "ours_vllm", "gkd", "gkd_default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run, each in a "
                        "fresh process")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "output"))
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args.variant, args)), flush=True)
        return
    os.makedirs(args.output, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    settings = {"variants": args.variants, "batch": args.batch, "accumulation": args.accumulation, "max_new_tokens": args.max_new_tokens, "steps": args.steps,
                "threads": args.threads, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    json.dump({"settings": settings, "results": results}, open(os.path.join(args.output,
              f"on_policy_{args.max_new_tokens}.json"), "w"),
              indent=2)
    memory = "peak_cuda_allocated_mib" if torch.cuda.is_available() else "peak_rss_growth_mib"
    print(f"settings: {settings}\n\n| variant | step (s, median) | completion tokens/step | completion tokens/s of the "
          f"step | sampling tokens/s | weight sync (s) | {memory} |\n| --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        sync = result["weight_sync_s_median"]
        print(f"| {result['variant']} | {result['step_seconds_median']:.3f} | {result['completion_tokens_per_step']:.1f} "
              f"| {result['completion_tokens_per_second']:.1f} | {result['sampling_tokens_per_second']:.1f} | "
              f"{'-' if sync is None else f'{sync:.3f}'} | {result[memory]:.1f} |")


if __name__ == "__main__":
    main()
