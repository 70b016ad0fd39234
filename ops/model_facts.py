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

KV_BYTES = 2  # the KV cache is float16
# Model types whose mlx-lm attention caches the compressed latent (DeepSeek V2's caches full keys and values).
LATENT_CACHE = {"deepseek_v3", "kimi_k2"}
_LAYER = re.compile(r"^(?:model\.|language_model\.model\.)?layers\.(\d+)\.")


def dtype_bits(dtype: str) -> int:
    """Bits of a safetensors dtype, from its name (F16, BF16, F8_E4M3, U32, F4...); BOOL is a byte."""
    digits = re.search(r"\d+", dtype)
    return int(digits[0]) if digits else 8


def tensor_bytes(model_dir: Path) -> dict[str, int]:
    """Every tensor's stored bytes, and whether it is a 16-bit float, by name."""
    sizes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as file:
            for name in file.keys():
                piece = file.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                dtype = piece.get_dtype()
                sizes[name] = ((count * dtype_bits(dtype) + 7) // 8, dtype in ("F16", "BF16"))
    return sizes


def kv_bytes_per_token(config: dict) -> int:
    heads = config["num_attention_heads"]
    if config.get("kv_lora_rank"):
        if config.get("model_type") in LATENT_CACHE:  # one latent per token, shared by the heads
            return (config["kv_lora_rank"] + config.get("qk_rope_head_dim", 0)) * KV_BYTES
        # decompressed: every head's key (its no-rope and rope parts) and value
        return heads * (config.get("qk_nope_head_dim", 0) + config.get("qk_rope_head_dim", 0) +
                        config.get("v_head_dim", 0)) * KV_BYTES
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * kv_heads * head_dim * KV_BYTES


def model_facts(model_id: str, model_dir: Path) -> ModelFacts:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    per_layer, embedding, head, half = [0] * layers, 0, 0, 0
    tensors = tensor_bytes(model_dir)
    for name, (size, half_float) in tensors.items():
        if (match := _LAYER.search(name)) is not None:
            if int(match[1]) >= layers:  # extra layers mlx-lm does not load (DeepSeek's multi-token prediction)
                continue
            per_layer[int(match[1])] += size
        elif "embed" in name:
            embedding += size
        else:  # the final norm and the output head
            head += size
        half += size if half_float else 0
    return ModelFacts(id=model_id, layers=layers, layer_bytes=per_layer, embedding_bytes=embedding, head_bytes=head,
                      # Tied when the files hold no output head of its own (mlx-lm's default for llama and qwen2).
                      tied_embeddings=not any("lm_head" in name for name in tensors),
                      kv_shared_by_heads=bool(config.get("kv_lora_rank")) and config.get("model_type") in LATENT_CACHE,
                      half_float_bytes=half,
                      kv_bytes_per_token=kv_bytes_per_token(config), hidden_size=config["hidden_size"],
                      intermediate_size=config["intermediate_size"],
                      vocab_size=config["vocab_size"], tensor_sizes=tensor_parallel_sizes(config))

