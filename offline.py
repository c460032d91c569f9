"""Offline distillation: the teacher's top-k next-token distribution at every counted position, captured once
(`offline.mode: capture` in distil_logits.py), stored compactly, and read back per batch when training from it
(`offline.mode: train`, the teacher never loaded). With `teacher_server.url` set, the capture asks a vLLM server
(served_teacher.py) instead of loading the teacher: the same shards and manifest.

On disk: parquet shards of fixed-size `TopKCodec` records plus manifest.json, which records what the capture depends
on (tokenizer, template, data fingerprint, k, temperature) so that training from a mismatched capture is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from common import ConfigError, print_rank0
from alignment import tokens_by_id
from data import counted_positions
from distributed import capture_gpus, check_launcher_processes, launched_deepspeed_config, zero3_inference_config
from heads import (
    add_hidden_states_forward,
    check_head_matches_forward,
    final_layer,
    gathered_head,
    head_logits,
    head_transform,
    teacher_hidden_at_counted_positions,
)
from losses import topk_distribution
from served_teacher import ServedTeacher, counted_topk, rows_to_send, run_startup_checks, served_teacher_from_config

CAPTURE_FORMAT_VERSION = 1


class TopKCodec:
    """Fixed-size binary record per trained position: the teacher's top-k token ids and probabilities.

    Layout of one record (bits, most significant first, padded to whole bytes):
    - ids: the k ids sorted ascending, Elias-Fano coded: the low L = floor(log2(V / k)) bits of each id, then the high
      parts in unary (k ones among k + (V >> L) bits). About k * (2 + log2(V / k)) bits: 843 bits for k = 64,
      V = 151,936, against 1,152 for 18-bit ids.
    - scale: the largest probability p_max, 8 bits on a log scale over [1/(e V), 1], rounded up.
    - tail: the probability mass outside the top-k, 8 bits on a log scale over [e^-30, 1] (code 0: below e^-30).
    - probabilities, in the same id order, quantised as c = round((levels - 1) * (p / scale)^0.35) with 90 levels,
      two codes per 13 bits (90 * 90 <= 2^13). Why a power: KL ~ sum p * (dlog p)^2 / 2, and with x = p^(1/2) every
      entry costs the same for the same step in x; top-k probabilities crowd near zero, so a smaller power (0.35, chosen
      by measurement on Gaussian and Zipf logits, bench/offline_bench.py) puts more levels there and cut the worst mean KL
      about threefold at k = 64. A code 0 decodes to a quarter step.
    Decoding renormalises the k probabilities and the tail to sum to 1. At k = 64 and V = 151,936 a record is
    843 + 8 + 8 + 416 = 1,275 bits = 160 bytes.
    """

    levels = 90
    pair_bits = 13
    power = 0.35

    def __init__(self, vocab_size: int, k: int):
        if not 1 <= k <= vocab_size:
            raise ConfigError(f"top_k={k} must be between 1 and the vocabulary size {vocab_size}.")
        self.vocab_size, self.k = vocab_size, k
        self.low_bits = max(0, int(np.floor(np.log2(vocab_size / k))))
        self.high_bits = k + (vocab_size >> self.low_bits) + 1
        self.pairs = (k + 1) // 2
        self.bits = k * self.low_bits + self.high_bits + 16 + self.pairs * self.pair_bits
        self.scale_floor = -np.log(vocab_size) - 1.0  # log of the smallest possible p_max, with a margin
        self.tail_floor = -30.0
        self.record_bytes = (self.bits + 7) // 8

    @staticmethod
    def _to_bits(values, width: int):
        """(n, m) unsigned ints -> (n, m * width) bits, most significant first."""
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
        return ((values.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8).reshape(values.shape[0], -1)

    @staticmethod
    def _from_bits(bits, width: int):
        weights = (1 << np.arange(width - 1, -1, -1, dtype=np.uint64))
        return (bits.reshape(bits.shape[0], -1, width).astype(np.uint64) * weights).sum(-1)

    def encode(self, ids, log_probs) -> "np.ndarray":
        """ids (n, k) int, log_probs (n, k) float (natural log, any order) -> (n, record_bytes) uint8."""
        ids, log_probs = np.asarray(ids, dtype=np.int64), np.asarray(log_probs, dtype=np.float64)
        n = ids.shape[0]
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1)
        probs = np.exp(np.take_along_axis(log_probs, order, 1))
        low = ids & ((1 << self.low_bits) - 1)
        high = ids >> self.low_bits
        upper = np.zeros((n, self.high_bits), dtype=np.uint8)
        np.put_along_axis(upper, high + np.arange(self.k), 1, axis=1)
        # Rounded up, so that every probability is at most the decoded scale.
        scale_code = np.clip(np.ceil(np.log(probs.max(1)) / self.scale_floor * -255 + 255), 0, 255)
        scale = np.exp(self.scale_floor * (255 - scale_code) / 255)
        tail = np.maximum(1.0 - probs.sum(1), 0.0)
        tail_code = np.clip(np.rint(255 - np.log(np.maximum(tail, 1e-300)) / self.tail_floor * 255), 0, 255)
        codes = np.power(probs / scale[:, None], self.power) * (self.levels - 1)
        codes = np.clip(np.rint(codes), 0, self.levels - 1).astype(np.int64)
        if self.k % 2:
            codes = np.concatenate([codes, np.zeros((n, 1), dtype=np.int64)], 1)
        paired = codes[:, 0::2] * self.levels + codes[:, 1::2]
        fields = [self._to_bits(low, self.low_bits) if self.low_bits else np.zeros((n, 0), np.uint8), upper,
                  self._to_bits(np.stack([scale_code, tail_code], 1).astype(np.uint64), 8),
                  self._to_bits(paired, self.pair_bits)]
        return np.packbits(np.concatenate(fields, 1), axis=1)

    def decode(self, records) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """(n, record_bytes) uint8 -> ids (n, k) int64 ascending, log_probs (n, k) float32, tail (n,) float32: the
        mass outside the top-k. Probabilities plus tail sum to 1."""
        records = np.asarray(records, dtype=np.uint8).reshape(-1, self.record_bytes)
        n = records.shape[0]
        bits = np.unpackbits(records, axis=1)[:, : self.bits]
        start = self.k * self.low_bits
        low = self._from_bits(bits[:, :start], self.low_bits) if self.low_bits else np.zeros((n, self.k), np.uint64)
        upper = bits[:, start : start + self.high_bits]
        _, positions = np.nonzero(upper)
        if positions.shape[0] != n * self.k:
            raise ValueError("corrupt top-k record: wrong number of ids")
        high = positions.reshape(n, self.k) - np.arange(self.k)
        ids = (high.astype(np.int64) << self.low_bits) | low.astype(np.int64)
        start += self.high_bits
        scale_code, tail_code = self._from_bits(bits[:, start : start + 16], 8).astype(np.float64).T
        scale = np.exp(self.scale_floor * (255 - scale_code) / 255)
        tail = np.exp(self.tail_floor * (255 - tail_code) / 255)  # code 0: below e^-30, kept as e^-30
        paired = self._from_bits(bits[:, start + 16 :], self.pair_bits).astype(np.int64)
        codes = np.stack([paired // self.levels, paired % self.levels], 2).reshape(n, -1)[:, : self.k]
        probs = scale[:, None] * np.power(np.where(codes == 0, 0.25, codes) / (self.levels - 1), 1 / self.power)
        total = probs.sum(1) + tail
        return ids, np.log(probs / total[:, None]).astype(np.float32), (tail / total).astype(np.float32)


def vocabulary_hash(tokenizer, size: int) -> str:
    """sha256 of the token strings of ids [0, size): two tokenizers with the same hash share that vocabulary."""
    return hashlib.sha256(json.dumps(tokens_by_id(tokenizer, size)).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of every row's input_ids and labels, in order: the exact tokens a capture was made from."""
    digest = hashlib.sha256()
    # A thousand rows at a time from the Arrow table: the same bytes (and hash) as hashing the whole columns at once.
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
        for input_ids, labels in zip(batch["input_ids"], batch["labels"]):
            digest.update(json.dumps([input_ids, labels]).encode())
    return digest.hexdigest()


def counted_positions_per_row(dataset) -> np.ndarray:
    """`counted_positions` of every row of a tokenized dataset, read a thousand rows at a time (int64 array)."""
    counts = np.zeros(len(dataset), dtype=np.int64)
    for start, batch in zip(range(0, len(dataset), 1000), dataset.select_columns(["labels"]).iter(batch_size=1000)):
        counts[start : start + len(batch["labels"])] = [counted_positions(labels) for labels in batch["labels"]]
    return counts


class TopKCapture:
    """A teacher's top-k distribution stored on disk (parquet shards + manifest.json) and read back per batch.

    Shards are `{split}-r{rank}-{n}.parquet`, each with columns `row` (index in the split) and `records` (the row's
    TopKCodec records, one per counted position, in order). Shards are written to a temporary name and renamed, so
    a crash leaves no partial shard; a run that resumes skips the rows already written.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest_path = os.path.join(folder, "manifest.json")

    def manifest(self) -> dict | None:
        if not os.path.isfile(self.manifest_path):
            return None
        with open(self.manifest_path) as handle:
            return json.load(handle)

    def shard_paths(self, split: str) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, name) for name in os.listdir(self.folder)
                      if name.startswith(f"{split}-") and name.endswith(".parquet"))

    def _read_shard(self, path: str):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, memory_map=True)
        except Exception as error:  # noqa: BLE001 - pyarrow's many error types all mean "this file is broken"
            raise ConfigError(f"capture shard '{path}' is truncated or corrupt ({str(error).splitlines()[0]}). "
                              "Delete it and run the capture again with the same config: it resumes and redoes only "
                              "those rows.") from None

    def rows_written(self, split: str) -> set[int]:
        rows = set()
        for path in self.shard_paths(split):
            rows.update(self._read_shard(path).column("row").to_pylist())
        return rows

    def write_shard(self, split: str, rank: int, rows: list[int], records: list[bytes]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(self.folder, exist_ok=True)
        taken = {os.path.basename(p) for p in self.shard_paths(split)}
        number = 0
        while f"{split}-r{rank:03d}-{number:05d}.parquet" in taken:
            number += 1
        path = os.path.join(self.folder, f"{split}-r{rank:03d}-{number:05d}.parquet")
        table = pa.table({"row": pa.array(rows, pa.int64()), "records": pa.array(records, pa.binary())})
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    def load(self, split: str, dataset, codec: TopKCodec) -> "TopKReader":
        """Check that every row of `dataset` is in the capture with the right number of records."""
        locations = {}
        for path in self.shard_paths(split):
            table = self._read_shard(path)
            for offset, row in enumerate(table.column("row").to_pylist()):
                locations[row] = (table, offset)
        missing = [row for row in range(len(dataset)) if row not in locations]
        if missing:
            raise ConfigError(
                f"capture '{self.folder}' lacks {len(missing)} of the {len(dataset)} rows of its {split} split (first: "
                f"row {missing[0]}): a shard is missing. Run the capture again with the same config to fill them in."
            )
        return TopKReader(locations, codec, dataset)


class TopKReader:
    """Decodes the stored top-k of a batch of rows, in the order the loss counts positions."""

    def __init__(self, locations: dict, codec: TopKCodec, dataset):
        self.locations, self.codec = locations, codec
        self.expected = counted_positions_per_row(dataset)

    def batch(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chunks = []
        for row in rows:
            table, offset = self.locations[row]
            data = np.frombuffer(table.column("records")[offset].as_py(), dtype=np.uint8)
            if data.size != self.expected[row] * self.codec.record_bytes:
                raise ConfigError(f"capture row {row} holds {data.size // self.codec.record_bytes} positions but the "
                                  f"dataset row has {self.expected[row]}: the capture does not match this data.")
            chunks.append(data)
        ids, log_probs, tail = self.codec.decode(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
        return (torch.from_numpy(ids).to(device), torch.from_numpy(log_probs).to(device),
                torch.from_numpy(tail).to(device))


def capture_settings(config: dict, tokenizer, vocab_size: int, splits: dict) -> dict:
    """What a capture depends on; training from it checks each field against its own config and data."""
    data = config["dataset"]
    return {
        "format_version": CAPTURE_FORMAT_VERSION,
        "teacher": config["models"]["teacher"],
        "vocab_size": vocab_size,
        "vocabulary_hash": vocabulary_hash(tokenizer, vocab_size),
        "chat_template": tokenizer.chat_template,
        "max_length": config["tokenizer"]["max_length"],
        "top_k": config["offline"]["top_k"],
        "temperature": config["distillation"]["temperature"],
        "dataset": {key: data.get(key) for key in ("name", "split", "format", "num_samples", "eval_size", "eval_name",
                                                   "eval_split", "seed", "system_prompt")},
        "fingerprints": {split: dataset_fingerprint(dataset) for split, dataset in splits.items()},
        "rows": {split: len(dataset) for split, dataset in splits.items()},
    }


_MISMATCH_HINTS = {
    "vocabulary_hash": "the capture was made with another tokenizer",
    "vocab_size": "the capture was made with another tokenizer",
    "chat_template": "the chat template differs",
    "max_length": "tokenizer.max_length differs",
    "temperature": "distillation.temperature differs (the stored distribution is at the capture's temperature)",
    "fingerprints": "the tokenized dataset differs (data, num_samples, seed, eval split, template or truncation)",
}


def check_capture_manifest(manifest: dict | None, expected: dict, folder: str, for_training: bool) -> None:
    """One clear error when a capture does not match the current run."""
    if manifest is None:
        if for_training:
            raise ConfigError(f"offline.capture_dir '{folder}' holds no manifest.json: run distil_logits.py with "
                              "offline.mode: capture first.")
        return
    if manifest.get("format_version") != CAPTURE_FORMAT_VERSION:
        raise ConfigError(f"capture '{folder}' has format version {manifest.get('format_version')}, this code reads "
                          f"{CAPTURE_FORMAT_VERSION}. Capture again.")
    ignore = {"teacher", "dataset", "rows"} if for_training else set()
    for key, value in expected.items():
        if key not in ignore and manifest.get(key) != value:
            hint = _MISMATCH_HINTS.get(key, f"{key} differs")
            raise ConfigError(f"capture '{folder}' does not match this run: {hint} (manifest {key}: "
                              f"{str(manifest.get(key))[:60]!r}, now: {str(value)[:60]!r}). Capture again or fix the config.")
    if for_training and not manifest.get("complete"):
        raise ConfigError(f"capture '{folder}' is not complete (the capture run stopped early). Run the capture again "
                          "with the same config: it resumes.")


class CaptureProcesses:
    """This process's rank, the number of processes and a barrier, from torch.distributed when it is initialised:
    accelerate's PartialState reports one process on the CPU under a DeepSpeed launch although DeepSpeed has
    initialised them all (measured with accelerate_zero3.yaml and 2 processes)."""

    def __init__(self, state):
        import torch.distributed as dist

        self.state = state
        self.distributed = dist.is_available() and dist.is_initialized()
        self.process_index = dist.get_rank() if self.distributed else state.process_index
        self.num_processes = dist.get_world_size() if self.distributed else state.num_processes
        self.local_process_index = int(os.environ.get("LOCAL_RANK", state.local_process_index))
        self.is_main_process = self.process_index == 0
        self.device = state.device

    def wait_for_everyone(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


class CaptureTeacher:
    """The teacher of a capture as `load_capture_teacher` placed it: `model`, what is called (a DeepSpeed engine
    under ZeRO-3, else the model), `bare`, the model itself, and `sharded`, true when every process holds a shard and
    each forward is therefore a collective that all processes must run together."""

    def __init__(self, model: torch.nn.Module, bare: torch.nn.Module, sharded: bool = False, keep=None):
        self.model, self.bare, self.sharded = model, bare, sharded
        self.keep = keep  # transformers' DeepSpeed config, registered by a weak reference: alive as long as this

    @property
    def input_device(self) -> torch.device:
        return self.bare.get_input_embeddings().weight.device


def load_capture_teacher(config: dict, state: CaptureProcesses) -> CaptureTeacher:
    """Load the capture's teacher with the placement its launch asks for, never one whole copy per process unless
    that is all there is:

    - launched with a DeepSpeed ZeRO-3 config (accelerate's --config_file or training.deepspeed): every process loads
      and keeps only its shard (zero.Init inside from_pretrained, then `deepspeed.initialize` with a ZeRO-3
      inference config), as training places its teacher; each forward gathers the weights layer by layer;
    - on a GPU node otherwise: `device_map="auto"` over this process's share of the node's GPUs
      (distributed.capture_gpus: launch one process per node to spread a 70B teacher over all of them);
    - else (the CPU, or one GPU per process): the whole teacher on this process's device.
    """
    from common import load_causal_lm, model_source

    name, training = config["models"]["teacher"], config["training"]
    deepspeed_config = launched_deepspeed_config(training)
    if deepspeed_config is not None and deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        hidden_size = AutoConfig.from_pretrained(model_source(name)).get_text_config().hidden_size
        inference = zero3_inference_config(deepspeed_config, hidden_size, config["offline"]["capture_batch_size"],
                                           state.num_processes, training)
        keep = HfDeepSpeedConfig(inference)  # while it lives, from_pretrained partitions as it loads (zero.Init)
        teacher = load_causal_lm(name, config, trainable=False)
        add_hidden_states_forward(teacher)  # before the engine wraps it, so that the engine calls it
        engine, *_ = deepspeed.initialize(model=teacher, config=inference)
        engine.eval()
        held = sum(getattr(p, "ds_tensor", p).numel() for p in teacher.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in teacher.parameters())
        print(f"capture teacher on rank {state.process_index}: holds {held:,} of {total:,} parameters (ZeRO-3)",
              flush=True)
        return CaptureTeacher(engine, teacher, sharded=state.num_processes > 1, keep=keep)
    gpus = capture_gpus(state.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)),
                        torch.cuda.device_count()) if torch.cuda.is_available() else []
    if len(gpus) > 1:
        # Free memory less a tenth, for the activations and the head's logits chunks.
        memory = {gpu: int(torch.cuda.mem_get_info(gpu)[0] * 0.9) for gpu in gpus}
        teacher = load_causal_lm(name, config, trainable=False, device_map="auto", max_memory=memory)
        print(f"capture teacher on rank {state.process_index}: spread over GPUs {gpus} (device_map auto)", flush=True)
    else:
        teacher = load_causal_lm(name, config, trainable=False).to(state.device)
    add_hidden_states_forward(teacher)
    return CaptureTeacher(teacher, teacher)


def run_capture(config: dict, teacher: CaptureTeacher, tokenizer, splits: dict, vocab_size: int) -> dict:
    """Write the teacher's top-k at every counted position of every split to config["offline"]["capture_dir"].

    Rows are split over processes (launch with accelerate for several GPUs); rows already in the folder are skipped,
    so an interrupted capture resumes. A sharded teacher (ZeRO-3) runs as many batches on every process, padded with
    a discarded one where a process has fewer rows left. Returns the manifest.
    """
    from accelerate import PartialState

    check_launcher_processes("distil_logits.py")  # a capture builds no training arguments, so check_launch never runs
    offline = config["offline"]
    state = CaptureProcesses(PartialState())
    capture = TopKCapture(offline["capture_dir"])
    codec = TopKCodec(vocab_size, offline["top_k"])
    expected = capture_settings(config, tokenizer, vocab_size, splits)
    check_capture_manifest(capture.manifest(), expected, capture.folder, for_training=False)
    if state.is_main_process and capture.manifest() is None:
        os.makedirs(capture.folder, exist_ok=True)
        with open(capture.manifest_path, "w") as handle:
            json.dump({**expected, "complete": False}, handle, indent=2)
    state.wait_for_everyone()

    served = isinstance(teacher, ServedTeacher)
    if not served:  # a served teacher's answers were checked by run_startup_checks
        first_row = next(iter(splits.values()))[0]["input_ids"][:16]
        check_head_matches_forward(teacher.model, teacher.bare, torch.tensor([first_row], device=teacher.input_device),
                                   "teacher")
    capture_rows = _served_capture_rows if served else _capture_rows
    todo = {}
    for split, dataset in splits.items():
        done = capture.rows_written(split)
        todo[split] = [row for row in range(len(dataset))
                       if row % state.num_processes == state.process_index and row not in done]
    # A capture of a real dataset runs for many minutes: show rank 0's progress in positions, the unit of its speed.
    positions = sum(int(counted_positions_per_row(dataset)[todo[split]].sum()) for split, dataset in splits.items())
    progress = tqdm(total=positions, unit=" positions", desc=f"capture (rank 0 of {state.num_processes})",
                    disable=not state.is_main_process, smoothing=0.1)
    tokens, start_time, size = 0, time.time(), offline["capture_batch_size"]
    for split, dataset in splits.items():
        todo_rows = todo[split]
        batches = -(-len(todo_rows) // size)
        if not served and teacher.sharded:  # every process runs the slowest one's number of forwards (each is a collective)
            count = torch.tensor(batches, device=state.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            batches = int(count)
        shard_rows, shard_records = [], []
        for first in range(0, batches * size, size):
            rows = todo_rows[first : first + size]
            examples = [dataset[row] for row in rows] or [next(iter(splits.values()))[0]]  # a padding batch
            records = capture_rows(teacher, examples, tokenizer.pad_token_id, codec, config, vocab_size)
            if not rows:
                continue
            shard_rows += rows
            shard_records += records
            written = sum(len(record) // codec.record_bytes for record in records)
            tokens += written
            progress.update(written)
            if len(shard_rows) >= offline["shard_rows"] or first + size >= len(todo_rows):
                capture.write_shard(split, state.process_index, shard_rows, shard_records)
                shard_rows, shard_records = [], []
    progress.close()
    seconds = time.time() - start_time
    print(f"capture on rank {state.process_index}: {tokens} positions in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.0f} positions/s)", flush=True)
    state.wait_for_everyone()
    manifest = {**expected, "complete": False}
    if state.is_main_process:
        manifest = _complete_manifest(capture, codec, splits, manifest, tokens / max(seconds, 1e-9))
    state.wait_for_everyone()
    return manifest


def _padded(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels and attention_mask of tokenized rows, right-padded to the longest."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for index, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[index, :size] = torch.tensor(example["input_ids"])
        labels[index, :size] = torch.tensor(example["labels"])
        attention_mask[index, :size] = 1
    return input_ids, labels, attention_mask


def _records_per_row(encoded: list, codec: TopKCodec, examples: list[dict]) -> list[bytes]:
    records = np.concatenate(encoded) if encoded else np.zeros((0, codec.record_bytes), np.uint8)
    counts = [counted_positions(example["labels"]) for example in examples]
    return [piece.tobytes() for piece in np.split(records, np.cumsum(counts)[:-1])]


def _served_capture_rows(teacher: ServedTeacher, examples: list[dict], pad_id: int, codec: TopKCodec, config: dict,
                         vocab_size: int) -> list[bytes]:
    """`_capture_rows` from a vLLM server (teacher_server.url): the rows are sent without their padding, and the answer
    at the counted positions is put in the capture's form at T = 1 (served_teacher.counted_topk)."""
    input_ids, labels, attention_mask = _padded(examples, pad_id)
    answers = teacher.top_k_rows(rows_to_send(input_ids, attention_mask))
    ids, log_probs, _ = counted_topk(answers, labels, config["offline"]["top_k"], config["distillation"]["temperature"],
                                     vocab_size)
    return _records_per_row([codec.encode(ids.numpy(), log_probs.numpy())], codec, examples)


def _capture_rows(teacher: CaptureTeacher, examples: list[dict], pad_id: int, codec: TopKCodec, config: dict,
                  vocab_size: int) -> list[bytes]:
    """The encoded top-k records of a batch of tokenized rows, one bytes object per row (its counted positions)."""
    input_ids, labels, attention_mask = _padded(examples, pad_id)
    device = teacher.input_device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    hidden = teacher_hidden_at_counted_positions(teacher.model, inputs, labels, final_layer(teacher.bare))
    head, transform = teacher.bare.get_output_embeddings(), head_transform(teacher.bare)
    # The head's logits a chunk of positions at a time: the (positions, vocab) logits never exist whole.
    # Held per (position, vocabulary entry), float32: the logits, their log-softmax and two top-k/tail temporaries.
    rows = getattr(head.weight, "ds_shape", head.weight.shape)[0]
    chunk = max(16, int(config["distillation"]["loss_memory_mb"] * 2**20 / (16 * rows)) // 16 * 16)
    encoded = []
    with torch.no_grad(), gathered_head(head):  # under ZeRO-3 a collective: once per batch on every process
        for begin in range(0, hidden.shape[0], chunk):
            logits = head_logits(hidden[begin : begin + chunk], head, transform)
            ids, log_probs, _ = topk_distribution(logits, config["offline"]["top_k"],
                                                  config["distillation"]["temperature"], vocab_size)
            encoded.append(codec.encode(ids.cpu().numpy(), log_probs.cpu().numpy()))
    return _records_per_row(encoded, codec, examples)


def _complete_manifest(capture: TopKCapture, codec: TopKCodec, splits: dict, manifest: dict,
                       positions_per_second: float) -> dict:
    """Check that every row was written, then mark the capture complete with its sizes (written atomically)."""
    for split, dataset in splits.items():
        written = capture.rows_written(split)
        if len(written) != len(dataset):
            raise ConfigError(f"capture of split {split} has {len(written)} of {len(dataset)} rows after the run.")
    positions = int(sum(counted_positions_per_row(dataset).sum() for dataset in splits.values()))
    stored = sum(os.path.getsize(path) for split in splits for path in capture.shard_paths(split))
    manifest = {**manifest, "complete": True, "record_bytes": codec.record_bytes, "positions": positions,
                "bytes_on_disk": stored, "bytes_per_position_on_disk": stored / max(positions, 1),
                "positions_per_second": positions_per_second}
    with open(capture.manifest_path + ".tmp", "w") as handle:
        json.dump(manifest, handle, indent=2)
    os.replace(capture.manifest_path + ".tmp", capture.manifest_path)
    print_rank0(f"capture complete: {positions} positions, {codec.record_bytes} bytes per position per record, "
                f"{stored / max(positions, 1):.1f} bytes per position on disk, in {capture.folder}")
    return manifest


def with_row_index(batch: dict, indices: list[int]) -> dict:
    """`Dataset.map(with_row_index, with_indices=True, batched=True)`: each row's index in its split as `capture_row`,
    the key of its stored top-k."""
    return {"capture_row": indices}


class CaptureRowCollator:
    """TRL's padding collator, plus each row's index in its split so the trainer can fetch its stored top-k."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate([{key: example[key] for key in ("input_ids", "labels")} for example in examples])
        batch["capture_row"] = torch.tensor([example["capture_row"] for example in examples])
        return batch


def capture_teacher(config: dict, tokenizer, vocab_size: int) -> dict:
    """`offline.mode: capture` from start to end (distil_logits.main hands over after checking the config and the
    tokenizers): tokenize the data exactly as training from the capture will, load the teacher, and `run_capture`.
    Returns the manifest."""
    from accelerate import PartialState

    from data import check_ids_below, prepare_datasets
    from distributed import peak_memory_mib, print_memory_report

    train, evaluation, _ = prepare_datasets(config["dataset"], tokenizer, config["tokenizer"]["max_length"])
    splits = {"train": train} if evaluation is None else {"train": train, "eval": evaluation}
    if len(tokenizer) > vocab_size:  # the student's tokenizer has tokens the teacher's lacks
        check_ids_below(splits, vocab_size, tokenizer)
    if config["teacher_server"]["url"] is not None:  # the teacher's weights are never loaded here
        teacher, checks = served_teacher_from_config(config, tokenizer)
        run_startup_checks(teacher, vocab_size, **checks)
        return run_capture(config, teacher, tokenizer, splits, vocab_size)
    state = CaptureProcesses(PartialState())  # before loading: zero.Init needs the process group
    before = peak_memory_mib()
    teacher = load_capture_teacher(config, state)
    print_memory_report("teacher loaded", before)
    return run_capture(config, teacher, tokenizer, splits, vocab_size)
