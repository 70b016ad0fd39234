"""The JetStream side: jobs are durable records, served even if published before any worker runs."""

from __future__ import annotations

import subprocess
import sys
import time

import msgspec
import nats
import pytest

from pipeline.nats_server import EmbeddedNats
from pipeline.audit import AUDIT_STREAM, AUDIT_SUBJECT
from pipeline.streams import MAX_DELIVER, ensure_streams, worker_consumer_config
from pipeline.subjects import (CANCELS_STREAM, DEAD_STREAM, JOBS_STREAM, RESULTS_STREAM, cancel_subject, dead_subject,
                               job_subject, result_subject, worker_durable)
from schemas.audit import AuditRecord
from schemas.jobs import Cancel, Done, Event, Failed, Job, SamplingParams
from schemas.openai import ChatMessage
from ops.config import free_port
from tests.conftest import FRANCE, MODEL

decode_event = msgspec.json.Decoder(Event).decode


async def test_job_record_is_in_the_stream(server, client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    nc = await nats.connect(server.nats_url)
    try:
        js = nc.jetstream()
        record = await js.get_last_msg(JOBS_STREAM, job_subject(MODEL))
        assert record.headers["Nats-Msg-Id"] == reply.id
        job = msgspec.json.decode(record.data, type=Job)
        assert job.id == reply.id and job.source == "http"
        assert [(m.role, m.content) for m in job.messages] == [("user", FRANCE[0]["content"])]
        assert job.params.temperature == 0 and job.params.max_tokens == 2
        # The same msg id again is recognised as a duplicate and not queued a second time.
        ack = await js.publish(job_subject(MODEL), record.data, headers={"Nats-Msg-Id": reply.id})
        assert ack.duplicate
        assert (await js.get_last_msg(JOBS_STREAM, job_subject(MODEL))).seq == record.seq
    finally:
        await nc.close()


async def next_event(sub, timeout=180.0):
    return decode_event((await sub.next_msg(timeout=timeout)).data)


async def final_event(sub):
    while not isinstance(event := await next_event(sub), (Done, Failed)):
        pass
    return event


@pytest.fixture
async def bare_nats(tmp_path):
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    server.start()
    nc = await nats.connect(server.url)
    await ensure_streams(nc.jetstream())
    yield server, nc
    await nc.close()
    server.stop()


async def test_jobs_published_before_a_worker_are_served(bare_nats, server):
    nats_server, nc = bare_nats
    js = nc.jetstream()
    replies = {name: await nc.subscribe(f"test.replies.{name}") for name in ("bad", "cancelled", "good")}

    # A malformed job (wrong type for `model`): its submitter gets a schema error, and the worker goes on.
    await js.publish(job_subject(MODEL), b'{"id": "bad-1", "reply_subject": "test.replies.bad", "model": 5}',
                     headers={"Nats-Msg-Id": "bad-1"})
    # A job cancelled while it waits: never run.
    cancelled = Job(id="job-cancelled", model=MODEL, reply_subject="test.replies.cancelled", kind="chat",
                    messages=[ChatMessage(role="user", content="Tell me a long story.")], created=time.time())
    await js.publish(job_subject(MODEL), msgspec.json.encode(cancelled), headers={"Nats-Msg-Id": cancelled.id})
    await js.publish(cancel_subject(cancelled.id), msgspec.json.encode(Cancel(id=cancelled.id)), stream=CANCELS_STREAM)
    good = Job(id="job-good", model=MODEL, reply_subject="test.replies.good", kind="chat", stream=False,
               messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0), created=time.time())
    await js.publish(job_subject(MODEL), msgspec.json.encode(good), headers={"Nats-Msg-Id": good.id})

    worker = subprocess.Popen([sys.executable, "-m", "workers.worker", "--model-id", MODEL, "--model-dir",
                               str(server.home / "models" / MODEL), "--nats-url", nats_server.url,
                               "--heartbeat", "0.5"])
    try:
        bad = await next_event(replies["bad"])
        assert isinstance(bad, Failed) and bad.error.code == "invalid_job" and bad.status == 400
        assert "model" in bad.error.message
        skipped = await final_event(replies["cancelled"])
        assert isinstance(skipped, Failed) and skipped.error.code == "cancelled"
        done = await final_event(replies["good"])
        assert isinstance(done, Done) and "Paris" in done.text and done.finish_reason == "stop"
        assert worker.poll() is None
    finally:
        worker.terminate()
        assert worker.wait(30) == 0


async def stored_bytes_after(tmp_path, key: str | None, secret: bytes) -> bytes:
    """Queue a job containing `secret` on a fresh nats-server, stop it, return every byte it stored."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), encryption_key=key)
    server.start()
    nc = await nats.connect(server.url)
    await ensure_streams(nc.jetstream())
    job = Job(id="job-secret", model=MODEL, reply_subject="r", kind="completion", prompt=secret.decode())
    await nc.jetstream().publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    await nc.close()
    server.stop()
    return b"".join(p.read_bytes() for p in (tmp_path / "nats" / "jetstream").rglob("*") if p.is_file())


async def test_jetstream_encryption_at_rest(tmp_path):
    secret, key = b"patient 4711 has condition X", "a-long-random-key-from-the-vault"
    assert secret in await stored_bytes_after(tmp_path / "plain", None, secret)
    assert secret not in await stored_bytes_after(tmp_path / "encrypted", key, secret)
    # The same key reads the queued job back after a restart.
    server = EmbeddedNats(tmp_path / "encrypted" / "nats", port=free_port(), encryption_key=key)
    server.start()
    nc = await nats.connect(server.url)
    try:
        stored = await nc.jetstream().get_last_msg(JOBS_STREAM, job_subject(MODEL))
        assert msgspec.json.decode(stored.data, type=Job).prompt == secret.decode()
    finally:
        await nc.close()
        server.stop()


async def test_job_delivered_max_deliver_times_is_dead_lettered(bare_nats, server):
    nats_server, nc = bare_nats
    js = nc.jetstream()
    replies = await nc.subscribe("test.replies.doomed")
    job = Job(id="job-doomed", model=MODEL, reply_subject="test.replies.doomed", kind="completion", prompt="Hi",
              created=time.time())
    await js.publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    # Four deliveries that never finish, as if four workers had died on it (the worker's own consumer).
    pull = await js.pull_subscribe(job_subject(MODEL), durable=worker_durable(MODEL), stream=JOBS_STREAM,
                                   config=worker_consumer_config(MODEL, ack_wait_s=2.5))
    for delivery in range(1, MAX_DELIVER):
        (msg,) = await pull.fetch(1, timeout=10)
        assert msg.metadata.num_delivered == delivery
        await msg.nak()
    await pull.unsubscribe()

    worker = subprocess.Popen([sys.executable, "-m", "workers.worker", "--model-id", MODEL, "--model-dir",
                               str(server.home / "models" / MODEL), "--nats-url", nats_server.url,
                               "--heartbeat", "0.5"])
    try:
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and failed.error.code == "max_deliveries" and failed.status == 500
        dead = await js.get_last_msg(DEAD_STREAM, dead_subject(MODEL))
        assert msgspec.json.decode(dead.data, type=Job).id == job.id
        assert dead.headers["Conclave-Deliveries"] == str(MAX_DELIVER)
        record = msgspec.json.decode((await js.get_last_msg(AUDIT_STREAM, AUDIT_SUBJECT)).data, type=AuditRecord)
        assert (record.job_id, record.outcome, record.error.code) == (job.id, "failed", "max_deliveries")
        assert worker.poll() is None
    finally:
        worker.terminate()
        assert worker.wait(30) == 0


async def test_a_submitter_that_was_away_fetches_its_result_by_job_id(server):
    nc = await nats.connect(server.nats_url)
    try:
        js = nc.jetstream()
        # Nobody listens on the reply subject: the submitter has gone away after publishing.
        job = Job(id="job-away", model=MODEL, reply_subject="test.replies.nobody", kind="chat", stream=False,
                  messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0, max_tokens=12),
                  created=time.time())
        await js.publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        # Back later, it reads the final event from the results stream (watching the subject, no polling).
        watch = await js.subscribe(result_subject(job.id), stream=RESULTS_STREAM, ordered_consumer=True)
        result = decode_event((await watch.next_msg(timeout=180)).data)
        assert isinstance(result, Done) and "Paris" in result.text and result.id == job.id
        stored = await js.get_last_msg(RESULTS_STREAM, result_subject(job.id))
        assert decode_event(stored.data) == result
    finally:
        await nc.close()
