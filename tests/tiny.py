"""A random-weight llama small enough to load in a second: for sharding, numerics and the dashboard's load test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

TINY = {
    "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256,
    "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 49152,
    "tie_word_embeddings": True, "max_position_embeddings": 2048, "rope_theta": 10000.0,
}


def tiny_llama(path: Path, tokenizer_from: Path) -> Path:
    """The tiny llama, float32, in a normal model directory at `path`, with the tokenizer of the model at
    `tokenizer_from` (the bundled one's: its vocabulary is TINY's)."""
    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(7)
    model = llama.Model(llama.ModelArgs.from_dict(TINY))
    # Embeddings of unit scale spread the logits far apart, so that greedy choices cannot flip on the
    # rounding differences of a different summation order (tensor parallel sums partial products).
    model.model.embed_tokens.weight = mx.random.normal(model.model.embed_tokens.weight.shape)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(TINY))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, path / name)
    return path
