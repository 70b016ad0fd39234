"""The Linux CPU path: an optimised BLAS under MLX's CPU backend, and weights in the form it is fast on.

Why: the `mlx[cpu]` wheel links the reference (netlib) BLAS, and MLX's x86 kernels for quantized matmuls are
scalar. Measured on a 2-core Zen 4 VM with the bundled SmolLM2-135M (4-bit): 4.7 s to the first token of a
36-token prompt and 5 tok/s decode. The same model held as float32 over Intel's MKL: 0.3 s and 16-18 tok/s,
with the same greedy text. Per transformer layer one matmul step takes 4.4 ms (4-bit, netlib) against 1.0 ms
(float32, MKL) for one row, and 59 ms against 2.1 ms for 16 rows: batching only pays on the fast path.
Weight layout: for one row MKL is as fast with mlx-lm's `x @ W.T` as with pre-transposed weights, but for a few
rows (a batched decode step) it is 2.7x slower, so weights are held column-major (`column_major_weights`).

How, without a patched MLX: libmlx.so finds `cblas_sgemm` and friends through dynamic symbol lookup, so a
library already in the process's global scope that defines them (LD_PRELOAD) is used instead of the bundled
one. Every rank Conclave starts runs through this module first (`rank_command`: `python -m workers.cpu_path
MODULE ARGS`), which sets that variable and execs the rank, so ranks started over ssh or by mpirun on another
machine find that machine's library, as local ones do. Each worker then checks what it really got (`loaded_blas`)
and holds its quantized weights as float32 (`dense_weights`) only when the fast BLAS is there and they fit, since
float32 takes 8x a 4-bit weight's memory.

Per-op cost: on this backend RoPE and RMSNorm are several small ops each (MLX has fused kernels for them on Metal
and CUDA only): measured on a 2-core Xeon VM, 204 us for one RoPE and 107 us for one RMSNorm of SmolLM2's decode
step, 81 us and 38 us once `mx.compile`d, and the whole decode step 14% faster (`compile_small_ops`).

SiLU: MLX's x86 CPU `exp` (so `sigmoid`) costs 19-25 ns an element where a product costs 0.5 (the wheel is built
for baseline x86-64: its polynomial calls `std::fma` once a term, element by element, and its run-time compiled
kernels are built without `-march` too). SiLU was about half of a group prefill's time. `fast_swiglu` takes the
sigmoid from a rational function of products, sums and one division, which the compiled kernel vectorises: 5 ms
instead of 27 for a [16, 45, 1536] gate, within a few float32 ulps of |gate x| (SwiGLU MLPs: `compile_small_ops`).

Where: Linux without a GPU backend. Metal (Accelerate) and CUDA are left exactly as they are.
"""

from __future__ import annotations

import ctypes.util
import inspect
import os
import sys
from functools import cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Float32 weights may take at most this share of the memory available when the worker loads (several ranks loading
# at once on one machine each see the same memory: a quarter leaves room for a few); beyond it the worker keeps the
# stored (quantized) weights and says so. Placement counts weights as stored (README, Limits).
DENSE_SHARE = 0.25
RANKS_HERE = "CONCLAVE_RANKS_HERE"  # how many ranks the launcher starts on this machine (ops/group.py)
LIBRARIES = ("mkl_rt", "openblas")  # as they appear in a loaded library's file name


def fast_blas() -> tuple[str | None, str]:
    """The BLAS library a worker on this machine should preload, or None; and why, for the log."""
    if sys.platform != "linux":
        return None, "not Linux (macOS has Accelerate under MLX)"
    if mx.cuda.is_available():
        return None, "CUDA backend"
    # Intel's `mkl` wheel (x86_64) installs libmkl_rt into the environment's lib folder.
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        if found := sorted(Path(prefix, "lib").glob("libmkl_rt.so*")):
            return str(found[0]), "Intel MKL from the mkl wheel"
    # Elsewhere (arm64), a system OpenBLAS such as Debian's libopenblas0 defines the same CBLAS symbols.
    if name := ctypes.util.find_library("openblas"):
        return name, "the system's OpenBLAS"
    return None, "no optimised BLAS found (pip install mkl on x86_64, or the system's OpenBLAS)"


def blas_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the fast BLAS preloaded, for a rank's process, and its
    threads a fair share of the machine's cores where several ranks run on it (RANKS_HERE, set by the launcher, or
    Open MPI's local size): MKL and OpenBLAS otherwise each take every core and spin on them between calls."""
    env = dict(os.environ if base is None else base)
    library, _ = fast_blas()
    if library and library not in env.get("LD_PRELOAD", "").split(":"):
        # After what is preloaded already (a sanitizer's runtime must stay first); before libmlx either way.
        env["LD_PRELOAD"] = ":".join(filter(None, (env.get("LD_PRELOAD"), library)))
    ranks = int(env.get(RANKS_HERE) or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0))
    # A rank already bound to some of the cores (mpirun binds each rank) uses those; one free to use them all, its share.
    if library and ranks > 1 and cores == os.cpu_count():
        threads = str(max(1, cores // ranks))
        for name in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(name, threads)  # the operator's own setting wins
    return env


def rank_command(module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` as a rank: through `main` below, on the rank's machine."""
    return [sys.executable, "-m", "workers.cpu_path", module, *args]


def loaded_blas() -> str | None:
    """The optimised BLAS preloaded into this process (its file name), or None (see `preloaded_blas`)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return preloaded_blas(os.environ.get("LD_PRELOAD", ""), [line.rpartition("/")[2] for line in maps.splitlines()])


def preloaded_blas(preload: str, mapped: list[str]) -> str | None:
    """Of the library files `mapped` into a process, the optimised BLAS that `preload` (LD_PRELOAD) named. Mapped
    alone is not enough: numpy's own OpenBLAS is mapped too, with suffixed symbols that libmlx never binds to. By
    library, not by file name: LD_PRELOAD may name a link (Debian's libopenblas.so.0 leads to
    openblas-pthread/libopenblasp-r0.3.21.so), and a process's map shows the file behind it."""
    names = [Path(p).name for p in preload.split(":") if p]
    wanted = [f"lib{library}" for library in LIBRARIES if any(f"lib{library}" in name for name in names)]
    return next((name for name in mapped if any(name.startswith(prefix) for prefix in wanted)), None)


def memory_available() -> int:
    """The machine's available memory, or less where this process's cgroup (a container) allows less."""
    import psutil

    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")  # v2: the process's own group is the root of its namespace in a container
    try:
        limit, used = (cgroup / "memory.max").read_text().strip(), int((cgroup / "memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's quantized layers (linear, embedding, MoE experts) once held as float32: each
    uint32 of a packed weight holds 32 / bits values."""
    return sum(module.weight.size * 32 // module.bits * 4 for _, module in model.named_modules()
               if "scales" in module and hasattr(module, "bits"))


def affine_dequantize(module: nn.Module) -> mx.array:
    """A quantized layer's weight (2-D, or 3-D for MoE experts) as float32 (affine mode, 2, 4 or 8 bits: whole values
    in each uint32), from MLX's element-wise ops. Why not mx.dequantize: its CPU kernel is scalar, and turning the
    bundled model's weights dense took 3.6 s of a worker's 6.3 s start on a 2-core Xeon VM; these ops do its
    49,152 x 576 embedding in 0.26 s against 0.98. The values are exact in float32 (mx.dequantize rounds them to the
    scales' float16)."""
    weight, bits = module.weight, module.bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    values = (weight[..., None] >> shifts) & ((1 << bits) - 1)  # [out, in / (32 / bits), 32 / bits]: low bits first
    groups = values.reshape(*weight.shape[:-1], -1, module.group_size).astype(mx.float32)
    scales, biases = module.scales.astype(mx.float32), module.biases.astype(mx.float32)
    return (groups * scales[..., None] + biases[..., None]).reshape(*weight.shape[:-1], -1)


def dense_weights(model: nn.Module) -> str:
    """On the Linux CPU path, turn the quantized layers into float32 ones (lazily: only what is evaluated is
    computed); returns the line the worker logs about the path it took."""
    if mx.default_device() != mx.cpu:
        return f"{mx.default_device()}: weights as stored"
    if sys.platform != "linux":
        return "CPU backend outside Linux: weights as stored"
    blas = loaded_blas()
    if blas is None:
        _, why = fast_blas()
        return f"CPU path: the bundled reference BLAS ({why}); weights as stored"
    needed, available = dense_bytes(model), memory_available()
    if needed == 0:
        return f"CPU path: {blas}; weights as stored (none quantized)"
    if needed > DENSE_SHARE * available:
        return (f"CPU path: {blas}, but weights as stored: float32 would take {needed / 1e9:.1f} GB, more than "
                f"{DENSE_SHARE:.0%} of the {available / 1e9:.1f} GB available")
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # (MoE experts)
    from mlx_lm.utils import dequantize_model  # here: mlx_lm.utils imports transformers (3 s), and `main` must
    # exec the rank without that delay

    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters()) if v.dtype == mx.uint32)
    # mlx-lm swaps the modules; the weights of the common kinds are then computed by `affine_dequantize` instead.
    fast = {name: affine_dequantize(module) for name, module in model.named_modules()
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
            and getattr(module, "mode", "affine") == "affine" and 32 % module.bits == 0}
    dequantize_model(model)
    modules = dict(model.named_modules())
    for name, weight in fast.items():
        modules[name].weight = weight
    return f"CPU path: {blas}; quantized weights held as float32 (+{(needed - stored) / 1e6:.0f} MB)"


# Modules whose call is `x @ weight.T` (+ bias): mlx-lm's linear layers, and the tensor-parallel ones `Model.shard` puts
# in their place.
MATMUL_MODULES = (nn.Linear, nn.AllToShardedLinear, nn.ShardedToAllLinear)


def column_major_weights(model: nn.Module, output_head: bool = True) -> int:
    """Hold every float matrix the model multiplies by as `x @ W.T` column-major: the same array (shape, name, values)
    over a buffer laid out as its transpose, so that the BLAS gets a plain, untransposed gemm. Returns how many.

    Why: MKL and OpenBLAS take a slow path for `x @ W.T` with a few rows. On a 2-core Xeon VM one SmolLM2 layer's
    matmuls take 6.5 ms for 16 rows (a batched decode step) against 2.5 ms column-major, and 1.0 against 0.75 ms for
    one row; from a few hundred rows (a long prefill) the two are within a few percent (512 rows: 31.9 ms as stored,
    33.9 column-major). The token embedding is included only where it is the output head too: tied
    (`args.tie_word_embeddings`, as workers/shard.py reads it) on a rank that computes the logits (`output_head`: not
    an earlier pipeline stage); elsewhere it is only looked up, and a lookup reads rows. Quantized and 3-D (MoE)
    weights are left as they are: their kernels are MLX's own."""
    tied = output_head and getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    head = getattr(getattr(model, "model", None), "embed_tokens", None) if tied else None
    count = 0
    for _, module in model.named_modules():
        if not (isinstance(module, MATMUL_MODULES) or (head is not None and module is head)):
            continue
        if "scales" not in module and module.weight.ndim == 2:
            # mx.contiguous copies into the transpose's row-major order; .T is then a view with swapped strides.
            module.weight = mx.contiguous(module.weight.T).T
            count += 1
    return count


# One compiled function per kind, for every module of the model: its settings are constants to mx.compile (a trace
# per distinct value and input shape), its arrays are inputs.
@mx.compile
def _rope(x, offset, dims, traditional, base, scale):
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


@mx.compile
def _rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)


class CompiledRoPE(nn.RoPE):
    """nn.RoPE, compiled for decode steps. A prefill's input (several positions) takes the plain path: each new
    prompt length would be one more trace kept for good, and a prefill's ops are big enough for their overhead not
    to count."""

    def __call__(self, x, offset=0):
        if x.shape[-2] != 1:
            return super().__call__(x, offset)
        # An array, not an int: a Python int is a constant to mx.compile, and a new one each step would retrace.
        offset = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)
        return _rope(x, offset, self.dims, self.traditional, self.base, self.scale)


class CompiledRMSNorm(nn.RMSNorm):
    """nn.RMSNorm, compiled for decode steps (see CompiledRoPE)."""

    def __call__(self, x):
        return _rms_norm(x, self["weight"], self.eps) if x.ndim > 1 and x.shape[-2] == 1 else super().__call__(x)


# tanh(h) = h P(h²) / Q(h²) for |h| <= C, the point where this approximation reaches exactly ±1 in float32 (Eigen's
# `generic_fast_tanh_float`, a few ulp from tanh; its clamp for builds without FMA, as MLX's run-time kernels are;
# Eigen's `tanh(h) = h` for tiny h is left out: P/Q is that to an ulp there). sigmoid(g) = (1 + tanh(g / 2)) / 2, so
# SiLU(g) x is within about 3e-7 |g x| of mlx-lm's (a few float32 ulps of |g x|; more than that relative to SiLU where
# it is near 0, at large negative g, where 1 + tanh cancels).
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


@partial(mx.compile, shapeless=True)
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `swiglu`, with no `exp` (see the module docstring): one fused kernel. Float32
    only: in float16 the smallest coefficients underflow and 1 + tanh cancels to nothing (the CPU path casts the
    model to float32 first)."""
    h = mx.clip(gate * 0.5, -_TANH_CLAMP, _TANH_CLAMP)
    h2 = h * h
    p, q = h2 * _TANH_P[0] + _TANH_P[1], h2 * _TANH_Q[0] + _TANH_Q[1]
    for coefficient in _TANH_P[2:]:
        p = p * h2 + coefficient
    for coefficient in _TANH_Q[2:]:
        q = q * h2 + coefficient
    return gate * (0.5 + 0.5 * (h * p / q)) * x


# Below this many elements of the gate mlx-lm's swiglu is faster: a shapeless compiled kernel of fast_swiglu's ~25
# ops costs about 75 us a call however small (measured, 30 calls: 1 row of SmolLM2, 1,536 elements, 2.4 ms against
# 1.35; 2 rows 2.8 against 3.4; 16 rows 4.7 against 18.8).
FAST_SWIGLU_MIN_ELEMENTS = 2048


@cache
def _fast_mlp_class(cls: type) -> type | None:
    """A subclass of `cls` that calls `fast_swiglu`, when `cls.__call__` is, word for word, the SwiGLU MLP of
    mlx-lm's llama (`down_proj(swiglu(gate_proj(x), up_proj(x)))`, as in qwen2, qwen3, mistral ...); else None.
    Compared by bytecode, signature and the `swiglu` it calls, so a model whose MLP does anything else keeps it."""
    from mlx_lm.models import activations, llama  # here: the launcher (`main`) must not pay for mlx-lm's import

    call, reference = getattr(cls, "__call__", None), llama.MLP.__call__
    code = getattr(call, "__code__", None)
    fields = ("co_code", "co_names", "co_consts", "co_argcount", "co_posonlyargcount", "co_kwonlyargcount")
    kind = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS | inspect.CO_GENERATOR | inspect.CO_COROUTINE  # not __future__'s
    if (code is None or any(getattr(code, f) != getattr(reference.__code__, f) for f in fields)
            or code.co_flags & kind != reference.__code__.co_flags & kind
            or call.__globals__.get("swiglu") is not activations.swiglu):
        return None

    def __call__(self, x):
        gate = self.gate_proj(x)
        fast = gate.dtype == mx.float32 and gate.size >= FAST_SWIGLU_MIN_ELEMENTS
        swiglu = fast_swiglu if fast else activations.swiglu
        return self.down_proj(swiglu(gate, self.up_proj(x)))

    return type(cls.__name__, (cls,), {"__call__": __call__, "__doc__": cls.__doc__})


def compile_small_ops(model: nn.Module) -> int:
    """On the CPU backend: run the model's RoPE and RMSNorm modules compiled in decode steps, and its SwiGLU MLPs
    with `fast_swiglu` (see the module docstring); returns how many modules. Each keeps its place, name and weights
    in the model (only its class changes), so checkpoints, sharding and parameter names are untouched. Other RoPE
    variants (scaled, YaRN) and other MLPs are left as they are."""
    count = 0
    for _, module in model.named_modules():
        if type(module) is nn.RoPE:
            module.__class__ = CompiledRoPE
        elif type(module) is nn.RMSNorm:
            module.__class__ = CompiledRMSNorm
        elif fast := _fast_mlp_class(type(module)):
            module.__class__ = fast
        else:
            continue
        count += 1
    return count


def main() -> None:
    """`python -m workers.cpu_path MODULE ARGS`: exec `python -m MODULE ARGS` with `blas_environment`."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m workers.cpu_path MODULE [ARGS...]")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", *sys.argv[1:]], blas_environment())


if __name__ == "__main__":
    main()
