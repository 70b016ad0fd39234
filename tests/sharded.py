"""A model directory in several safetensors files, as large checkpoints come (`model-0000i-of-0000n.safetensors`
and `model.safetensors.index.json`), made from any model directory: for per-rank fetching to be real in tests."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx


def sharded_copy(source: Path, target: Path, layers_per_file: int) -> dict[str, str]:
    """`source`'s weights re-saved in `target`: the tensors of no layer in the first file, then `layers_per_file`
    layers a file; its other files copied. Returns the weight map."""
    target.mkdir(parents=True)
    weights = {}
    for file in sorted(source.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("."):
            shutil.copy(file, target / file.name)

    def group(name: str) -> int:
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        return 0 if layer is None else 1 + int(layer.group(1)) // layers_per_file

    groups = sorted({group(name) for name in weights})
    names = {g: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, g in enumerate(groups)}
    for g in groups:
        mx.save_safetensors(str(target / names[g]), {k: v for k, v in weights.items() if group(k) == g},
                            metadata={"format": "mlx"})
    weight_map = {name: names[group(name)] for name in sorted(weights)}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map
