"""Distillation loss forward + backward: peak memory and time of each implementation, each in a fresh process.

    python bench/loss_bench.py                       # everything (~7 min on 2 CPU cores); writes bench/output/
    python bench/loss_bench.py --sizes 32k --variants chunked,floor --repeats 5    # a subset
    python bench/loss_bench.py --sizes 32k --memory-budget-mb 256 --output bench/output/budget256   # smaller chunks
    python bench/loss_bench.py --baseline-rev HEAD~3      # adds chunked@REV: the loss as of a git revision

Variants (inputs: student hidden (T, Hs) and head (V, Hs) with gradients, teacher hidden (T, Ht) and head (V, Ht),
targets (T,); float32 on the CPU, bf16 on CUDA):
  full_logits       (T, V) logits of both models, then losses.logit_distillation_loss + losses.causal_lm_loss
  chunked           losses.chunked_distillation_loss (this project), its default memory budget (--memory-budget-mb)
  chunked@REV       the same function as of git revision REV (--baseline-rev; losses.py, or common.py before the
                    loss had a module of its own), for before/after
  liger             Liger-Kernel 0.8.5 LigerFusedLinearJSDLoss, beta=0 (forward KL), its defaults (torch.compile on,
                    1024-token chunks); its soft loss is KL at temperature T without the T^2 factor
  liger_eager       the same with compiled=False (32k size only)
  trl               TRL 1.16 DistillationTrainer's _chunked_divergence_loss (ChunkedDivergenceFunction), beta=0:
                    forward KL only, no CE, no T^2; recomputes both projections in backward
  floor             only the matrix products of the chunked loss, same chunk size: per chunk the student and teacher
                    logits, then grad_hidden = g @ W and grad_W += g^T @ h with g = the student logits; no softmax
  cross_uld, cross_hybrid (+ _topk)   only with --variants: distillation.cross_tokenizer's loss (chunked CE plus
                    cross_tokenizer_loss.chunked_cross_tokenizer_kd, autograd with a checkpoint per chunk) over T
                    aligned 1:1 pairs

Peak memory: CUDA: torch.cuda.max_memory_allocated minus the allocated memory before the step. CPU: peak resident set
size (VmHWM, reset by writing 5 to /proc/self/clear_refs, or a 1 ms sampling thread where that is not allowed) minus
the resident size just before the step, after the inputs are built, a warm-up step has run, the gradients are freed and
malloc_trim has returned freed heap to the system. Time: median of the timed steps after the warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUTPUT = os.path.join(HERE, "output")

config = {
    # --- sizes: name, tokens T, student hidden Hs, teacher hidden Ht, vocabulary V, timed repeats ---
    "sizes": {
        "32k": {"tokens": 4096, "student_hidden": 512, "teacher_hidden": 1024, "vocab": 32768, "repeats": 3,
                "skip": []},
        # Qwen2's vocabulary. 1024 tokens so that full_logits (about 14 (T, V) float32 copies) fits beside the other
        # engineers' jobs on a 24 GiB machine, and one step of every variant stays under ~15 s on 2 cores.
        "qwen2": {"tokens": 1024, "student_hidden": 512, "teacher_hidden": 1024, "vocab": 151936, "repeats": 2,
                  "skip": ["liger_eager"]},  # to keep the whole run under ~8 min
    },
    # --- variants, in table order ---
    "variants": ["full_logits", "chunked", "liger", "liger_eager", "trl", "floor"],
    # --- the loss ---
    "kd_weight": 0.5,  # weight of KD (liger: weight_soft_loss)
    "ce_weight": 0.5,  # weight of CE (liger: weight_hard_loss; trl has none)
    "temperature": 2.0,  # softmax temperature of both distributions
    "divergence": "forward_kl",  # KL(teacher || student); liger and trl: beta = 0
    "teacher_weight_scale": 3.0,  # teacher head weights times this: a sharper teacher than student
    "memory_budget_mb": 512,  # chunked_distillation_loss's default; sets the chunk of chunked and floor
    # --- timing ---
    "warmup": 1,  # untimed steps first (liger's torch.compile happens here)
    "worker_timeout_s": 300,  # a variant that runs longer is reported as failed
    # --- targets, checked at the 32k size ---
    "targets": {"memory_vs_floor": 1.5, "memory_vs_liger": 0.25, "time_vs_floor": 1.15, "time_vs_liger": 1.0},
}

COMPUTES = {
    "full_logits": "0.5 CE + 0.5 T^2 KL",
    "chunked": "0.5 CE + 0.5 T^2 KL",
    "liger": "0.5 CE + 0.5 KL",
    "liger_eager": "0.5 CE + 0.5 KL",
    "trl": "KL (no CE)",
    "floor": "matmuls only",
    # not in config["variants"] (run with --variants): distillation.cross_tokenizer
    "cross_uld": "0.5 CE + 0.5 T^2 sorted L1",
    "cross_uld_topk": "0.5 CE + 0.5 T^2 sorted L1 (top 256)",
    "cross_hybrid": "0.5 CE + 0.5 T^2 (KL on shared + sorted L1)",
    "cross_hybrid_topk": "0.5 CE + 0.5 T^2 (KL on shared + sorted L1, top 256)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1)) / 1024


def _malloc_trim() -> None:
    """Return glibc's freed heap to the system, so the next step's allocations show up in the resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one step above the memory in use when `start` is called, in MiB."""

    def __init__(self, device) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()
        self._sampling = False

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            # The reset must bring the high-water mark down to the current size, else it did nothing.
            if _status_mb("VmHWM") - _status_mb("VmRSS") < 1:
                return "VmHWM after clear_refs 5"
        except OSError:
            pass
        return "VmRSS sampled every 1 ms"

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        gc.collect()
        _malloc_trim()
        self.baseline = _status_mb("VmRSS")
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self.sampled = self.baseline
            self._sampling = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as handle:
            while self._sampling:
                handle.seek(0)
                self.sampled = max(self.sampled, int(handle.read().split()[1]) * page_mb)
                time.sleep(0.001)

    def stop(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.baseline) / 2**20
        if self.method.startswith("VmHWM"):
            return _status_mb("VmHWM") - self.baseline
        self._sampling = False
        self._thread.join()
        return self.sampled - self.baseline


# ---------------------------------------------------------------------------------------------------------------------
# Variants: each returns a function that runs the loss forward and returns the scalar to call backward on
# ---------------------------------------------------------------------------------------------------------------------


def _addmm_fp32(accumulator, a, b) -> None:
    """accumulator (float32) += a @ b, with no (vocab, hidden) temporary."""
    import torch

    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(a.float(), b.float())


def floor_function():
    import torch

    class FloorMatmuls(torch.autograd.Function):
        """The chunked loss's matrix products and nothing else: a lower bound on its time and memory."""

        @staticmethod
        def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, chunk):
            tokens = student_hidden.shape[0]
            student_logits = torch.empty((chunk, student_weight.shape[0]), dtype=student_weight.dtype,
                                         device=student_weight.device)
            teacher_logits = torch.empty((chunk, teacher_weight.shape[0]), dtype=teacher_weight.dtype,
                                         device=teacher_weight.device)
            grad_hidden = torch.empty_like(student_hidden)
            grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
            for start in range(0, tokens, chunk):
                end = min(start + chunk, tokens)
                hidden, logits = student_hidden[start:end], student_logits[: end - start]
                torch.mm(hidden, student_weight.t(), out=logits)
                torch.mm(teacher_hidden[start:end], teacher_weight.t(), out=teacher_logits[: end - start])
                torch.mm(logits, student_weight, out=grad_hidden[start:end])  # g = the logits: any cheap tensor
                _addmm_fp32(grad_weight, logits.t(), hidden)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = student_weight.dtype
            return torch.zeros((), device=student_hidden.device)

        @staticmethod
        def backward(ctx, _grad_loss):
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None

    return FloorMatmuls


def module_at_revision(revision: str) -> types.ModuleType:
    """The loss module as of a git revision (losses.py, or common.py before the split), loaded as its own module. Its
    imports of this repository's other modules resolve to the working tree's."""
    for path in ("losses.py", "common.py"):
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"revision {revision} has neither losses.py nor common.py")
    module = types.ModuleType(f"loss_at_{revision}")
    exec(compile(shown.stdout, f"{path}@{revision}", "exec"), module.__dict__)
    return module


def make_variant(name: str, inputs: dict, settings: dict) -> tuple:
    """(function running the forward and returning the loss, facts about the variant for the table)."""
    import torch
    import torch.nn.functional as F

    import cross_tokenizer_loss
    import losses

    hs, ws, ht, wt, targets = (inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                   "teacher_weight", "targets"))
    vocab = ws.shape[0]
    kd_weight, ce_weight, temperature = settings["kd_weight"], settings["ce_weight"], settings["temperature"]
    divergence = settings["divergence"]
    student_head = types.SimpleNamespace(weight=ws, bias=None)
    teacher_head = types.SimpleNamespace(weight=wt, bias=None)
    budget = settings["memory_budget_mb"]
    chunk = losses.chunk_tokens_for_budget(vocab, budget, ws.dtype, ws.device, divergence)

    if name == "full_logits":
        # One extra row at the end so that the causal shift of the reference functions counts all T positions.
        labels = torch.cat([torch.full((1,), -100, device=targets.device), targets])[None]

        def run():
            student_logits = F.pad(hs, (0, 0, 0, 1))[None] @ ws.t()
            with torch.no_grad():
                teacher_logits = F.pad(ht, (0, 0, 0, 1))[None] @ wt.t()
            kd = losses.logit_distillation_loss(student_logits, teacher_logits, labels, divergence, temperature)
            ce = losses.causal_lm_loss(student_logits, labels)
            return kd_weight * kd + ce_weight * ce

        return run, {"chunk_tokens": hs.shape[0]}

    if name == "chunked" or name.startswith("chunked@"):
        module = losses if name == "chunked" else module_at_revision(name.split("@", 1)[1])
        loss_function = module.chunked_distillation_loss
        try:
            facts = {"chunk_tokens": module.chunk_tokens_for_budget(vocab, budget, ws.dtype, ws.device, divergence)}
        except TypeError:  # before the estimate knew the dtype, device and divergence
            facts = {"chunk_tokens": module.chunk_tokens_for_budget(vocab, budget)}
        block_tokens = getattr(module, "block_tokens", getattr(module, "row_block_tokens", None))
        if block_tokens is not None:
            if settings.get("block_kib"):
                module.CPU_BLOCK_BYTES = int(settings["block_kib"] * 1024)
            facts["block_tokens"] = min(facts["chunk_tokens"], block_tokens(vocab, hs.device))

        def run():
            loss, _kd, _ce = loss_function(hs, student_head, ht, teacher_head, targets, kd_weight, ce_weight,
                                           divergence=divergence, temperature=temperature, memory_budget_mb=budget)
            return loss

        return run, facts

    if name in ("liger", "liger_eager"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        if divergence != "forward_kl":
            raise SystemExit("liger: only forward_kl (beta=0) is benchmarked")
        # beta=0: F.kl_div(student_log_probs, teacher_log_probs, log_target=True) = KL(teacher || student).
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=ce_weight, weight_soft_loss=kd_weight, beta=0.0,
                                        temperature=temperature, compiled=name == "liger")
        return (lambda: liger(hs, ws, ht, wt, targets)), {"chunk_tokens": liger.chunk_size, "compiled": liger.compiled}

    if name == "trl":
        try:
            from trl.kernels import chunked_divergence
            from trl.trainer.distillation_trainer import _chunked_divergence_loss
        except ImportError as error:
            raise SystemExit(f"SKIP: TRL's chunked divergence is not importable: {error}")
        completion_mask = torch.ones((1, hs.shape[0]), dtype=torch.long, device=hs.device)

        def run():
            loss, _entropy, _count = _chunked_divergence_loss(hs[None], ht[None], ws, wt, completion_mask, beta=0.0,
                                                              temperature=temperature)
            return loss

        return run, {"chunk_tokens": chunked_divergence.TOKEN_CHUNK_SIZE,
                     "vocab_chunk": chunked_divergence.VOCAB_CHUNK_SIZE}

    if name.startswith("cross_"):
        # distillation.cross_tokenizer: the chunked CE (no KD) + cross_tokenizer_loss.chunked_cross_tokenizer_kd over T
        # aligned 1:1 pairs, both vocabularies V; hybrid: the first half of the ids matched exactly. cross_*_topk: the
        # sorted L1 on the top 256 of each distribution (+ the tails' mass difference) instead of a full sort.
        method, top_k = name.split("_")[1], 256 if name.endswith("_topk") else None
        from common import return_large_frees_to_the_system

        return_large_frees_to_the_system()  # as distil_logits.main does for cross_tokenizer
        half = torch.arange(vocab // 2, device=hs.device)
        positions = torch.arange(hs.shape[0], device=hs.device)
        cross = {"rows": torch.zeros_like(positions), "positions": positions, "pieces": None, "teacher_hidden": ht,
                 "teacher_head": teacher_head, "teacher_transform": (1.0, None), "teacher_vocab": vocab,
                 "shared_ids": (half, half), "method": method, "top_k": top_k, "matched_weight": 1.0,
                 "unmatched_weight": 1.0, "student_transform": (1.0, None)}

        def run():
            loss, _kd, ce = losses.chunked_distillation_loss(hs, student_head, None, None, targets, 0.0, ce_weight,
                                                             memory_budget_mb=budget)
            kd = cross_tokenizer_loss.chunked_cross_tokenizer_kd(hs[None], student_head, cross, temperature, vocab,
                                                                 divergence, 0.5, 0.1, budget)
            return loss + kd_weight * kd / hs.shape[0]  # T^2 is inside kd, on the hybrid's matched term

        return run, {"chunk_tokens": cross_tokenizer_loss.cross_tokenizer_chunk_tokens(vocab, budget)}

    if name == "floor":
        floor = floor_function()
        return (lambda: floor.apply(hs, ws, ht, wt, chunk)), {"chunk_tokens": chunk}

    raise SystemExit(f"unknown variant '{name}'")


# ---------------------------------------------------------------------------------------------------------------------
# One variant in this (fresh) process
# ---------------------------------------------------------------------------------------------------------------------


def worker(name: str, size: dict, settings: dict) -> dict:
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    sys.path.insert(0, ROOT)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    tokens, hs_size, ht_size, vocab = size["tokens"], size["student_hidden"], size["teacher_hidden"], size["vocab"]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    inputs = {
        "student_hidden": randn(tokens, hs_size).requires_grad_(),
        "student_weight": randn(vocab, hs_size, scale=hs_size**-0.5).requires_grad_(),
        "teacher_hidden": randn(tokens, ht_size),
        "teacher_weight": randn(vocab, ht_size, scale=settings["teacher_weight_scale"] * ht_size**-0.5),
        "targets": torch.randint(0, vocab, (tokens,), generator=generator).to(device),
    }
    run, facts = make_variant(name, inputs, settings)

    def clear_grads():
        inputs["student_hidden"].grad = inputs["student_weight"].grad = None

    def step() -> float:
        if settings.get("eval"):  # evaluation: the forward under no_grad, as the Trainer's prediction step runs it
            with torch.no_grad():
                loss = run()
        else:
            loss = run()
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    started = time.perf_counter()
    for _ in range(settings["warmup"]):
        step()
        clear_grads()
    warmup_s = time.perf_counter() - started
    memory = PeakMemory(device)
    times, cpu_times, peaks = [], [], []
    for _ in range(size["repeats"]):
        clear_grads()
        memory.start()
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)  # all threads: ~threads x wall time when undisturbed
        peaks.append(memory.stop())
    return {"variant": name, "loss": loss, "peak_mb": max(peaks), "time_s": statistics.median(times),
            "best_s": min(times), "times_s": times, "cpu_times_s": cpu_times, "peaks_mb": peaks,
            "warmup_s": warmup_s, "memory_method": memory.method,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            **facts}


# ---------------------------------------------------------------------------------------------------------------------
# Driver: one fresh process per (size, variant), then the table, the plot and the targets
# ---------------------------------------------------------------------------------------------------------------------


def run_variant(name: str, size_name: str, size: dict, settings: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--size-json",
               json.dumps({"name": size_name, **size}), "--settings-json", json.dumps(settings)]
    print(f"[{size_name}] {name} ...", end=" ", flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings["worker_timeout_s"], cwd=ROOT)
    except subprocess.TimeoutExpired:
        print("timed out")
        return {"variant": name, "error": f"timed out after {settings['worker_timeout_s']} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            print(f"peak {result['peak_mb']:.0f} MB, median {result['time_s']:.2f} s, steps "
                  f"{' '.join(f'{t:.2f}' for t in result['times_s'])} (warm-up {result['warmup_s']:.1f} s)")
            return result
    reason = (done.stdout + done.stderr).strip().splitlines()
    reason = reason[-1] if reason else f"exit code {done.returncode}"
    if done.returncode < 0:
        reason = f"killed by signal {-done.returncode} (out of memory?)"
    print(reason)
    return {"variant": name, "error": reason}


def pool(runs: list[dict]) -> dict:
    """One variant's result over several rounds: all timed steps pooled, the highest peak."""
    failed = [r for r in runs if "error" in r]
    if len(runs) == 1 or failed:
        return (failed or runs)[0]
    measured, result = runs, dict(runs[0])
    for key in ("times_s", "cpu_times_s", "peaks_mb"):
        result[key] = [value for r in measured for value in r[key]]
    result.update(time_s=statistics.median(result["times_s"]), best_s=min(result["times_s"]),
                  peak_mb=max(result["peaks_mb"]), warmup_s=sum(r["warmup_s"] for r in measured))
    return result


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results if "error" not in r}
    floor, liger = by_name.get("floor"), by_name.get("liger")
    lines = ["| variant | computes | chunk (tokens) | peak MB | x floor | x liger | time s | x floor | x liger | best s | loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {COMPUTES.get(r['variant'], '')} | - | - | - | - | - | - | - | - | "
                         f"not run: {r['error']} |")
            continue
        chunk = str(r.get("chunk_tokens", "-"))
        if "block_tokens" in r:
            chunk += f" (blocks of {r['block_tokens']} tokens)"
        if "vocab_chunk" in r:
            chunk += f" x {r['vocab_chunk']} vocab"
        get = lambda other, key: other[key] if other else None  # noqa: E731
        lines.append(
            f"| {r['variant']} | {COMPUTES.get(r['variant'], '')} | {chunk} | {r['peak_mb']:.0f} | "
            f"{ratio(r['peak_mb'], get(floor, 'peak_mb'))} | {ratio(r['peak_mb'], get(liger, 'peak_mb'))} | "
            f"{r['time_s']:.2f} | {ratio(r['time_s'], get(floor, 'time_s'))} | "
            f"{ratio(r['time_s'], get(liger, 'time_s'))} | {r['best_s']:.2f} | {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def check_targets(results: list[dict], targets: dict, variant: str) -> list[str]:
    by_name = {r["variant"]: r for r in results if "error" not in r}
    mine, floor, liger = by_name.get(variant), by_name.get("floor"), by_name.get("liger")
    checks = [
        ("peak memory <= {:.2f} x floor", "peak_mb", floor, targets["memory_vs_floor"]),
        ("peak memory <= {:.2f} x liger", "peak_mb", liger, targets["memory_vs_liger"]),
        ("time <= {:.2f} x floor", "time_s", floor, targets["time_vs_floor"]),
        ("time <= {:.2f} x liger", "time_s", liger, targets["time_vs_liger"]),
    ]
    lines = []
    for text, key, other, limit in checks:
        label = f"{variant}: " + text.format(limit)
        if mine is None or other is None:
            lines.append(f"SKIP {label} (not measured)")
            continue
        value = mine[key] / other[key]
        line = f"{'PASS' if value <= limit else 'FAIL'} {label}: {value:.2f}"
        if key == "time_s":  # the same ratio from the fastest step of each, less sensitive to other jobs
            line += f" (best step: {mine['best_s'] / other['best_s']:.2f})"
        lines.append(line)
    return lines


def plot(all_results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(all_results), 2, figsize=(11, 3.6 * len(all_results)), squeeze=False)
    for row, (label, results) in enumerate(all_results.items()):
        measured = [r for r in results if "error" not in r]
        names = [r["variant"] for r in measured]
        for column, (key, unit) in enumerate((("peak_mb", "peak memory above inputs (MB)"), ("time_s", "forward + backward (s)"))):
            axis = axes[row][column]
            values = [r[key] for r in measured]
            bars = axis.bar(names, values, color=["tab:red" if n.startswith("chunked") else "tab:gray" for n in names])
            axis.bar_label(bars, labels=[f"{v:.0f}" if key == "peak_mb" else f"{v:.2f}" for v in values], fontsize=8)
            axis.set_yscale("log" if key == "peak_mb" else "linear")
            axis.set_title(f"{label}: {unit}", fontsize=9)
            axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def checkout() -> str:
    """The checkout's commit, and whether losses.py differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "losses.py"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {head}" + (" with losses.py modified" if dirty else "")


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s+(.*)", lscpu).group(1).strip()
        cpus = re.search(r"^CPU\(s\):\s+(\d+)", lscpu, re.M).group(1)
    except (OSError, AttributeError):
        model, cpus = platform.processor(), str(os.cpu_count())
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {cpus} CPUs, {memory_gib:.0f} GiB RAM{gpu}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help=f"comma-separated subset of {','.join(config['sizes'])}")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(config['variants'])}")
    parser.add_argument("--tokens", type=int, help="tokens T of every size (default: per size in config)")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default: per size in config)")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default {config['warmup']})")
    parser.add_argument("--threads", type=int, help="torch threads in each variant's process (default: torch's)")
    parser.add_argument("--eval", action="store_true", help="time the forward under torch.no_grad() (evaluation), "
                        "without backward")
    parser.add_argument("--baseline-rev", help="also run chunked@REV: the chunked loss at this git revision")
    parser.add_argument("--block-kib", type=float, help="chunked: KiB per row-block temporary on the CPU "
                        "(losses.CPU_BLOCK_BYTES)")
    parser.add_argument("--memory-budget-mb", type=float, default=config["memory_budget_mb"],
                        help="memory_budget_mb of chunked (and chunked@REV), which also sets floor's chunk")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times, alternating the "
                        "order, and pool the timed steps (for a machine shared with other jobs)")
    parser.add_argument("--output", default=OUTPUT, help="folder for loss_bench.md/.png/.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size-json", help=argparse.SUPPRESS)
    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker, json.loads(args.size_json), json.loads(args.settings_json))
        print("RESULT " + json.dumps(result), flush=True)
        return

    settings = {key: config[key] for key in ("kd_weight", "ce_weight", "temperature", "divergence",
                                             "teacher_weight_scale", "warmup", "worker_timeout_s")}
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    if args.block_kib:
        settings["block_kib"] = args.block_kib
    if args.threads:
        settings["threads"] = args.threads
    settings["memory_budget_mb"] = args.memory_budget_mb
    settings["eval"] = args.eval
    sizes = {name: dict(size) for name, size in config["sizes"].items()
             if not args.sizes or name in args.sizes.split(",")}
    variants = args.variants.split(",") if args.variants else list(config["variants"])
    if args.baseline_rev:
        revision = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
        variants.insert(variants.index("chunked") + 1 if "chunked" in variants else 0, f"chunked@{revision}")
        COMPUTES[f"chunked@{revision}"] = COMPUTES["chunked"]
    for unknown in {v for v in variants if not v.startswith("chunked@")} - set(config["variants"]) - set(COMPUTES):
        raise SystemExit(f"unknown variant '{unknown}'; choose from {', '.join(COMPUTES)}")
    os.makedirs(args.output, exist_ok=True)

    started, load_before = time.time(), os.getloadavg()
    all_results = {}
    for size_name, size in sizes.items():
        if args.repeats:
            size["repeats"] = args.repeats
        if args.tokens:
            size["tokens"] = args.tokens
        label = f"{size_name}: T={size['tokens']}, Hs={size['student_hidden']}, Ht={size['teacher_hidden']}, V={size['vocab']}"
        names = [name for name in variants if name not in size.get("skip", []) or args.variants]
        rounds = [[run_variant(name, size_name, size, settings) for name in (names if r % 2 == 0 else names[::-1])]
                  for r in range(args.rounds)]
        all_results[label] = [pool([next(x for x in results if x["variant"] == name) for results in rounds])
                              for name in names]
    load_after = os.getloadavg()

    with open(os.path.join(args.output, "loss_bench.json"), "w") as handle:
        json.dump({"settings": settings, "sizes": sizes, "results": all_results}, handle, indent=2)
    first = next((r for results in all_results.values() for r in results if "error" not in r), {})
    command = "python " + " ".join(["bench/loss_bench.py"] + sys.argv[1:])
    repeats = ", ".join(f"{name} {size['repeats']}" for name, size in sizes.items())
    report = [
        "# Distillation loss: peak memory and time of " + ("the forward under no_grad (evaluation)" if settings["eval"]
                                                           else "forward + backward"),
        "",
        f"`{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s, "
        f"{checkout()}.",
        f"Machine: {machine()}; {first.get('device', '?')} {first.get('dtype', '')}, {first.get('threads', '?')} threads. "
        f"Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share these cores).",
        f"Loss: kd_weight {settings['kd_weight']}, ce_weight {settings['ce_weight']}, {settings['divergence']}, "
        f"temperature {settings['temperature']}, memory_budget_mb {settings['memory_budget_mb']:g}. Peak memory: {first.get('memory_method', '?')}, above the memory in use "
        "before the step (inputs built, warm-up done, gradients freed). Time: median of the timed steps "
        f"({repeats}{f', {args.rounds} rounds' if args.rounds > 1 else ''}) after {settings['warmup']} warm-up "
        "step(s); best s = the fastest step.",
        "MB = 2^20 bytes. Ratios: x floor = variant / floor, x liger = variant / liger (same size, same run).",
    ]
    printed = []
    for label, results in all_results.items():
        report += ["", f"## {label}", "", table(results)]
        if "32k" in label:
            lines = []
            for variant in [r["variant"] for r in results if r["variant"].startswith("chunked")]:
                lines += check_targets(results, config["targets"], variant)
            report += ["", "Targets (32k size):", ""] + [f"- {line}" for line in lines]
            printed += lines
    report_text = "\n".join(report) + "\n"
    with open(os.path.join(args.output, "loss_bench.md"), "w") as handle:
        handle.write(report_text)
    plot(all_results, os.path.join(args.output, "loss_bench.png"))
    print("\n" + report_text)
    print(f"wrote {os.path.relpath(args.output, ROOT)}/loss_bench.md, .png and .json")


if __name__ == "__main__":
    main()
