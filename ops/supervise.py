"""Keeping `conclave serve`'s children running: the embedded nats-server, and each model's worker group.

Both are restarted with backoff (1 s, doubling to 30 s, back to 1 s after a minute of good running),
and each failure is said in one log line: what exited, how, and when it comes back.

A worker group is only as alive as its least alive rank. The supervisor restarts the whole group
when any rank exits, and also when a local rank stops touching its liveness file
(workers/status.py) for STALE_HEARTBEATS heartbeats: a process that is stopped (SIGSTOP) or whose
event loop hangs neither exits nor answers, and would otherwise hold its jobs for good.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from ops.group import GroupSpec, HostSpec, Launcher, start_group
from pipeline.connection import sleep_unless
from pipeline.nats_server import EmbeddedNats, stop_process
from workers.status import alive_file

log = logging.getLogger("conclave.serve")
# A group id names its wake-up subject and its ranks' folders: never the same twice in one process, also when a
# controller replaces the supervisor after re-placing a model (ops/controller.py).
GROUP_NUMBERS = itertools.count(1)
STALE_HEARTBEATS = 20  # a liveness file this many heartbeats old (and at least 10 s) means a hung rank


def describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class Backoff:
    def __init__(self, first_s: float = 1.0, most_s: float = 30.0, healthy_s: float = 60.0):
        self.first_s, self.most_s, self.healthy_s = first_s, most_s, healthy_s
        self.next_s = first_s

    def after(self, ran_s: float) -> float:
        """The pause before the next start, for a run that lasted `ran_s`."""
        if ran_s > self.healthy_s:
            self.next_s = self.first_s  # it had been running well: a new failure, not a crash loop
        pause, self.next_s = self.next_s, min(self.next_s * 2, self.most_s)
        return pause


async def keep_broker_running(server: EmbeddedNats, stopping: asyncio.Event) -> None:
    """Restart the embedded nats-server whenever it exits, on the same port and store: queued jobs are on
    disk, and every client (ingress, workers) reconnects to it by itself."""
    backoff = Backoff()
    while not stopping.is_set():
        started = time.monotonic()
        process = server.process
        code = await asyncio.to_thread(process.wait)
        if stopping.is_set():
            return
        pause = backoff.after(time.monotonic() - started)
        log.error("nats-server (pid %d) exited with %s; restarting it on the same store in %.0fs", process.pid,
                  describe_exit(code), pause)
        while not stopping.is_set():
            await sleep_unless(stopping, pause)  # a stop during the pause ends it
            if stopping.is_set():
                return
            try:
                await asyncio.to_thread(server.start)
                if stopping.is_set():  # `serve` stopped while it was starting: it must not outlive it
                    await asyncio.to_thread(server.stop)
                    return
                log.info("nats-server restarted (pid %d)", server.process.pid)
                break
            except (OSError, RuntimeError, TimeoutError) as exc:
                pause = backoff.after(0)
                log.error("nats-server did not start (%s); trying again in %.0fs", exc, pause)


class GroupSupervisor:
    """Keeps one model's worker group running: every rank, started together, restarted together.

    A rank blocked in a collective cannot recover, so when any rank exits or hangs the rest are stopped
    and the whole group is started again. A single worker process is a group of one.
    """

    def __init__(self, spec: GroupSpec, command: Callable[[str, Path], list[str]], workdir: Path,
                 heartbeat_s: float, launchers: Callable[[HostSpec], Launcher] | None = None):
        self.spec = spec
        self.launchers = launchers  # None: local or ssh by host (ops/group.py: launcher_for)
        self.command = command  # (group id, its folder) -> the argv every rank runs
        self.workdir = workdir
        self.stale_s = max(STALE_HEARTBEATS * heartbeat_s, 10.0)
        self.processes: list[subprocess.Popen] = []
        self.folder: Path | None = None  # the current group's: rank files and liveness files
        self.stopping = False
        # `stop` runs on another thread than `run`: never let a group start after (or while) it stops.
        self.lock = threading.Lock()

    def running(self) -> list[Path]:
        """The liveness files of the group's rank processes alive on this machine (a node's status reports them;
        a remote rank's process here is its ssh client or an agent's stand-in, not the rank)."""
        hosts, folder = self.spec.placements(), self.folder
        return [alive_file(folder, rank) for rank, (process, host) in enumerate(zip(list(self.processes), hosts))
                if process.poll() is None and host.is_local]

    def start(self) -> bool:
        with self.lock:
            if self.stopping:
                return False
            group_id = f"{os.getpid()}-{next(GROUP_NUMBERS)}"
            self.folder = self.workdir / group_id
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.processes = start_group(self.spec, self.command(group_id, self.folder), self.folder,
                                             self.launchers)
            except OSError as exc:  # e.g. no ssh, or a host's launcher failed: retried with backoff
                log.error("could not start worker group %s: %s", group_id, exc)
                self.processes = []
                return False
            return True

    async def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            started = time.monotonic()
            if await asyncio.to_thread(self.start):
                failures = await asyncio.to_thread(self.wait_failure)
                if self.stopping:
                    return
                hosts = self.spec.placements()
                pause = backoff.after(time.monotonic() - started)
                for rank, what in failures:
                    log.error("worker rank %d (pid %d on %s) %s", rank, self.processes[rank].pid,
                              hosts[rank].ssh if rank < len(hosts) else "?", what)
                log.error("stopping the other rank(s) of the group and restarting it in %.0fs", pause)
                await asyncio.to_thread(self.tear_down)
            else:
                pause = backoff.after(0)
            await asyncio.sleep(pause)

    def wait_failure(self) -> list[tuple[int, str]]:
        """The ranks that exited or hung, with what happened, once there is one (or we are stopping)."""
        local = self.spec.placements()
        while not self.stopping:
            failures = [(rank, f"exited with {describe_exit(p.returncode)}")
                        for rank, p in enumerate(self.processes) if p.poll() is not None]
            for rank, process in enumerate(self.processes):
                stale = self.stale_for(rank) if rank < len(local) and local[rank].is_local else 0.0
                if process.returncode is None and stale > self.stale_s:
                    process.kill()  # SIGKILL works on a stopped process too
                    failures.append((rank, f"stopped responding (no heartbeat for {stale:.0f}s): killed"))
            if failures:
                return failures
            time.sleep(0.2)  # polling a handful of child processes; os.wait would steal other children
        return []

    def stale_for(self, rank: int) -> float:
        """Seconds since rank `rank` last touched its liveness file (0 before its first touch)."""
        try:
            return time.time() - alive_file(self.folder, rank).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def stop_ranks(self, leader_timeout_s: float, follower_timeout_s: float) -> None:
        """SIGTERM the leader and wait for it, then the followers; SIGKILL whatever outlives its timeout.

        Leader first: a stopped leader finishes its current step sequence with the followers (they are
        still there) and hands its unfinished jobs back to JetStream, or, after a rank failed, answers
        its requesters (its watchdog sees the group stalled within a heartbeat).
        """
        if self.processes:
            leader, *followers = self.processes
            stop_process(leader, leader_timeout_s)
            for process in followers:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in followers:
                stop_process(process, follower_timeout_s)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def tear_down(self) -> None:
        """After a rank failed. Followers get no grace: a rank blocked in a collective whose peer is gone
        never returns to handle a signal."""
        self.stop_ranks(leader_timeout_s=10.0, follower_timeout_s=0.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        with self.lock:
            self.stopping = True
            self.stop_ranks(timeout_s, timeout_s)
