"""How a model may be split over ranks: pure functions of its config, without MLX.

The worker's loader (workers/shard.py) checks a split with them before it loads anything, and placement
(ops/placement.py) plans one with them before any rank starts, so both agree on what a model allows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LAYOUTS = ("whole", "tensor", "pipeline")


class ShardError(ValueError):
    """A model that cannot be split the way it was asked to be."""


def tensor_parallel_sizes(config: dict, limit: int = 64) -> list[int]:
    """The group sizes that split this model's attention heads and MLP evenly (1 included)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    hidden = config["hidden_size"]
    intermediate = config["intermediate_size"]
    # Quantized weights are split along their input dimension in whole quantization groups.
    group = (config.get("quantization") or {}).get("group_size", 1)
    return [
        n for n in range(1, limit + 1)
        if heads % n == 0 and kv_heads % n == 0 and intermediate % n == 0
        and (hidden // n) % group == 0 and (intermediate // n) % group == 0
    ]


def check_tensor_parallel(config: dict, n: int) -> None:
    sizes = tensor_parallel_sizes(config)
    if n not in sizes:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        raise ShardError(
            f"--tensor-parallel {n} does not divide this model: it has {heads} attention heads, {kv_heads} "
            f"key/value heads and an MLP of {config['intermediate_size']}, which split evenly over "
            f"{', '.join(map(str, sizes))} ranks. Use one of those, or --pipeline-parallel {n}."
        )


def pipeline_split(num_layers: int, ranks: int, weights: list[float] | None = None) -> list[int]:
    """Layers per rank: proportional to `weights` (e.g. each rank's free memory), even if none.

    Every rank gets at least one layer; rounding leftovers go to the ranks with the largest remainders.
    """
    if ranks > num_layers:
        raise ShardError(f"--pipeline-parallel {ranks} needs at least {ranks} layers; the model has {num_layers}.")
    weights = weights or [1.0] * ranks
    if len(weights) != ranks or any(w <= 0 for w in weights):
        raise ShardError(f"need {ranks} positive weights for the pipeline split, got {weights}")
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    split = [max(1, int(x)) for x in exact]
    order = sorted(range(ranks), key=lambda r: exact[r] - int(exact[r]), reverse=True)
    i = 0
    while sum(split) < num_layers:
        split[order[i % ranks]] += 1
        i += 1
    while sum(split) > num_layers:  # only when the max(1, ...) floor pushed us over
        r = max(range(ranks), key=lambda r: split[r])
        split[r] -= 1
    return split


def check_pipeline_split(split: list[int], num_layers: int, ranks: int) -> None:
    if len(split) != ranks or any(s < 1 for s in split) or sum(split) != num_layers:
        raise ShardError(f"--split {','.join(map(str, split))} must give each of the {ranks} ranks at least one "
                         f"layer and add up to the model's {num_layers} layers.")


WEIGHT_INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def weight_map(model_dir: Path) -> dict[str, str] | None:
    """The model's weight map (tensor name -> the safetensors file holding it), or None for a model in one file."""
    path = Path(model_dir) / WEIGHT_INDEX
    return json.loads(path.read_text())["weight_map"] if path.is_file() else None


def layer_files(weights: dict[str, str]) -> tuple[list[list[str]], list[str]]:
    """The weight map folded by layer: per decoder layer, the files holding its tensors, and the files holding a
    tensor of no layer (embeddings, final norm, head). Matched by layer number as mlx-lm's `sharded_load` does,
    since a model's `sanitize` may rename tensors but keeps their layer. Small enough for the cluster's catalogue
    (schemas/cluster.py: CatalogueEntry) where the map is not: a large mixture of experts names ~100k tensors."""
    by_layer: dict[int, set[str]] = {}
    shared: set[str] = set()
    for name, file in weights.items():
        layer = _LAYER.search(name)
        (shared if layer is None else by_layer.setdefault(int(layer.group(1)), set())).add(file)
    count = max(by_layer, default=-1) + 1
    return [sorted(by_layer.get(i, ())) for i in range(count)], sorted(shared)


def stage_files(per_layer: list[list[str]], shared: list[str], start: int, end: int) -> set[str]:
    """The weight files a pipeline stage holding layers [start, end) reads (`layer_files`' two lists): those with any
    of its layers, and those with any tensor of no layer (a stage keeps what its place needs, and which of them a
    file holds is not worth a finer guess). The controller fetches these to a pipeline rank's node
    (ops/controller.py) and the worker checks it has them before loading (workers/shard.py)."""
    return set(shared).union(*per_layer[start:end])
