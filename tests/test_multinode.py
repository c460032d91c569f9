"""What changes when a run spans several nodes, checked in one process by giving accelerate's PartialState the ranks
of another process: each node's first process (LOCAL_RANK 0) prepares the datasets first, writing that node's
datasets cache, and the node's other processes wait for it and read the cache."""

import pytest
from accelerate import PartialState
from conftest import tiny_config

import data
from common import load_tokenizer


@pytest.mark.parametrize("local_rank,first", [(0, "load"), (1, "wait")])
def test_each_nodes_first_process_prepares_the_data_first(assets, tmp_path, monkeypatch, local_rank, first):
    """Global rank 2 of 4 (2 nodes of 2): as its node's first process it loads at once and waits for the others only
    afterwards; as the node's second it waits first. Only global rank 0 going first would make both wait."""
    state = PartialState()
    for key, value in (("process_index", 2), ("local_process_index", local_rank), ("num_processes", 4)):
        monkeypatch.setitem(state._shared_state, key, value)
    events = []
    monkeypatch.setattr(PartialState, "wait_for_everyone", lambda self: events.append("wait"))
    load_raw_dataset = data.load_raw_dataset
    monkeypatch.setattr(data, "load_raw_dataset", lambda *args: events.append("load") or load_raw_dataset(*args))
    config = tiny_config(assets, str(tmp_path / "out"))
    tokenizer = load_tokenizer(assets["student"], config["tokenizer"]["chat_template"])
    data.prepare_datasets(config["dataset"], tokenizer, 64)
    assert events[0] == first and events.count("wait") == 1, events
