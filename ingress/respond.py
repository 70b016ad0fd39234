"""From a job to its HTTP answer: admission, then an SSE stream or one JSON body.

A streamed request waits for a worker to accept its job before the response starts, so that a job
the worker refuses (context too long, ...) still gets its proper HTTP status. But a client that
hears nothing gives up (the OpenAI SDK after 10 minutes, many proxies after one): once the job has
waited WAITING_TICK_S in the queue the response starts anyway, with SSE comments (`: waiting`, which
SDKs ignore) every few seconds until it is taken and `: keep-alive` at every worker heartbeat during
a long prefill; a refusal after that point arrives as an error event, as any failure mid-stream does.
"""

from __future__ import annotations

import contextlib
import functools
from typing import AsyncIterator

import anyio
import msgspec
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ingress.errors import APIError
from ingress.relay import Waiting, submit
from ingress.shapes import Shape, prompt_chars
from pipeline.access import INGRESS
from schemas.jobs import Accepted, Chunk, Done, Event, Failed, Heartbeat, Job, Requeued

encode = msgspec.json.Encoder().encode
WAITING_COMMENT = b": waiting for a worker\n\n"
KEEPALIVE_COMMENT = b": keep-alive\n\n"


async def admit(ingress, job: Job) -> None:
    """Count the request in its model's queue, or 429 now rather than a wait longer than --max-queue-wait
    (ingress/admission.py)."""
    retry = await ingress.admission.enter(ingress.link.nc.jetstream(), job.model)
    if retry is not None:
        raise APIError(429, f"Model '{job.model}' is busy: this request would wait more than "
                       f"{ingress.config.max_queue_wait_s:.0f}s for a place in a batch; retry after {retry} seconds.",
                       code="rate_limit_exceeded", type="requests", headers={"Retry-After": str(retry)})


async def first_answer(events: AsyncIterator) -> Event | Waiting:
    """A streamed request's wait until a worker has taken the job (or refused it: raised), or until it has waited
    long enough in the queue that its response should start. Taken: its `Accepted`, or whatever of the job
    comes first where that was lost (published while this ingress's connection to NATS was being re-established:
    a reply subject keeps nothing), a chunk, a heartbeat or its result; the caller must not drop that event."""
    async for event in events:
        if isinstance(event, (Accepted, Chunk, Heartbeat, Done, Waiting)):
            return event
        if isinstance(event, Failed):
            raise APIError.from_detail(event.status, event.error)
    raise APIError(502, "The worker ended the job without a result.", code="worker_error")


async def replayed(event, events: AsyncIterator) -> AsyncIterator:
    """`event`, then the rest of `events` (closed with this)."""
    try:
        yield event
        async for later in events:
            yield later
    finally:
        await events.aclose()


async def final_result(events: AsyncIterator) -> Done:
    async for event in events:
        if isinstance(event, Done):
            return event
        if isinstance(event, Failed):
            raise APIError.from_detail(event.status, event.error)
    raise APIError(502, "The worker ended the job without a result.", code="worker_error")


async def sse(job: Job, events: AsyncIterator[Event | Waiting], first: Accepted | Waiting, shape: Shape,
              include_usage: bool, release) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream: one `data:` line per chunk, the finish chunk, optional usage, `[DONE]`."""
    attempt = first.attempt if isinstance(first, Accepted) else None
    sent_text = False
    # Per answer (`n`): where its next chunk's tokens start (completions' text_offset counts the prompt), and how many
    # tool calls it sent (the next one's index).
    sent_chars = [prompt_chars(job)] * job.params.n
    calls = [0] * job.params.n
    wants_logprobs = job.params.logprobs is not None
    try:
        for choice in range(job.params.n):
            yield shape.chunk(job, role=True, choice=choice)
        if isinstance(first, Waiting):
            yield WAITING_COMMENT
        async for event in events:
            if isinstance(event, Waiting):
                yield WAITING_COMMENT
            elif isinstance(event, Heartbeat):
                yield KEEPALIVE_COMMENT
            elif isinstance(event, Requeued):
                if sent_text:  # the next group would start the answer over: what was sent cannot be continued
                    raise APIError(503, f"The worker group serving this model lost a rank while generating "
                                   f"({event.reason}); the partial answer cannot be resumed. Retry the request.",
                                   code="worker_lost")
                yield WAITING_COMMENT  # nothing sent yet: it waits in the queue for the next group
            elif isinstance(event, Accepted):
                if attempt is not None and event.attempt != attempt and sent_text:
                    raise APIError(503, "The worker serving this request failed mid-generation; the partial "
                                   "answer cannot be resumed.", code="worker_lost")
                attempt = event.attempt
            elif isinstance(event, Chunk):
                sent_text, choice = True, event.choice
                if not 0 <= choice < job.params.n:
                    raise APIError(502, f"The worker sent an answer numbered {choice}, of {job.params.n} asked for.",
                                   code="worker_error")
                if event.text or not event.tool_calls:
                    yield shape.chunk(job, text=event.text, logprobs=event.logprobs if wants_logprobs else None,
                                      offset=sent_chars[choice], choice=choice)
                    sent_chars[choice] += len(event.text)
                for call in event.tool_calls:
                    yield shape.chunk(job, call=(calls[choice], call), choice=choice)
                    calls[choice] += 1
            elif isinstance(event, Done):
                if sent_text and event.attempt != attempt:  # another run's answer: it would not match the text sent
                    raise APIError(503, "The worker serving this request was replaced mid-generation; the partial "
                                   "answer cannot be completed.", code="worker_lost")
                if shape.on_done is not None:
                    await shape.on_done(job, event)
                yield shape.finish(job, event, include_usage)
            elif isinstance(event, Failed):
                raise APIError.from_detail(event.status, event.error)
    except APIError as exc:
        # Headers are gone already: the API's clients raise on its error event (OpenAI's: a `data:` error object).
        yield shape.error(exc.status, exc.detail)
        return
    finally:
        release()
        with anyio.CancelScope(shield=True):  # the relay cancels the job if it did not finish
            await events.aclose()
    yield shape.end


async def unless_disconnected(request: Request, work):
    """`await work()`, abandoned if the HTTP client disconnects first.

    Abandoning it closes the relay's event stream before the final event, and the relay then publishes
    a cancel: the worker stops within one decode step (or skips the job if it is still queued).
    """
    outcome: dict = {}
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        async def run() -> None:
            try:
                outcome["value"] = await work()
            except APIError as exc:
                outcome["error"] = exc
            group.cancel_scope.cancel()

        group.start_soon(watch)
        group.start_soon(run)
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:  # nobody will read this answer
        raise APIError(499, "The client closed the request.", code="client_closed")
    return outcome["value"]


def once(action):
    """`action`, callable any number of times, run the first time only."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


async def respond(request: Request, ingress, job: Job, stream: bool, include_usage: bool, shape: Shape) -> Response:
    """Admit, submit, and answer with an SSE stream of `shape.chunk`s or one JSON `shape.body`; every answer,
    errors too, names the job in `x-request-id` (its audit record's id)."""
    headers = {"x-request-id": job.id}
    try:
        await admit(ingress, job)
        release = once(lambda: ingress.admission.leave(job.model))  # the request leaves the model's queue
        try:
            return await answer(request, ingress, job, stream, include_usage, shape, release, headers)
        except BaseException:
            release()
            raise
    except APIError as exc:
        exc.headers = {**(exc.headers or {}), **headers}
        raise


async def answer(request: Request, ingress, job: Job, stream: bool, include_usage: bool, shape: Shape, release,
                 headers: dict) -> Response:
    nc, config = ingress.link.nc, ingress.config
    observe = functools.partial(ingress.metrics.observe, job.model)
    if stream:
        events = submit(nc, job, INGRESS, config.queue_timeout_s, config.worker_timeout_s, observe,
                        functools.partial(ingress.placed_at, job.model))
        try:
            first = await first_answer(events)
        except BaseException:
            await events.aclose()
            raise
        if not isinstance(first, (Accepted, Waiting)):  # taken, its Accepted lost: the stream starts with this event
            events, first = replayed(first, events), Waiting()
        # A client that goes away ends the stream, which closes `events`: the relay cancels the job. The
        # background task also runs when the stream never started.
        return StreamingResponse(sse(job, events, first, shape, include_usage, release),
                                 media_type="text/event-stream", background=BackgroundTask(release),
                                 headers={"Cache-Control": "no-cache", **headers})

    async def whole() -> Done:
        async with contextlib.aclosing(submit(nc, job, INGRESS, config.queue_timeout_s, config.worker_timeout_s,
                                              observe, functools.partial(ingress.placed_at, job.model))) as events:
            return await final_result(events)  # (its Accepted may have been lost: the result is what counts)

    done = await unless_disconnected(request, whole)
    release()
    if shape.on_done is not None:
        await shape.on_done(job, done)
    return Response(encode(shape.body(job, done)), media_type="application/json", headers=headers)
