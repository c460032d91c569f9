"""On-policy distillation through real seeded generation (no stand-in for on_policy.sample_completions): the batches
the student trains on hold exactly the tokens an independent sampler draws from the same seed (a plain decoding loop
without a KV cache: full forward, softmax of the last position, one torch.multinomial per step for the whole batch,
as generate samples), labelled on the completion through its first end token and nowhere else."""

import os
import shutil

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import distil_logits
import on_policy


def independent_samples(student, prompts: list[list[int]], seed: int, stop_ids: set[int], pad_id: int,
                        max_new_tokens: int) -> list[list[int]]:
    """Left-padded prompts decoded token by token at temperature 1 from the full sequence, rows that stopped padded."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (width - len(prompt)) + prompt for prompt in prompts])
    mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts])
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    new_tokens = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            new_tokens.append(token)
            finished |= torch.isin(token, torch.tensor(sorted(stop_ids)))
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if finished.all():
                break
    return torch.stack(new_tokens, 1).tolist()


@pytest.fixture(scope="module")
def student_that_stops(assets, tmp_path_factory):
    """The tiny student with its <|im_end|> head row along the mean direction of its final hidden states: it ends a
    turn with probability ~0.2 per token (a random head ~0.003), so some sampled rows stop and others are cut."""
    folder = str(tmp_path_factory.mktemp("student_that_stops"))
    student = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    end_of_turn = AutoTokenizer.from_pretrained(assets["tokenizer"]).convert_tokens_to_ids("<|im_end|>")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = student.model(torch.randint(5, 300, (64, 30), generator=generator)).last_hidden_state.mean((0, 1))
        student.lm_head.weight[end_of_turn] = 4 * hidden / hidden.norm()
    student.save_pretrained(folder)
    for name in os.listdir(assets["tokenizer"]):
        shutil.copy(os.path.join(assets["tokenizer"], name), folder)
    return folder


def test_sampled_batches_hold_the_seeded_samples_and_their_labels(assets, student_that_stops, tmp_path, monkeypatch):
    """One optimizer step of 2 accumulated micro-batches of 2 rows, both sampled (fraction 1), max_new_tokens 6,
    tokenizer.max_length 64 (which cuts the completion of the longest prompt)."""
    seen = []
    compute_loss = distil_logits.LogitsTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append({key: inputs[key].clone().cpu() for key in ("input_ids", "labels", "completion_lengths")})
        return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(distil_logits.LogitsTrainer, "compute_loss", recording)
    config = tiny_config(assets, str(tmp_path / "out"), student=student_that_stops, alpha=0.5,
                         divergence="reverse_kl", temperature=1.0)
    config["dataset"]["eval_size"] = 0
    config["on_policy"].update(fraction=1.0, max_new_tokens=6)
    config["training"].update(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                              save_strategy="no", eval_strategy="no")
    trainer = distil_logits.main(config)
    stop_ids, pad_id = set(trainer.on_policy.stop_ids), trainer.processing_class.pad_token_id
    student = AutoModelForCausalLM.from_pretrained(student_that_stops).eval()  # the weights the first step samples with
    max_length = config["tokenizer"]["max_length"]
    assert len(seen) == 2
    stopped = cut = 0
    for micro_batch, batch in enumerate(seen):
        prompt_lengths = [int((labels != -100).nonzero()[0]) for labels in batch["labels"]]
        prompts = [row[:length].tolist() for row, length in zip(batch["input_ids"], prompt_lengths)]
        seed = on_policy.generation_seed(config["training"]["seed"], 0, micro_batch, 0)
        # generate's budget: max_new_tokens, or less when the shortest prompt leaves less room in max_length
        budget = min(6, max_length - min(len(prompt) for prompt in prompts))
        completions = independent_samples(student, prompts, seed, stop_ids, pad_id, budget)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            kept = completion[:next((i + 1 for i, token in enumerate(completion) if token in stop_ids), len(completion))]
            kept = kept[:max_length - len(prompt)]  # the row itself is cut at max_length
            stopped, cut = stopped + (kept[-1] in stop_ids), cut + (kept[-1] not in stop_ids)
            padding = batch["input_ids"].shape[1] - len(prompt) - len(kept)
            assert batch["input_ids"][row].tolist() == prompt + kept + [pad_id] * padding
            assert batch["labels"][row].tolist() == [-100] * len(prompt) + kept + [-100] * padding
            assert int(batch["completion_lengths"][row]) == len(kept)
    print(f"sampled rows ending in a stop token: {stopped}, cut: {cut}")
    assert stopped and cut  # both ends of a completion were checked
