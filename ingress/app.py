"""The Starlette application: OpenAI routes in, jobs onto JetStream, events back out as JSON or SSE."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio
import msgspec
import nats
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ingress.errors import APIError, error_response, validation_error
from ingress.relay import submit
from ingress.requests import chat_job, completion_job
from pipeline.streams import ensure_streams
from pipeline.subjects import STATUS_PREFIX
from schemas.jobs import Accepted, Chunk, Done, Event, Failed, Job, WorkerStatus
from schemas.openai import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkChoice,
    ChunkDelta, Completion, CompletionChoice, CompletionRequest, ErrorDetail, ModelCard, ModelList,
)

log = logging.getLogger("conclave.ingress")
encode = msgspec.json.Encoder().encode


@dataclass
class IngressConfig:
    nats_url: str
    models: list[ModelCard]
    queue_timeout_s: float = 600.0  # how long a request waits for a worker to take its job
    worker_timeout_s: float = 30.0  # silence from a worker mid-job that counts as its death
    api_key: str | None = None  # when set, /v1 routes need `Authorization: Bearer <key>`
    status_ttl_s: float = 10.0  # a worker not heard from for this long is not counted as live


@dataclass
class WorkerTable:
    """Live workers per model, from their periodic WorkerStatus messages."""

    ttl_s: float
    seen: dict[str, tuple[WorkerStatus, float]] = field(default_factory=dict)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def update(self, status: WorkerStatus) -> None:
        self.seen[status.worker] = (status, time.monotonic())
        self.changed.set()
        self.changed = anyio.Event()

    def live(self, model: str) -> list[WorkerStatus]:
        now = time.monotonic()
        return [s for s, t in self.seen.values()
                if s.model == model and now - t < self.ttl_s and s.state in ("ready", "busy")]

    async def wait_live(self, model: str) -> None:
        while not self.live(model):
            await self.changed.wait()


class _State:
    nc: nats.NATS
    workers: WorkerTable


def create_app(config: IngressConfig) -> Starlette:
    models = {m.id: m for m in config.models}
    state = _State()
    # Who asked, in the audit log: an id derived from the API key (never the key), or "anonymous".
    caller = f"key-{hashlib.sha256(config.api_key.encode()).hexdigest()[:12]}" if config.api_key else "anonymous"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.nc = await nats.connect(config.nats_url, name="conclave-ingress", max_reconnect_attempts=-1)
        state.workers = WorkerTable(config.status_ttl_s)
        await ensure_streams(state.nc.jetstream())

        async def on_status(msg):
            with contextlib.suppress(msgspec.MsgspecError):
                state.workers.update(msgspec.json.decode(msg.data, type=WorkerStatus))

        await state.nc.subscribe(f"{STATUS_PREFIX}.>", cb=on_status)
        app.state.workers = state.workers
        try:
            yield
        finally:
            await state.nc.drain()

    def require_model(name: str) -> ModelCard:
        if name not in models:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           None, "model_not_found")
        return models[name]

    async def start(job: Job) -> tuple[AsyncIterator[Event], Accepted]:
        """Submit the job and wait until a worker accepts it, so a request it rejects (context too
        long, ...) still gets its proper HTTP status instead of a 200 stream that fails."""
        events = submit(state.nc, job, config.queue_timeout_s, config.worker_timeout_s)
        async for event in events:
            if isinstance(event, Accepted):
                return events, event
            if isinstance(event, Failed):
                raise APIError.from_detail(event.status, event.error)
        raise APIError(502, "The worker ended the job without a result.", code="worker_error")

    async def final_result(events: AsyncIterator[Event]) -> Done:
        async for event in events:
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise APIError.from_detail(event.status, event.error)
        raise APIError(502, "The worker ended the job without a result.", code="worker_error")

    async def sse(job: Job, events: AsyncIterator[Event], first: Accepted, chunk_for, include_usage: bool):
        """OpenAI's SSE stream: one `data:` line per chunk, the finish chunk, optional usage, `[DONE]`."""
        sent_text = False
        try:
            yield chunk_for(role=True)
            async for event in events:
                if isinstance(event, Accepted) and event.attempt != first.attempt and sent_text:
                    raise APIError(503, "The worker serving this request failed mid-generation; the partial "
                                   "answer cannot be resumed.", code="worker_lost")
                if isinstance(event, Chunk):
                    sent_text = True
                    yield chunk_for(text=event.text)
                elif isinstance(event, Done):
                    yield chunk_for(finish=event.finish_reason)
                    if include_usage:
                        yield chunk_for(usage=event.usage)
                elif isinstance(event, Failed):
                    raise APIError.from_detail(event.status, event.error)
        except APIError as exc:
            # Headers are gone already: OpenAI clients raise on a `data:` event carrying an error object.
            log.warning("stream %s failed: %s", job.id, exc)
            yield b"data: " + encode({"error": exc.detail}) + b"\n\n"
            return
        yield b"data: [DONE]\n\n"

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

    def stream_response(gen, job: Job) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-request-id": job.id})

    async def respond(request: Request, req, job: Job, chunk_for, body_for) -> Response:
        """Both endpoints: submit, then an SSE stream of `chunk_for(...)` or one JSON `body_for(done)`."""
        if req.stream:
            events, accepted = await start(job)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # StreamingResponse notices a client that goes away and closes `events`: the relay cancels the job.
            return stream_response(sse(job, events, accepted, chunk_for, include_usage), job)

        async def whole() -> Done:
            events, _ = await start(job)
            return await final_result(events)

        done = await unless_disconnected(request, whole)
        return Response(encode(body_for(done)), media_type="application/json", headers={"x-request-id": job.id})

    async def chat_completions(request: Request) -> Response:
        req = decode(await request.body(), ChatCompletionRequest)
        require_model(req.model)
        job = chat_job(req, caller)
        created = int(job.created)

        def chunk_for(role=False, text=None, finish=None, usage=None) -> bytes:
            choices = [] if usage else [ChunkChoice(index=0, delta=ChunkDelta(
                role="assistant" if role else None, content="" if role else text), finish_reason=finish)]
            chunk = ChatCompletionChunk(id=job.id, created=created, model=job.model, choices=choices, usage=usage)
            return b"data: " + encode(chunk) + b"\n\n"

        def body_for(done: Done) -> ChatCompletion:
            return ChatCompletion(id=job.id, created=created, model=job.model, usage=done.usage, choices=[
                ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)])

        return await respond(request, req, job, chunk_for, body_for)

    async def completions(request: Request) -> Response:
        req = decode(await request.body(), CompletionRequest)
        require_model(req.model)
        job = completion_job(req, caller)
        created = int(job.created)

        def chunk_for(role=False, text=None, finish=None, usage=None) -> bytes:
            if role:
                return b""  # completion streams have no role chunk
            choices = [] if usage else [CompletionChoice(index=0, text=text or "", finish_reason=finish)]
            chunk = Completion(id=job.id, created=created, model=job.model, choices=choices, usage=usage)
            return b"data: " + encode(chunk) + b"\n\n"

        def body_for(done: Done) -> Completion:
            return Completion(id=job.id, created=created, model=job.model, usage=done.usage, choices=[
                CompletionChoice(index=0, text=done.text, finish_reason=done.finish_reason)])

        return await respond(request, req, job, chunk_for, body_for)

    async def list_models(request: Request) -> Response:
        return Response(encode(ModelList(data=list(models.values()))), media_type="application/json")

    async def get_model(request: Request) -> Response:
        return Response(encode(require_model(request.path_params["model"])), media_type="application/json")

    async def health(request: Request) -> Response:
        connected = hasattr(state, "nc") and state.nc.is_connected
        per_model = {m: [msgspec.to_builtins(s) for s in state.workers.live(m)] for m in models}
        ready = connected and all(per_model.values())
        body = {"status": "ok" if ready else "unavailable", "nats": "connected" if connected else "disconnected",
                "models": {m: {"live_workers": w} for m, w in per_model.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                if config.api_key is not None:
                    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                    if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                        raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")
                return await handler(request)
            except APIError as exc:
                return error_response(exc.status, exc.detail, exc.headers)
            except Exception:
                log.exception("unhandled error in %s", request.url.path)
                raise
        return endpoint

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(get_model), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, ErrorDetail(message="The server had an error while processing your request.",
                                               type="server_error"))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_response(status, ErrorDetail(message=f"{request.method} {request.url.path}: "
                                                  f"{getattr(exc, 'detail', 'Not Found')}",
                                                  type="invalid_request_error", code="not_found" if status == 404 else None))

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={500: server_error, 404: not_found, 405: not_found})


def decode(body: bytes, type_):
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.MsgspecError as exc:
        raise validation_error(exc)
