"""The model's thread: runs the batch (workers/lockstep.py) whenever jobs wait to join it.

MLX work is synchronous, so the model lives on one dedicated thread. The asyncio side `submit`s
validated jobs; the thread hands them to the batch between steps (`admit`), in their order. The
asyncio side reads `stalled_s` to tell a batch that stopped making progress (a hung rank, a hung
kernel, a stopped process) from one that is merely busy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from workers.generation import Generation
from workers.lockstep import BatchEngine

log = logging.getLogger("conclave.worker")


class BatchScheduler:
    def __init__(self, engine: BatchEngine, heartbeat_s: float):
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.busy = False  # the thread is inside a batch
        self.waiting: deque[Generation] = deque()  # validated, waiting to join the batch
        self.lock = threading.Lock()
        self.work = threading.Event()  # set while `waiting` is not empty, or to wake the thread to stop
        self.closed = threading.Event()

    def stalled_s(self) -> float:
        """Seconds since the batch last made a step, while it runs; 0 while idle."""
        return time.monotonic() - self.engine.shard.last_step if self.busy else 0.0

    def run(self, before_batch: Callable[[], None], on_failure: Callable[[Exception, list], bool]) -> None:
        """The thread's loop, until `halt`. `before_batch` runs as a batch starts (a group wakes its
        followers there). When a step raises, `on_failure(exc, rows)` gets the rows the batch held and
        says whether to go on (a single process) or end the thread (a group: its ranks are out of step)."""
        while not self.closed.is_set():
            if not self.work.wait(timeout=self.heartbeat_s) or self.closed.is_set():
                continue
            self.engine.shard.last_step = time.monotonic()
            self.busy = True
            try:
                before_batch()
                self.engine.run(self.admit)
            except Exception as exc:
                log.exception("batch failed")
                if not on_failure(exc, self.engine.drop()):
                    return
            finally:
                self.busy = False

    def submit(self, generation: Generation) -> None:
        with self.lock:
            if self.closed.is_set():  # stopping: the model's thread takes no more jobs
                generation.on_leave("halted")
                return
            self.waiting.append(generation)
            self.work.set()

    def admit(self, fits: Callable[[Generation], bool] | None) -> Generation | None:
        """The first waiting job if `fits(it)` (the batch's test: room, and its joining group's size), which
        joins the batch now. Jobs cancelled while waiting end here, whether or not one is taken."""
        joining = None
        with self.lock:
            for generation in [g for g in self.waiting if g.cancelled.is_set()]:  # even when the batch is full
                self.waiting.remove(generation)
                generation.on_leave("cancelled")
            if fits is not None and self.waiting and fits(self.waiting[0]):
                joining = self.waiting.popleft()
                joining.joined = time.perf_counter()
            if not self.waiting:
                self.work.clear()
        return joining

    def halt(self) -> None:
        """Stop: the batch drops its jobs at its next step, waiting jobs are handed back, the thread ends."""
        self.engine.halt = True
        with self.lock:
            while self.waiting:
                self.waiting.popleft().on_leave("halted")
        self.closed.set()
        self.work.set()
