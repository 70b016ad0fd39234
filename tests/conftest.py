"""A real deployment per test session: embedded nats-server, a real worker, the real ingress, over HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import openai
import pytest

from ops.credentials import cluster_ca, issue_submitter, role_identity, write_private
from ops.spawn import ServerProcess, spawn_server
from pipeline.access import OPERATOR, Identity
from workers.cpu_path import rank_command

MODEL = "SmolLM2-135M-Instruct"
SUBMITTER = "tests"  # the suite's own NATS submitter, issued in every home before its server starts
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def submitter_identity(home: Path) -> Identity:
    """The suite's submitter in `home`, issued on first use (before a server starts: no reload to wait for)."""
    path = Path(home) / f"{SUBMITTER}.nk"
    if not path.exists():
        Path(home).mkdir(parents=True, exist_ok=True)
        write_private(path, issue_submitter(home, SUBMITTER))
    return Identity(SUBMITTER, path)


async def connect_as(home: Path, url: str, role: str = SUBMITTER, **options):
    """A nats-py connection to `url` as a role of `home` (default: the suite's submitter)."""
    import nats as nats_client

    identity = submitter_identity(home) if role == SUBMITTER else role_identity(home, role)
    if url.startswith("tls://"):  # a cluster's broker (serve --cluster): TLS with the CA made in that home
        identity = replace(identity, ca_file=cluster_ca(home))
    return await nats_client.connect(url, **identity.connect_options(), **options)


class Server(ServerProcess):
    async def connect(self, role: str = SUBMITTER, **options):
        return await connect_as(self.home, self.nats_url, role, **options)

    def health(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=10).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["models"][MODEL]["live_workers"]]

    def worker_pid(self) -> int:
        (pid,) = self.worker_pids()
        return pid


def start_server(home: Path, *flags: str, heartbeat: float = 0.5) -> Server:
    # A short heartbeat and worker timeout so that a killed worker is noticed within seconds.
    submitter_identity(home)
    return Server(**vars(spawn_server(home, "--heartbeat", str(heartbeat), "--worker-timeout", "5",
                                      "--checkpoint-interval", "1", *flags)))


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


async def wait_for_audit_record(server, predicate, timeout_s: float = 60.0):
    """The first audit record matching `predicate` in `server`'s audit log (read as the operator: no other
    role may), once it is there: this watches the audit subject instead of guessing a delay.
    """
    from pipeline.audit import decode_record
    from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM

    nc = await server.connect(OPERATOR)
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


def start_worker(server, broker, *flags: str) -> WorkerProcess:
    """A worker for the bundled model (from the session server's store) on `broker` (a Server or a Broker),
    heartbeat 0.5 s, with the worker role's credentials of the broker's home. Its consumer must exist."""
    from pipeline.access import worker_role

    seed = role_identity(broker.home, worker_role(MODEL)).seed_file
    process = subprocess.Popen([*rank_command("workers.worker"), "--model-id", MODEL, "--model-dir",
                                str(server.home / "models" / MODEL), "--nats-url", broker.nats_url, "--nats-seed", str(seed),
                                "--heartbeat", "0.5", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    worker = WorkerProcess(process)

    def read_lines():
        for line in process.stdout:
            worker.output.append(line)
            sys.stdout.write(line)

    threading.Thread(target=read_lines, daemon=True).start()
    return worker


@dataclass
class Broker:
    """An authenticated nats-server started by a test, and the home holding its credentials."""

    home: Path
    server: object  # pipeline.nats_server.EmbeddedNats

    @property
    def url(self) -> str:
        return self.server.url

    nats_url = url

    async def connect(self, role: str = SUBMITTER, **options):
        return await connect_as(self.home, self.url, role, **options)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def start_bare_nats(home: Path, port: int | None = None, **options) -> Broker:
    """An authenticated nats-server of its own in `home` (its roles: operator, the worker of MODEL, the suite's
    submitter); `prepare_streams` gives it Conclave's streams and MODEL's consumer."""
    from ops.config import free_port
    from ops.credentials import public_keys, write_authorization
    from pipeline.access import worker_role
    from pipeline.nats_server import EmbeddedNats

    for role in (OPERATOR, worker_role(MODEL)):
        role_identity(home, role)
    submitter_identity(home)
    server = EmbeddedNats(home / "nats", port=port or free_port(), **options)
    write_authorization(server.store_dir, public_keys(home))
    server.start()
    return Broker(home, server)


async def prepare_streams(nc) -> None:
    from pipeline.streams import ensure_consumer, ensure_streams

    await ensure_streams(nc.jetstream())
    await ensure_consumer(nc.jetstream(), MODEL, 2.5)  # 5 heartbeats of start_worker's 0.5 s


@pytest.fixture
async def bare_nats(tmp_path):
    """A nats-server of the test's own (`start_bare_nats` in tmp_path), and an operator's connection to it."""
    server = start_bare_nats(tmp_path)
    nc = await server.connect(OPERATOR)
    await prepare_streams(nc)
    yield server, nc
    await nc.close()
    server.stop()
