"""`conclave bench --against llama.cpp`: raw mlx-lm, served Conclave and llama.cpp on the same GGUF, same machine,
same prompt token ids, greedy, in one run (part 10's yardstick).

llama.cpp runs through `llama-cpp-python` (installed with the bundled model's package) with as many threads as the
machine has cores, in a child process: a crash of the native library (one build of it segfaulted in its first
decode on this VM) is reported in the JSON rather than ending the bench. Before each prompt its context is reset,
so that it prefills the whole prompt as the other two do (llama.cpp would otherwise reuse the chat template's common
prefix). TTFT is from the start of the request to the first generated token; decode tok/s as `ops/bench.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ops.bench import PROMPTS, bench_prompts, machine, raw_run, served_run, summary
from ops.spawn import spawn_server
from workers.shard import load_shard
from workers.store import ModelStore, bundled_gguf


def llama_runs(gguf: Path, prompts: list[list[int]], max_tokens: int, threads: int) -> list[dict]:
    """In this process: each prompt's greedy generation through llama.cpp, timed, with its text."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False)
    runs = []
    for ids in [prompts[0], *prompts]:  # the first run warms up, as on the other paths
        llm.reset()
        start = time.perf_counter()
        first = last = None
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            first = first or now
            last = now
            if llm.token_eos() == token:
                break
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
        text = llm.detokenize(tokens).decode("utf-8", errors="replace")
        runs.append({"ttft_ms": (first - start) * 1000, "decode_tps": (len(tokens) - 1) / (last - first),
                     "tokens": len(tokens), "text": text})
    return runs[1:]


def llama_in_child(gguf: Path, prompts: list[list[int]], max_tokens: int, threads: int) -> list[dict] | str:
    """`llama_runs` in a child process: its runs, or why it failed."""
    spec = json.dumps({"gguf": str(gguf), "prompts": prompts, "max_tokens": max_tokens, "threads": threads})
    done = subprocess.run([sys.executable, "-m", "ops.bench_llama"], input=spec, capture_output=True, text=True)
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        return f"llama.cpp failed ({why}): {done.stderr.strip()[-500:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_llama_bench(args) -> dict:
    model = ModelStore(args.home / "models").resolve(args.model)
    prompts = bench_prompts(args.prompts)
    shard = load_shard(model.path)  # in this process: stock mlx-lm (no preloaded BLAS), as a user runs it
    ids = [list(shard.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
           for p in prompts]
    threads = os.cpu_count() or 1
    llama = llama_in_child(bundled_gguf(), ids, args.max_tokens, threads)
    raw, served = [], []
    with tempfile.TemporaryDirectory() as home:
        server = spawn_server(Path(home), "--model", str(model.path), "--prefix-cache-gb", "0")
        try:
            with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=600) as http:
                raw_run(shard.model, shard.tokenizer, PROMPTS[0], 4)
                served_run(http, model.path.name, PROMPTS[0], 4)
                for prompt in prompts:
                    raw.append(raw_run(shard.model, shard.tokenizer, prompt, args.max_tokens))
                    served.append(served_run(http, model.path.name, prompt, args.max_tokens))
        finally:
            server.stop()
    # The served path's weights and BLAS differ from stock mlx-lm's (workers/cpu_path.py): its greedy text against
    # theirs, prompt by prompt.
    report = {"model": model.id, "machine": machine(), "max_tokens": args.max_tokens, "prompts": len(prompts),
              "threads": threads, "raw_mlx_lm": summary(raw), "served": summary(served),
              "same_text_as_raw_mlx_lm": f"{sum(r['text'] == s['text'] for r, s in zip(raw, served))}/{len(prompts)}"}
    if isinstance(llama, str):
        return {**report, "llama_cpp": llama}
    llama_s, served_s = summary(llama), report["served"]
    same = sum(s["text"] == l["text"] for s, l in zip(served, llama))
    return {**report, "llama_cpp": llama_s,
            "ttft_served_over_llama_cpp": round(served_s["ttft_ms_p50"] / llama_s["ttft_ms_p50"], 2),
            "decode_served_over_llama_cpp": round(served_s["decode_tps_p50"] / llama_s["decode_tps_p50"], 3),
            "same_text_as_llama_cpp": f"{same}/{len(prompts)}",
            "goals": {"ttft_ratio_max": 3.0, "decode_ratio_min": 0.5}}


if __name__ == "__main__":  # the child of llama_in_child
    spec = json.loads(sys.stdin.read())
    print(json.dumps(llama_runs(Path(spec["gguf"]), spec["prompts"], spec["max_tokens"], spec["threads"])))
