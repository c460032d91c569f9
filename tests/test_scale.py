"""Launch and logging hygiene at scale: a plain `python script` on a machine with several GPUs is refused (the
Trainer would fall into nn.DataParallel) before anything is loaded or written; the logged loss parts count every
process even on an epoch's last uneven batch (where accelerate's gather_for_metrics drops samples), cost no
collective or host read per micro-step and one reduce at the logging step, and a NaN on another process stops this one
too at the logging step, naming the step it first went bad; the teacher
head that FSDP2 shards is gathered once into a plain frozen copy for the loss."""

import copy
import math

import pytest
import torch
import transformers
from conftest import tiny_config

import distil_hidden
import distil_logits
from common import ConfigError, LossPartLog, TrainingDivergedError


class TwoRankAccelerator:
    """This process is rank 0 of 2; `other` holds what rank 1 contributes to the next reduce, `other_gather` what it
    contributes to the next gather. Its gather_for_metrics truncates as accelerate does on an epoch's last uneven
    batch, where rank 1 only holds duplicated padding samples: the result keeps rank 0's row alone."""

    def __init__(self):
        self.other = None
        self.other_gather = None
        self.reduces = 0
        self.gathers = 0

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.reduces += 1
        return tensor + self.other(tensor)

    def gather(self, tensor):
        self.gathers += 1
        return torch.cat([tensor, self.other_gather(tensor)])

    def gather_for_metrics(self, tensor):
        self.gathers += 1
        return tensor  # rank 1's rows dropped as duplicates


def add_step(log, kd, ce, tokens, normaliser, step=1):
    log.add("train", step, "/nonexistent", kd_loss=(torch.tensor(kd), normaliser, torch.tensor(tokens)),
            ce_loss=(torch.tensor(ce), normaliser, torch.tensor(tokens)))


def test_uneven_last_batch_still_counts_every_rank():
    """Rank 0: 3 tokens with KD sum 3 x 1.0 and CE sum 3 x 2.0; rank 1: 5 tokens with KD sum 5 x 3.0 and CE sum
    5 x 4.0 (values given per token, normaliser = tokens). Means over all 8 tokens: KD (3 + 15) / 8, CE (6 + 20) / 8.
    Dropping rank 1 would give 1.0 and 2.0."""
    accelerator = TwoRankAccelerator()
    log = LossPartLog(accelerator)
    # Rank 1's (sum, items) rows for kd_loss and ce_loss, in the order the parts were passed.
    accelerator.other = lambda local: torch.tensor([[15.0, 5.0], [20.0, 5.0]])
    add_step(log, kd=1.0, ce=2.0, tokens=3, normaliser=3)
    assert log.pop_means("train") == pytest.approx({"kd_loss": 18 / 8, "ce_loss": 26 / 8}, rel=1e-6)


def count_host_reads(monkeypatch) -> list:
    """Record every call that copies a tensor's value to the host (a device sync on a GPU)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _original=original, _name=name, **k: reads.append(_name) or _original(self, *a, **k))
    return reads


def test_no_collective_or_host_sync_per_micro_step_one_reduce_at_logging(monkeypatch):
    accelerator = TwoRankAccelerator()
    log = LossPartLog(accelerator)
    accelerator.other = lambda local: torch.zeros_like(local)
    reads = count_host_reads(monkeypatch)
    for step in range(4):
        add_step(log, kd=1.0 + step, ce=2.0, tokens=2, normaliser=2)
    assert (accelerator.reduces, accelerator.gathers, reads) == (0, 0, [])
    means = log.pop_means("train")
    assert (accelerator.reduces, accelerator.gathers) == (1, 0)
    assert means == pytest.approx({"kd_loss": (2 + 4 + 6 + 8) / 8, "ce_loss": 2.0}, rel=1e-6)
    assert log.pop_means("train") == {} and accelerator.reduces == 1


def test_nan_on_the_other_rank_stops_this_one_at_the_logging_step():
    """Rank 1's KD sum went NaN at step 7 (its first non-finite step), rank 0's never: nothing is raised at the
    micro-steps, and the logging step stops rank 0 naming the part and rank 1's step."""
    accelerator = TwoRankAccelerator()
    log = LossPartLog(accelerator)
    accelerator.other = lambda local: torch.tensor([[math.nan, 4.0], [1.0, 4.0]])
    accelerator.other_gather = lambda first: torch.tensor([[7.0, math.inf]])
    for step in (6, 7, 8):
        add_step(log, kd=1.0, ce=2.0, tokens=4, normaliser=4, step=step)
    with pytest.raises(TrainingDivergedError, match=r"^kd_loss became non-finite at optimizer step 7 "):
        log.pop_means("train")


def test_nan_here_is_named_with_its_first_step_and_checked_before_a_save():
    accelerator = TwoRankAccelerator()
    log = LossPartLog(accelerator)
    accelerator.other = lambda local: torch.zeros_like(local)
    accelerator.other_gather = lambda first: torch.full_like(first, math.inf)
    add_step(log, kd=1.0, ce=2.0, tokens=4, normaliser=4, step=2)
    log.check("train")  # finite: no error, and the interval is kept
    add_step(log, kd=math.inf, ce=2.0, tokens=4, normaliser=4, step=3)
    add_step(log, kd=math.nan, ce=math.nan, tokens=4, normaliser=4, step=4)
    with pytest.raises(TrainingDivergedError, match=r"^ce_loss and kd_loss became non-finite at optimizer step 3 "):
        log.check("train")


def hidden_config(assets, output_dir):
    config = copy.deepcopy(distil_hidden.config)
    config["dataset"].update(name=assets["data"], eval_size=4, seed=0)
    config["models"].update(teacher=assets["teacher"], student=assets["student"])
    config["tokenizer"]["max_length"] = 64
    config["model_config"]["use_flash_attention"] = False
    config["training"].update(output_dir=output_dir, max_steps=1)
    return config


@pytest.mark.parametrize("script", ["distil_logits", "distil_hidden"])
def test_plain_python_launch_with_several_gpus_is_refused(assets, tmp_path, monkeypatch, script):
    """What the Trainer sees on a machine with 4 GPUs and no distributed launcher: n_gpu == 4, which makes it wrap
    the student in nn.DataParallel. The script must stop first, naming the accelerate command."""
    monkeypatch.setattr(transformers.TrainingArguments, "n_gpu", property(lambda self: 4))
    output_dir = tmp_path / "out"
    if script == "distil_logits":
        module, config = distil_logits, tiny_config(assets, str(output_dir))
    else:
        module, config = distil_hidden, hidden_config(assets, str(output_dir))
    loaded = []
    monkeypatch.setattr(module, "load_causal_lm", lambda *args, **kwargs: loaded.append(args) or pytest.fail("loaded"))
    with pytest.raises(ConfigError, match=rf"accelerate launch --multi_gpu --num_processes 4 {script}\.py"):
        module.main(config)
    assert not loaded and not output_dir.exists()


GATHER_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
rank = int(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Qwen2Config
from distributed import teacher_head_for_loss
torch.manual_seed(0)  # the same teacher on both ranks
teacher = AutoModelForCausalLM.from_config(Qwen2Config(
    vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=False)).eval().requires_grad_(False)
head = teacher.get_output_embeddings()
weight = head.weight.detach().clone()
mesh = init_device_mesh("cpu", (2,))
for layer in teacher.model.layers:  # as accelerate's TRANSFORMER_BASED_WRAP: each decoder layer, then the root
    fully_shard(layer, mesh=mesh)
fully_shard(teacher, mesh=mesh)
assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] == 48  # each rank holds half the rows
copy = teacher_head_for_loss(teacher, torch.device("cpu"))
assert not isinstance(copy.weight, DTensor) and copy.bias is None and not copy.weight.requires_grad
assert torch.equal(copy.weight, weight)
biased = torch.nn.Linear(8, 12).requires_grad_(False)  # a head with a bias, sharded the same way
want_weight, want_bias = biased.weight.clone(), biased.bias.clone()
holder = type("T", (torch.nn.Module,), {{"get_output_embeddings": lambda self: self.head}})()
holder.head = biased
fully_shard(holder, mesh=mesh)
assert biased.bias.to_local().shape[0] == 6
copy = teacher_head_for_loss(holder, torch.device("cpu"))
assert torch.equal(copy.weight, want_weight) and torch.equal(copy.bias, want_bias) and not copy.bias.requires_grad
plain = torch.nn.Linear(8, 12)
assert teacher_head_for_loss(type("T", (torch.nn.Module,), {{"get_output_embeddings": lambda self: plain}})(), "cpu") is plain
torch.distributed.destroy_process_group()
print("ok", flush=True)
# Every check has run: leave without interpreter teardown, where gloo's threads can abort the process
# ("terminate called without an active exception", seen once in a fresh clone) after the test has passed.
os._exit(0)
"""


def test_fsdp2_teacher_head_is_gathered_once_into_plain_tensors():
    """What FSDP2 leaves on the teacher's head when it shards a model over 2 ranks (fully_shard per decoder layer and
    at the root, on a gloo mesh: half the rows of the head on each rank, a bias too) becomes one plain, frozen copy of
    the whole head on every rank; a head that is not sharded is used as it is."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = GATHER_SCRIPT.format(root=ROOT, port=port)
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    for rank in ranks:
        stdout, stderr = rank.communicate(timeout=300)
        assert rank.returncode == 0 and "ok" in stdout, stderr[-2000:]


HEAD_CHECK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
rank = int(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from transformers import AutoModelForCausalLM, Qwen2Config
from common import ConfigError
from heads import add_hidden_states_forward, check_head_matches_forward
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(Qwen2Config(
    vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=False)).eval()
add_hidden_states_forward(model)
if rank == 1:  # this rank's model alone scales its logits after the head, as a model heads.head_transform misses
    head = model.get_output_embeddings()
    head.__class__ = type("ScaledHead", (torch.nn.Linear,), {{"forward": lambda self, x: torch.nn.Linear.forward(self, x) * 1.7}})
try:
    check_head_matches_forward(model, model, torch.tensor([[1, 5, 9, 3, 7]]), "student")
except ConfigError as error:
    print(f"error: {{error}}", file=sys.stderr, flush=True)
    os._exit(2)
torch.distributed.barrier()  # the run's next collective: a rank that passed alone waits here for the other
print("passed", flush=True)
os._exit(0)
"""


def test_head_check_failing_on_one_rank_stops_both_with_the_same_error():
    """2 gloo processes where only rank 1's model has a wrong head: both must stop at the check with the same one-line
    error (decided over both ranks), instead of rank 0 passing into its next collective while rank 1 has stopped."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = HEAD_CHECK_SCRIPT.format(root=ROOT, port=port)
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    results = []
    try:
        for rank in ranks:
            stdout, stderr = rank.communicate(timeout=120)  # a rank left waiting in the barrier would time out
            results.append((rank.returncode, stdout, stderr))
    finally:
        for rank in ranks:
            rank.kill()
    errors = [[line for line in stderr.splitlines() if line.startswith("error:")] for _, _, stderr in results]
    assert [code for code, _, _ in results] == [2, 2], results
    assert all(len(lines) == 1 and "the student's logits differ from its final hidden state" in lines[0]
               for lines in errors), results
    assert errors[0] == errors[1]  # the same verdict (the worst rank's error) on both
