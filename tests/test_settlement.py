"""Every job settled exactly once: one result, one audit record, one ack, whoever settles it and how often."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec

from pipeline.audit import decode_record, read_records
from pipeline.settle import Delivery, Settler
from pipeline.subjects import JOBS_STREAM, RESULTS_STREAM, job_subject, result_subject, worker_durable
from schemas.jobs import Accepted, Chunk, Done, Event, Failed, Job, SamplingParams
from schemas.openai import ErrorDetail, Usage
from tests.conftest import MODEL, SUBMITTER, start_worker, wait_for_audit_record

decode_event = msgspec.json.Decoder(Event).decode
EOS = 2  # <|im_end|>, suppressed so that a job runs for exactly its max_tokens


def done(job: Job, text: str) -> Done:
    return Done(id=job.id, text=text, finish_reason="stop", worker=text, ttft_ms=1.0, duration_ms=2.0,
                usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4))


async def records_of(js, job_id: str) -> list:
    return [r for r in [decode_record(raw) async for _, raw in read_records(js)] if r.job_id == job_id]


async def test_a_job_settled_many_times_at_once_is_settled_once(bare_nats):
    _, nc = bare_nats
    js = nc.jetstream()
    job = Job(id="job-settle", model=MODEL, reply_subject="conclave.replies.tests.settle", kind="completion", prompt="Hi")
    replies = await nc.subscribe(job.reply_subject)
    await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    pull = await js.pull_subscribe_bind(durable=worker_durable(MODEL), stream=JOBS_STREAM)
    (msg,) = await pull.fetch(1, timeout=10)
    # A group's watchdog and the job's own end settle one delivery at the same moment; a second worker that
    # also ran the job (a redelivery) settles another delivery of it.
    mine, theirs = Settler(nc, MODEL, "worker-a"), Settler(nc, MODEL, "worker-b")
    first = Delivery(job.id, job, job.reply_subject, 1, msg=msg, model=MODEL, submitter=SUBMITTER)
    again = Delivery(job.id, job, job.reply_subject, 2, msg=msg, model=MODEL, submitter=SUBMITTER)
    lost = Failed(id=job.id, status=503, error=ErrorDetail(message="lost", type="server_error", code="worker_lost"))
    standing = await asyncio.gather(mine.settle(first, done(job, "from a")), mine.settle(first, lost),
                                    theirs.settle(again, done(job, "from b")))
    # One final event stands, and every settle answered with it.
    assert standing[0] == standing[1] == standing[2] and isinstance(standing[0], Done)
    stored = await js.get_last_msg(RESULTS_STREAM, result_subject(MODEL, SUBMITTER, job.id))
    assert decode_event(stored.data) == standing[0]
    (record,) = await records_of(js, job.id)
    assert record.output == standing[0].text and record.outcome == "done"
    assert (await js.stream_info(JOBS_STREAM)).state.messages == 0  # acked: it left the queue
    finals = [decode_event((await replies.next_msg(timeout=5)).data) for _ in range(2)]
    assert all(final == standing[0] for final in finals)
    # A later delivery of the same id (a redelivery after a lost ack, or the id published again) finds it.
    assert await mine.stored(first) == standing[0]


async def events_until_final(sub, seen: list) -> Done | Failed:
    while True:
        event = decode_event((await sub.next_msg(timeout=180)).data)
        seen.append(event)
        if isinstance(event, (Done, Failed)):
            return event


async def start_long_job(nc, job_id: str, tokens: int) -> tuple[Job, object, list]:
    """Queue a greedy job that runs for exactly `tokens` tokens; return it, its reply subscription and the events
    seen up to its first text."""
    job = Job(id=job_id, model=MODEL, reply_subject=f"conclave.replies.tests.{job_id}", kind="completion",
              prompt="Once upon a time", created=time.time(),
              params=SamplingParams(temperature=0, max_tokens=tokens, logit_bias={EOS: -100.0}))
    replies = await nc.subscribe(job.reply_subject)
    await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    seen: list = []
    while not any(isinstance(e, Chunk) for e in seen):
        seen.append(decode_event((await replies.next_msg(timeout=180)).data))
    return job, replies, seen


async def test_a_redelivery_to_the_worker_still_running_the_job_does_not_run_it_again(bare_nats, server):
    nats_server, nc = bare_nats
    worker = start_worker(server, nats_server)  # heartbeat 0.5 s: ack-wait 2.5 s
    try:
        job, replies, seen = await start_long_job(nc, "job-stalled", 40)
        # The process stops for longer than its job's ack-wait (as in a NATS outage): JetStream redelivers the
        # job, and the worker meets that redelivery when it resumes, with the first run still going.
        os.kill(worker.process.pid, signal.SIGSTOP)
        await asyncio.sleep(3 * 2.5)
        os.kill(worker.process.pid, signal.SIGCONT)
        final = await events_until_final(replies, seen)
        assert isinstance(final, Done) and final.usage.completion_tokens == 40 and final.finish_reason == "length"
        await wait_for_audit_record(nats_server, lambda r: r.job_id == job.id)
        assert len(await records_of(nc.jetstream(), job.id)) == 1
        assert [e.attempt for e in seen if isinstance(e, Accepted)] == [1]  # one run, never restarted
        assert "still runs here" in worker.log and "Traceback" not in worker.log
        assert worker.process.poll() is None
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
        assert worker.stop() == 0


async def test_two_workers_that_both_ran_a_job_settle_it_once(bare_nats, server):
    nats_server, nc = bare_nats
    workers = [start_worker(server, nats_server) for _ in range(2)]
    try:
        job, replies, seen = await start_long_job(nc, "job-twice", 30)
        first = next(e for e in seen if isinstance(e, Accepted))
        stalled = next(w for w in workers if first.worker.endswith(f":{w.process.pid}"))
        # The worker running it stops past the job's ack-wait: the other worker takes the redelivery and runs
        # it as attempt 2; then the first resumes and finishes its own run too.
        os.kill(stalled.process.pid, signal.SIGSTOP)
        while not any(isinstance(e, Accepted) and e.attempt == 2 for e in seen):
            seen.append(decode_event((await replies.next_msg(timeout=180)).data))
        os.kill(stalled.process.pid, signal.SIGCONT)
        # Both runs end and settle; whichever settled first, its final event is the one both answer with.
        finals = [await events_until_final(replies, seen), await events_until_final(replies, seen)]
        await wait_for_audit_record(nats_server, lambda r: r.job_id == job.id)
        stored = decode_event((await nc.jetstream().get_last_msg(RESULTS_STREAM, result_subject(MODEL, SUBMITTER, job.id))).data)
        assert all(final == stored for final in finals)
        (record,) = await records_of(nc.jetstream(), job.id)
        assert record.output == stored.text
        assert all(w.process.poll() is None and "Traceback" not in w.log for w in workers)
    finally:
        for worker in workers:
            os.kill(worker.process.pid, signal.SIGCONT)
            assert worker.stop() == 0
