"""Layer maps and projections for hidden-state distillation (distil_hidden.py): which student block is compared with
which teacher block, and the one trained linear map per pair that takes the student's hidden size to the teacher's.
The projections are saved beside the student in hidden_projections.safetensors, with the layer map in its metadata.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from common import ConfigError, load_error, model_source

PROJECTIONS_FILE = "hidden_projections.safetensors"


def model_shape(name: str) -> tuple[int, int]:
    """(number of transformer blocks, hidden size) of a causal LM, read from its config without loading weights."""
    from transformers import AutoConfig

    source = model_source(name)
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=False).get_text_config()
    except (OSError, ValueError) as error:
        raise load_error("the config of", name, error) from None
    return model_config.num_hidden_layers, model_config.hidden_size


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Every student block s = 1..S matched to teacher block ceil(s * T / S).

    The teacher's T blocks are cut into S equal groups and student block s matches the last block of group s, so the
    last student block always matches the last teacher block. S = 2, T = 4: (1, 2), (2, 4); S = 3, T = 4: (1, 2),
    (2, 3), (3, 4); S = 4, T = 2: (1, 1), (2, 1), (3, 2), (4, 2). Blocks count from 1 as in `output_hidden_states`
    (index 0 is the embedding output; index T is the last block after the final norm).
    """
    return [(block, -(-block * teacher_layers // student_layers)) for block in range(1, student_layers + 1)]


def check_layer_map_format(layer_map: Any) -> None:
    """'uniform', or a non-empty list of distinct [student_layer, teacher_layer] pairs of positive integers."""
    if layer_map == "uniform":
        return
    example = "e.g. [[1, 2], [2, 4]] (student block, teacher block; blocks count from 1)"
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ConfigError(f"distillation.layer_map must be 'uniform' or a list of [student_layer, teacher_layer] pairs, {example}; got {layer_map!r}.")
    for pair in layer_map:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(type(x) is int for x in pair)):
            raise ConfigError(f"distillation.layer_map entry {pair!r} is not a [student_layer, teacher_layer] pair of integers, {example}.")
        if min(pair) < 1:
            raise ConfigError(
                f"distillation.layer_map entry {list(pair)} names layer 0, the embedding output. Blocks count from 1 "
                "(as in output_hidden_states); map transformer blocks only."
            )
    if len({tuple(pair) for pair in layer_map}) != len(layer_map):
        raise ConfigError(f"distillation.layer_map {layer_map!r} repeats a pair; list each pair once.")


def resolve_layer_map(layer_map: Any, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs of `layer_map` ('uniform' or explicit pairs), checked against the two
    models' block counts. A layer the model does not have is a ConfigError."""
    check_layer_map_format(layer_map)
    if layer_map == "uniform":
        return uniform_layer_map(student_layers, teacher_layers)
    for student_layer, teacher_layer in layer_map:
        for which, layer, count in (("student", student_layer, student_layers), ("teacher", teacher_layer, teacher_layers)):
            if layer > count:
                raise ConfigError(
                    f"distillation.layer_map pair [{student_layer}, {teacher_layer}] names {which} layer {layer}, but "
                    f"the {which} has {count} blocks (valid layers: 1 to {count})."
                )
    return [(int(student_layer), int(teacher_layer)) for student_layer, teacher_layer in layer_map]


def projection_key(student_layer: int, teacher_layer: int) -> str:
    """Name of a pair's projection in the ModuleDict and in the saved file ('3_6': student block 3, teacher block 6)."""
    return f"{student_layer}_{teacher_layer}"


def build_projections(layer_pairs: list[tuple[int, int]], student_hidden_size: int, teacher_hidden_size: int,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.ModuleDict:
    """One Linear(student_hidden_size -> teacher_hidden_size) per mapped pair, biases at zero. The weight starts as the
    identity when the sizes match, else as a random semi-orthogonal matrix (it preserves norms on the smaller side),
    so the hidden loss starts from a map that neither erases nor inflates the student's signal. `seed` makes the
    random matrices reproducible."""
    generator = torch.Generator().manual_seed(seed)
    projections = torch.nn.ModuleDict()
    for student_layer, teacher_layer in layer_pairs:
        projection = torch.nn.Linear(student_hidden_size, teacher_hidden_size, bias=True, dtype=dtype)
        with torch.no_grad():
            if student_hidden_size == teacher_hidden_size:
                projection.weight.copy_(torch.eye(teacher_hidden_size, dtype=dtype))
            else:
                projection.weight.copy_(torch.nn.init.orthogonal_(torch.empty(teacher_hidden_size, student_hidden_size),
                                                                generator=generator))
            projection.bias.zero_()
        projections[projection_key(student_layer, teacher_layer)] = projection
    return projections


def save_projections(tensors: dict[str, torch.Tensor], layer_pairs: list[tuple[int, int]], folder: str) -> str:
    """Write the projections' tensors ('3_6.weight', '3_6.bias', ...) to folder/hidden_projections.safetensors, with
    the layer map (student block, teacher block; 1-based) in the file's metadata. Returns the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROJECTIONS_FILE)
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, path,
              metadata={"format": "pt", "layer_map": json.dumps([list(pair) for pair in layer_pairs])})
    return path


def load_projections(folder: str) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Read folder/hidden_projections.safetensors: (tensors, layer map). A missing file is a ConfigError."""
    from safetensors import safe_open

    path = os.path.join(folder, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"'{folder}' has no {PROJECTIONS_FILE}; it was not written by distil_hidden.py.")
    with safe_open(path, framework="pt") as handle:
        layer_pairs = [tuple(pair) for pair in json.loads(handle.metadata()["layer_map"])]
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, layer_pairs
