"""A real deployment per test session: embedded nats-server, a real worker, the real ingress, over HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from ops.spawn import ServerProcess, spawn_server

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


class Server(ServerProcess):
    def health(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=10).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["models"][MODEL]["live_workers"]]

    def worker_pid(self) -> int:
        (pid,) = self.worker_pids()
        return pid


def start_server(home: Path, *flags: str, heartbeat: float = 0.5) -> Server:
    # A short heartbeat and worker timeout so that a killed worker is noticed within seconds.
    return Server(**vars(spawn_server(home, "--heartbeat", str(heartbeat), "--worker-timeout", "5", *flags)))


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("conclave-home"))
    yield srv
    srv.stop()
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


def stream_until_broken(client: openai.OpenAI, break_worker) -> tuple[str, str]:
    """Stream a long answer, call `break_worker` after the first text; return the error the client got
    and the request (job) id.

    The client must get a clean error, not a hang. The answer cannot end before the break on any machine:
    its end-of-sequence token is suppressed and it may run to 4,000 tokens (seconds even on a fast GPU),
    while a broken worker or group is noticed within seconds.
    """
    stream = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=4000, stream=True,
                                            logit_bias={"2": -100})
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 1:
                    break_worker()
                    job_id = chunk.id
    assert 1 <= len(received) < 4000
    return str(caught.value), job_id


async def wait_for_audit_record(nats_url: str, predicate, timeout_s: float = 60.0):
    """The first audit record matching `predicate`, once the worker has appended it.

    A worker appends the record just after it sends the final event, so a client can have its answer a
    moment before the record exists; this watches the audit subject instead of guessing a delay.
    """
    import nats as nats_client

    from pipeline.audit import decode_record
    from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM

    nc = await nats_client.connect(nats_url)
    try:
        watch = await nc.jetstream().subscribe(f"{AUDIT_PREFIX}.>", stream=AUDIT_STREAM, ordered_consumer=True)
        while True:
            record = decode_record((await watch.next_msg(timeout=timeout_s)).data)
            if predicate(record):
                return record
    finally:
        await nc.close()


@dataclass
class WorkerProcess:
    """A standalone worker (python -m workers.worker), its output kept line by line."""

    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.output)

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


def start_worker(server, nats_url: str, *flags: str) -> WorkerProcess:
    """A worker for the bundled model (from the session server's store) on `nats_url`, heartbeat 0.5 s."""
    process = subprocess.Popen([sys.executable, "-m", "workers.worker", "--model-id", MODEL, "--model-dir",
                                str(server.home / "models" / MODEL), "--nats-url", nats_url, "--heartbeat", "0.5",
                                *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = WorkerProcess(process)

    def read_lines():
        for line in process.stdout:
            worker.output.append(line)
            sys.stdout.write(line)

    threading.Thread(target=read_lines, daemon=True).start()
    return worker


@pytest.fixture
async def bare_nats(tmp_path):
    """A nats-server of the test's own, with Conclave's streams, and a connection to it."""
    import nats as nats_client

    from ops.config import free_port
    from pipeline.nats_server import EmbeddedNats
    from pipeline.streams import ensure_streams

    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    server.start()
    nc = await nats_client.connect(server.url)
    await ensure_streams(nc.jetstream())
    yield server, nc
    await nc.close()
    server.stop()
