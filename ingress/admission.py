"""Which workers are live, and whether a new request can start soon enough to be worth queueing.

Admission control by expected wait, not only by count: a request that would wait longer than
`--max-queue-wait` for a place in a batch is answered 429 at once, with `Retry-After`, instead of
being queued behind hundreds of others until its client gives up. The estimate:

    jobs      = jobs of the model queued or running (JetStream's consumer, and at least this
                ingress's own unfinished requests, which it counts exactly)
    capacity  = sum of the live workers' --max-batch
    rate      = jobs a worker can start per second: a batch slot frees every `job_s` seconds, and
                joining jobs are prefilled one at a time, each taking `prefill_s` (moving averages the
                workers report), so min(max_batch / job_s, 1 / prefill_s), summed over workers
    wait      = 0 while jobs < capacity, else (jobs - capacity + 1) / rate

Until a worker has finished a job there is nothing to estimate from, and the count limit
(`--max-queued`, enforced by JetStream) is the only one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import anyio

from pipeline.subjects import JOBS_STREAM, worker_durable
from schemas.jobs import WorkerStatus


@dataclass
class WorkerTable:
    """Live workers per model, from their periodic WorkerStatus messages."""

    ttl_s: float
    seen: dict[str, tuple[WorkerStatus, float]] = field(default_factory=dict)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def update(self, status: WorkerStatus) -> None:
        self.seen[status.worker] = (status, time.monotonic())
        self.changed.set()
        self.changed = anyio.Event()

    def live(self, model: str) -> list[WorkerStatus]:
        now = time.monotonic()
        return [s for s, t in self.seen.values()
                if s.model == model and now - t < self.ttl_s and s.state in ("ready", "busy")]

    async def wait_live(self, model: str) -> None:
        while not self.live(model):
            await self.changed.wait()


def expected_wait_s(workers: list[WorkerStatus], jobs: int) -> float | None:
    """Seconds until one more job could join a batch, with `jobs` queued or running; None if unknown."""
    capacity = sum(w.max_batch for w in workers)
    if capacity == 0:
        return None
    if jobs < capacity:
        return 0.0
    measured = [w for w in workers if w.job_s > 0 and w.prefill_s > 0]
    if not measured:
        return None
    rate = sum(min(w.max_batch / w.job_s, 1 / w.prefill_s) for w in measured)
    return (jobs - capacity + 1) / rate


class Admission:
    """This ingress's view of each model's queue: its own unfinished requests, and the consumer's counts
    (read from JetStream at most every `refresh_s`, so a burst of requests costs one lookup)."""

    def __init__(self, workers: WorkerTable, max_wait_s: float, refresh_s: float = 0.5):
        self.workers = workers
        self.max_wait_s = max_wait_s
        self.refresh_s = refresh_s
        self.mine: Counter[str] = Counter()  # requests published by this ingress and not yet finished
        self.counted: dict[str, tuple[int, float]] = {}  # model -> (jobs in JetStream, when read)
        self.lock = asyncio.Lock()

    async def queued(self, js, model: str) -> int:
        """Jobs of the model in JetStream, queued or running, as last read."""
        async with self.lock:
            count, at = self.counted.get(model, (0, 0.0))
            if time.monotonic() - at > self.refresh_s:
                try:
                    info = await js.consumer_info(JOBS_STREAM, worker_durable(model), timeout=1.0)
                    count = info.num_pending + info.num_ack_pending
                except Exception:  # no consumer yet, or NATS busy: keep the last count
                    pass
                self.counted[model] = (count, time.monotonic())
        return count

    async def enter(self, js, model: str) -> int | None:
        """None: the request is admitted and counted until `leave`. Otherwise the seconds after which a retry
        is likely to be admitted. Deciding and counting happen with no await between them, so a burst of
        requests is counted one by one."""
        queued = await self.queued(js, model)
        wait = expected_wait_s(self.workers.live(model), max(queued, self.mine[model]))
        if wait is not None and wait > self.max_wait_s:
            return max(1, min(60, math.ceil(wait - self.max_wait_s)))
        self.mine[model] += 1
        return None

    def leave(self, model: str) -> None:
        self.mine[model] -= 1
