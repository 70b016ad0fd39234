"""Publishes a job to JetStream and relays the worker's events from the job's reply subject."""

from __future__ import annotations

from typing import AsyncIterator

import anyio
import msgspec
import nats
import nats.js.errors
from nats.js.errors import NoStreamResponseError

from ingress.errors import APIError
from pipeline.streams import max_queued
from pipeline.subjects import CANCELS_STREAM, JOBS_STREAM, cancel_subject, job_subject
from schemas.jobs import Cancel, Done, Event, Failed, Job

decode_event = msgspec.json.Decoder(Event).decode
encode = msgspec.json.Encoder().encode


QUEUE_FULL = 10077  # JetStream: "maximum messages per subject exceeded" (pipeline/streams.py: max_queued)
RETRY_AFTER_S = 5  # a few decode-heavy jobs' worth; a client that honours it does not hammer a full queue


async def submit(nc, job: Job, queue_timeout_s: float, worker_timeout_s: float) -> AsyncIterator[Event]:
    """Yields the job's events until Done or Failed.

    Waits up to `queue_timeout_s` for a worker to take the job (it stays durable in the stream
    meanwhile), then up to `worker_timeout_s` between events once one has: workers send a heartbeat
    while they compute, so silence that long means the worker died.
    """
    # Subscribe before publishing so no event can arrive before anyone listens.
    sub = await nc.subscribe(job.reply_subject)
    finished = False
    try:
        try:
            await nc.jetstream().publish(job_subject(job.model), encode(job), stream=JOBS_STREAM,
                                         headers={"Nats-Msg-Id": job.id})
        except nats.js.errors.APIError as exc:
            if exc.err_code != QUEUE_FULL:
                raise
            raise APIError(429, f"Too many requests are queued for model '{job.model}' (limit {max_queued()}); "
                           f"retry after {RETRY_AFTER_S} seconds.", code="rate_limit_exceeded", type="requests",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        except (NoStreamResponseError, nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            raise APIError(503, f"The job queue is unavailable ({type(exc).__name__}); try again shortly.",
                           code="queue_unavailable")
        taken = False
        while True:
            try:
                msg = await sub.next_msg(timeout=worker_timeout_s if taken else queue_timeout_s)
            except nats.errors.TimeoutError:
                if not taken:
                    raise APIError(503, f"No worker for model '{job.model}' took the request within "
                                   f"{queue_timeout_s:.0f}s.", code="no_worker")
                raise APIError(503, f"The worker serving '{job.model}' stopped responding for "
                               f"{worker_timeout_s:.0f}s; the request was abandoned.", code="worker_lost")
            event = decode_event(msg.data)
            taken = True
            # Set before yielding: a caller that stops reading at the final event never resumes us, and the
            # job must not then be "cancelled" after it finished.
            finished = isinstance(event, (Done, Failed))
            yield event
            if finished:
                return
    finally:
        # Shielded: this also runs when a disconnecting client cancels the request.
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
            if not finished:
                # The requester is gone (client disconnect, timeout): stop the work, wherever the job is now.
                await cancel(nc, job.id, "requester gone")


async def cancel(nc, job_id: str, reason: str) -> None:
    try:
        await nc.jetstream().publish(cancel_subject(job_id), encode(Cancel(id=job_id, reason=reason)),
                                     stream=CANCELS_STREAM)
    except (NoStreamResponseError, nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
        pass  # best effort: without it the job still ends, only later
