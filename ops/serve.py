"""`conclave serve`: nats-server (embedded unless --nats-url), one worker process per model, the ingress.

Shutdown order on Ctrl-C / SIGTERM: stop taking HTTP requests, stop the worker (its unfinished job
goes back to JetStream), then stop nats-server, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import uvicorn

from ingress.app import IngressConfig, create_app
from ops.config import free_port
from ops.group import GroupSpec, GroupSpecError, plan_group, python_command, rank_arguments, start_group
from pipeline.nats_server import KEY_VARIABLE, EmbeddedNats, stop_process
from schemas.openai import ModelCard
from workers.store import ModelStore, StoredModel, model_context_length

log = logging.getLogger("conclave.serve")
READY_LINE = "Conclave is serving"  # printed once the worker is ready; launchers wait for it


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` owns the signals so it can stop the children too."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class GroupSupervisor:
    """Keeps one model's worker group running: every rank, started together, restarted together.

    A group is only as alive as its least alive rank: when any rank exits, the rest are stopped
    (a rank blocked in a collective cannot recover) and the whole group is started again, with backoff.
    A single worker process is a group of one.
    """

    def __init__(self, spec: GroupSpec, command: Callable[[str], list[str]], workdir: Path):
        self.spec = spec
        self.command = command  # group id -> the argv every rank runs
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        self.stopping = False
        self.starts = 0
        # `stop` runs on another thread than `run`: never let a group start after (or while) it stops.
        self.lock = threading.Lock()

    def start(self) -> bool:
        with self.lock:
            if self.stopping:
                return False
            self.starts += 1
            group_id = f"{os.getpid()}-{self.starts}"
            try:
                self.processes = start_group(self.spec, self.command(group_id), self.workdir / group_id)
            except OSError as exc:  # e.g. no ssh, or a host's launcher failed: retried with backoff
                log.error("could not start worker group %s: %s", group_id, exc)
                self.processes = []
                return False
            return True

    async def run(self) -> None:
        backoff = 1.0
        while not self.stopping:
            started = time.monotonic()
            if await asyncio.to_thread(self.start):
                exited = await asyncio.to_thread(self.wait_any)
                if self.stopping:
                    return
                if time.monotonic() - started > 60:
                    backoff = 1.0  # it had been running well: this is a new failure, not a crash loop
                hosts = self.spec.placements()
                for rank, code in exited:
                    log.error("worker rank %d (pid %d on %s) exited with %s", rank, self.processes[rank].pid,
                              hosts[rank].ssh if rank < len(hosts) else "?", describe_exit(code))
                log.error("stopping the other rank(s) of the group and restarting it in %.0fs", backoff)
                await asyncio.to_thread(self.tear_down)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def wait_any(self) -> list[tuple[int, int]]:
        """The ranks that have exited, with their exit codes, once there is one (or we are stopping)."""
        while not self.stopping:
            exited = [(rank, p.returncode) for rank, p in enumerate(self.processes) if p.poll() is not None]
            if exited:
                return exited
            time.sleep(0.2)  # polling a handful of child processes; os.wait would steal other children
        return []

    def stop_ranks(self, leader_timeout_s: float, follower_timeout_s: float) -> None:
        """SIGTERM the leader and wait for it, then the followers; SIGKILL whatever outlives its timeout.

        Leader first: a stopped leader finishes its current step sequence with the followers (they are
        still there) and hands its unfinished job back to JetStream, or, after a rank failed, answers
        its requester (its watchdog sees the group stalled within a heartbeat).
        """
        if not self.processes:
            return
        leader, *followers = self.processes
        stop_process(leader, leader_timeout_s)
        for process in followers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in followers:
            stop_process(process, follower_timeout_s)

    def tear_down(self) -> None:
        """After a rank failed. Followers get no grace: a rank blocked in a collective whose peer is gone
        never returns to handle a signal."""
        self.stop_ranks(leader_timeout_s=10.0, follower_timeout_s=0.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        with self.lock:
            self.stopping = True
            self.stop_ranks(timeout_s, timeout_s)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


@dataclass
class ServerProcess:
    """A `conclave serve` started as a child process on free loopback ports."""

    process: subprocess.Popen
    base_url: str  # ends in /v1
    nats_url: str
    home: Path
    output: list[str]  # its stdout and stderr, line by line

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as an operator would, and its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def spawn_server(home: Path, *flags: str, timeout_s: float = 180.0) -> ServerProcess:
    """Start `conclave serve` and return once it printed READY_LINE (for tests and `conclave bench`)."""
    port, nats_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "--home", str(home), "serve", "--port", str(port),
         "--nats-port", str(nats_port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # One thread reads every line (a full pipe would block the server) and keeps them for failure reports.
    # Waiting on the pipe with select() instead would miss lines already read into the file's buffer: two
    # ranks logging in the same millisecond arrive in one read.
    output: list[str] = []
    ready = threading.Event()

    def read_lines():
        for line in process.stdout:
            output.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()  # end of output: the server exited

    threading.Thread(target=read_lines, daemon=True).start()
    if not ready.wait(timeout_s):
        process.kill()
        raise TimeoutError(f"no {READY_LINE!r} within {timeout_s}s:\n" + "".join(output))
    if not any(READY_LINE in line for line in output):
        raise RuntimeError("the server exited before it was ready:\n" + "".join(output))
    return ServerProcess(process, f"http://127.0.0.1:{port}/v1", f"nats://127.0.0.1:{nats_port}", home, output)


@dataclass
class WorkerSettings:
    """What every worker process (every rank of a group alike) is started with; see workers/worker.py."""

    heartbeat_s: float = 2.0
    queue_ttl_s: float = 600.0
    step_timeout_s: float = 60.0
    max_batch: int = 16
    prefix_cache_gb: float = 4.0

    def arguments(self) -> list[str]:
        return ["--heartbeat", str(self.heartbeat_s), "--queue-ttl", str(self.queue_ttl_s), "--step-timeout",
                str(self.step_timeout_s), "--max-batch", str(self.max_batch), "--prefix-cache-gb",
                str(self.prefix_cache_gb)]


def worker_command(model: StoredModel, spec: GroupSpec, nats_url: str,
                   settings: WorkerSettings) -> Callable[[str], list[str]]:
    def command(group_id: str) -> list[str]:
        return python_command("workers.worker", "--model-id", model.id, "--model-dir", str(model.path),
                              "--nats-url", nats_url, "--group-id", group_id, *settings.arguments(),
                              *rank_arguments(spec))

    return command


async def serve(home: Path, model_spec: str, host: str, port: int, nats_url: str | None, nats_port: int,
                api_key: str | None, worker_timeout_s: float, group: GroupSpec, settings: WorkerSettings) -> None:
    model = ModelStore(home / "models").resolve(model_spec)
    group = plan_group(group, model.path)
    if nats_url is None and not all(h.is_local for h in group.hosts):
        raise GroupSpecError("a group with ranks on other hosts needs --nats-url: a NATS server every host can "
                             "reach (the embedded one listens on 127.0.0.1 only)")
    if group.size > 1:
        log.info("serving %s on %d ranks (%s parallel, %s backend%s)", model.id, group.size, group.layout,
                 group.backend, f", layers per rank {group.split}" if group.split else "")
    nats_server = None
    if nats_url is None:
        nats_server = EmbeddedNats(home / "nats", port=nats_port, encryption_key=os.environ.get(KEY_VARIABLE))
        await asyncio.to_thread(nats_server.start)
        nats_url = nats_server.url
    supervisor = GroupSupervisor(group, worker_command(model, group, nats_url, settings), home / "groups")
    card = ModelCard(id=model.id, created=model.created, context_length=model_context_length(model.path))
    app = create_app(IngressConfig(nats_url=nats_url, models=[card], queue_timeout_s=settings.queue_ttl_s,
                                   worker_timeout_s=worker_timeout_s, api_key=api_key,
                                   status_ttl_s=4 * settings.heartbeat_s))
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

    async def announce_when_ready():
        while not server.started:
            await asyncio.sleep(0.05)
        await app.state.workers.wait_live(model.id)
        print(f"{READY_LINE} {model.id} at http://{host}:{port}/v1 (NATS {nats_url})", flush=True)

    workers = asyncio.create_task(supervisor.run())
    ready = asyncio.create_task(announce_when_ready())
    try:
        await server.serve()
    finally:
        ready.cancel()
        await asyncio.to_thread(supervisor.stop)
        workers.cancel()
        if nats_server is not None:
            await asyncio.to_thread(nats_server.stop)
        print("Conclave stopped.", flush=True)
