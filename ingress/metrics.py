"""Prometheus metrics at `/metrics` (the `prometheus-client` package), one registry per app.

Two kinds: what the ingress observes as answers pass through it (requests by outcome, time to first
token and decode speed per model, from each job's final event), and gauges read when scraped (each
model's queue depth from its consumer, each node's figures from the nodes bucket). A figure a node does
not report (GPU, temperature, power on this platform) is left out, never exported as 0.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from pipeline.nodes import read_nodes, state_of
from schemas.cluster import NodeStatus
from schemas.jobs import Done, Failed

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECODE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0)
log = logging.getLogger("conclave.metrics")
NODE_FIGURES = [  # (metric, help, value of a status)
    ("conclave_node_memory_total_bytes", "Memory of the node", lambda s: s.facts.memory_total),
    ("conclave_node_memory_available_bytes", "Memory the node offers", lambda s: s.facts.memory_available),
    ("conclave_node_memory_used_bytes", "Memory in use on the node", lambda s: s.memory_used),
    ("conclave_node_cpu_percent", "CPU utilisation", lambda s: s.cpu_percent),
    ("conclave_node_gpu_percent", "GPU utilisation", lambda s: s.gpu_percent),
    ("conclave_node_temperature_celsius", "Temperature", lambda s: s.temperature_c),
    ("conclave_node_power_watts", "Power", lambda s: s.power_w),
    ("conclave_node_disk_free_bytes", "Disk free where the models are", lambda s: s.disk_free),
    ("conclave_node_ranks", "Worker rank processes running", lambda s: s.ranks),
    ("conclave_node_tokens_per_second", "Tokens per second its ranks generated over the last report",
     lambda s: s.tokens_per_s),
]


class Scraped:
    """The gauges, from the snapshot the last scrape read (prometheus-client collects synchronously)."""

    def __init__(self):
        self.nodes: list[NodeStatus] = []
        self.queued: dict[str, int] = {}

    def collect(self):
        queue = GaugeMetricFamily("conclave_queue_jobs", "Jobs of the model queued or running in JetStream",
                                  labels=["model"])
        for model, count in self.queued.items():
            queue.add_metric([model], count)
        yield queue
        up = GaugeMetricFamily("conclave_node_up", "1 while the node reports, 0 once it is lost", labels=["node", "host"])
        for status in self.nodes:
            up.add_metric([status.facts.id, status.facts.host], 1 if state_of(status) == "up" else 0)
        yield up
        for name, text, value in NODE_FIGURES:
            family = GaugeMetricFamily(name, text, labels=["node", "host"])
            for status in self.nodes:  # a lost node's last figures are not current: only its conclave_node_up
                if state_of(status) == "up" and (figure := value(status)) is not None:
                    family.add_metric([status.facts.id, status.facts.host], figure)
            yield family


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("conclave_requests", "Requests answered, by model and outcome",
                                ["model", "outcome"], registry=self.registry)
        self.ttft = Histogram("conclave_ttft_seconds", "Time to first token, as the worker measured it",
                              ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.decode = Histogram("conclave_decode_tokens_per_second", "Tokens per second after the first",
                                ["model"], buckets=DECODE_BUCKETS, registry=self.registry)
        self.scraped = Scraped()
        self.registry.register(self.scraped)

    def observe(self, model: str, final: Done | Failed) -> None:
        if isinstance(final, Failed):
            self.requests.labels(model, "cancelled" if final.error.code == "cancelled" else "failed").inc()
            return
        self.requests.labels(model, "done").inc()
        if final.usage.completion_tokens == 0:  # ended before a first token (cancelled while queued): no TTFT
            return
        self.ttft.labels(model).observe(final.ttft_ms / 1000)
        decoding_s = (final.duration_ms - final.ttft_ms) / 1000
        if final.usage.completion_tokens > 1 and decoding_s > 0:
            self.decode.labels(model).observe((final.usage.completion_tokens - 1) / decoding_s)

    async def render(self, ingress) -> bytes:
        try:  # NATS away: the counters still come, with the gauges of the last scrape that read them
            js = ingress.link.nc.jetstream()
            self.scraped.nodes = await read_nodes(js)
            self.scraped.queued = {model: await ingress.admission.queued(js, model) for model in ingress.models}
        except Exception as exc:
            log.warning("metrics: could not read the nodes and queues (%s); serving the last ones read", exc)
        return generate_latest(self.registry)
