"""The Starlette application: OpenAI routes in, jobs onto JetStream, events back out as JSON or SSE.

The routes are plain functions (ingress/handlers.py); what they share lives in one `Ingress` object,
made here and kept in `app.state.ingress`: the configuration, the NATS link, the live workers and
admission control, and the sweep that answers jobs for models nobody serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
from dataclasses import dataclass

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import handlers
from ingress.admission import Admission, WorkerTable
from ingress.errors import APIError, error_response
from pipeline.connection import Link, persist
from pipeline.streams import ensure_streams
from pipeline.subjects import STATUS_PREFIX, subject_token
from pipeline.unrouted import keep_sweeping
from schemas.jobs import WorkerStatus
from schemas.openai import ErrorDetail, ModelCard

log = logging.getLogger("conclave.ingress")
decode_status = msgspec.json.Decoder(WorkerStatus).decode


@dataclass
class IngressConfig:
    nats_url: str
    models: list[ModelCard]
    queue_timeout_s: float = 600.0  # how long a request waits for a worker to take its job
    worker_timeout_s: float = 30.0  # silence from a worker mid-job that counts as its death
    api_key: str | None = None  # when set, /v1 routes need `Authorization: Bearer <key>`
    status_ttl_s: float = 10.0  # a worker not heard from for this long is not counted as live
    max_queue_wait_s: float = 60.0  # a request expected to wait longer for a batch is answered 429


class Ingress:
    """What every route shares."""

    def __init__(self, config: IngressConfig):
        self.config = config
        self.models = {m.id: m for m in config.models}
        # Who asked, in the audit log: an id derived from the API key (never the key), or "anonymous".
        self.caller = (f"key-{hashlib.sha256(config.api_key.encode()).hexdigest()[:12]}" if config.api_key
                       else "anonymous")
        self.workers = WorkerTable(config.status_ttl_s)
        self.admission = Admission(self.workers, config.max_queue_wait_s)
        self.link = Link(config.nats_url, "conclave-ingress", on_open=self.on_open)
        self.sweeping: asyncio.Task | None = None

    async def on_open(self, nc) -> None:
        """On every new connection: the streams exist, and worker statuses come in."""
        await persist(lambda: ensure_streams(nc.jetstream()), 30.0)

        async def on_status(msg):
            with contextlib.suppress(msgspec.MsgspecError):
                self.workers.update(decode_status(msg.data))

        await nc.subscribe(f"{STATUS_PREFIX}.>", cb=on_status)

    async def start(self) -> None:
        await self.link.open()
        name = f"{socket.gethostname()}:{os.getpid()}"  # who settled a swept job, in its audit record
        self.sweeping = asyncio.create_task(keep_sweeping(self.link, name, self.serves))

    async def stop(self) -> None:
        if self.sweeping is not None:
            self.sweeping.cancel()
        await self.link.close()

    def serves(self, token: str) -> bool:
        """Whether anyone serves the model with this subject token: this ingress, or a worker heard from."""
        models = set(self.models) | {status.model for status, _ in self.workers.seen.values()}
        return any(subject_token(model) == token for model in models)

    def require_model(self, name: str) -> ModelCard:
        if name not in self.models:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           None, "model_not_found")
        return self.models[name]


def guarded(handler, api_key: str | None):
    """The route with OpenAI's error object for every APIError, and the API key checked first."""
    async def endpoint(request: Request) -> Response:
        try:
            if api_key is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")
            return await handler(request)
        except APIError as exc:
            return error_response(exc.status, exc.detail, exc.headers)
        except Exception:
            log.exception("unhandled error in %s", request.url.path)
            raise
    return endpoint


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, ErrorDetail(message="The server had an error while processing your request.",
                                           type="server_error"))


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return error_response(status, ErrorDetail(message=f"{request.method} {request.url.path}: "
                                              f"{getattr(exc, 'detail', 'Not Found')}",
                                              type="invalid_request_error", code="not_found" if status == 404 else None))


def create_app(config: IngressConfig) -> Starlette:
    ingress = Ingress(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await ingress.start()
        try:
            yield
        finally:
            await ingress.stop()

    key = config.api_key
    routes = [
        Route("/v1/chat/completions", guarded(handlers.chat_completions, key), methods=["POST"]),
        Route("/v1/completions", guarded(handlers.completions, key), methods=["POST"]),
        Route("/v1/models", guarded(handlers.list_models, key), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(handlers.get_model, key), methods=["GET"]),
        Route("/health", handlers.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={500: server_error, 404: not_found, 405: not_found})
    app.state.ingress = ingress
    return app
