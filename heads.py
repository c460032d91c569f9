"""Output heads: what a model does between its last hidden state and its logits, the backbone-only forward that the
losses read hidden states from, and the start-up check that the loss rebuilds a model's own logits exactly (run in
every engine, DeepSpeed ZeRO-3 included).

The chunked losses (losses.py, cross_tokenizer_loss.py) never call a model's output head: they multiply its final
hidden states by the head's weight chunk by chunk and apply `head_transform` themselves, so that the (tokens,
vocabulary) logits never exist whole.
"""

from __future__ import annotations

import types

import torch

from common import ConfigError
from data import next_token_mask


def head_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) that the model applies between its output head and its logits:
    logits = softcap * tanh(scale * (h W^T + b) / softcap), or scale * (h W^T + b) without soft-capping."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None):
        scale = 1.0 / text_config.logits_scaling  # Granite divides its logits by logits_scaling
    return float(1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)


def _apply_head_transform(logits: torch.Tensor, scale: float, softcap: float | None,
                          in_place: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one implementation of `head_transform`'s formula: (transformed logits, d logits / d raw or None).

    In place (the chunked kernel's reused buffers) it overwrites `logits` and also returns the slope, which it must
    take from tanh's output before that is multiplied by the soft-cap in the same memory. Out of place it is
    differentiable by autograd and returns no slope. Both apply the same float operations in the same order."""
    if softcap is None:
        if scale == 1.0:
            return logits, None
        return (logits.mul_(scale) if in_place else logits * scale), None
    if not in_place:
        return torch.tanh(logits * (scale / softcap)) * softcap, None
    capped = logits.mul_(scale / softcap).tanh_()
    slope = (1 - capped.square()).mul_(scale)
    return capped.mul_(softcap), slope


def transform_logits(logits: torch.Tensor, transform: tuple[float, float | None]) -> torch.Tensor:
    """softcap * tanh(scale * raw / softcap) (or scale * raw) of raw head outputs, differentiably (a new tensor)."""
    return _apply_head_transform(logits, *transform, in_place=False)[0]


def transform_logits_(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """`transform_logits` in place; return d logits / d raw when it is not a constant."""
    return _apply_head_transform(logits, scale, softcap, in_place=True)[1]


def head_logits(hidden: torch.Tensor, head: torch.nn.Module, transform: tuple[float, float | None]) -> torch.Tensor:
    """float32 logits of a few rows of hidden states, exactly as the chunked loss builds them (no gradient)."""
    weight, bias = full_head_tensors(head)
    logits = hidden.to(weight.device) @ weight.t()  # device_map may leave the head on another GPU than the last layer
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    transform_logits_(logits, *transform)
    return logits


def full_head_tensors(head: torch.nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of an output head; FSDP2 shards them as DTensors, gathered here (differentiably) for the loss."""
    if head is None:
        return None, None
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return weight, bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def gathered_head(*heads: torch.nn.Module | None):
    """A context in which the heads' parameters are whole under DeepSpeed ZeRO-3 (which partitions them and gathers
    a module's parameters only inside that module's own forward, which the chunked loss never calls); elsewhere a
    no-op. Every process must enter it together (the gather is a collective)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    parameters = [parameter for head in heads if head is not None
                  for parameter in (head.weight, getattr(head, "bias", None))]
    return maybe_gather_lm_head_ctx(*parameters)


# ---------------------------------------------------------------------------------------------------------------------
# The backbone alone: hidden states without the head, through the model's own forward (where the engines' hooks run)
# ---------------------------------------------------------------------------------------------------------------------


def add_hidden_states_forward(model: torch.nn.Module) -> None:
    """Let `model(..., hidden_layers=[...])` return the backbone's hidden states at those `output_hidden_states`
    indices (a tuple indexed like `output_hidden_states`, None at the other indices; index num_hidden_layers is the
    final hidden state after the last norm), without the output head. Going through the model's own forward keeps
    the DeepSpeed and FSDP hooks that gather sharded parameters."""
    original_forward = model.forward

    def forward(self, *args, hidden_layers: list[int] | None = None, **kwargs):
        if hidden_layers is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, output_hidden_states=list(hidden_layers), **kwargs).hidden_states

    model.forward = types.MethodType(forward, model)


def final_layer(model: torch.nn.Module) -> int:
    """The `hidden_layers` index of a model's final hidden state (its number of blocks)."""
    return model.config.get_text_config().num_hidden_layers


def teacher_hidden_at_counted_positions(teacher: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                                        last: int) -> torch.Tensor:
    """The teacher's final hidden states (`hidden_layers` index `last`, from `final_layer` of the unwrapped teacher)
    at the positions whose next-token label counts, shape (N, Ht). Needs `add_hidden_states_forward(teacher)`: only
    the backbone runs, the logits are built chunk by chunk in the loss."""
    with torch.no_grad():
        hidden = teacher(**inputs, hidden_layers=[last])[last]
    return hidden[:, :-1][next_token_mask(labels.to(hidden.device))]


# ---------------------------------------------------------------------------------------------------------------------
# The start-up head check
# ---------------------------------------------------------------------------------------------------------------------


def forget_zero3_trace(engine: torch.nn.Module) -> None:
    """Make a DeepSpeed ZeRO-3 engine record its module order again from its next forward (a no-op elsewhere).

    ZeRO-3 records the order in which a model's modules run over its first forwards and from then on prefetches
    parameters by that order. The head check's forwards call the output head, which training never does (the loss
    reads the head's weight inside `gathered_head`): left in the trace, the head would be prefetched into that
    gather and the step fails. TRL's add_hooks invalidates the trace the same way after generation."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # training engine, or a frozen model's engine
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def largest_over_processes(value: torch.Tensor) -> float:
    """A scalar tensor's largest value over every process (NaN counting as infinite), so that a check made on it passes
    or fails on all of them together. Decided on each rank alone, a failure on one (its own row, its own shard) would
    stop it while the others went on into their next collective and waited there for ever. Every process calls it."""
    value = torch.nan_to_num(value.detach().float().reshape(1), nan=float("inf"))
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


def check_head_matches_forward(model: torch.nn.Module, unwrapped: torch.nn.Module, input_ids: torch.Tensor,
                               name: str, mixed_precision: bool = False) -> None:
    """Stop with one clear error when the model's own logits differ from what the chunked loss builds from its final
    hidden state (head weight and bias, then `head_transform`): a model that does anything else between its backbone
    and its head would otherwise train on a different loss without anyone noticing.

    `model` is what the engine runs (DDP / DeepSpeed wrapper, or the model itself), patched by
    `add_hidden_states_forward`; `unwrapped` is the bare model; `mixed_precision` is true when the engine autocasts
    the forward (training.bf16 / fp16). Runs two short forwards in eval mode. Every process must call it together: the
    verdict is the worst process's (`largest_over_processes`), so that all stop with the same error or none does, and
    under ZeRO-3 its forwards and the head's gather are collectives too (the engine then records its trace afresh,
    `forget_zero3_trace`). The tolerance allows bf16/fp16 rounding of logits, far below the effect of a missing scale or
    soft-cap on a real model's logits.
    """
    head, transform, last = unwrapped.get_output_embeddings(), head_transform(unwrapped), final_layer(unwrapped)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=input_ids, use_cache=False).logits.float()
            hidden = model(input_ids=input_ids, hidden_layers=[last])[last]
            # accelerate's mixed precision returns float32 outputs even from a bf16 model
            with gathered_head(head):
                got = head_logits(hidden.to(head.weight.dtype), head, transform)
    finally:
        model.train(was_training)
        forget_zero3_trace(model)
    # Under mixed precision accelerate autocasts inside the forward and returns float32 outputs: the model's logits
    # are then bf16/fp16 products although every dtype seen here is float32.
    low_precision = (mixed_precision or hidden.dtype != torch.float32 or head.weight.dtype != torch.float32
                     or torch.is_autocast_enabled(hidden.device.type))
    expected = expected.to(got.device)
    error = largest_over_processes((got - expected).abs().max() / expected.std().clamp(min=1e-6))
    if not error <= (5e-2 if low_precision else 1e-3):
        raise ConfigError(
            f"the {name}'s logits differ from its final hidden state through its output head (scale {transform[0]}, "
            f"soft-cap {transform[1]}) by {error:.3g} of their spread on a short row: {type(unwrapped).__name__} does "
            "something between backbone and head that heads.head_transform does not know, so the chunked loss would "
            "train on other logits. Add that transform to heads.head_transform."
        )
