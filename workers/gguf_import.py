"""Turn a llama-family GGUF file into a normal MLX / Hugging Face model directory.

Every later stage (the engine, sharding, `mlx_lm.load`) reads only that one format, so the GGUF
specifics live here and nowhere else: tensor names, the Q/K row permutation llama.cpp applies,
quantization parameters, and the tokenizer and chat template stored in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF tensor name (after `blk.N.`) -> mlx-lm llama parameter name (after `model.layers.N.`).
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizer names whose split differs from plain GPT-2 byte-level BPE.
# SmolLM's tokenizer puts every digit in its own pre-token before the byte-level split.
INDIVIDUAL_DIGIT_PRE_TOKENIZERS = {"smollm"}

GGUF_TOKEN_CONTROL = 3  # tokenizer.ggml.token_type value for special tokens such as <|im_end|>


def _scalar(value):
    return value.item() if isinstance(value, mx.array) else value


def read_config(metadata: dict) -> dict:
    """The Hugging Face style config.json for a llama-family GGUF."""
    arch = metadata["general.architecture"]
    if arch not in ("llama",):
        raise ValueError(f"GGUF architecture {arch!r} is not supported for import (supported: llama)")

    def field(name, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return _scalar(value)

    heads = field("attention.head_count")
    hidden = field("embedding_length")
    return {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": field("block_count"),
        "intermediate_size": field("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv", heads),
        "head_dim": field("rope.dimension_count", hidden // heads),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": field("rope.freq_base", 10000.0),
        "max_position_embeddings": field("context_length"),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "bos_token_id": _scalar(metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _scalar(metadata.get("tokenizer.ggml.eos_token_id")),
    }


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's interleaved-rotary row order so the standard (half-split) RoPE applies.

    llama.cpp stores each head's rows as pairs (x0, x_half, x1, x_half+1, ...). The permutation acts
    on output rows only, so quantized weights, scales and biases are reordered the same way.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(tensors: dict[str, mx.array], config: dict) -> tuple[dict[str, mx.array], dict]:
    """Rename GGUF tensors to mlx-lm llama names; return the weights and the quantization config."""
    weights: dict[str, mx.array] = {}
    for name, tensor in tensors.items():
        stem, _, part = name.rpartition(".")  # part: weight | scales | biases
        if stem.startswith("blk."):
            _, layer, kind = stem.split(".", 2)
            if kind not in LAYER_TENSORS:
                raise ValueError(f"unexpected GGUF tensor {name}")
            target = f"model.layers.{layer}.{LAYER_TENSORS[kind]}.{part}"
            if kind == "attn_q":
                tensor = _unpermute_rows(tensor, config["num_attention_heads"])
            elif kind == "attn_k":
                tensor = _unpermute_rows(tensor, config["num_key_value_heads"])
        elif stem in GLOBAL_TENSORS:
            target = f"{GLOBAL_TENSORS[stem]}.{part}"
        else:
            continue  # e.g. rope_freqs: recomputed by the model
        weights[target] = tensor

    config["tie_word_embeddings"] = "lm_head.weight" not in weights

    # GGUF Q4_0/Q4_1/Q8_0 arrive as MLX affine triples with group size 32; the bit width follows from
    # the packed width: bits = 32 * packed_columns / input_columns.
    quantization: dict = {}
    for name in weights:
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            packed, groups = weights[f"{module}.weight"].shape[-1], weights[name].shape[-1]
            group_size = 32
            bits = packed * 32 // (groups * group_size)
            quantization[module] = {"group_size": group_size, "bits": bits}
    if quantization:
        # The most common setting is the default; the others are listed per module, as mlx-lm reads them.
        settings = [json.dumps(v, sort_keys=True) for v in quantization.values()]
        default = json.loads(max(set(settings), key=settings.count))
        config["quantization"] = {
            **default,
            **{m: q for m, q in quantization.items() if q != default},
        }
    return weights, config


def build_tokenizer(metadata: dict) -> Tokenizer:
    """The byte-level BPE tokenizer stored in the GGUF metadata, as a `tokenizers.Tokenizer`."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"GGUF tokenizer {metadata.get('tokenizer.ggml.model')!r} is not supported (supported: gpt2 byte-level BPE)"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.get("tokenizer.ggml.pre") in INDIVIDUAL_DIGIT_PRE_TOKENIZERS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = metadata.get("tokenizer.ggml.token_type")
    if token_types is not None:
        special = [tokens[i] for i, t in enumerate(token_types.tolist()) if t == GGUF_TOKEN_CONTROL]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def tokenizer_config(metadata: dict, context_length: int) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[_scalar(index)]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_eos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

    Writes into a temporary sibling and renames it into place, so a crash never leaves a half-written
    model that a later start would take for a complete one.
    """
    tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    config = read_config(metadata)
    weights, config = convert_weights(tensors, config)

    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer(metadata).save(str(staging / "tokenizer.json"))
    tok_config = tokenizer_config(metadata, config["max_position_embeddings"])
    (staging / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (staging / "special_tokens_map.json").write_text(
        json.dumps({k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n"
    )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    staging.rename(out_dir)
    return out_dir
