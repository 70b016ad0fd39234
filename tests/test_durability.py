"""The JetStream side: jobs are durable records, served even if published before any worker runs."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import nats
import nats.js.errors
import pytest

from pipeline.access import INGRESS, OPERATOR
from pipeline.audit import decode_record, read_records
from pipeline.streams import MAX_DELIVER
from pipeline.subjects import (CANCELS_STREAM, DEAD_STREAM, JOBS_STREAM, RESULTS_STREAM, cancel_subject, dead_subject,
                               job_subject, result_subject, worker_durable)
from schemas.jobs import Cancel, Done, Event, Failed, Job, SamplingParams
from schemas.openai import ChatMessage
from ops.config import free_port
from tests.conftest import (FRANCE, MODEL, SUBMITTER, prepare_streams, start_bare_nats, start_server, start_worker,
                            wait_for_audit_record)

decode_event = msgspec.json.Decoder(Event).decode


async def test_a_duplicate_msg_id_is_served_once(server, client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    nc = await server.connect()
    try:
        js = nc.jetstream()
        # The same Nats-Msg-Id again (a submitter retrying after a lost ack) is dropped by JetStream.
        again = Job(id=reply.id, model=MODEL, reply_subject="conclave.replies.tests.again", kind="chat",
                    messages=[ChatMessage(**m) for m in FRANCE], created=time.time())
        ack = await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(again), headers={"Nats-Msg-Id": reply.id})
        assert ack.duplicate
        # The audit log holds it exactly once (the stream itself is a work queue: a finished job leaves it).
        await wait_for_audit_record(server, lambda r: r.job_id == reply.id)
        operator = await server.connect(OPERATOR)
        records = [decode_record(raw) async for _, raw in read_records(operator.jetstream())]
        await operator.close()
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
    replies = {name: await nc.subscribe(f"conclave.replies.tests.{name}") for name in ("bad", "cancelled", "good")}

    # A malformed job (wrong type for `model`): its submitter gets a schema error, and the worker goes on.
    await js.publish(job_subject(MODEL, SUBMITTER), b'{"id": "bad-1", "reply_subject": "conclave.replies.tests.bad", "model": 5}',
                     headers={"Nats-Msg-Id": "bad-1"})
    # A job cancelled while it waits: never run.
    cancelled = Job(id="job-cancelled", model=MODEL, reply_subject="conclave.replies.tests.cancelled", kind="chat",
                    messages=[ChatMessage(role="user", content="Tell me a long story.")], created=time.time())
    await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(cancelled), headers={"Nats-Msg-Id": cancelled.id})
    await js.publish(cancel_subject(SUBMITTER, cancelled.id), msgspec.json.encode(Cancel(id=cancelled.id)), stream=CANCELS_STREAM)
    good = Job(id="job-good", model=MODEL, reply_subject="conclave.replies.tests.good", kind="chat", stream=False,
               messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0), created=time.time())
    await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(good), headers={"Nats-Msg-Id": good.id})

    worker = start_worker(server, nats_server)
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
    server = start_bare_nats(tmp_path, encryption_key=key)
    nc = await server.connect(OPERATOR)
    await prepare_streams(nc)
    job = Job(id="job-secret", model=MODEL, reply_subject="conclave.replies.tests.r", kind="completion",
              prompt=secret.decode())
    await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    await nc.close()
    server.stop()
    return b"".join(p.read_bytes() for p in (tmp_path / "nats" / "jetstream").rglob("*") if p.is_file())


async def test_jetstream_encryption_at_rest(tmp_path):
    secret, key = b"patient 4711 has condition X", "a-long-random-key-from-the-vault"
    assert secret in await stored_bytes_after(tmp_path / "plain", None, secret)
    assert secret not in await stored_bytes_after(tmp_path / "encrypted", key, secret)
    # The same key reads the queued job back after a restart.
    server = start_bare_nats(tmp_path / "encrypted", encryption_key=key)
    nc = await server.connect(OPERATOR)
    try:
        stored = await nc.jetstream().get_last_msg(JOBS_STREAM, job_subject(MODEL, SUBMITTER))
        assert msgspec.json.decode(stored.data, type=Job).prompt == secret.decode()
    finally:
        await nc.close()
        server.stop()


async def test_job_delivered_max_deliver_times_is_dead_lettered(bare_nats, server):
    nats_server, nc = bare_nats
    js = nc.jetstream()
    replies = await nc.subscribe("conclave.replies.tests.doomed")
    job = Job(id="job-doomed", model=MODEL, reply_subject="conclave.replies.tests.doomed", kind="completion", prompt="Hi",
              created=time.time())
    await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    # Four deliveries that never finish, as if four workers had died on it (the worker's own consumer).
    pull = await js.pull_subscribe_bind(durable=worker_durable(MODEL), stream=JOBS_STREAM)
    for delivery in range(1, MAX_DELIVER):
        (msg,) = await pull.fetch(1, timeout=10)
        assert msg.metadata.num_delivered == delivery
        await msg.nak()
    await pull.unsubscribe()

    worker = start_worker(server, nats_server)
    try:
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and failed.error.code == "max_deliveries" and failed.status == 500
        dead = await js.get_last_msg(DEAD_STREAM, dead_subject(MODEL))
        assert msgspec.json.decode(dead.data, type=Job).id == job.id
        assert dead.headers["Conclave-Deliveries"] == str(MAX_DELIVER)
        record = await wait_for_audit_record(nats_server, lambda r: r.job_id == job.id)
        assert (record.outcome, record.error.code) == ("failed", "max_deliveries")
        assert worker.process.poll() is None
    finally:
        assert worker.stop() == 0


async def test_a_submitter_that_was_away_fetches_its_result_by_job_id(server):
    nc, operator = await server.connect(), await server.connect(OPERATOR)
    try:
        js = nc.jetstream()
        # Nobody listens on the reply subject: the submitter has gone away after publishing.
        job = Job(id="job-away", model=MODEL, reply_subject="conclave.replies.tests.nobody", kind="chat", stream=False,
                  messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0, max_tokens=12),
                  created=time.time())
        await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        # The operator watches the results stream for it (a submitter may not make consumers)...
        subject = result_subject(MODEL, SUBMITTER, job.id)
        watch = await operator.jetstream().subscribe(subject, stream=RESULTS_STREAM, ordered_consumer=True)
        result = decode_event((await watch.next_msg(timeout=180)).data)
        assert isinstance(result, Done) and "Paris" in result.text and result.id == job.id
        # ... and the submitter, back later, reads its final event by its job id.
        stored = await js.get_last_msg(RESULTS_STREAM, subject, direct=True)
        assert decode_event(stored.data) == result
    finally:
        await nc.close()
        await operator.close()


async def test_a_full_queue_answers_429_over_http_and_refuses_nats_publishes(server, tmp_path):
    """The queue limit is per model and submitter: a full queue of HTTP requests answers 429, a NATS submitter's
    full queue refuses its publishes, and neither fills the other's."""
    srv = start_server(tmp_path / "home", "--model", str(server.home / "models" / MODEL), "--max-queued", "2")
    nc, operator = await srv.connect(), await srv.connect(OPERATOR)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "logit_bias": {"2": -100},
            "stream": True}
    try:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:
            # Two HTTP requests: one running, one waiting; the ingress's queue for the model is full.
            streams = [await http.send(http.build_request("POST", "/completions", json=body), stream=True)
                       for _ in range(2)]
            ingress_subject = job_subject(MODEL, INGRESS)
            while (await operator.jetstream().stream_info(JOBS_STREAM, subjects_filter=ingress_subject)
                   ).state.subjects.get(ingress_subject, 0) < 2:
                await asyncio.sleep(0.05)
            response = await http.post("/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 2})
            assert response.status_code == 429 and response.headers["retry-after"] == "5"
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests") and "limit 2" in error["message"]

            # A NATS submitter has a queue of its own, as full after two jobs; the third is refused at publish.
            js = nc.jetstream()
            jobs = [Job(id=f"job-queued-{i}", model=MODEL, reply_subject="conclave.replies.tests.ignored",
                        kind="completion", prompt="Hi", created=time.time()) for i in range(3)]
            for job in jobs[:2]:
                await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
            with pytest.raises(nats.js.errors.APIError) as refused:
                await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(jobs[2]),
                                 headers={"Nats-Msg-Id": jobs[2].id})
            assert refused.value.err_code == 10077  # "maximum messages per subject exceeded"
            for job in jobs[:2]:
                await js.publish(cancel_subject(SUBMITTER, job.id), msgspec.json.encode(Cancel(id=job.id)),
                                 stream=CANCELS_STREAM)
            for stream in streams:  # the clients go away: their jobs are cancelled
                await stream.aclose()
    finally:
        await nc.close()
        await operator.close()
        assert srv.stop() == 0


async def test_jobs_queued_across_a_nats_server_restart_are_all_served(server, tmp_path):
    port = free_port()
    first = start_bare_nats(tmp_path, port)
    nc = await first.connect(OPERATOR)
    await prepare_streams(nc)
    jobs = [Job(id=f"job-restart-{i}", model=MODEL, reply_subject=f"conclave.replies.tests.restart.{i}", kind="completion",
                prompt="The capital of France is", params=SamplingParams(temperature=0, max_tokens=3),
                stream=False, created=time.time()) for i in range(3)]
    for job in jobs:
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    await nc.close()
    first.stop()  # queued jobs are on disk only now

    second = start_bare_nats(tmp_path, port)
    nc = await second.connect()
    replies = [await nc.subscribe(job.reply_subject) for job in jobs]
    worker = start_worker(server, second)
    try:
        for job, sub in zip(jobs, replies):
            done = await final_event(sub)
            assert isinstance(done, Done) and done.id == job.id and "Paris" in done.text
    finally:
        assert worker.stop() == 0
        await nc.close()
        second.stop()


async def test_a_nats_job_out_of_range_gets_the_same_400_as_http(server):
    nc = await server.connect()
    try:
        replies = await nc.subscribe("conclave.replies.tests.hot")
        job = Job(id="job-hot", model=MODEL, reply_subject="conclave.replies.tests.hot", kind="chat",
                  messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=5.0),
                  created=time.time())
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and failed.status == 400
        assert (failed.error.param, failed.error.code) == ("temperature", "invalid_value")
    finally:
        await nc.close()
