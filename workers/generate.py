"""One greedy generation on one rank of a group, without NATS: `conclave generate` starts every rank.

    python -m workers.generate --model-dir DIR --prompt TEXT --max-tokens N --report-dir DIR [--layout ...]

For checking that a group computes what a single process computes, and for measuring it: each rank
writes a JSON report (its layers, parameter bytes, peak memory, and on the leader the tokens, TTFT,
decode speed and the per-token cost of the group's collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import mlx.core as mx

from workers.lockstep import BatchEngine, admit_from, broadcast
from workers.shard import Shard, load_shard
from workers.rank import RankArgs, add_rank_arguments, barrier, join_group


def collective_ms_per_token(shard: Shard, repeats: int = 30) -> float:
    """The communication one decode step needs on this layout, run alone (no compute), in ms.

    tensor: two all_sums of one hidden state per layer; pipeline: the hidden state handed down the
    stages and the logits back to rank 0; both: the plan and the sampled token broadcast.
    """
    if shard.group is None:
        return 0.0
    group, rank, size = shard.group, shard.rank, shard.size
    hidden = mx.zeros((1, 1, shard.hidden_size), dtype=shard.dtype)
    logits = mx.zeros((1, shard.vocab_size), dtype=shard.dtype)
    plan = mx.zeros((4,), dtype=mx.int32)  # the leader's plan before a step (one row staying)
    token = mx.zeros((1,), dtype=mx.int32)

    def one_step():
        if shard.layout == "tensor":
            for _ in range(2 * (shard.layers[1] - shard.layers[0])):
                mx.eval(mx.distributed.all_sum(hidden, group=group))
        else:
            if rank > 0:
                mx.eval(mx.distributed.recv_like(hidden, rank - 1, group=group))
            mx.eval(mx.distributed.send(hidden if rank < size - 1 else logits, (rank + 1) % size, group=group))
            if rank == 0:
                mx.eval(mx.distributed.recv_like(logits, size - 1, group=group))
        mx.eval(broadcast(shard, plan))
        mx.eval(broadcast(shard, token))

    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        one_step()
    return (time.perf_counter() - start) * 1000 / repeats


class _Once:
    """The leader's one greedy request (a `Row` of workers/lockstep.py)."""

    greedy = True
    share_prefill = False
    cancelled = threading.Event()  # never set

    def __init__(self, prompt: list[int], max_tokens: int):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.times: list[float] = []

    def on_token(self, token: int) -> bool:
        self.tokens.append(token)
        self.times.append(time.perf_counter())
        return len(self.tokens) == self.max_tokens

    def fail(self, exc: Exception) -> None:
        raise exc  # a check of the group: nothing to isolate

    def on_leave(self, reason: str) -> None:
        pass


def generate_once(engine: BatchEngine, text: str, max_tokens: int, raw: bool) -> dict:
    """Greedy, exactly `max_tokens` tokens (end-of-sequence does not stop it); timings on the leader."""
    shard = engine.shard
    if not shard.is_leader:
        engine.run()
        return {}
    tokenizer = shard.tokenizer
    prompt = (tokenizer.encode(text) if raw else
              tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    once = _Once(list(prompt), max_tokens)
    start = time.perf_counter()
    engine.run(admit_from([once]))
    times = once.times
    return {
        "prompt_tokens": len(prompt), "tokens": once.tokens, "text": tokenizer.decode(once.tokens),
        "ttft_ms": round((times[0] - start) * 1000, 1),
        "decode_tps": round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several prompts, run in turn")
    parser.add_argument("--raw", action="store_true", help="the prompt as is, without the chat template")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--report-dir", required=True, help="this rank writes rank-<rank>.json here")
    add_rank_arguments(parser)
    args = parser.parse_args(argv)

    group = join_group(RankArgs(args.layout, args.backend, args.split))
    shard = load_shard(Path(args.model_dir), args.layout, group, args.split)
    barrier(group)
    memory_after_load = mx.get_peak_memory()
    # No prefix cache: each prompt is measured from a cold start.
    engine = BatchEngine(shard, max_batch=1, prefix_cache_bytes=0)
    runs = [generate_once(engine, text, args.max_tokens, args.raw) for text in args.prompt]
    report = {
        "rank": shard.rank, "ranks": shard.size, "layout": shard.layout, "layers": list(shard.layers),
        "parameter_bytes": shard.parameter_bytes(), "peak_memory_bytes_after_load": memory_after_load,
        "peak_memory_bytes": mx.get_peak_memory(), "load_s": round(shard.load_s, 3),
    }
    report["collective_ms_per_token"] = round(collective_ms_per_token(shard), 3)
    if shard.is_leader:
        report.update(runs[0], runs=runs)
    Path(args.report_dir, f"rank-{shard.rank}.json").write_text(json.dumps(report))
    mx.synchronize()  # a discarded last step may still be running
    os._exit(0)  # as workers/worker.py: skip MLX's C++ teardown, which can abort at interpreter exit


if __name__ == "__main__":
    main()
