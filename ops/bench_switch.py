"""`conclave bench --switch`: how long a request waits when its model must replace another, against loading it with
nothing to replace.

One machine serving with `--cluster` and a memory limit that fits the served model and one more (`--memory-gb`,
default 4.3: placement reserves 1.85 GB for the bundled model at 8k x 4 on CPU, float32), and two more models in
its store (the bundled model under two other ids, so that both load alike). Each round:

1. cold: neither loaded (both unloaded and gone); the time from a request for the second to its first token;
2. switch: the second loaded and idle; the time from a request for the first to its first token (the second is
   unloaded to make room: ops/instances.py), then back again.

The goal (issue 12): a switch within 10% of a cold load. Medians over `--rounds`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ops.bench_cluster import first_token_s
from ops.spawn import spawn_cluster, stop_all
from workers.store import ModelStore, bundled_gguf

MODELS = ("bench-switch-a", "bench-switch-b")


def run_switch_bench(args) -> dict:
    colds, switches = [], []
    with tempfile.TemporaryDirectory(prefix="conclave-bench-switch-") as tmp:
        first, _, _ = spawn_cluster(Path(tmp) / "a", [], str(args.memory_gb))
        try:
            store = ModelStore(first.home / "models")
            for model in MODELS:
                store.import_gguf(bundled_gguf(), model)
            url = first.base_url
            wait_until(lambda: all(status(url, m) == "idle" for m in MODELS), "the models in the catalogue")
            for _ in range(args.rounds):
                for model in MODELS:
                    httpx.delete(f"{url}/cluster/instances/{model}", timeout=30)
                wait_until(lambda: not any(i["model"] in MODELS for i in instances(url)), "the models unloaded")
                colds.append(first_token_s(url, MODELS[1], time.monotonic()))
                for model in MODELS:  # a switches in for b, then b for a
                    switches.append(first_token_s(url, model, time.monotonic()))
                    assert [i["model"] for i in instances(url) if i["model"] in MODELS] == [model]
        finally:
            stop_all((first,))
    cold, switch = statistics.median(colds), statistics.median(switches)
    return {"bench": "switch", "rounds": args.rounds, "memory_gb": args.memory_gb,
            "cold_first_token_s": [round(x, 2) for x in colds],
            "switch_first_token_s": [round(x, 2) for x in switches],
            "cold_s": round(cold, 2), "switch_s": round(switch, 2), "switch_vs_cold": round(switch / cold, 2)}


def status(url: str, model: str) -> str | None:
    return {m["id"]: m["status"] for m in httpx.get(url + "/models", timeout=30).json()["data"]}.get(model)


def instances(url: str) -> list[dict]:
    return httpx.get(url + "/cluster/instances", timeout=30).json()["data"]


def wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f}s")
        time.sleep(0.2)
