"""`conclave bench`: raw `mlx_lm.stream_generate` against the full HTTP -> NATS -> worker -> SSE path;
with --tensor-parallel / --pipeline-parallel, one process against worker groups instead; with
--concurrency, the served path with several requests in flight (continuous batching).

Both paths run in one process tree and one run, on the same model directory, the same prompts, greedy,
the same max_tokens. The two are interleaved prompt by prompt so that machine drift hits both alike.
TTFT is from the start of the request (raw: before the chat template is applied) to the first text.
Decode tok/s is (completion tokens - 1) / (time of the last token - time of the first token).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from ops.group import generate_on_group, local_group
from ops.spawn import spawn_server
from workers.shard import ShardError, load_shard
from workers.store import ModelStore

PROMPTS = [
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
    "What is the difference between a virus and a bacterium?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
]


def bench_prompts(n: int) -> list[str]:
    """The first n of PROMPTS, cycling through them again when n is larger."""
    return (PROMPTS * (n // len(PROMPTS) + 1))[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(runs: list[dict]) -> dict:
    ttft = [r["ttft_ms"] for r in runs]
    tps = [r["decode_tps"] for r in runs]
    return {"runs": len(runs), "ttft_ms_p50": round(statistics.median(ttft), 1),
            "ttft_ms_p95": round(percentile(ttft, 0.95), 1), "decode_tps_p50": round(statistics.median(tps), 2),
            "decode_tps_mean": round(statistics.fmean(tps), 2),
            "completion_tokens_mean": round(statistics.fmean(r["tokens"] for r in runs), 1)}


def raw_run(model, tokenizer, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    first = last = None
    tokens = 0
    parts = []
    for response in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(0.0)):
        now = time.perf_counter()
        if response.text and first is None:
            first = now
        last, tokens = now, response.generation_tokens
        parts.append(response.text)
    return {"ttft_ms": (first - start) * 1000, "decode_tps": (tokens - 1) / (last - first), "tokens": tokens,
            "text": "".join(parts)}


def served_run(http: httpx.Client, model_id: str, prompt: str, max_tokens: int, **extra) -> dict:
    """One streamed greedy chat request (with `extra` fields in its body); times relative to its start, plus its
    start and end on the perf_counter clock (for aggregate throughput under concurrency), and its text."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first = last = None
    tokens = cached = 0
    parts = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                parts.append(chunk["choices"][0]["delta"]["content"])
                now = time.perf_counter()
                first = first or now
                last = now
    return {"ttft_ms": (first - start) * 1000, "decode_tps": (tokens - 1) / (last - first), "tokens": tokens,
            "cached_tokens": cached, "start": start, "end": time.perf_counter(), "text": "".join(parts)}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "mlx_device": str(mx.default_device()), "mlx": mx.__version__}


def cpu_model() -> str:
    """The CPU's name where the system says it (Linux: /proc/cpuinfo; macOS: sysctl): figures differ by machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or platform.processor()
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def run_bench(args) -> dict:
    model = ModelStore(args.home / "models").resolve(args.model)
    prompts = bench_prompts(args.prompts)
    shard = load_shard(model.path)
    loaded, tokenizer = shard.model, shard.tokenizer
    with tempfile.TemporaryDirectory() as home:
        # No prefix cache: the served path must prefill what the raw path prefills, or TTFT compares caches.
        server = spawn_server(Path(home), "--model", str(model.path), "--prefix-cache-gb", "0")
        try:
            with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=600) as http:
                # Warm-up on both paths: first-call compilation and page-ins are not what is measured.
                raw_run(loaded, tokenizer, PROMPTS[0], 4)
                served_run(http, model.path.name, PROMPTS[0], 4)
                raw, served = [], []
                for _ in range(args.repeat):
                    for prompt in prompts:
                        raw.append(raw_run(loaded, tokenizer, prompt, args.max_tokens))
                        served.append(served_run(http, model.path.name, prompt, args.max_tokens))
        finally:
            server.stop()
    raw_s, served_s = summary(raw), summary(served)
    return {
        "model": model.id,
        "machine": machine(),
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "raw_mlx_lm": raw_s,
        "served": served_s,
        "decode_ratio_served_over_raw": round(served_s["decode_tps_p50"] / raw_s["decode_tps_p50"], 3),
        "ttft_overhead_ms_p50": round(served_s["ttft_ms_p50"] - raw_s["ttft_ms_p50"], 1),
        "goals": {"decode_ratio_min": 0.97, "ttft_overhead_ms_max": 15},
    }


def run_group_bench(args) -> dict:
    """Single rank, tensor-parallel and pipeline-parallel groups on the same model and prompts.

    Engine level (workers/generate.py on every rank, no HTTP or NATS), greedy, exactly max_tokens per
    prompt; the first prompt is run once more before the measured ones as a warm-up. Memory is MLX's
    peak per rank; collective ms/token is the communication of one decode step run on its own.
    """
    model = ModelStore(args.home / "models").resolve(args.model)
    prompts = bench_prompts(args.prompts)
    layouts = {"single": local_group("whole", 1)}
    if args.tensor_parallel > 1:
        layouts[f"tensor_{args.tensor_parallel}"] = local_group("tensor", args.tensor_parallel)
    if args.pipeline_parallel > 1:
        layouts[f"pipeline_{args.pipeline_parallel}"] = local_group("pipeline", args.pipeline_parallel)
    results: dict[str, dict] = {}
    single_tokens = None
    for name, spec in layouts.items():
        try:
            report = generate_on_group(spec, model.path, [prompts[0], *prompts], args.max_tokens)
        except ShardError as exc:
            results[name] = {"refused": str(exc)}
            continue
        runs = report["runs"][1:]
        tokens = [r["tokens"] for r in runs]
        single_tokens = single_tokens or tokens
        results[name] = {
            "ranks": len(report["per_rank"]),
            "split": report["split"],
            "ttft_ms_p50": round(statistics.median(r["ttft_ms"] for r in runs), 1),
            "decode_tps_p50": round(statistics.median(r["decode_tps"] for r in runs), 2),
            "collective_ms_per_token": report["collective_ms_per_token"],
            "same_tokens_as_single": tokens == single_tokens,
            "per_rank": [{"rank": r["rank"], "layers": r["layers"],
                          "parameter_mb": round(r["parameter_bytes"] / 1e6, 1),
                          "peak_memory_mb": round(r["peak_memory_bytes"] / 1e6, 1)} for r in report["per_rank"]],
        }
    return {
        "model": model.id,
        "machine": machine(),
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "layouts": results,
    }


def served_level(http: httpx.Client, model_id: str, prompts: list[str], level: int, max_tokens: int) -> dict:
    """`prompts` served with `level` requests in flight at a time."""
    with ThreadPoolExecutor(level) as pool:
        runs = list(pool.map(lambda p: served_run(http, model_id, p, max_tokens), prompts))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttft = [r["ttft_ms"] for r in runs]
    return {
        "requests": len(runs),
        "aggregate_decode_tps": round(sum(r["tokens"] for r in runs) / wall, 2),
        "per_request_decode_tps_p50": round(statistics.median(r["decode_tps"] for r in runs), 2),
        "ttft_ms_p50": round(statistics.median(ttft), 1),
        "ttft_ms_p95": round(percentile(ttft, 0.95), 1),
        "cached_prompt_tokens_mean": round(statistics.fmean(r["cached_tokens"] for r in runs), 1),
        "wall_s": round(wall, 2),
    }


def run_concurrency_bench(args) -> dict:
    """The served path under load: for each level N, requests kept N at a time in flight.

    Per level: aggregate decode tok/s (every completion token of the level over its wall time), TTFT
    p50/p95, the ratio of the aggregate to the first level's, and the queue overhead per job: served
    TTFT minus raw mlx-lm's TTFT on the same kind of prompts (prefill and first step in-process, no
    queue). The levels run with the prefix cache off, so that served and raw prefill the same tokens;
    then the first level runs again with it on, every prompt unique ("Request n: ...") so that only the
    chat template's shared head can be reused, as for real traffic.
    """
    model = ModelStore(args.home / "models").resolve(args.model)
    levels = args.concurrency
    shard = load_shard(model.path)
    counter = iter(range(1_000_000))

    def unique_prompts(n: int) -> list[str]:
        return [f"Request {next(counter)}: {p}" for p in bench_prompts(n)]

    raw_run(shard.model, shard.tokenizer, PROMPTS[0], 2)  # warm-up
    raw = [raw_run(shard.model, shard.tokenizer, p, 2) for p in unique_prompts(args.prompts)]
    raw_ttft = statistics.median(r["ttft_ms"] for r in raw)
    results: dict[str, dict] = {}
    for prefix_cache in (0, 4):
        with tempfile.TemporaryDirectory() as home:
            server = spawn_server(Path(home), "--model", str(model.path), "--max-batch", str(max(levels)),
                                  "--prefix-cache-gb", str(prefix_cache))
            try:
                with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=1800,
                                  limits=httpx.Limits(max_connections=max(levels) + 4)) as http:
                    served_run(http, model.path.name, PROMPTS[0], 4)  # warm-up
                    for level in levels if not prefix_cache else levels[:1]:
                        prompts = unique_prompts(level * -(-args.prompts // level))  # whole rounds of `level`
                        result = served_level(http, model.path.name, prompts, level, args.max_tokens)
                        result["queue_overhead_ms_p50"] = round(result["ttft_ms_p50"] - raw_ttft, 1)
                        results[f"{level}" if not prefix_cache else f"{level}_with_prefix_cache"] = result
            finally:
                server.stop()
    base = results[str(levels[0])]["aggregate_decode_tps"]
    for result in results.values():
        result["ratio_to_single"] = round(result["aggregate_decode_tps"] / base, 2)
    return {
        "model": model.id,
        "machine": machine(),
        "max_tokens": args.max_tokens,
        "raw_mlx_lm_ttft_ms_p50": round(raw_ttft, 1),
        "concurrency": results,
    }
