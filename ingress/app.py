"""The Starlette application: OpenAI routes in, jobs onto JetStream, events back out as JSON or SSE.

The routes are plain functions (ingress/handlers.py); what they share lives in one `Ingress` object,
made here and kept in `app.state.ingress`: the configuration, the NATS link (as the `ingress` role:
pipeline/access.py), the live workers and admission control.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass, field

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import anthropic, audit, dashboard, handlers, live, responses
from ingress.admission import Admission, WorkerTable
from ingress.audit import AuditReader
from ingress.errors import APIError, error_response
from ingress.keys import ANONYMOUS, KeyRing, bearer_token
from ingress.live import Live
from ingress.metrics import Metrics
from pipeline.access import Identity
from pipeline.connection import Link
from pipeline.nodes import INSTANCES_REFRESH_S, STATUS_OF_STATE, cluster_models, read_instances, read_nodes
from pipeline.subjects import INSTANCES_PREFIX, STATUS_PREFIX
from schemas.catalogue import ClusterModel
from schemas.jobs import WorkerStatus
from schemas.membership import Instance
from schemas.openai import ErrorDetail, ModelCard

log = logging.getLogger("conclave.ingress")
decode_status = msgspec.json.Decoder(WorkerStatus).decode


@dataclass
class IngressConfig:
    nats_url: str
    identity: Identity  # the ingress role's NATS credentials (pipeline/access.py)
    models: list[ModelCard]
    # A cluster's ingress: its model list is the cluster's catalogue, and a request for an idle model loads it
    # (ingress/handlers.py: model_for); one machine's `serve` answers for its model alone.
    cluster: bool = False
    queue_timeout_s: float = 600.0  # how long a request waits for a worker to take its job
    worker_timeout_s: float = 30.0  # silence from a worker mid-job that counts as its death
    # name -> key (ingress/keys.py); when any, /v1 routes need `Authorization: Bearer <key>` and /health
    # shows its details only with one
    api_keys: dict[str, str] = field(default_factory=dict)
    status_ttl_s: float = 10.0  # a worker not heard from for this long is not counted as live
    max_queue_wait_s: float = 60.0  # a request expected to wait longer for a batch is answered 429
    # The auditor role's NATS credentials and the deployment's checkpoint signing key (public): the dashboard's audit
    # view (ingress/audit.py). `conclave serve` alone has them; without, the view says where the audit log is read.
    auditor: Identity | None = None
    audit_key: str | None = None
    # The Host names the API answers to; None: any. `serve` and `join` set the loopback names when they listen on
    # loopback without keys: a web page that rebinds its own name to 127.0.0.1 would otherwise read the API.
    hosts: frozenset[str] | None = None


class Ingress:
    """What every route shares."""

    def __init__(self, config: IngressConfig):
        self.config = config
        self.models = {m.id: m for m in config.models}
        self.placements: dict[str, float] = {}  # model -> when the cluster's controller last placed it
        self.catalogue: dict[str, ClusterModel] = {}  # the cluster's models, loaded or not (pipeline/nodes.py)
        self.instances: list[Instance] = []  # as last read
        self.instances_changed = asyncio.Event()
        self.workers = WorkerTable(config.status_ttl_s)
        self.admission = Admission(self.workers, config.max_queue_wait_s)
        self.metrics = Metrics()
        self.live = Live(self)
        self.audit = None if config.auditor is None else AuditReader(
            config.nats_url, config.auditor, config.audit_key, lambda record: self.live.send("audit", record))
        self.link = Link(config.nats_url, "conclave-ingress", config.identity, on_open=self.on_open)

    async def on_open(self, nc) -> None:
        """On every new connection: worker statuses come in. (The streams are the operator's to make:
        ops/serve.py does before it starts the ingress.)"""
        async def on_status(msg):
            with contextlib.suppress(msgspec.MsgspecError):
                self.workers.update(decode_status(msg.data))

        async def on_instance(msg):  # an instance written or deleted: its model list is read again now
            self.instances_changed.set()

        await nc.subscribe(f"{STATUS_PREFIX}.>", cb=on_status)
        await nc.subscribe(f"{INSTANCES_PREFIX}.>", cb=on_instance)
        await self.live.on_open(nc)

    async def start(self) -> None:
        await self.link.open()
        # In the background: an existing NATS server configured before the auditor role existed refuses it, and
        # that must cost the audit view only (it answers 503 meanwhile), never the serving.
        self.auditing = asyncio.create_task(self.audit.link.open()) if self.audit is not None else None
        self.following = asyncio.create_task(self.follow_instances())
        self.living = asyncio.create_task(self.live.run())

    async def stop(self) -> None:
        self.following.cancel()
        self.living.cancel()
        if self.auditing is not None:
            self.auditing.cancel()
            await self.audit.link.close()
        await self.link.close()

    async def placed_at(self, model: str, fresh: bool) -> float:
        """When the controller last placed `model` (its instance's time): read now when `fresh`, else as last followed
        (no round trip: asked when a worker takes a job, on every request)."""
        if fresh:
            self.placements.update({i.model: i.time for i in await read_instances(self.link.nc.jetstream())})
        return self.placements.get(model, 0.0)

    async def follow_instances(self) -> None:
        """The models it answers for: those it was started with, and every one the cluster's controller has
        placed (the instances bucket), so an ingress on any node serves what the cluster serves; read every
        INSTANCES_REFRESH_S, and at once when an instance changes."""
        while True:
            self.instances_changed.clear()  # (a change heard from now on is read at the next round)
            with contextlib.suppress(Exception):  # NATS away a moment: keep the list it has
                js = self.link.nc.jetstream()
                instances = self.instances = await read_instances(js)
                self.placements.update({i.model: i.time for i in instances})
                # A model being removed ("stopping") takes no new request: its last jobs are being answered.
                cards = [ModelCard(id=i.model, created=i.created, context_length=i.context_length,
                                   status=STATUS_OF_STATE[i.state]) for i in instances if i.state != "stopping"]
                self.models = {**{m.id: m for m in self.config.models}, **{c.id: c for c in cards}}
                if self.config.cluster:
                    self.catalogue = {m.id: m for m in cluster_models(await read_nodes(js), instances)}
                if self.live.pages:
                    await self.live.push_cluster()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.instances_changed.wait(), INSTANCES_REFRESH_S)

    def loading(self, model: str) -> None:
        """`model` was just loaded on demand: taken at once, before the next read of the instances lists it."""
        self.models.setdefault(model, ModelCard(id=model, created=0, status="loading"))

    def cards(self) -> list[ModelCard]:
        """What `GET /v1/models` lists: the models served, then the rest of the cluster's catalogue (idle, or
        unloading), each with its status."""
        rest = [ModelCard(id=m.id, created=m.created, context_length=m.context_length, status=m.status)
                for m in self.catalogue.values() if m.id not in self.models]
        return [*self.models.values(), *rest]

    def require_model(self, name: str) -> ModelCard:
        if name not in self.models:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           None, "model_not_found")
        return self.models[name]


def guarded(handler, api_keys: dict[str, str], open_to_all: bool = False, render=error_response):
    """The route with OpenAI's error object for every APIError, and the API key checked first.

    The handler finds who asked in `request.state.caller`: `key:<name>:<fingerprint>` (ingress/keys.py),
    or "anonymous" when no key is configured. A route `open_to_all` is also called without a valid key,
    with `request.state.caller` None; any other answers 401. `render` writes the error in the route's API's own
    shape (OpenAI's by default; Anthropic's for /v1/messages).
    """
    keys = KeyRing(api_keys)

    async def endpoint(request: Request) -> Response:
        try:
            from_this_site(request, request.app.state.ingress.config.hosts)
            try:
                request.state.caller = authenticate(request, keys)
            except APIError:
                if not open_to_all:
                    raise
                request.state.caller = None
            return await handler(request)
        except APIError as exc:
            return render(exc.status, exc.detail, exc.headers)
        except Exception:  # a bug, or NATS closing the connection under a request: a 500 in the route's own shape
            log.exception("unhandled error in %s", request.url.path)
            return render(500, SERVER_ERROR)
    return endpoint


CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 6750: a 401 names the scheme it wants
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def answering_hosts(bind: str, api_keys: dict[str, str]) -> frozenset[str] | None:
    """IngressConfig.hosts for a server that listens on `bind`: the loopback names when that is loopback and no key
    is asked for (the only case where a page that rebinds its name to this machine gains anything); else None."""
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:  # a host name to listen on: whatever it resolves to, the operator named it
        loopback = False
    return LOOPBACK_HOSTS if loopback and not api_keys else None


def host_name(host: str) -> str:
    """A Host header's name without its port: "[::1]:8000" is "[::1]", "localhost:8000" "localhost"."""
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if ":" in host else host


def from_this_site(request: Request, hosts: frozenset[str] | None) -> None:
    """Refuse what a web page on another site makes a browser send here, before anything runs.

    A page anywhere may POST to this port from the operator's browser (a form or a `no-cors` fetch with a text/plain
    body needs no preflight): without keys, or with them where a key is not needed, that would load models or burn
    the machines. Browsers name the page's site in `Origin` (on every cross-site request, and on a same-site POST);
    SDKs and curl send none. So a request whose Origin is not this server (its Host, or the name a proxy in front
    was asked by, `X-Forwarded-Host`, which such a page cannot set without a preflight this server never grants) is
    a 403. And where `hosts` is set (loopback without keys), a Host outside it is a 421: a page whose own name was
    rebound to 127.0.0.1 would be same-origin with this server, and read it."""
    host = request.headers.get("host", "")
    if hosts is not None and (name := host_name(host)).lower() not in hosts:
        raise APIError(421, f"This server answers to {', '.join(sorted(hosts))} only (it listens on loopback without "
                       f"API keys), not {name[:100]!r}.", None, "host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None:
        site = urllib.parse.urlsplit(origin).netloc
        if site not in {host, request.headers.get("x-forwarded-host")}:
            raise APIError(403, f"A request from a web page on {origin[:100]!r} is not accepted: browsers may call "
                           "this API only from its own pages (the dashboard).", None, "cross_origin_refused")


def authenticate(request: Request, keys: KeyRing) -> str:
    """Who sent the request, by its API key; an APIError (401) when keys are configured and it has none of them.
    The messages say what is wrong with the header, never which key came close."""
    if not keys:
        return ANONYMOUS
    header = request.headers.get("authorization")
    if header is None and (key := request.headers.get("x-api-key")) is not None:
        header = f"Bearer {key}"  # how Anthropic's SDK sends its key (/v1/messages); the same keys
    if header is None:
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                       "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", None, "invalid_api_key",
                       headers=CHALLENGE)
    token = bearer_token(header)
    if token is None:
        raise APIError(401, "The Authorization header must be `Bearer YOUR_KEY`.", None, "invalid_api_key",
                       headers=CHALLENGE)
    caller = keys.caller(token)
    if caller is None:
        raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key", headers=CHALLENGE)
    return caller


SERVER_ERROR = ErrorDetail(message="The server had an error while processing your request.", type="server_error")


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, SERVER_ERROR)


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return error_response(status, ErrorDetail(message=f"{request.method} {request.url.path}: "
                                              f"{getattr(exc, 'detail', 'Not Found')}",
                                              type="invalid_request_error", code="not_found" if status == 404 else None),
                          getattr(exc, "headers", None))  # a 405's `Allow` (RFC 9110 requires it)


def create_app(config: IngressConfig) -> Starlette:
    ingress = Ingress(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await ingress.start()
        try:
            yield
        finally:
            await ingress.stop()

    keys = config.api_keys
    routes = [
        Route("/v1/chat/completions", guarded(handlers.chat_completions, keys), methods=["POST"]),
        Route("/v1/completions", guarded(handlers.completions, keys), methods=["POST"]),
        Route("/v1/messages", guarded(anthropic.messages, keys, render=anthropic.error_response), methods=["POST"]),
        Route("/v1/responses", guarded(responses.responses, keys), methods=["POST"]),
        Route("/v1/models", guarded(handlers.list_models, keys), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(handlers.get_model, keys), methods=["GET"]),
        Route("/v1/cluster", guarded(handlers.cluster, keys), methods=["GET"]),
        Route("/v1/cluster/placement", guarded(handlers.placement, keys), methods=["POST"]),
        Route("/v1/cluster/instances", guarded(handlers.list_instances, keys), methods=["GET"]),
        Route("/v1/cluster/instances", guarded(handlers.add_instance, keys), methods=["POST"]),
        Route("/v1/cluster/instances/{model:path}", guarded(handlers.remove_instance, keys), methods=["DELETE"]),
        Route("/v1/cluster/events", guarded(live.events, keys), methods=["GET"]),
        Route("/v1/audit/records", guarded(audit.list_records, keys), methods=["GET"]),
        Route("/v1/audit/records/{seq}", guarded(audit.get_record, keys), methods=["GET"]),
        Route("/v1/audit/verify", guarded(audit.verify, keys), methods=["POST"]),
        Route("/metrics", guarded(handlers.metrics, keys), methods=["GET"]),
        # Up/down for anyone (a load balancer's probe has no key); hosts, pids and jobs only with a key.
        Route("/health", guarded(handlers.health, keys, open_to_all=True), methods=["GET"]),
        *dashboard.routes(),  # the page itself holds no data: open to all; what it shows comes from the routes above
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={500: server_error, 404: not_found, 405: not_found})
    app.state.ingress = ingress
    return app
