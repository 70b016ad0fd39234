"""`conclave bench --cluster`: how fast the cluster notices a lost node and serves again, and what placement costs.

1. Placement time: `place` (a pure function) on a synthetic 100-node cluster (racks of four Mac Studios with an
   RDMA mesh inside each rack, 64 to 512 GB each) for a 1T-parameter 4-bit model (tensor over a rack), a 70B
   4-bit one (one node) and one too large for any node set's memory at a long context (pipeline over many);
   median and p90 of repeated runs.
2. On this machine, three nodes on loopback (`serve --cluster` and two `join`, each offering 1.5 GB so that the
   default model is split over two of them), as the tests run them: SIGKILL the agent and ranks of the second
   node of the plan, then measure
   - detection: from the kill until the node's status reads lost (what `conclave nodes` shows);
   - recovery: from the kill until the first token of a streamed request sent through the surviving
     node's ingress right after the kill (it waits in the queue while the model is placed again).
3. A broker of three on loopback (`serve --cluster --brokers 3` and two `join --broker`): SIGKILL the whole first
   machine (serve, its nats-server, its ranks), then measure
   - takeover: from the kill until a broker node holds the controller lease (pipeline/lease.py);
   - recovery: from the kill until the first token of a streamed request sent through a broker node's ingress.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ops.agent import node_id
from ops.placement import place
from schemas.cluster import Link, ModelFacts, NodeFacts, PlacementRequest

GB = 10**9


def synthetic_cluster(n: int = 100) -> tuple[list[NodeFacts], list[Link]]:
    sizes = [512, 256, 192, 128, 64]
    size = [sizes[(i // 4) % 5] for i in range(n)]  # a rack's four machines alike
    nodes = [NodeFacts(id=f"studio-{i:03d}", backend="metal", memory_total=size[i] * GB,
                       memory_available=int(size[i] * GB * 0.9), working_set=int(size[i] * GB * 0.75),
                       models=["kimi-k2-4bit"] if i % 7 == 0 else []) for i in range(n)]
    links = [Link(a=nodes[r + i].id, b=nodes[r + j].id, kind="rdma")
             for r in range(0, n - 3, 4) for i in range(4) for j in range(i + 1, 4)]
    return nodes, links


def synthetic_model(name: str, layers: int, layer_gb: float, heads_divide: list[int]) -> ModelFacts:
    return ModelFacts(id=name, layers=layers, layer_bytes=[int(layer_gb * GB)] * layers, embedding_bytes=2 * GB,
                      head_bytes=2 * GB, kv_bytes_per_token=4096, hidden_size=7168, intermediate_size=18432,
                      vocab_size=160000, tensor_sizes=heads_divide)


def placement_times(repeats: int = 20) -> dict:
    nodes, links = synthetic_cluster()
    cases = {"1T-4bit (tensor over a rack)": (synthetic_model("kimi-k2-4bit", 61, 9.0, [1, 2, 4, 8]),
                                              PlacementRequest()),
             "70B-4bit (one node)": (synthetic_model("llama-70b-4bit", 80, 0.45, [1, 2, 4, 8]), PlacementRequest()),
             "1T-4bit at 128k x 16 (pipeline)": (synthetic_model("kimi-k2-4bit", 61, 9.0, [1, 3]),
                                                 PlacementRequest(context=131072, sequences=16))}
    report = {}
    for name, (model, request) in cases.items():
        times, result = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            result = place(model, nodes, links, request)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        report[name] = {"median_ms": round(statistics.median(times), 2),
                        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
                        "result": f"{result.layout} over {len(result.ranks)} node{'s' if len(result.ranks) > 1 else ''}"
                        if hasattr(result, "ranks")
                        else f"refused: {result.reason}"}
    return {"nodes": len(nodes), "rdma_links": len(links), "repeats": repeats, "cases": report}


def first_token_s(base_url: str, model: str, started: float) -> float:
    """Seconds from `started` to the first text of a streamed answer sent now."""
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return time.monotonic() - started
    raise RuntimeError("the answer had no text")


async def detection_s(first_home: Path, nats_url: str, node: str, started: float) -> float:
    from ops.deployment import operator_connection
    from pipeline.nodes import read_nodes, state_of

    nc = await operator_connection(first_home, nats_url, "conclave-bench")
    try:
        while time.monotonic() - started < 120:
            if any(s.facts.id == node and state_of(s) == "lost" for s in await read_nodes(nc.jetstream())):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise TimeoutError(f"node {node} was not shown as lost within 120 s")
    finally:
        await nc.close()


async def takeover_s(home: Path, url: str, previous: str, started: float) -> float:
    from ops.credentials import cluster_ca, role_identity
    from pipeline.access import OPERATOR, Identity
    from pipeline.connection import connect_once
    from pipeline.lease import read_lease

    identity = Identity(OPERATOR, role_identity(home, OPERATOR).seed_file, cluster_ca(home))
    while time.monotonic() - started < 120:
        try:
            nc = await connect_once(url, "conclave-bench", identity)
            try:
                lease = await read_lease(nc.jetstream())
            finally:
                await nc.close()
            if lease is not None and lease.node_id != previous:
                return time.monotonic() - started
        except Exception:  # the brokers electing leaders
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("no other node took the controller lease within 120 s")


def first_machine_lost(tmp: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from ops.join import read_membership
    from ops.spawn import spawn_brokers, stop_all
    from workers.store import DEFAULT_MODEL

    homes = [tmp / name for name in ("first", "broker-b", "broker-c")]
    first, nodes, _ = spawn_brokers(homes[0], homes[1:])
    try:
        first_token_s(nodes[0].base_url, DEFAULT_MODEL, time.monotonic())  # warm: the model answers
        urls = ",".join(f"tls://127.0.0.1:{read_membership(home).own_broker.client_port}" for home in homes[1:])
        started = time.monotonic()
        first.kill()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(first_token_s, nodes[0].base_url, DEFAULT_MODEL, started)
            taken = asyncio.run(takeover_s(homes[0], urls, node_id(homes[0]), started))
            recovered = answer.result()
        return {"takeover_s": round(taken, 2), "first_token_after_loss_s": round(recovered, 2), "brokers": 3,
                "lease_s": 10.0}
    finally:
        stop_all(nodes)


def run_cluster_bench(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from ops.spawn import spawn_cluster, stop_all
    from workers.store import DEFAULT_MODEL

    report = {"placement": placement_times()}
    with tempfile.TemporaryDirectory(prefix="conclave-bench-cluster-") as tmp:
        homes = [Path(tmp) / name for name in ("a", "b", "c")]
        first, nodes, _ = spawn_cluster(homes[0], homes[1:], "1.5")
        try:
            (instance,) = httpx.get(first.base_url + "/cluster", timeout=30).json()["instances"]
            (lost,) = [n for n in nodes if node_id(n.home) in instance["nodes"]]
            (spare,) = [n for n in nodes if n is not lost]
            first_token_s(spare.base_url, DEFAULT_MODEL, time.monotonic())  # warm: the model answers
            started = time.monotonic()
            lost.kill()
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(first_token_s, spare.base_url, DEFAULT_MODEL, started)
                detected = asyncio.run(detection_s(homes[0], first.nats_url, node_id(lost.home), started))
                recovered = answer.result()
            report["lost_node"] = {"detected_s": round(detected, 2), "first_token_after_loss_s": round(recovered, 2),
                                   "nodes": 3, "status_interval_s": 1.0, "lost_after_s": 3.0,
                                   "layout": instance["layout"]}
        finally:
            stop_all((*nodes, first))
        report["first_machine_lost"] = first_machine_lost(Path(tmp))
    return report
