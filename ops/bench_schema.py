"""`conclave bench --json-schema`: what constrained decoding costs (workers/constrain.py).

The served path, streamed and greedy, on the same prompts with and without a JSON Schema in `response_format`,
interleaved prompt by prompt so that machine drift hits both alike. The schema asks for a list of short points and
a summary, so that answers run to max_tokens as free ones do; decode speed is compared (tokens after the first
over the time after the first), not the length of the answers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from ops.bench import PROMPTS, bench_prompts, machine, served_run, summary
from ops.spawn import spawn_server
from workers.store import ModelStore

SCHEMA = {"type": "object", "properties": {
    "points": {"type": "array", "items": {"type": "string"}, "minItems": 3},
    "summary": {"type": "string"}}, "required": ["points", "summary"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "notes", "schema": SCHEMA, "strict": True}}


def run_schema_bench(args) -> dict:
    model = ModelStore(args.home / "models").resolve(args.model)
    prompts = bench_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as home:
        server = spawn_server(Path(home), "--model", str(model.path), "--prefix-cache-gb", "0")
        try:
            with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=600) as http:
                served_run(http, model.path.name, PROMPTS[0], 4)  # warm-up: first-call compilation
                served_run(http, model.path.name, PROMPTS[0], 4, response_format=FORMAT)  # and the tokenizer's map
                free, constrained = [], []
                for _ in range(args.repeat):
                    for prompt in prompts:
                        free.append(served_run(http, model.path.name, prompt, args.max_tokens))
                        constrained.append(served_run(http, model.path.name, prompt, args.max_tokens,
                                                      response_format=FORMAT))
        finally:
            server.stop()
    free_s, constrained_s = summary(free), summary(constrained)
    return {
        "model": model.id,
        "machine": machine(),
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "schema": SCHEMA,
        "free": free_s,
        "json_schema": constrained_s,
        "decode_ratio_schema_over_free": round(constrained_s["decode_tps_p50"] / free_s["decode_tps_p50"], 3),
        "ttft_overhead_ms_p50": round(constrained_s["ttft_ms_p50"] - free_s["ttft_ms_p50"], 1),
        "goals": {"decode_ratio_min": 0.9},
    }
