"""A real deployment per test session: embedded nats-server, a real worker, the real ingress, over HTTP."""

from __future__ import annotations

import sys
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

    The client must get a clean error, not a hang: 300 tokens take about 30 s here, and a broken worker or
    group is noticed within seconds.
    """
    stream = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=300, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 1:
                    break_worker()
                    job_id = chunk.id
    assert 1 <= len(received) < 300
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
