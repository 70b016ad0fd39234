"""The Linux CPU path (workers/cpu_path.py): the BLAS a rank gets, the weights it holds, its compiled small ops."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import _merge_caches
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from ops.spawn import wait_for_line
from tests.conftest import MODEL
from tests.tiny import tiny_llama
from workers import cpu_path
from workers.cpu_path import RANKS_HERE, blas_environment, compile_small_ops, dense_weights, fast_blas


def test_the_served_worker_says_which_path_it_took(server):
    """The session's worker was started as every rank is (`rank_command`): on this machine it reports the BLAS it
    found and what it did with its weights."""
    line = wait_for_line(server.output, "CPU path", 5)
    library, why = fast_blas()
    if library is None:
        assert why in line and "weights as stored" in line
    else:
        assert Path(library).name in line and "quantized weights held as float32" in line
    assert "RoPE and RMSNorm modules compiled" in line


def test_several_ranks_on_one_machine_share_its_cores():
    library, _ = fast_blas()
    one = blas_environment({})
    assert "MKL_NUM_THREADS" not in one  # one rank: the library's own default (every core)
    if library is None:
        assert "LD_PRELOAD" not in one
        return
    assert one["LD_PRELOAD"].endswith(library)
    two = blas_environment({RANKS_HERE: "2"})
    assert two["MKL_NUM_THREADS"] == two["OPENBLAS_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert blas_environment({RANKS_HERE: "2", "MKL_NUM_THREADS": "7"})["MKL_NUM_THREADS"] == "7"
    # Open MPI's count of ranks on this machine, for ranks mpirun started
    assert blas_environment({"OMPI_COMM_WORLD_LOCAL_SIZE": "64"})["MKL_NUM_THREADS"] == "1"
    # already preloaded (a sanitizer first): not twice
    again = blas_environment({"LD_PRELOAD": f"/lib/asan.so:{library}"})
    assert again["LD_PRELOAD"] == f"/lib/asan.so:{library}"


@pytest.fixture(scope="module")
def tiny(server, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), server.home / "models" / MODEL)


def greedy(model, prompt: list[int], steps: int, batch_cache: bool) -> tuple[list[int], mx.array]:
    """`steps` greedy tokens and the first step's logits, with mlx-lm's plain cache (int offsets) or the batch's
    (array offsets, as workers/lockstep.py runs it)."""
    cache = make_prompt_cache(model)
    if batch_cache:
        cache = _merge_caches([cache])
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    first, tokens = logits, []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1]
    return tokens, first


@pytest.mark.parametrize("batch_cache", [False, True])
def test_compiled_small_ops_change_no_token(tiny, batch_cache):
    model = load_model(tiny)[0]
    prompt = list(range(5, 40))
    tokens, logits = greedy(model, prompt, 24, batch_cache)
    layers = len(model.model.layers)
    assert compile_small_ops(model) == 3 * layers + 1  # a RoPE and two norms per layer, and the final norm
    assert isinstance(model.model.layers[0].self_attn.rope, cpu_path.CompiledRoPE)
    assert "model.norm.weight" in dict(tree_flatten(model.parameters()))  # names and weights as they were
    compiled_tokens, compiled_logits = greedy(model, prompt, 24, batch_cache)
    assert compiled_tokens == tokens
    assert mx.allclose(compiled_logits, logits, atol=1e-4).item()


def quantized_tiny(tiny: Path) -> nn.Module:
    model = load_model(tiny)[0]
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def test_quantized_weights_become_float32_only_where_they_fit(tiny, monkeypatch):
    monkeypatch.setattr(cpu_path, "loaded_blas", lambda: "libmkl_rt.so.3")
    model = quantized_tiny(tiny)
    tokens = greedy(model, list(range(5, 40)), 16, True)[0]
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
    assert greedy(model, list(range(5, 40)), 16, True)[0] == tokens
