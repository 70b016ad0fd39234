"""One rank's share of a model: load only what this rank needs, and run its part of a forward pass.

Three layouts, one interface (`Shard.forward`):
- whole: one process holds the model.
- tensor: every rank holds every layer with its attention heads and MLP columns split N ways
  (mlx-lm's `Model.shard`); the all_sums inside the layers keep the ranks' hidden states equal,
  so every rank computes the same logits.
- pipeline: rank r holds a contiguous range of layers. Rank 0 embeds the tokens, each rank sends
  its hidden state to the next with `mx.distributed.send/recv`, the last rank applies the final
  norm and head and sends the logits back to rank 0, which is the only rank that samples.

Weights are loaded lazily and only this rank's share is ever evaluated, so a rank reads and holds
about 1/N of the layers (plus the embedding and head where its stage needs them).
"""

from __future__ import annotations

import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from workers.cpu_path import column_major_weights, compile_small_ops, dense_weights, loaded_blas
from workers.split import (ShardError, check_pipeline_split, check_tensor_parallel, layer_files, pipeline_split,
                           stage_files, weight_map)


@dataclass
class Shard:
    model: nn.Module
    tokenizer: object
    layout: str
    group: mx.distributed.Group | None
    layers: tuple[int, int]  # [start, end) of the model's layers held here
    hidden_size: int
    vocab_size: int
    dtype: mx.Dtype
    load_s: float = 0.0
    cpu_path: str = ""  # on Linux CPU, which BLAS and weights it runs (workers/cpu_path.py), for the log
    last_step: float = field(default_factory=time.monotonic)  # read by the leader's watchdog

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def parameter_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def forward(self, tokens: mx.array, cache: list, logits: bool) -> mx.array | None:
        """Run this rank's part for `tokens` (shape [B, L]).

        With `logits`, returns the last position's logits ([B, vocab]) on the leader (and on every
        rank of a tensor group); None elsewhere. Without, only fills the KV cache (prefill).
        """
        if self.layout != "pipeline":
            out = self.model(tokens, cache=cache)
            return out[:, -1, :] if logits else out
        rank, last, group = self.rank, self.size - 1, self.group
        inner = self.model.model
        if rank == 0:
            h = inner(tokens, cache)
        else:
            template = mx.zeros((*tokens.shape, self.hidden_size), dtype=self.dtype)
            received = mx.distributed.recv_like(template, rank - 1, group=group)
            if rank == last and logits:
                h = self.model(None, cache=cache, input_embeddings=received)[:, -1, :]
            else:
                h = inner(None, cache, input_embeddings=received)
        if rank != last:
            # Each send is evaluated on its own so that it runs before this rank's next recv: in one graph
            # the recv could be scheduled first and deadlock the pipeline.
            mx.eval(mx.distributed.send(h, rank + 1, group=group))
        elif logits:
            mx.eval(mx.distributed.send(h, 0, group=group))
        else:
            mx.eval(h)
        if rank == 0 and logits:
            template = mx.zeros((tokens.shape[0], self.vocab_size), dtype=self.dtype)
            return mx.distributed.recv_like(template, last, group=group)
        return None


def check_layout(model: nn.Module, layout: str) -> None:
    """Whether this mlx-lm model can be split this way (the architecture, not the sizes)."""
    name = type(model).__module__
    if layout == "tensor" and not hasattr(model, "shard"):
        raise ShardError(f"{name} has no tensor-parallel sharding in mlx-lm (Model.shard); use --pipeline-parallel.")
    if layout == "pipeline":
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            raise ShardError(f"pipeline parallel needs a llama-style model (model.embed_tokens, model.layers, "
                             f"model.norm); {name} is not one.")
        if not all("input_embeddings" in inspect.signature(f).parameters for f in (model.__call__, inner.__call__)):
            raise ShardError(f"{name} cannot start a forward pass from hidden states (no input_embeddings "
                             f"argument), so it cannot run as a pipeline stage.")


def refused_layouts(model_dir: Path, layouts: tuple[str, ...] = ("tensor", "pipeline")) -> dict[str, str]:
    """Of `layouts`, those the model in `model_dir` cannot run, with why (`check_layout`): built lazily once, no
    weights read. Kept in the cluster's catalogue (ops/catalogue.py), so a controller without the files knows."""
    layouts = tuple(layout for layout in layouts if layout in ("tensor", "pipeline"))
    if not layouts:
        return {}
    model = mlx_lm_load_model(Path(model_dir), lazy=True, strict=False)[0]
    refused = {}
    for layout in layouts:
        try:
            check_layout(model, layout)
        except ShardError as exc:
            refused[layout] = str(exc)
    return refused


def _cut_pipeline_stage(model: nn.Module, rank: int, size: int, split: list[int]) -> tuple[int, int]:
    """Keep only this stage's layers (and embedding / norm / head where the stage uses them)."""
    inner = model.model
    check_pipeline_split(split, len(inner.layers), size)
    start = sum(split[:rank])
    end = start + split[rank]
    inner.layers = inner.layers[start:end]
    if hasattr(inner, "fa_idx"):  # llama's mask bookkeeping indexes the local layer list
        types = [getattr(layer, "use_sliding", False) for layer in inner.layers]
        inner.fa_idx = types.index(False) if False in types else 0
        inner.swa_idx = types.index(True) if True in types else None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    if rank > 0 and not (rank == size - 1 and tied):
        del inner["embed_tokens"]
    if rank < size - 1:
        inner.norm = nn.Identity()  # the hidden state goes on to the next stage un-normalised
        if "lm_head" in model:
            del model["lm_head"]
    return start, end


def load_shard(model_dir: Path, layout: str = "whole", group: mx.distributed.Group | None = None,
               split: list[int] | None = None) -> Shard:
    """Load this rank's share of the model in `model_dir`; see the module docstring for the layouts."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    size = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    # A pipeline rank's node may hold only the weight files of its stage (ops/model_files.py: fetched per rank):
    # loaded without insisting on every weight, then checked to hold every file its stage reads.
    weights = weight_map(model_dir)
    missing = set(weights.values()) - {p.name for p in model_dir.glob("*.safetensors")} if weights else set()
    # lazy: nothing is read until evaluated below
    model, config = mlx_lm_load_model(model_dir, lazy=True, strict=not missing)
    num_layers = len(model.layers)
    layers = (0, num_layers)
    if size > 1:
        check_layout(model, layout)
    if layout == "tensor":
        check_tensor_parallel(config, size)
    if layout == "pipeline" and size > 1:
        layers = _cut_pipeline_stage(model, rank, size, split or pipeline_split(num_layers, size))
    # After the cut (a stage dequantizes only its own layers), before tensor sharding (whose quantized
    # layers are other classes, and whose float32 ones shard as any Linear).
    cpu_path = dense_weights(model)
    if layout == "tensor" and size > 1:
        model.shard(group)
    needed = stage_files(*layer_files(weights), *layers) if missing and layout == "pipeline" and size > 1 else missing
    if lacking := sorted(missing & needed):
        raise ShardError(f"{model_dir} lacks {', '.join(lacking)}, which layers {layers[0]}-{layers[1]} of this rank "
                         f"need")
    # MLX's CPU kernels for float16/bfloat16 are several times slower than float32 (about 30x for
    # fp16 activations against quantized weights); Metal and CUDA keep the checkpoint's dtype.
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
        cpu_path += f"; {compile_small_ops(model)} RoPE, RMSNorm and MLP modules compiled"
        if loaded_blas() is not None:  # (after the cast and the tensor sharding: both would copy it back)
            output_head = layout != "pipeline" or rank == size - 1  # (earlier stages pass a hidden state on)
            cpu_path += f"; {column_major_weights(model, output_head)} weight matrices held column-major"
    # Reads only the weights this rank kept. The tokenizer loads meanwhile, on a thread of its own (its second of Python
    # and Rust; `mx.eval` lets go of the GIL): on the CPU backend the weights' dequantizing and copies take as long.
    with ThreadPoolExecutor(1) as pool:
        tokenizer = pool.submit(load_tokenizer, model_dir, eos_token_ids=config.get("eos_token_id"))
        mx.eval(model.parameters())
        tokenizer = tokenizer.result()
    model.eval()
    dtype = next(v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight"))
    return Shard(model=model, tokenizer=tokenizer, layout=layout, group=group, layers=layers,
                 hidden_size=config["hidden_size"], vocab_size=config["vocab_size"], dtype=dtype,
                 load_s=time.perf_counter() - started, cpu_path=cpu_path)
