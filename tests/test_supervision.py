"""Every process is supervised: a killed or stopped nats-server or worker comes back, and the jobs it held are
answered, each settled once. One deployment of its own (one job at a time), used by the tests in turn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.audit import decode_record, read_records
from pipeline.subjects import JOBS_STREAM, worker_durable
from pipeline.access import OPERATOR
from tests.conftest import FRANCE, MODEL, start_server, wait_for_audit_record

EOS = 2  # <|im_end|>, suppressed so that a job runs for exactly its max_tokens


def eventually(condition, timeout_s: float = 120.0, what: str = "the condition"):
    """Poll `condition()` until it is true (a state another process reaches; there is no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.1)
    return value


def nats_server_pid(home: Path) -> int:
    """The embedded nats-server of the deployment in `home`, from /proc (Linux, where CI runs)."""
    config = str(home / "nats" / "nats-server.conf")
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and command[0].endswith(b"nats-server") and config.encode() in command:
            return int(entry.name)
    raise LookupError(f"no nats-server with {config}")


@pytest.fixture(scope="module")
def deployment(server, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("supervised"), "--model", str(server.home / "models" / MODEL),
                       "--max-batch", "1")
    yield srv
    assert srv.stop() == 0


def client_of(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)


async def records_by_job(srv) -> dict[str, int]:
    nc = await srv.connect(OPERATOR)
    try:
        counts: dict[str, int] = {}
        async for _, raw in read_records(nc.jetstream()):
            job_id = decode_record(raw).job_id
            counts[job_id] = counts.get(job_id, 0) + 1
        return counts
    finally:
        await nc.close()


async def queued_jobs(srv) -> int:
    nc = await srv.connect(OPERATOR)
    try:
        return (await nc.jetstream().consumer_info(JOBS_STREAM, worker_durable(MODEL))).num_pending
    finally:
        await nc.close()


async def test_a_killed_nats_server_is_restarted_and_the_jobs_it_held_are_answered_once(deployment):
    client = client_of(deployment)
    with ThreadPoolExecutor(2) as pool:
        # One job holds the batch's only slot for 40 tokens; a second waits in JetStream's store behind it.
        running = pool.submit(client.completions.create, model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=40,
                              logit_bias={str(EOS): -100})
        eventually(lambda: any(w["active"] for w in deployment.health()["models"][MODEL]["live_workers"]),
                   what="the first job running")
        queued = pool.submit(client.chat.completions.create, model=MODEL, messages=FRANCE, temperature=0,
                             max_tokens=12)
        while await queued_jobs(deployment) < 1:
            await asyncio.sleep(0.1)
        pid = nats_server_pid(deployment.home)
        os.kill(pid, signal.SIGKILL)
        answer = queued.result(timeout=300)
        assert "Paris" in answer.choices[0].message.content
        try:
            first = running.result(timeout=300)
            assert first.usage.completion_tokens == 40
            ids = [first.id, answer.id]
        except openai.APIError as exc:  # a clean error is allowed for the job that was running, not a hang
            assert exc.code in ("worker_lost",), exc
            ids = [answer.id]
    log = "".join(deployment.output)
    assert f"nats-server (pid {pid}) exited with signal SIGKILL; restarting it on the same store" in log
    assert "Traceback" not in log
    for job_id in ids:
        await wait_for_audit_record(deployment, lambda r: r.job_id == job_id)
    counts = await records_by_job(deployment)
    assert [counts[job_id] for job_id in ids] == [1] * len(ids)


async def test_a_stopped_worker_is_restarted_and_a_waiting_stream_hears_from_the_server_meanwhile(deployment):
    pid = deployment.worker_pid()
    os.kill(pid, signal.SIGSTOP)  # alive but frozen: it neither exits nor answers
    try:
        lines = []
        body = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 12, "stream": True}
        with httpx.stream("POST", deployment.base_url + "/chat/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if line == "data: [DONE]":
                    break
    finally:
        with contextlib.suppress(ProcessLookupError):  # the supervisor killed it, as it should
            os.kill(pid, signal.SIGCONT)
    # Before any text, the stream said it was waiting: a client with a read timeout does not give up.
    first_text = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
    assert any(line.startswith(": waiting") for line in lines[:first_text])
    assert "Paris" in "".join(lines) and lines[-1] == "data: [DONE]"
    assert f"worker rank 0 (pid {pid} on localhost) stopped responding" in "".join(deployment.output)
    assert deployment.worker_pid() != pid


async def test_a_request_answered_503_because_nats_did_not_answer_never_runs(deployment):
    pid = nats_server_pid(deployment.home)
    os.kill(pid, signal.SIGSTOP)  # connections stay open, nothing answers
    try:
        response = httpx.post(deployment.base_url + "/chat/completions", timeout=120,
                              json={"model": MODEL, "messages": FRANCE, "max_tokens": 12})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_unavailable"
    job_id = response.headers["x-request-id"]
    # Its publish may still have reached the queue: a worker settles it with the 503 its client got, unrun.
    record = await wait_for_audit_record(deployment, lambda r: r.job_id == job_id)
    assert (record.outcome, record.error.code) == ("failed", "queue_unavailable")
    still = client_of(deployment).chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    assert "Paris" in still.choices[0].message.content
