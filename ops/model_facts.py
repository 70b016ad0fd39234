"""A model directory's facts for placement (schemas/cluster.py: ModelFacts), read without loading it.

Weights are counted from the safetensors headers (each tensor's dtype and shape, as stored: quantized
weights with their scales and biases), so the bytes of each decoder layer, of the embeddings and of the
head are exact. The KV cache per token follows the attention mlx-lm runs: keys and values of every KV
head in float16, or, for multi-head latent attention (DeepSeek V3, Kimi K2), the cached latent and its
rotary part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from schemas.cluster import ModelFacts
from workers.split import tensor_parallel_sizes

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
KV_BYTES = 2  # the KV cache is float16
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_bytes(model_dir: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as file:
            for name in file.keys():
                piece = file.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                sizes[name] = count * DTYPE_BYTES[piece.get_dtype()]
    return sizes


def kv_bytes_per_token(config: dict) -> int:
    if config.get("kv_lora_rank"):  # multi-head latent attention: one latent per token, shared by the heads
        return (config["kv_lora_rank"] + config.get("qk_rope_head_dim", 0)) * KV_BYTES
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * kv_heads * head_dim * KV_BYTES


def model_facts(model_id: str, model_dir: Path) -> ModelFacts:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    per_layer, embedding, head = [0] * layers, 0, 0
    for name, size in tensor_bytes(model_dir).items():
        if (match := _LAYER.search(name)) is not None and int(match[1]) < layers:
            per_layer[int(match[1])] += size
        elif "embed" in name:
            embedding += size
        else:  # the final norm and the output head
            head += size
    return ModelFacts(id=model_id, layers=layers, layer_bytes=per_layer, embedding_bytes=embedding, head_bytes=head,
                      tied_embeddings=bool(config.get("tie_word_embeddings")),
                      kv_bytes_per_token=kv_bytes_per_token(config), hidden_size=config["hidden_size"],
                      intermediate_size=config.get("intermediate_size") or config.get("moe_intermediate_size", 0),
                      vocab_size=config["vocab_size"], tensor_sizes=tensor_parallel_sizes(config))

