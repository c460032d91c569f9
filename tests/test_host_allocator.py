"""glibc's mmap threshold is a process-wide setting: distil_logits.py fixes it for the cross-tokenizer loss only when
that loss runs on the CPU, where its (chunk, vocabulary) buffers come from glibc's heap. On a GPU they are CUDA memory,
and a fixed threshold would only turn every large host allocation of the run into its own mmap."""

import pytest
import torch
import transformers
from conftest import tiny_config
from test_cross_tokenizer import foreign  # noqa: F401 - the fixture: a teacher on another tokenizer

import distil_logits


class DataReached(Exception):
    """Raised where the datasets would be prepared: everything the test checks is decided before."""


@pytest.mark.parametrize("device,fixed", [("cpu", True), ("cuda", False)])
def test_mmap_threshold_is_fixed_only_where_the_cross_tokenizer_loss_runs_on_the_cpu(foreign, tmp_path, monkeypatch,  # noqa: F811
                                                                                    device, fixed):
    calls = []
    monkeypatch.setattr(distil_logits, "return_large_frees_to_the_system", lambda: calls.append(device))
    monkeypatch.setattr(transformers.TrainingArguments, "device", property(lambda self: torch.device(device)))

    def stop(*args, **kwargs):
        raise DataReached

    monkeypatch.setattr(distil_logits, "prepare_paired_datasets", stop)
    config = tiny_config(foreign, str(tmp_path / "out"), cross_tokenizer="hybrid")
    with pytest.raises(DataReached):
        distil_logits.main(config)
    assert calls == ([device] if fixed else [])
