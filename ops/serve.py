"""`conclave serve`: nats-server (embedded unless --nats-url), one worker process per model, the ingress.

Shutdown order on Ctrl-C / SIGTERM: stop taking HTTP requests, stop the worker (its unfinished job
goes back to JetStream), then stop nats-server, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn

from ingress.app import IngressConfig, create_app
from pipeline.nats_server import EmbeddedNats, child_preexec, stop_process
from schemas.openai import ModelCard
from workers.store import ModelStore, StoredModel, model_context_length

log = logging.getLogger("conclave.serve")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` owns the signals so it can stop the children too."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class WorkerSupervisor:
    """Keeps one worker process running; restarts it (with backoff) if it exits on its own."""

    def __init__(self, command: list[str]):
        self.command = command
        self.process: subprocess.Popen | None = None
        self.stopping = False

    async def run(self) -> None:
        backoff = 1.0
        while not self.stopping:
            self.process = subprocess.Popen(self.command, preexec_fn=child_preexec)
            code = await asyncio.to_thread(self.process.wait)
            if self.stopping:
                return
            log.error("worker pid %d exited with %s; restarting in %.0fs", self.process.pid, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stopping = True
        stop_process(self.process, timeout_s)


def worker_command(model: StoredModel, nats_url: str, heartbeat_s: float, queue_ttl_s: float) -> list[str]:
    return [sys.executable, "-m", "workers.worker", "--model-id", model.id, "--model-dir", str(model.path),
            "--nats-url", nats_url, "--heartbeat", str(heartbeat_s), "--queue-ttl", str(queue_ttl_s)]


async def serve(home: Path, model_spec: str, host: str, port: int, nats_url: str | None, nats_port: int,
                api_key: str | None, queue_timeout_s: float, worker_timeout_s: float, heartbeat_s: float) -> None:
    model = ModelStore(home / "models").resolve(model_spec)
    nats_server = None
    if nats_url is None:
        nats_server = EmbeddedNats(home / "nats", port=nats_port)
        await asyncio.to_thread(nats_server.start)
        nats_url = nats_server.url
    supervisor = WorkerSupervisor(worker_command(model, nats_url, heartbeat_s, queue_timeout_s))
    card = ModelCard(id=model.id, created=model.created, context_length=model_context_length(model.path))
    app = create_app(IngressConfig(nats_url=nats_url, models=[card], queue_timeout_s=queue_timeout_s,
                                   worker_timeout_s=worker_timeout_s, api_key=api_key,
                                   status_ttl_s=4 * heartbeat_s))
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

    async def announce_when_ready():
        while not server.started:
            await asyncio.sleep(0.05)
        await app.state.workers.wait_live(model.id)
        print(f"Conclave is serving {model.id} at http://{host}:{port}/v1 (NATS {nats_url})", flush=True)

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
