"""What a served teacher costs: bytes on the wire per position and the rows and positions per second one vLLM server
answers (`wire`), and the optimizer-step time of distil_logits.py with the teacher served (prefetch 0 and 2) against
the teacher in-process and against training from an offline capture (`steps`).

    python bench/served_teacher_bench.py build                        # tiny teacher, student, data: bench/output/served
    bash scripts/serve_teacher.sh bench/output/served/teacher --dtype float32 --max-model-len 1024 &   # until ready
    python bench/served_teacher_bench.py steps --url http://127.0.0.1:8000
    python bench/served_teacher_bench.py wire --url http://127.0.0.1:8000 --vocab 151665 --rows 64 --length 1024

`wire`: random ids below --vocab, --rows rows of --length tokens, --workers requests in flight; the client's JSON
parsing runs in the same threads, so the rates are what a trainer sees. `steps`: distil_logits.main on the built
assets (ChatML demo conversations, T = 1, alpha 0.5, k = --k), each setup for --steps optimizer steps of
--accumulation micro-batches; a step's time is the time between two steps' starts (LogitsTrainer.get_batch_samples),
the first step left out, median over the rest. On one machine the server and the trainer share the CPU; a GPU recipe:
serve the teacher on its own GPU (`CUDA_VISIBLE_DEVICES=1 bash scripts/serve_teacher.sh ...`) and run `steps` with
`CUDA_VISIBLE_DEVICES=0`, using a real teacher and student (--teacher, --student, --data).
"""

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

from served_teacher import ServedTeacher, check_model_served  # noqa: E402

BUILD = os.path.join(HERE, "output", "served")


def build(folder: str) -> None:
    """Demo conversations, their tokenizer, a teacher (Qwen2, hidden 256, 4 layers) and a student (hidden 64, 2 layers)
    with random weights: the speed does not depend on them."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import demo_data

    os.makedirs(folder, exist_ok=True)
    rows = demo_data.make_conversations(400, seed=0)
    demo_data.write_jsonl(rows, os.path.join(folder, "train.jsonl"))
    tokenizer_dir = os.path.join(folder, "tokenizer")
    demo_data.train_tokenizer([demo_data.render_chatml(r["conversations"]) for r in rows], tokenizer_dir, 2048)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    for name, hidden, layers in (("teacher", 256, 4), ("student", 64, 2)):
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 32, num_key_value_heads=1, max_position_embeddings=1024,
                             tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
        torch.manual_seed(len(name))
        AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(folder, name))
        for file in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, file), os.path.join(folder, name))
    print(f"built {folder}: vocabulary {vocab}; serve the teacher with:\n  bash scripts/serve_teacher.sh "
          f"{os.path.join(folder, 'teacher')} --dtype float32 --max-model-len 1024")


def wire(args) -> None:
    random.seed(0)
    rows = [[random.randrange(args.vocab) for _ in range(args.length)] for _ in range(args.rows)]
    print(f"{args.rows} rows of {args.length} tokens, {args.workers} requests in flight, {args.url}")
    print("| k | answer | bytes per position | requests/s | positions/s |")
    print("|---|---|---|---|---|")
    for k in args.k:
        for compress in (False, True):
            teacher = ServedTeacher(args.url, model=args.model, top_k=k, compress=compress, max_workers=args.workers)
            check_model_served(teacher)
            teacher.top_k_rows(rows[:1])  # warm the connection and the server
            teacher.wire_bytes = teacher.positions = 0
            start = time.perf_counter()
            teacher.top_k_rows(rows)
            seconds = time.perf_counter() - start
            stats = teacher.stats()
            print(f"| {k} | {'gzip' if compress else 'JSON'} | {stats['wire_bytes_per_position']:.0f} | "
                  f"{args.rows / seconds:.1f} | {stats['positions'] / seconds:.0f} |", flush=True)
            teacher.close()


def timed_run(config: dict) -> dict:
    """distil_logits.main(config): the median optimizer-step time after the first, and teacher_wait_s per step."""
    import distil_logits

    starts = []
    original = distil_logits.LogitsTrainer.get_batch_samples

    def timed(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return original(self, *args, **kwargs)

    distil_logits.LogitsTrainer.get_batch_samples = timed
    try:
        trainer = distil_logits.main(config)
    finally:
        distil_logits.LogitsTrainer.get_batch_samples = original
    steps = [b - a for a, b in zip(starts[1:], starts[2:])]
    waits = [log["teacher_wait_s"] for log in trainer.state.log_history if "teacher_wait_s" in log][1:]
    return {"step_s": statistics.median(steps), "teacher_wait_s": statistics.median(waits) if waits else None}


def steps(args) -> None:
    import distil_logits

    base = copy.deepcopy(distil_logits.config)
    base["dataset"].update(name=args.data, eval_size=0, seed=0)
    base["models"].update(teacher=args.teacher, student=args.student)
    base["tokenizer"]["max_length"] = args.max_length
    base["model_config"]["use_flash_attention"] = False
    base["distillation"].update(temperature=1.0, alpha=0.5)
    base["offline"]["top_k"] = args.k
    base["training"].update(output_dir=os.path.join(args.output, "run"), max_steps=args.steps,
                            per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
                            eval_strategy="no", save_strategy="no", logging_steps=1, bf16=False,
                            activation_checkpointing=False, dataloader_num_workers=0, overwrite_output_dir=True,
                            report_to=[])
    setups = {}

    def run(name: str, **sections) -> None:
        config = copy.deepcopy(base)
        for section, values in sections.items():
            config[section].update(values)
        shutil.rmtree(config["training"]["output_dir"], ignore_errors=True)
        setups[name] = timed_run(config)
        print(f"{name}: {setups[name]}", flush=True)

    capture_dir = os.path.join(args.output, "capture")
    shutil.rmtree(capture_dir, ignore_errors=True)
    capture = copy.deepcopy(base)
    capture["offline"].update(mode="capture", capture_dir=capture_dir)
    distil_logits.main(capture)
    for _ in range(args.repeats):  # interleaved, so that other jobs on the machine slow every setup alike
        run("in-process teacher")
        run("offline capture", offline={"mode": "train", "capture_dir": capture_dir})
        for prefetch in (0, 2):
            run(f"served, prefetch {prefetch}", teacher_server={"url": args.url, "top_k": args.k, "prefetch": prefetch})
    print(f"\n{args.steps} steps of {args.accumulation} micro-batches x {args.batch} rows, max_length "
          f"{args.max_length}, k = {args.k}; median step time after the first (seconds)")
    print("| teacher | step s | teacher_wait_s per step |")
    print("|---|---|---|")
    for name, result in setups.items():
        wait = "" if result["teacher_wait_s"] is None else f"{result['teacher_wait_s']:.3f}"
        print(f"| {name} | {result['step_s']:.3f} | {wait} |")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "steps.json"), "w") as handle:
        json.dump(setups, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build").add_argument("--folder", default=BUILD)
    measure = commands.add_parser("wire")
    measure.add_argument("--url", default="http://127.0.0.1:8000")
    measure.add_argument("--model", default=None, help="served model name (default: the server's only model)")
    measure.add_argument("--vocab", type=int, required=True, help="ids are drawn below this")
    measure.add_argument("--rows", type=int, default=32)
    measure.add_argument("--length", type=int, default=256)
    measure.add_argument("--k", type=int, nargs="+", default=[20, 64, 256])
    measure.add_argument("--workers", type=int, default=8)
    step = commands.add_parser("steps")
    step.add_argument("--url", default="http://127.0.0.1:8000")
    step.add_argument("--teacher", default=os.path.join(BUILD, "teacher"))
    step.add_argument("--student", default=os.path.join(BUILD, "student"))
    step.add_argument("--data", default=os.path.join(BUILD, "train.jsonl"))
    step.add_argument("--output", default=os.path.join(BUILD, "steps"))
    step.add_argument("--k", type=int, default=64)
    step.add_argument("--steps", type=int, default=6)
    step.add_argument("--batch", type=int, default=4)
    step.add_argument("--accumulation", type=int, default=4)
    step.add_argument("--max-length", type=int, default=512)
    step.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    {"build": lambda: build(args.folder), "wire": lambda: wire(args), "steps": lambda: steps(args)}[args.command]()


if __name__ == "__main__":
    main()
