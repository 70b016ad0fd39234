"""The Linux CPU path (workers/cpu_path.py): the BLAS a rank gets, the weights it holds, its compiled small ops."""

from __future__ import annotations

import os
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import _merge_caches
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import load_model

from ops.spawn import wait_for_line
from tests.conftest import MODEL
from tests.tiny import tiny_llama
from workers import cpu_path
from workers.cpu_path import (RANKS_HERE, blas_environment, column_major_weights, compile_small_ops, dense_weights,
                               fast_blas, preloaded_blas)


def test_the_served_worker_says_which_path_it_took(server):
    """The session's worker was started as every rank is (`rank_command`): it reports the BLAS it found on this
    machine and what it did with its weights."""
    line = wait_for_line(server.output, " ready (context", 5)
    library, why = fast_blas()
    if mx.default_device() != mx.cpu:  # Metal or CUDA: as they were
        assert "weights as stored" in line and "compiled" not in line
        return
    assert "RoPE, RMSNorm and MLP modules compiled" in line
    if library is None:
        assert why in line and "weights as stored" in line
    else:
        assert f"CPU path: {Path(library).name}" in line and "quantized weights held as float32" in line
        assert "weight matrices held column-major" in line


def test_the_preloaded_blas_is_found_behind_links_and_not_confused_with_numpys():
    debian = ["libc.so.6", "libopenblasp-r0.3.21.so", "libmlx.so"]
    assert preloaded_blas("libopenblas.so.0", debian) == "libopenblasp-r0.3.21.so"
    assert preloaded_blas("/venv/lib/libmkl_rt.so.3", ["libmkl_rt.so.3", "libmlx.so"]) == "libmkl_rt.so.3"
    numpy = ["libscipy_openblas64_-56d6093b.so", "libmlx.so"]  # mapped, but not preloaded: libmlx does not use it
    assert preloaded_blas("", numpy) is None
    assert preloaded_blas("libopenblas.so.0", numpy) is None  # named, but not loaded (ld.so ignored it)


def test_several_ranks_on_one_machine_share_its_cores():
    library, _ = fast_blas()
    one = blas_environment({})
    assert "MKL_NUM_THREADS" not in one  # one rank: the library's own default (every core)
    if library is None:
        assert "LD_PRELOAD" not in one
        return
    assert one["LD_PRELOAD"].endswith(library)
    # already preloaded (a sanitizer first): not twice
    again = blas_environment({"LD_PRELOAD": f"/lib/asan.so:{library}"})
    assert again["LD_PRELOAD"] == f"/lib/asan.so:{library}"
    assert blas_environment({RANKS_HERE: "2", "MKL_NUM_THREADS": "7"})["MKL_NUM_THREADS"] == "7"
    two = blas_environment({RANKS_HERE: "2"})
    if len(os.sched_getaffinity(0)) < os.cpu_count():  # bound to some cores already: those are its share
        assert "MKL_NUM_THREADS" not in two
        return
    assert two["MKL_NUM_THREADS"] == two["OPENBLAS_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
    # Open MPI's count of ranks on this machine, for ranks mpirun started
    assert blas_environment({"OMPI_COMM_WORLD_LOCAL_SIZE": "64"})["MKL_NUM_THREADS"] == "1"


@pytest.fixture(scope="module")
def tiny(server, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), server.home / "models" / MODEL)


def greedy(model, prompts: list[list[int]], steps: int, batch_cache: bool) -> tuple[list[list[int]], mx.array]:
    """`steps` greedy tokens of each row (prompts of one length) and every decode step's logits, with mlx-lm's plain
    cache (int offsets) or the batch's (array offsets, as workers/lockstep.py runs it)."""
    cache = make_prompt_cache(model)
    if batch_cache:
        cache = _merge_caches([cache])
    logits = model(mx.array(prompts), cache=cache)[:, -1]
    tokens, steps_logits = [], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.tolist())
        logits = model(token[:, None], cache=cache)[:, -1]
        steps_logits.append(logits)
    return tokens, mx.stack(steps_logits)


@pytest.mark.parametrize("batch_cache", [False, True])
def test_compiled_small_ops_change_no_token(tiny, batch_cache):
    model = load_model(tiny)[0]
    prompt = list(range(5, 40))
    tokens, logits = greedy(model, [prompt], 24, batch_cache)
    layers = len(model.model.layers)
    # a RoPE, two norms and a SwiGLU MLP per layer, and the final norm
    assert compile_small_ops(model) == 4 * layers + 1
    assert isinstance(model.model.layers[0].self_attn.rope, cpu_path.CompiledRoPE)
    assert type(model.model.layers[0].mlp).__call__ is not llama.MLP.__call__
    assert isinstance(model.model.layers[0].mlp, llama.MLP)
    assert "model.norm.weight" in dict(tree_flatten(model.parameters()))  # names and weights as they were
    compiled_tokens, compiled_logits = greedy(model, [prompt], 24, batch_cache)
    assert compiled_tokens == tokens
    # every step's logits, each at its own position (offset)
    assert mx.allclose(compiled_logits, logits, atol=1e-4).item()


def test_fast_swiglu_is_swiglu_to_float32_rounding():
    gate = mx.concatenate([mx.linspace(-40, 40, 400_001), mx.array([0.0, 1e-30, -1e-30, 3e-4, -3e-4])])
    x = mx.random.normal(gate.shape, key=mx.random.key(0))
    error = mx.abs(cpu_path.fast_swiglu(gate, x) - swiglu(gate, x))
    # a few float32 ulps of |gate x| (measured: at most 3.2e-7 of it); relative to SiLU itself more where it
    # is near 0 (large negative gates: 1 - tanh cancels), which no later sum can tell from rounding
    assert (error <= 5e-7 * mx.maximum(mx.abs(gate), 1) * mx.abs(x)).all().item()
    assert cpu_path.fast_swiglu(mx.array([0.0]), mx.array([1.0])).item() == 0.0


def test_only_mlps_that_are_mlx_lms_swiglu_take_the_fast_one():
    class GeluMLP(llama.MLP):
        def __call__(self, x):
            return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))

    class CopiedMLP(nn.Module):  # the same words as llama's, another class: as good
        def __call__(self, x) -> mx.array:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    class MoreArgumentsMLP(nn.Module):  # the same words, another signature
        def __call__(self, x, mask=None) -> mx.array:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    # the same code object calling another function by that name
    OtherSwigluMLP = type("OtherSwigluMLP", (llama.MLP,), {
        "__call__": types.FunctionType(llama.MLP.__call__.__code__, {"swiglu": lambda gate, x: nn.gelu(gate) * x})})

    for other in (GeluMLP, MoreArgumentsMLP, OtherSwigluMLP, nn.Linear):
        assert cpu_path._fast_mlp_class(other) is None, other
    assert issubclass(cpu_path._fast_mlp_class(CopiedMLP), CopiedMLP)


def test_the_fast_swiglu_runs_where_it_is_faster(monkeypatch):
    """On float32 gates of FAST_SWIGLU_MIN_ELEMENTS or more; mlx-lm's swiglu on smaller ones (one decode row of a small
    model) and on other dtypes."""
    calls = []
    monkeypatch.setattr(cpu_path, "fast_swiglu", lambda gate, x: calls.append(gate.shape) or swiglu(gate, x))
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=1024,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=32)
    mlp = llama.MLP(args)
    mlp.__class__ = cpu_path._fast_mlp_class(llama.MLP)
    mlp(mx.zeros((1, 1, 64)))  # 1,024 elements
    assert calls == []
    mlp(mx.zeros((1, 2, 64)))
    assert calls == [(1, 2, 1024)]
    mlp.set_dtype(mx.float16)
    mlp(mx.zeros((1, 8, 64), dtype=mx.float16))
    assert calls == [(1, 2, 1024)]


def test_column_major_weights_are_the_same_arrays_and_change_no_token(tiny):
    """Several rows at once, as a batched decode step runs them (the case the layout is for)."""
    model = load_model(tiny)[0]
    prompts = [list(range(5 + row, 40 + row)) for row in range(4)]

    before = dict(tree_flatten(model.parameters()))
    tokens, logits = greedy(model, prompts, 16, False)
    linears = sum(isinstance(m, (nn.Linear, nn.Embedding)) for _, m in model.named_modules())
    assert column_major_weights(model) == linears
    # An earlier pipeline stage only looks its (tied) embedding up: that one stays as it is.
    assert column_major_weights(load_model(tiny)[0], output_head=False) == linears - 1
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and mx.array_equal(after[k], before[k]).item() for k in before)
    mx.eval(model.parameters())
    up = model.model.layers[0].mlp.up_proj.weight  # [out, in], laid out as its transpose: a column steps 4 bytes
    assert memoryview(up).strides == (4, 4 * up.shape[0])
    laid_out_tokens, laid_out_logits = greedy(model, prompts, 16, False)
    assert laid_out_tokens == tokens
    # the BLAS sums in another order: the same logits to rounding
    assert mx.allclose(laid_out_logits, logits, atol=1e-4).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_affine_dequantize_gives_mx_dequantize_values(bits, dtype):
    """Linear, embedding and MoE experts (3-D), with float32 and with float16 scales (checkpoints' usual): the values
    mx.dequantize computes from the same scales in float32 (with float16 ones it computes, and rounds, in float16)."""
    weights = mx.random.normal((96, 256), key=mx.random.key(bits)).astype(dtype)
    experts = QuantizedSwitchLinear(256, 96, 3, group_size=64, bits=bits)
    for layer in (nn.QuantizedLinear.from_linear(nn.Linear(256, 96), group_size=64, bits=bits),
                  nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 256), group_size=64, bits=bits), experts):
        stacked = mx.stack([weights] * 3) if layer is experts else weights
        layer.weight, layer.scales, layer.biases = mx.quantize(stacked, group_size=64, bits=bits)
        expected = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                                 group_size=64, bits=bits)
        dense = cpu_path.affine_dequantize(layer)
        assert dense.dtype == mx.float32 and dense.shape == stacked.shape
        assert mx.allclose(dense, expected, rtol=1e-6, atol=1e-6).item()


def quantized_tiny(tiny: Path) -> nn.Module:
    model = load_model(tiny)[0]
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def test_quantized_weights_become_float32_only_where_they_fit(tiny, monkeypatch):
    monkeypatch.setattr(cpu_path, "loaded_blas", lambda: "libmkl_rt.so.3")
    model = quantized_tiny(tiny)
    tokens = greedy(model, [list(range(5, 40))], 16, True)[0]
    needed = cpu_path.dense_bytes(model)
    monkeypatch.setattr(cpu_path, "memory_available", lambda: int(needed / cpu_path.DENSE_SHARE) - 1)
    line = dense_weights(model)
    assert "weights as stored" in line and f"{needed / 1e9:.1f} GB" in line
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)

    monkeypatch.setattr(cpu_path, "memory_available", lambda: int(needed / cpu_path.DENSE_SHARE) + 1)
    assert "held as float32" in dense_weights(model)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == mx.float32
    assert not any(v.dtype == mx.uint32 for _, v in tree_flatten(model.parameters()))
    # the same numbers, so the same greedy tokens
    assert greedy(model, [list(range(5, 40))], 16, True)[0] == tokens
