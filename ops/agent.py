"""This machine as a node of the cluster: its identity, its facts, and the agent loop that reports them.

For now the agent runs inside `conclave serve` and reports with its operator connection; `conclave join`
(a node without a broker, with its own role) is the next piece. The facts come from psutil (memory, CPU,
disk) and MLX (the backend, Metal's recommended working set). GPU utilisation, temperature and power are
None here: they need macmon (macOS) or NVML (NVIDIA), which this version does not read yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from pipeline.nodes import put_status
from schemas.cluster import NodeFacts, NodeStatus

log = logging.getLogger("conclave.agent")
REPORT_S = 1.0


def node_id(home: Path) -> str:
    """Made once per home and kept: a node's identity survives restarts and renames of its host."""
    path = Path(home) / "node-id"
    if path.exists():  # every report asks: no temporary file each second
        return path.read_text().strip()
    try:  # made whole or not at all: two commands starting on a fresh home agree on one id
        temporary = path.with_name(f"node-id.{uuid.uuid4().hex}")
        temporary.write_text(uuid.uuid4().hex[:12] + "\n")
        os.link(temporary, path)  # fails if another made it first
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_text().strip()


def local_node(home: Path, memory_limit: int | None = None, memory=None) -> NodeFacts:
    """This machine's facts: psutil's memory (or the sample `memory`) and, on Metal, MLX's recommended
    working set; `memory_limit` caps what it offers (an operator's reserve, or a test's)."""
    import mlx.core as mx
    import psutil

    from workers.store import ModelStore

    backend = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "cpu"
    working_set = mx.device_info().get("max_recommended_working_set_size") if backend == "metal" else None
    memory = memory or psutil.virtual_memory()
    available = memory.available if memory_limit is None else min(memory.available, memory_limit)
    return NodeFacts(id=node_id(home), host=socket.gethostname(), backend=backend, memory_total=memory.total,
                     memory_available=available, working_set=working_set,
                     models=[m.id for m in ModelStore(Path(home) / "models").list()])


def node_status(home: Path, ranks: int, memory_limit: int | None = None) -> NodeStatus:
    import psutil

    memory = psutil.virtual_memory()  # one sample: used and available agree
    facts = local_node(home, memory_limit, memory)
    return NodeStatus(facts=facts, memory_used=memory.total - memory.available,
                      cpu_percent=psutil.cpu_percent(interval=None), disk_free=psutil.disk_usage(str(home)).free,
                      ranks=ranks, time=time.time())


async def keep_reporting(link, home: Path, ranks: Callable[[], int], stopping: asyncio.Event,
                         memory_limit: int | None = None) -> None:
    """Put this node's status every REPORT_S until `stopping`; one log line when reporting fails, one when it
    works again."""
    import psutil

    psutil.cpu_percent(interval=None)  # the first reading only starts the measurement
    failing = False
    while not stopping.is_set():
        try:
            status = await asyncio.to_thread(node_status, home, ranks(), memory_limit)
            await put_status(link.nc.jetstream(), status)
            if failing:
                log.info("node status reported again")
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("could not report this node's status: %s", exc)
            failing = True
        try:
            await asyncio.wait_for(stopping.wait(), REPORT_S)
        except asyncio.TimeoutError:
            pass


def nodes_table(statuses: list[NodeStatus], now: float | None = None) -> str:
    """`conclave nodes`: one line per node; "-" for a figure its platform does not give."""
    from ops.placement import budget, gb
    from pipeline.nodes import state_of

    now = now if now is not None else time.time()

    def value(x, form="{}") -> str:
        return "-" if x is None else form.format(x)

    rows = [["NODE", "HOST", "BACKEND", "MEMORY USED/AVAILABLE/TOTAL", "BUDGET", "GPU", "CPU", "TEMP", "POWER",
             "DISK FREE", "MODELS", "RANKS", "LAST SEEN"]]
    for status in statuses:
        f, ago = status.facts, now - status.time
        rows.append([f.id, f.host, f.backend, f"{gb(status.memory_used)}/{gb(f.memory_available)}/{gb(f.memory_total)}",
                     gb(budget(f)), value(status.gpu_percent, "{:.0f}%"), value(status.cpu_percent, "{:.0f}%"),
                     value(status.temperature_c, "{:.0f} C"), value(status.power_w, "{:.0f} W"),
                     value(status.disk_free and gb(status.disk_free)), ",".join(f.models) or "-", str(status.ranks),
                     f"{ago:.1f}s ago" + (" (LOST)" if state_of(status, now) == "lost" else "")])
    if len(rows) == 1:
        return "no node has reported (is `conclave serve` running?)"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
