"""How a worker shows that it is alive: a status message on NATS for the ingress, a file for its supervisor.

Two audiences, two channels. The ingress (health, admission control) reads `WorkerStatus` on
`conclave.status.<model>` every heartbeat. The supervisor in `conclave serve` cannot rely on NATS (it
must also see a worker that is alive while NATS is down, and a stopped one while NATS is up), so every
rank also touches a file in its group's folder every heartbeat, from its event loop: a process that is
stopped (SIGSTOP) or whose event loop hangs stops touching it, and the supervisor restarts the group.
A model thread that hangs while the event loop runs is the step watchdog's case (workers/worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import msgspec
import nats

from pipeline.connection import sleep_unless
from pipeline.subjects import status_subject
from schemas.cluster import RankCounters
from schemas.jobs import WorkerStatus
from workers.files import replace_whole

if TYPE_CHECKING:  # (mlx-lm, seconds to import: not for the supervisor and the agent, which read alive files)
    from workers.generation import Generation

log = logging.getLogger("conclave.worker")
encode = msgspec.json.Encoder().encode
decode_counters = msgspec.json.Decoder(RankCounters).decode


@dataclass
class Progress:
    """What a rank has done, for its liveness file: the tokens its batch engine stepped through (workers/lockstep.py;
    every rank of a group steps the same ones). Its node's agent turns them into the node's tokens per second."""

    tokens: int = 0


def alive_file(folder: Path, rank: int) -> Path:
    """The file rank `rank` of a group touches every heartbeat (read by ops/supervise.py)."""
    return Path(folder) / f"rank-{rank}.alive"


class ServiceTimes:
    """Moving averages of how long this worker's jobs take, for the ingress's admission control
    (ingress/admission.py): how long a job holds a batch slot, and how long its prefill holds the
    batch's one joining slot (joins are prefilled one at a time). And its time to first token, for the dashboard."""

    weight = 0.2  # of the newest job

    def __init__(self):
        self.job_s = 0.0
        self.prefill_s = 0.0
        self.ttft_s = 0.0

    def observe(self, generation: Generation, finished: float) -> None:
        if not generation.joined or not generation.first_token:
            return  # never joined the batch (cancelled or refused while waiting)
        job_s, prefill_s = finished - generation.joined, generation.first_token - generation.joined
        ttft_s = generation.ttft_ms / 1000
        if not self.job_s:
            self.job_s, self.prefill_s, self.ttft_s = job_s, prefill_s, ttft_s
            return
        self.job_s += self.weight * (job_s - self.job_s)
        self.prefill_s += self.weight * (prefill_s - self.prefill_s)
        self.ttft_s += self.weight * (ttft_s - self.ttft_s)


async def report_status(nc, status: Callable[[], WorkerStatus], heartbeat_s: float, stopping: asyncio.Event) -> None:
    """Publish `status()` every heartbeat until `stopping`. A publish that fails (NATS restarting) is
    retried at the next beat: the loop itself never ends on an error."""
    failing = False
    while not stopping.is_set():
        current = status()
        try:
            await nc.publish(status_subject(current.model), encode(current))
            failing = False
        except nats.errors.Error as exc:
            if not failing:
                log.warning("could not publish this worker's status (%s); retrying every heartbeat", exc)
            failing = True
        await sleep_unless(stopping, heartbeat_s)


def write_counters(path: Path, counters: RankCounters) -> None:
    """Replaced whole: its node's agent reads it at any moment (read half-written, the node was reported without
    the rank's counters)."""
    replace_whole(path, encode(counters))


def read_counters(path: Path) -> RankCounters | None:
    """What a rank last wrote to its liveness file; None while it has written nothing."""
    try:
        return decode_counters(path.read_bytes())
    except (OSError, msgspec.MsgspecError):
        return None


async def keep_alive(path: Path | None, heartbeat_s: float, stopping: asyncio.Event, progress: Progress) -> None:
    """Write `path` every heartbeat (its time says the rank lives; its content is the rank's MLX memory and
    progress, which its node's agent reports); stop the process (set `stopping`) once its supervisor is gone, so
    that no worker lingers as an orphan."""
    import mlx.core as mx

    parent = os.getppid()
    while not stopping.is_set():
        if path is not None:
            try:
                write_counters(path, RankCounters(pid=os.getpid(), active=mx.get_active_memory(),
                                                  peak=mx.get_peak_memory(), tokens=progress.tokens))
            except OSError as exc:
                log.warning("could not write %s: %s", path, exc)
        if os.getppid() != parent:
            log.warning("parent process exited; stopping")
            stopping.set()
        await sleep_unless(stopping, heartbeat_s)
