"""On-policy distillation through real seeded generation (no stand-in for on_policy.sample_completions): the batches
the student trains on hold exactly the tokens an independent sampler draws from the same seed (a plain decoding loop
without a KV cache: full forward, softmax of the last position, one torch.multinomial per step for the whole batch,
as generate samples), labelled on the completion through its first end token and nowhere else. One generation per
optimizer step covers the rows of all its sampled micro-batches. A checkpoint whose generation_config sets every
sampling field (top_k, min_p, suppress_tokens, max_time, ...) still samples the student's own distribution."""

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
    tokenizer.max_length 64 (which cuts the completion of the longest prompt): the 4 rows are sampled in one
    left-padded batch from the step's seed (per-micro-batch generation draws other tokens)."""
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
    prompts = []
    for batch in seen:
        prompt_lengths = [int((labels != -100).nonzero()[0]) for labels in batch["labels"]]
        prompts += [row[:length].tolist() for row, length in zip(batch["input_ids"], prompt_lengths)]
    seed = on_policy.generation_seed(config["training"]["seed"], 0, 0)
    # generate's budget: max_new_tokens, or less when the step's shortest prompt leaves less room in max_length
    budget = min(6, max_length - min(len(prompt) for prompt in prompts))
    completions = independent_samples(student, prompts, seed, stop_ids, pad_id, budget)
    stopped = cut = 0
    for micro_batch, batch in enumerate(seen):
        for row in range(2):
            prompt, completion = prompts[2 * micro_batch + row], completions[2 * micro_batch + row]
            kept = completion[:next((i + 1 for i, token in enumerate(completion) if token in stop_ids), len(completion))]
            kept = kept[:max_length - len(prompt)]  # the row itself is cut at max_length
            stopped, cut = stopped + (kept[-1] in stop_ids), cut + (kept[-1] not in stop_ids)
            padding = batch["input_ids"].shape[1] - len(prompt) - len(kept)
            assert batch["input_ids"][row].tolist() == prompt + kept + [pad_id] * padding
            assert batch["labels"][row].tolist() == [-100] * len(prompt) + kept + [-100] * padding
            assert int(batch["completion_lengths"][row]) == len(kept)
    print(f"sampled rows ending in a stop token: {stopped}, cut: {cut}")
    assert stopped and cut  # both ends of a completion were checked


# Every field of transformers 5.23's GenerationConfig that, set in a checkpoint's generation_config.json, would change
# which tokens generate samples or where it stops (on_policy.neutral_generation_config lists how each is neutralised).
CHECKPOINT_SAMPLING_FIELDS = dict(
    do_sample=True, num_beams=3, num_return_sequences=2, temperature=0.3, top_k=2, top_p=0.5, min_p=0.4, top_h=0.5, typical_p=0.4, epsilon_cutoff=0.05,
    eta_cutoff=0.05, repetition_penalty=3.0, encoder_repetition_penalty=2.0, no_repeat_ngram_size=1,
    length_penalty=2.0, min_length=40, min_new_tokens=5, max_time=1e-9, renormalize_logits=True,
    remove_invalid_values=True, exponential_decay_length_penalty=(1, 2.0), suppress_tokens=list(range(40, 200)),
    begin_suppress_tokens=list(range(200, 300)), bad_words_ids=[[7], [8]], sequence_bias=[[[9], 5.0]],
    forced_bos_token_id=10, forced_eos_token_id=11, guidance_scale=2.0,
)


def test_a_checkpoints_generation_config_does_not_change_the_samples(student_that_stops, tmp_path):
    """The student saved with a generation_config that sets every sampling field (a chat model's top_k 20, min_p,
    repetition_penalty, and the rest) samples exactly what the independent sampler draws from its plain softmax:
    the same tokens and the same stops."""
    from transformers import GenerationConfig

    folder = str(tmp_path / "student_with_generation_config")
    student = AutoModelForCausalLM.from_pretrained(student_that_stops).eval()
    student.generation_config = GenerationConfig(**CHECKPOINT_SAMPLING_FIELDS)
    student.save_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert student.generation_config.min_p == 0.4 and student.generation_config.suppress_tokens[0] == 40
    tokenizer = AutoTokenizer.from_pretrained(student_that_stops)
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22], [30, 31, 32, 33]]
    ids, mask = on_policy.left_padded(prompts, tokenizer.pad_token_id, "cpu")
    settings = {"sampling_temperature": 1.0, "top_p": 1.0}
    sampled = on_policy.sample_completions(student, ids, mask, settings, stop_ids, tokenizer.pad_token_id,
                                           len(tokenizer), seed=3, max_new_tokens=12)
    expected = independent_samples(student, prompts, 3, set(stop_ids), tokenizer.pad_token_id, 12)
    assert sampled == expected
    assert any(stop_ids[0] in row for row in sampled) and any(max(row) >= 40 for row in sampled)
