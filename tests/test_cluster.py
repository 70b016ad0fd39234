"""The node this deployment runs on, as its agent reports it: `conclave nodes` and `GET /v1/cluster`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import msgspec
import psutil

from ops.agent import nodes_table
from pipeline.nodes import LOST_AFTER_S, on_this_clock, state_of
from schemas.catalogue import FetchProgress, FileProgress
from schemas.cluster import NodeFacts, NodeStatus
from tests.conftest import FRANCE, MODEL


def reported(http, deadline_s: float = 30.0) -> dict:
    """/v1/cluster once the agent has reported (it does every second from the start)."""
    deadline = time.monotonic() + deadline_s
    while not (body := http.get("/cluster").json())["nodes"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def test_the_cluster_lists_this_node_with_real_figures_and_its_instance(server, http):
    body = reported(http)
    (node,) = body["nodes"]
    facts = node["facts"]
    assert facts["id"] == (server.home / "node-id").read_text().strip() and facts["host"] == socket.gethostname()
    assert facts["backend"] == "cpu" and facts["memory_total"] == psutil.virtual_memory().total
    assert 0 < facts["memory_available"] <= facts["memory_total"] and MODEL in facts["models"]
    assert node["state"] == "up" and node["last_seen_s"] < LOST_AFTER_S and node["ranks"] == 1
    assert 0 <= node["cpu_percent"] <= 100 and node["disk_free"] > 0
    # What this machine cannot measure is null, never a made-up zero.
    assert node["gpu_percent"] is None and node["temperature_c"] is None and node["power_w"] is None
    (instance,) = body["instances"]
    assert instance["model"] == MODEL and len(instance["workers"]) == 1
    assert body["controller"] is None  # one machine, no cluster: no controller lease


def test_conclave_nodes_prints_the_table(server, http):
    reported(http)
    shown = subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(server.home), "nodes"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:3] == ["NODE", "HOST", "BACKEND"]
    node_id = (server.home / "node-id").read_text().strip()
    assert row.split()[:3] == [node_id, socket.gethostname(), "cpu"] and MODEL in row and "ago" in row
    assert "LOST" not in row


def test_lost_or_up_is_judged_on_the_brokers_clock_whatever_the_readers_says():
    # Times as the broker stored them; this reader's clock an hour ahead of the broker's (or a minute behind): the
    # node that reported last is up, the one silent 10 s before it lost, either way.
    facts = NodeFacts(id="n1", host="h", memory_total=8 * 10**9, memory_available=4 * 10**9)
    stored = [NodeStatus(facts=facts, memory_used=0, time=1000.0),
              NodeStatus(facts=msgspec.structs.replace(facts, id="n2"), memory_used=0, time=990.0)]
    for now in (1000.0 + 3600, 1000.0 - 60):
        assert [state_of(s, now) for s in on_this_clock(stored, 1000.0, now)] == ["up", "lost"]
    # After the bucket's leader changed: a dead node's last report stamped by the old leader's clock, 100 s ahead of
    # the new leader's, which stored the last report (at 1000): the live node is not judged lost for it.
    dead = msgspec.structs.replace(stored[1], time=1100.0)
    assert state_of(on_this_clock([stored[0], dead], 1000.0, 5000.0)[0], 5000.0) == "up"
    assert on_this_clock([], 0.0, 5.0) == []


def test_a_node_that_stopped_reporting_is_shown_lost_not_dropped():
    facts = NodeFacts(id="n1", host="h", memory_total=8 * 10**9, memory_available=4 * 10**9)
    status = NodeStatus(facts=facts, memory_used=4 * 10**9, time=1000.0)
    assert state_of(status, now=1000.0 + LOST_AFTER_S - 0.1) == "up"
    assert state_of(status, now=1000.0 + LOST_AFTER_S + 0.1) == "lost"
    table = nodes_table([status], now=1012.0).splitlines()
    assert len(table) == 2 and table[1].endswith("12.0s ago (LOST)") and " - " in table[1]  # unmeasured: "-"
    # A model on its way to a node, under the table: how far, how fast, from where; or why it failed.
    arriving = msgspec.structs.replace(status, fetching=[
        FetchProgress(model="qwen", done=3 * 10**9, total=8 * 10**9, source="n2", bytes_per_s=250 * 10**6,
                      files=[FileProgress(name="a.safetensors", done=10**9, total=2 * 10**9),
                             FileProgress(name="b.safetensors", done=0, total=2 * 10**9)]),
        FetchProgress(model="llama", error="from node n2: no space")])
    assert nodes_table([arriving], now=1012.0).splitlines()[2:] == [
        "n1: fetching qwen from n2: 3.0 GB of 8.0 GB at 250 MB/s, 20s left; a.safetensors 1.0 GB of 2.0 GB, 8s left; "
        "b.safetensors 0 MB of 2.0 GB, 16s left",  # the two files share the rate
        "n1: fetching llama failed: from node n2: no space"]


def test_prometheus_metrics_count_answers_and_show_queues_and_nodes(server, client, http):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    reported(http)
    model = (("model", MODEL),)
    before = scrape()
    client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    for _ in client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, stream=True):
        pass
    after = scrape()
    done = (("model", MODEL), ("outcome", "done"))
    assert after[("conclave_requests_total", done)] == before.get(("conclave_requests_total", done), 0) + 2
    assert after[("conclave_ttft_seconds_count", model)] == before.get(("conclave_ttft_seconds_count", model), 0) + 2
    decoded = ("conclave_decode_tokens_per_second_count", model)
    assert after[decoded] == before.get(decoded, 0) + 2
    assert ("conclave_queue_jobs", model) in after
    node = (("host", socket.gethostname()), ("node", (server.home / "node-id").read_text().strip()))
    assert after[("conclave_node_up", node)] == 1
    assert after[("conclave_node_memory_total_bytes", node)] == psutil.virtual_memory().total
    assert ("conclave_node_gpu_percent", node) not in after  # not measured here: absent, not 0


def test_the_node_counts_the_tokens_its_rank_generates(server, client, http):
    def stepped() -> int:  # every rank's count, from its liveness file, as the agent last reported it
        (node,) = reported(http)["nodes"]
        return sum(rank["tokens"] for rank in node["rank_memory"])

    before = stepped()
    answer = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    deadline = time.monotonic() + 30  # the rank writes its count each heartbeat; the agent reports each second
    while stepped() - before < answer.usage.completion_tokens - 1:  # the first token comes from the prefill
        assert time.monotonic() < deadline, (before, stepped(), answer.usage)
        time.sleep(0.2)
    (node,) = reported(http)["nodes"]
    assert node["tokens_per_s"] is not None and node["tokens_per_s"] >= 0


def test_tokens_per_second_is_the_busiest_rank_since_the_last_report():
    from ops.agent import tokens_per_s
    from schemas.cluster import RankCounters

    def rank(pid: int, tokens: int) -> RankCounters:
        return RankCounters(pid=pid, active=0, peak=0, tokens=tokens)

    rate, seen = tokens_per_s([rank(1, 100), rank(2, 40)], {}, at=10.0)
    assert rate is None and seen == {1: (100, 10.0), 2: (40, 10.0)}  # nothing to compare with yet
    rate, seen = tokens_per_s([rank(1, 130), rank(2, 50), rank(3, 7)], seen, at=12.0)
    assert rate == 15.0  # (130 - 100) / 2 s; a new rank (pid 3) counts from the next report
    rate, _ = tokens_per_s([rank(1, 5)], {1: (130, 12.0)}, at=13.0)
    assert rate is None  # a count that went back (a reused pid) is not a rate


def test_the_live_stream_starts_with_a_snapshot_of_this_machine_then_its_reports(server):
    """`GET /v1/cluster/events` (the dashboard's, ingress/live.py) read as any SSE client would: a snapshot first,
    then each node report as it arrives, and throughput samples of the model served."""
    node_id = (server.home / "node-id").read_text().strip()
    events: list[tuple[str, dict]] = []
    with httpx.stream("GET", server.base_url + "/cluster/events", timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, msgspec.json.decode(line.removeprefix("data: "))))
            if {"node", "throughput"} <= {n for n, _ in events}:
                break
    name, snapshot = events[0]
    assert name == "snapshot" and [n["facts"]["id"] for n in snapshot["nodes"]] == [node_id]
    assert snapshot["cluster"] is False and snapshot["audit"] is True and snapshot["controller"] is None
    (model,) = snapshot["models"]
    assert model["id"] == MODEL and model["status"] == "loaded"
    node = next(data for n, data in events if n == "node")
    assert node["facts"]["id"] == node_id and node["state"] == "up" and node["memory_used"] > 0
    sample = next(data for n, data in events if n == "throughput")["models"][MODEL]
    assert set(sample) == {"tokens_per_s", "ttft_s", "in_flight", "queued"}
    assert isinstance(sample["in_flight"], int) and isinstance(sample["queued"], int)  # counted: a page is reading
