"""This machine as a node of the cluster: its identity, its facts, and the agent loop that reports them.

The agent runs inside `conclave serve` (reporting with its operator connection) and `conclave join` (as the
node's own `node-<id>` role, ops/node.py). The facts come from psutil (memory, CPU,
disk) and MLX (the backend, Metal's recommended working set); GPU utilisation, temperature and power, the
network interfaces and RDMA devices from ops/telemetry.py (macmon on macOS, NVML on NVIDIA; None where
neither measures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from pipeline.connection import sleep_unless
from pipeline.nodes import node_subject, put_status
from schemas.catalogue import FetchProgress
from schemas.cluster import NodeFacts, NodeStatus, RankCounters

log = logging.getLogger("conclave.agent")
REPORT_S = 1.0
NET_KINDS = [("ethernet", "eth"), ("thunderbolt", "tb"), ("wifi", "wifi")]  # `conclave nodes`' NET column


def node_id(home: Path) -> str:
    """Made once per home and kept: a node's identity survives restarts and renames of its host."""
    path = Path(home) / "node-id"
    if path.exists():  # every report asks: no temporary file each second
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # made whole or not at all: two commands starting on a fresh home agree on one id
        temporary = path.with_name(f"node-id.{uuid.uuid4().hex}")
        temporary.write_text(uuid.uuid4().hex[:12] + "\n")
        os.link(temporary, path)  # fails if another made it first
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass(frozen=True)
class Offer:
    """What an agent says of its node besides what it measures."""

    memory_limit: int | None = None  # caps the memory it offers (an operator's reserve, or a test's)
    address: str = ""  # where other nodes' ranks reach it
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # this start of the agent


def local_node(home: Path, offer: Offer, memory=None, held: int = 0) -> NodeFacts:
    """This machine's facts: psutil's memory (or the sample `memory`) and, on Metal, MLX's recommended
    working set; the offer's memory limit caps what it offers (an operator's reserve, or a test's). What its
    ranks hold (`held`, MLX's active memory) counts as available: the controller takes off what each instance's
    plan reserves here (ops/placement.py: offers), loaded or not, so a rank's memory is counted once."""
    import mlx.core as mx
    import psutil

    from workers.store import ModelStore

    backend = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "cpu"
    working_set = mx.device_info().get("max_recommended_working_set_size") if backend == "metal" else None
    memory = memory or psutil.virtual_memory()
    store = ModelStore(Path(home) / "models")
    limit = offer.memory_limit
    available = memory.available + held if limit is None else min(memory.available + held, limit)
    return NodeFacts(id=node_id(home), host=socket.gethostname(), backend=backend, memory_total=memory.total,
                     memory_available=available, working_set=working_set,
                     models=[m.id for m in store.list()], shards=store.shards(),
                     address=offer.address, session=offer.session)


def node_status(home: Path, ranks: list[Path], offer: Offer) -> NodeStatus:
    """Blocks for a GPU sample on macOS (ops/telemetry.py: MACMON_SAMPLE_MS): run it in a thread."""
    import psutil

    from ops.telemetry import gpu_reading, network_facts
    from workers.status import read_counters

    memory = psutil.virtual_memory()  # one sample: used and available agree
    counters = [c for c in map(read_counters, ranks) if c is not None]
    facts = local_node(home, offer, memory, sum(c.active for c in counters))
    gpu = gpu_reading()
    network = network_facts()  # found again every NETWORK_REFRESH_S, not every report
    return NodeStatus(facts=facts, memory_used=memory.total - memory.available,
                      cpu_percent=psutil.cpu_percent(interval=None), gpu_percent=gpu.gpu_percent,
                      temperature_c=gpu.temperature_c, power_w=gpu.power_w,
                      disk_free=psutil.disk_usage(str(home)).free, ranks=len(ranks),
                      rank_memory=counters,
                      interfaces=network.interfaces, rdma_devices=network.rdma, thunderbolt=network.thunderbolt,
                      rdma_enabled=network.rdma_enabled, time=time.time())


def tokens_per_s(counters: list[RankCounters], before: dict[int, tuple[int, float]],
                 at: float) -> tuple[float | None, dict[int, tuple[int, float]]]:
    """The node's tokens per second since the last report, and what to compare the next one with: for each rank
    seen then (by pid), the tokens it stepped since over the time since; the largest, since the ranks of one group
    step the same tokens (a node's ranks of one pipeline would otherwise count them twice). None when no rank
    was seen at the last report."""
    rates = [(c.tokens - before[c.pid][0]) / (at - before[c.pid][1]) for c in counters
             if c.pid in before and at > before[c.pid][1] and c.tokens >= before[c.pid][0]]
    return (round(max(rates), 1) if rates else None), {c.pid: (c.tokens, at) for c in counters}


async def keep_reporting(link, home: Path, ranks: Callable[[], list[Path]], stopping: asyncio.Event,
                         offer: Offer, fetching: Callable[[], list] = list) -> None:
    """Put this node's status every REPORT_S until `stopping`; one log line when reporting fails, one when it
    works again. Then delete it: a node stopped cleanly leaves the table at once instead of being lost 3 s later,
    and, being gone before its controller (if it ran one) hands the lease over, is not where the next one places."""
    import psutil

    psutil.cpu_percent(interval=None)  # the first reading only starts the measurement
    failing, seen = False, {}
    while not stopping.is_set():
        try:
            status = await asyncio.to_thread(node_status, home, ranks(), offer)
            rate, seen = tokens_per_s(status.rank_memory, seen, status.time)
            status = msgspec.structs.replace(status, tokens_per_s=rate, fetching=fetching())
            await put_status(link.nc.jetstream(), status)
            if failing:
                log.info("node status reported again")
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("could not report this node's status: %s", exc)
            failing = True
        await sleep_unless(stopping, REPORT_S)
    with contextlib.suppress(Exception):
        await link.nc.publish(node_subject(node_id(home)), b"", headers={"KV-Operation": "DEL"})
        await link.nc.flush(timeout=2)


def nodes_table(statuses: list[NodeStatus], now: float | None = None) -> str:
    """`conclave nodes`: one line per node; "-" for a figure its platform does not give."""
    from ops.placement import budget, gb
    from pipeline.nodes import state_of

    now = now if now is not None else time.time()

    def value(x, form="{}") -> str:
        return "-" if x is None else form.format(x)

    def network(status: NodeStatus) -> str:  # "eth:1,tb:2,rdma:2": interfaces up by kind, RDMA devices
        up = [i.kind for i in status.interfaces if i.up]
        counts = [f"{short}:{up.count(kind)}" for kind, short in NET_KINDS if kind in up]
        counts += [f"rdma:{len(status.rdma_devices)}"] if status.rdma_devices else []
        return ",".join(counts) or "-"

    rows = [["NODE", "HOST", "BACKEND", "MEMORY USED/AVAILABLE/TOTAL", "BUDGET", "GPU", "CPU", "TEMP", "POWER",
             "DISK FREE", "NET", "MODELS", "RANKS", "TOK/S", "LAST SEEN"]]
    for status in statuses:
        f, ago = status.facts, now - status.time
        rows.append([f.id, f.host, f.backend, f"{gb(status.memory_used)}/{gb(f.memory_available)}/{gb(f.memory_total)}",
                     gb(budget(f)), value(status.gpu_percent, "{:.0f}%"), value(status.cpu_percent, "{:.0f}%"),
                     value(status.temperature_c, "{:.0f} C"), value(status.power_w, "{:.0f} W"),
                     value(status.disk_free and gb(status.disk_free)), network(status), ",".join(f.models) or "-",
                     str(status.ranks), value(status.tokens_per_s, "{:.1f}"),
                     f"{ago:.1f}s ago" + (" (LOST)" if state_of(status, now) == "lost" else "")])
    if len(rows) == 1:
        return "no node has reported (is `conclave serve` running?)"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + [fetch_line(s.facts.id, p) for s in statuses for p in s.fetching])


def fetch_line(node: str, progress: FetchProgress) -> str:
    """A model arriving at a node (ops/model_files.py), under the table."""
    from ops.placement import gb

    if progress.error:
        return f"{node}: fetching {progress.model} failed: {progress.error}"
    rate = (f" at {gb(progress.bytes_per_s)}/s, {(progress.total - progress.done) / progress.bytes_per_s:.0f}s left"
            if progress.bytes_per_s else "")
    source = f" from {progress.source}" if progress.source else ""
    # Each file on its way, with its time left at its share of the rate (the files in flight share it).
    files = "".join(f"; {f.name} {gb(f.done)} of {gb(f.total)}" + (
        f", {(f.total - f.done) * len(progress.files) / progress.bytes_per_s:.0f}s left" if progress.bytes_per_s else "")
        for f in progress.files)
    return f"{node}: fetching {progress.model}{source}: {gb(progress.done)} of {gb(progress.total)}{rate}{files}"
