"""Worker death and server shutdown: clean errors, no hung connections, no orphan processes."""

from __future__ import annotations

import os
import signal
import socket

import httpx
import pytest

from pipeline.audit import decode_record, read_records
from ops.spawn import wait_for_line
from pipeline.access import OPERATOR
from tests.conftest import FRANCE, MODEL, start_server, stream_until_broken, wait_for_audit_record



async def test_killed_worker_gives_a_clean_error_then_recovers(server, client):
    pid = server.worker_pid()
    message, job_id = stream_until_broken(client, lambda: os.kill(pid, signal.SIGKILL))
    # Either the ingress noticed the silence, or the restarted worker took the redelivered job first.
    assert "stopped responding" in message or "failed mid-generation" in message
    # The supervisor restarts the worker; the next request waits in the queue for it and succeeds.
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert any(p != pid for p in server.worker_pids())
    # The ingress cancelled the job it gave up on, so its redelivery is skipped or stopped: the audit log has
    # exactly one record for it (the killed delivery wrote none), and it says so.
    record = await wait_for_audit_record(server, lambda r: r.job_id == job_id)
    assert record.outcome == "cancelled" and record.attempt >= 2
    nc = await server.connect(OPERATOR)
    try:
        assert [decode_record(raw).job_id async for _, raw in read_records(nc.jetstream())].count(job_id) == 1
    finally:
        await nc.close()


def test_sigterm_stops_every_process(tmp_path):
    srv = start_server(tmp_path / "home")
    worker = srv.worker_pid()
    nats_port = int(srv.nats_url.rsplit(":", 1)[1])
    assert srv.stop() == 0
    wait_for_line(srv.output, "Conclave stopped.", 10)  # (its last lines may still be on their way to `output`)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", nats_port), timeout=2).close()


async def test_client_disconnect_stops_a_non_streamed_request(server, http):
    # The client gives up after 5 s on an answer of up to 8,000 tokens that cannot end early (its end token is
    # suppressed): the worker must stop soon after, on any machine.
    prompt = "Write a long story about a lighthouse keeper and a whale."
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", timeout=5, json={"model": MODEL, "max_tokens": 8000, "temperature": 0,
                                                        "logit_bias": {"2": -100},
                                                        "messages": [{"role": "user", "content": prompt}]})
    record = await wait_for_audit_record(
        server, lambda r: bool(r.job and r.job.messages and r.job.messages[0].content == prompt))
    assert record.outcome == "cancelled" and record.error.code == "cancelled" and record.finish_reason is None
    assert 0 < record.usage.completion_tokens < 8000
