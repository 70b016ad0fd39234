"""A real deployment per test session: embedded nats-server, a real worker, the real ingress, over HTTP."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from ops.config import free_port

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    nats_url: str
    home: Path
    output: list[str]

    def health(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=10).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["models"][MODEL]["live_workers"]]

    def worker_pid(self) -> int:
        (pid,) = self.worker_pids()
        return pid


def wait_for_line(process: subprocess.Popen, marker: str, timeout_s: float, output: list[str]) -> None:
    """Block on the process's stdout until `marker` appears (the server prints it once it is ready)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not selector.select(left):
            break
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("server exited before it was ready:\n" + "".join(output))
        output.append(line)
        if marker in line:
            return
    raise TimeoutError(f"no {marker!r} within {timeout_s}s:\n" + "".join(output))


def start_server(home: Path, *extra: str, heartbeat: float = 0.5) -> Server:
    port, nats_port = free_port(), free_port()
    env = {**os.environ, "CONCLAVE_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port), "--nats-port", str(nats_port),
         "--heartbeat", str(heartbeat), "--worker-timeout", "5", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    output: list[str] = []
    wait_for_line(process, "Conclave is serving", 180, output)
    # Keep draining the server's output (a full pipe would block it) and keep it for failure reports.
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    return Server(process, f"http://127.0.0.1:{port}/v1", f"nats://127.0.0.1:{nats_port}", home, output)


def stop_server(server: Server) -> int:
    server.process.send_signal(signal.SIGTERM)
    return server.process.wait(60)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("conclave-home"))
    yield srv
    stop_server(srv)
    sys.stdout.write("".join(srv.output[-200:]))


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer(server):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(server.home / "models" / MODEL)
