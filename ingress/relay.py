"""Publishes a job to JetStream and relays the worker's events from the job's reply subject.

Publishing retries with the same `Nats-Msg-Id` while NATS is unreachable (JetStream drops the
duplicate if an earlier try got through), for up to PUBLISH_DEADLINE_S; only then is the request
answered 503 `queue_unavailable`. Because a try whose acknowledgement was lost may still have queued
the job, that answer comes with a cancel marked `refused`: a worker that meets the job settles it with
the 503 its client got and never runs it.

Events: every event carries the delivery attempt that produced it. When a job is redelivered (its
worker died or was away past its ack-wait) and a later attempt is accepted, chunks and heartbeats of
the earlier attempt are ignored; a final event is taken whichever attempt sends it (settling stores
one final event per job and every attempt answers with that one: pipeline/settle.py). A job whose worker group
lost a rank comes back `Requeued`: it waits again as a queued job (a streamed response that already sent text
ends with an error when another attempt's text would follow: ingress/respond.py).

Silence: while no worker has taken the job the relay yields `Waiting` every WAITING_TICK_S (a
streamed response sends a keep-alive comment), up to `queue_timeout_s`; once taken, a worker is
presumed dead after `worker_timeout_s` without an event, unless the connection to NATS was down or
re-established meanwhile (then the silence is the broker's, not the worker's). Before answering a
timeout the relay looks for the job's stored result, in case its final event was lost in an outage.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator, Awaitable, Callable

import anyio
import msgspec
import nats
import nats.js.errors

from ingress.errors import APIError
from pipeline.connection import persist, transient
from pipeline.limits import PayloadLimits, UNDECODABLE
from pipeline.settle import stored_result
from pipeline.streams import max_queued
from pipeline.subjects import CANCELS_STREAM, JOBS_STREAM, cancel_subject, job_subject
from schemas.jobs import Accepted, Cancel, Chunk, Done, Event, Failed, Heartbeat, Job, Requeued

decode_event = msgspec.json.Decoder(Event).decode
encode = msgspec.json.Encoder().encode

QUEUE_FULL = 10077  # JetStream: "maximum messages per subject exceeded" (pipeline/streams.py: max_queued)
RETRY_AFTER_S = 5  # a few decode-heavy jobs' worth; a client that honours it does not hammer a full queue
PUBLISH_DEADLINE_S = 10.0  # how long a publish is retried while NATS is unreachable
WAITING_TICK_S = 5.0


class Waiting:
    """No worker has taken the job yet (yielded every WAITING_TICK_S while it waits in the queue)."""


async def publish_job(nc, job: Job, submitter: str) -> None:
    """Queue `job` as `submitter` (the role `nc` is connected as), or raise the APIError its client gets (413 too large, 429 queue full, 503 queue unavailable)."""
    data = encode(job)
    if len(data) > (limit := PayloadLimits(nc.max_payload).job_bytes):  # a job may encode larger than its body
        raise APIError(413, f"The request makes a job of {len(data)} bytes; this server accepts at most {limit}.",
                       None, "request_too_large")
    try:
        await persist(lambda: nc.jetstream().publish(job_subject(job.model, submitter), data, stream=JOBS_STREAM,
                                                     headers={"Nats-Msg-Id": job.id}), PUBLISH_DEADLINE_S)
    except nats.errors.Error as exc:
        if isinstance(exc, nats.js.errors.APIError) and exc.err_code == QUEUE_FULL:
            raise APIError(429, f"Too many requests are queued for model '{job.model}' (limit {max_queued()}); "
                           f"retry after {RETRY_AFTER_S} seconds.", code="rate_limit_exceeded", type="requests",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if not transient(exc) and not isinstance(exc, nats.errors.ConnectionClosedError):
            raise
        # A try whose acknowledgement was lost may have queued the job: withdraw it. A core publish, buffered by
        # nats-py while it reconnects and stored by the cancels stream when it arrives.
        with contextlib.suppress(nats.errors.Error):
            await nc.publish(cancel_subject(submitter, job.id), encode(Cancel(id=job.id, reason=f"queue unavailable: "
                                                                   f"{type(exc).__name__}", refused=True)))
        raise APIError(503, f"The job queue is unavailable ({type(exc).__name__}); try again shortly.",
                       code="queue_unavailable")


async def replaced(placement: Callable[[bool], Awaitable[float]], placed: float | None) -> bool:
    try:
        return placed is not None and await placement(True) != placed
    except Exception:  # NATS away: no news is not a placement
        return False


async def submit(nc, job: Job, submitter: str, queue_timeout_s: float, worker_timeout_s: float,
                 on_final: Callable[[Done | Failed], None] | None = None,
                 placement: Callable[[bool], Awaitable[float]] | None = None) -> AsyncIterator[Event | Waiting]:
    """Publish the job as `submitter` and yield its events until Done or Failed (and `Waiting` while it is
    queued); `on_final` sees the final event first (the ingress's metrics). `placement(fresh)` says when the model
    was last placed (on a cluster; as last followed, or read now): a worker silent since a newer placement was lost with its node, and the job, given
    back to the queue by JetStream after its ack wait, is waited for as a queued one, not answered 503."""
    # Subscribe before publishing so no event can arrive before anyone listens.
    sub = await nc.subscribe(job.reply_subject)
    try:
        await publish_job(nc, job, submitter)
    except BaseException:
        await unsubscribe(sub)
        raise
    finished = False
    try:
        queued_until = time.monotonic() + queue_timeout_s
        taken, attempt, placed = False, 0, None
        while True:
            reconnects = nc.stats["reconnects"]
            wait = min(WAITING_TICK_S, max(0.0, queued_until - time.monotonic())) if not taken else worker_timeout_s
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                if not taken and time.monotonic() < queued_until:
                    yield Waiting()
                    continue
                if taken and (not nc.is_connected or nc.stats["reconnects"] != reconnects):
                    continue  # the broker was away, not the worker: give it another worker_timeout_s
                if taken and placement is not None and await replaced(placement, placed):
                    taken, queued_until = False, time.monotonic() + queue_timeout_s  # its node is gone: queued again
                    yield Waiting()
                    continue
                result = None
                with contextlib.suppress(nats.errors.Error):  # NATS away: no stored result to offer
                    result = await stored_result(nc.jetstream(), job.model, submitter, job.id)
                if result is not None:
                    finished = True  # its final event was sent while we could not hear it
                    if on_final is not None:
                        on_final(result)
                    yield result
                    return
                if not taken:
                    raise APIError(503, f"No worker for model '{job.model}' took the request within "
                                   f"{queue_timeout_s:.0f}s.", code="no_worker")
                raise APIError(503, f"The worker serving '{job.model}' stopped responding for "
                               f"{worker_timeout_s:.0f}s; the request was abandoned.", code="worker_lost")
            try:
                event = decode_event(msg.data)
            except UNDECODABLE:
                continue  # not one of ours
            if isinstance(event, (Accepted, Chunk, Heartbeat, Requeued)):
                if event.attempt < attempt:
                    continue  # a superseded delivery of this job, still running somewhere
                attempt = max(attempt, event.attempt)
            if isinstance(event, Requeued):  # its group lost a rank: queued again, as if just published
                taken, queued_until = False, time.monotonic() + queue_timeout_s
                yield event
                continue
            if not taken and placement is not None:
                with contextlib.suppress(Exception):
                    placed = await placement(False)
            taken = True
            # Set before yielding: a caller that stops reading at the final event never resumes us, and the
            # job must not then be "cancelled" after it finished.
            finished = isinstance(event, (Done, Failed))
            if finished and on_final is not None:
                on_final(event)
            yield event
            if finished:
                return
    finally:
        # Shielded: this also runs when a disconnecting client cancels the request.
        with anyio.CancelScope(shield=True):
            await unsubscribe(sub)
            if not finished:
                # The requester is gone (client disconnect, timeout): stop the work, wherever the job is now.
                await cancel(nc, submitter, job.id, "requester gone")


async def unsubscribe(sub) -> None:
    try:
        await sub.unsubscribe()
    except nats.errors.Error:  # the connection is gone, and the subscription with it
        pass


async def cancel(nc, submitter: str, job_id: str, reason: str) -> None:
    try:
        await nc.jetstream().publish(cancel_subject(submitter, job_id), encode(Cancel(id=job_id, reason=reason)),
                                     stream=CANCELS_STREAM)
    except nats.errors.Error:
        pass  # best effort: without it the job still ends, only later
