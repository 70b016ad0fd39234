"""GGUF import: the store holds a normal MLX / Hugging Face directory that plain mlx-lm loads."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from tests.conftest import FRANCE, MODEL


def test_mlx_lm_load_gives_the_served_tokens(server, client):
    path = server.home / "models" / MODEL
    model, tokenizer = load(str(path))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # as the worker does on CPU (workers/shard.py: load_shard)
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    raw = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(0.0)))
    served = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in raw
    assert served.choices[0].message.content == raw


def test_imported_directory_layout(server):
    path = server.home / "models" / MODEL
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["hidden_size"]) == ("llama", 30, 9, 3, 576)
    assert config["tie_word_embeddings"] is True
    # Q4_1 layers and the Q8_0 tied embedding keep their bit widths.
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"] and tok_config["eos_token"] == "<|im_end|>"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer.encode("<|im_start|>").ids == [1]  # special tokens stay whole
    digits = tokenizer.encode("2024").tokens
    assert digits == ["2", "0", "2", "4"]  # SmolLM splits numbers into single digits
