"""The JetStream side: jobs are durable records, served even if published before any worker runs."""

from __future__ import annotations

import time

import httpx
import msgspec
import nats
import nats.js.errors
import pytest

from pipeline.nats_server import EmbeddedNats
from pipeline.audit import decode_record, read_records
from pipeline.streams import MAX_DELIVER, ensure_streams, worker_consumer_config
from pipeline.subjects import (CANCELS_STREAM, DEAD_STREAM, JOBS_STREAM, RESULTS_STREAM, cancel_subject, dead_subject,
                               job_subject, result_subject, worker_durable)
from schemas.jobs import Cancel, Done, Event, Failed, Job, SamplingParams
from schemas.openai import ChatMessage
from ops.config import free_port
from tests.conftest import FRANCE, MODEL, start_server, start_worker, wait_for_audit_record

decode_event = msgspec.json.Decoder(Event).decode


async def test_a_duplicate_msg_id_is_served_once(server, client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    nc = await nats.connect(server.nats_url)
    try:
        js = nc.jetstream()
        # The same Nats-Msg-Id again (a submitter retrying after a lost ack) is dropped by JetStream.
        again = Job(id=reply.id, model=MODEL, reply_subject="test.replies.again", kind="chat",
                    messages=[ChatMessage(**m) for m in FRANCE], created=time.time())
        ack = await js.publish(job_subject(MODEL), msgspec.json.encode(again), headers={"Nats-Msg-Id": reply.id})
        assert ack.duplicate
        # The audit log holds it exactly once (the stream itself is a work queue: a finished job leaves it).
        await wait_for_audit_record(server.nats_url, lambda r: r.job_id == reply.id)
        records = [decode_record(raw) async for _, raw in read_records(js)]
        mine = [r for r in records if r.job_id == reply.id]
        assert len(mine) == 1 and mine[0].job.source == "http" and mine[0].job.params.max_tokens == 2
    finally:
        await nc.close()


async def next_event(sub, timeout=180.0):
    return decode_event((await sub.next_msg(timeout=timeout)).data)


async def final_event(sub):
    while not isinstance(event := await next_event(sub), (Done, Failed)):
        pass
    return event


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

    worker = start_worker(server, nats_server.url)
    try:
        bad = await next_event(replies["bad"])
        assert isinstance(bad, Failed) and bad.error.code == "invalid_job" and bad.status == 400
        assert "model" in bad.error.message
        skipped = await final_event(replies["cancelled"])
        assert isinstance(skipped, Failed) and skipped.error.code == "cancelled"
        done = await final_event(replies["good"])
        assert isinstance(done, Done) and "Paris" in done.text and done.finish_reason == "stop"
        assert worker.process.poll() is None
    finally:
        assert worker.stop() == 0


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

    worker = start_worker(server, nats_server.url)
    try:
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and failed.error.code == "max_deliveries" and failed.status == 500
        dead = await js.get_last_msg(DEAD_STREAM, dead_subject(MODEL))
        assert msgspec.json.decode(dead.data, type=Job).id == job.id
        assert dead.headers["Conclave-Deliveries"] == str(MAX_DELIVER)
        record = await wait_for_audit_record(nats_server.url, lambda r: r.job_id == job.id)
        assert (record.outcome, record.error.code) == ("failed", "max_deliveries")
        assert worker.process.poll() is None
    finally:
        assert worker.stop() == 0


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


async def test_a_full_queue_answers_429_over_http_and_refuses_nats_publishes(server, tmp_path):
    srv = start_server(tmp_path / "home", "--model", str(server.home / "models" / MODEL), "--max-queued", "2")
    nc = await nats.connect(srv.nats_url)
    try:
        js = nc.jetstream()
        long_jobs = [Job(id=f"job-long-{i}", model=MODEL, reply_subject="test.replies.ignored", kind="completion",
                         prompt="Once upon a time", params=SamplingParams(temperature=0, max_tokens=400),
                         created=time.time()) for i in range(2)]
        for job in long_jobs:  # one running, one waiting: the model's limit of 2
            await js.publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})

        response = httpx.post(srv.base_url + "/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": FRANCE, "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests") and "limit 2" in error["message"]

        third = Job(id="job-third", model=MODEL, reply_subject="r", kind="completion", prompt="Hi")
        with pytest.raises(nats.js.errors.APIError) as refused:
            await js.publish(job_subject(MODEL), msgspec.json.encode(third), headers={"Nats-Msg-Id": third.id})
        assert refused.value.err_code == 10077  # "maximum messages per subject exceeded"
        for job in long_jobs:
            await js.publish(cancel_subject(job.id), msgspec.json.encode(Cancel(id=job.id)), stream=CANCELS_STREAM)
    finally:
        await nc.close()
        assert srv.stop() == 0


async def test_jobs_queued_across_a_nats_server_restart_are_all_served(server, tmp_path):
    port = free_port()
    first = EmbeddedNats(tmp_path / "nats", port=port)
    first.start()
    nc = await nats.connect(first.url)
    await ensure_streams(nc.jetstream())
    jobs = [Job(id=f"job-restart-{i}", model=MODEL, reply_subject=f"test.replies.restart.{i}", kind="completion",
                prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=3),
                stream=False, created=time.time()) for i in range(3)]
    for job in jobs:
        await nc.jetstream().publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    await nc.close()
    first.stop()  # queued jobs are on disk only now

    second = EmbeddedNats(tmp_path / "nats", port=port)
    second.start()
    nc = await nats.connect(second.url)
    replies = [await nc.subscribe(job.reply_subject) for job in jobs]
    worker = start_worker(server, second.url)
    try:
        for job, sub in zip(jobs, replies):
            done = await final_event(sub)
            assert isinstance(done, Done) and done.id == job.id and "Paris" in done.text
    finally:
        assert worker.stop() == 0
        await nc.close()
        second.stop()


async def test_a_nats_job_out_of_range_gets_the_same_400_as_http(server):
    nc = await nats.connect(server.nats_url)
    try:
        replies = await nc.subscribe("test.replies.hot")
        job = Job(id="job-hot", model=MODEL, reply_subject="test.replies.hot", kind="chat",
                  messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=5.0),
                  created=time.time())
        await nc.jetstream().publish(job_subject(MODEL), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and failed.status == 400
        assert (failed.error.param, failed.error.code) == ("temperature", "invalid_value")
    finally:
        await nc.close()
