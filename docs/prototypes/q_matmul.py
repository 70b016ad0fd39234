"""A measurement, not part of Conclave (README, "Re-measured later on 2026-12-01", part 10): the bundled model's
211 quantized matmuls of one token through a weight-only AVX2 kernel (q_matmul.c) against float32 over MLX's BLAS.

    gcc -O3 -march=native -fopenmp -shared -fPIC docs/prototypes/q_matmul.c -o /tmp/libq.so
    OMP_NUM_THREADS=2 python -m workers.cpu_path docs.prototypes.q_matmul /tmp/libq.so   # (MKL preloaded)
"""

import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model

from workers.store import ModelStore, bundled_gguf


def main() -> None:
    lib = ctypes.CDLL(sys.argv[1])
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.q_matmul.argtypes = [P, I, P, P, P, P, I, I, I, I]
    model, _ = load_model(ModelStore(Path(tempfile.mkdtemp())).import_gguf(bundled_gguf()).path)
    mats = [(np.array(m.weight), np.array(m.scales.astype(mx.float32)), np.array(m.biases.astype(mx.float32)),
             m.group_size, m.bits) for _, m in model.named_modules() if "scales" in m]
    for w, s, b, group, bits in (mats[0], next(m for m in mats if m[4] == 8)):  # the kernel's numerics
        out, inn = w.shape[0], w.shape[1] * 32 // bits
        x, y = np.random.randn(1, inn).astype(np.float32), np.zeros((1, out), np.float32)
        lib.q_matmul(x.ctypes.data, 1, w.ctypes.data, s.ctypes.data, b.ctypes.data, y.ctypes.data, out, inn, group, bits)
        dense = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=group, bits=bits))
        print(f"{bits}-bit: largest difference from the dequantized matmul, relative: "
              f"{np.abs(y - x @ dense.T).max() / np.abs(x @ dense.T).max():.1e}")
    for rows in (1, 16):
        xs = {w.shape[1] * 32 // bits: np.random.randn(rows, w.shape[1] * 32 // bits).astype(np.float32)
              for w, _, _, _, bits in mats}
        ys = {w.shape[0]: np.zeros((rows, w.shape[0]), np.float32) for w, *_ in mats}
        dense = [mx.contiguous(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=g, bits=bits).T).T
                 for w, s, b, g, bits in mats]
        xm = {n: mx.array(v) for n, v in xs.items()}
        mx.eval(dense, list(xm.values()))
        low, high = [], []
        for _ in range(10):  # one after the other: OpenMP's and MKL's threads each spin a while after their work
            start = time.perf_counter()
            for w, s, b, group, bits in mats:
                out, inn = w.shape[0], w.shape[1] * 32 // bits
                lib.q_matmul(xs[inn].ctypes.data, rows, w.ctypes.data, s.ctypes.data, b.ctypes.data,
                             ys[out].ctypes.data, out, inn, group, bits)
            low.append(time.perf_counter() - start)
        for _ in range(10):
            start = time.perf_counter()
            mx.eval([xm[d.shape[1]] @ d.T for d in dense])
            high.append(time.perf_counter() - start)
        print(f"{rows} rows: {len(mats)} matmuls, packed weights (this kernel) {1000 * statistics.median(low):.1f} ms; "
              f"float32 (MLX's BLAS) {1000 * statistics.median(high):.1f} ms")


if __name__ == "__main__":
    main()
