"""Model files between nodes: each node serves its model store read-only over HTTPS, and a node that lacks a model
fetches it from one that has it, so that each byte enters the building once and then travels over the LAN.

Not over NATS: nats-py's object store moved 41-133 MB/s on loopback here and has open large-object problems
(nats.py #703, nats-server #4680); NATS carries who may read (below), the catalogue (ops/catalogue.py) and the
progress (each node's status).

- **What is served** (`files_app`): a model's manifest (each file's name, size and SHA-256, `manifest`) and its
  files, with HTTP Range requests (Starlette's FileResponse), nothing else: a file is named by the model and a name
  the manifest lists, so no request reaches outside a model's directory.
- **Who may read**: the holder of a ticket this node issued (`Tickets`), asked for over NATS on
  `conclave.agents.<id>.files` (`answer_tickets`, `ask_ticket`), where every node is authenticated by its own
  keys (pipeline/access.py). A ticket is a random bearer token for one model, alive while used (TICKET_S after
  its last use). The port speaks TLS from its first byte, with a key and a certificate the node makes at every
  start (ops/cluster_tls.py: self_signed); the ticket carries the certificate, and the receiver trusts only it
  (ops/model_fetch.py: pinned), so no other machine can read the bytes in transit or pose as the node, and a
  ticket never crosses the LAN in clear. Over TLS the port answers 401 to a request without a ticket before it
  opens a file; every file is also checked against its SHA-256 on arrival.
- **How a model arrives**: ops/model_fetch.py, whole (`fetch_model`) or a pipeline rank's share (`fetch_part`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ops.cluster_tls import self_signed
from ops.model_fetch import CHUNK, FetchError, Progress, fetch_model, fetch_part, keep_manifest, sha256_of
from ops.model_relay import arriving_manifest, relayed
from pipeline.access import AGENTS_PREFIX
from pipeline.connection import answer
from pipeline.limits import UNDECODABLE
from schemas.catalogue import FILE_NAME, FetchProgress, FileProgress, ModelFile, ModelManifest, Ticket, TicketAsk
from workers.store import (MANIFEST_CACHE, ModelStore, StoredModel, StoreError, model_revision)

log = logging.getLogger("conclave.files")
TICKET_S = 600.0  # a ticket unused this long dies; each request it is used for gives it this long again
TICKETS_LIVE = 4096  # tickets alive at once on one node: 64 nodes each fetching 64 models from it
encode = msgspec.json.Encoder().encode


def files_subject(node_id: str) -> str:
    return f"{AGENTS_PREFIX}.{node_id}.files"


def manifest(model: StoredModel) -> ModelManifest:
    """The model's files with their sizes and SHA-256, hashed once per file and kept beside them (a file whose size
    or modification time changed is hashed again). Blocks: run it in a thread."""
    cache_path = model.path / MANIFEST_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    files, fresh = [], {}
    for path in sorted(model.path.iterdir()):
        if path.is_symlink() or not path.is_file() or path.name.startswith("."):
            continue  # a link could point anywhere: only the model's own files are served
        if not FILE_NAME.fullmatch(path.name):
            log.warning("%s of %s is not served: not a name a model file may have", path.name, model.id)
            continue
        stat = path.stat()
        known = cache.get(path.name)
        if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            digest = known["sha256"]
        else:
            digest = sha256_of(path).hexdigest()
        fresh[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        files.append(ModelFile(name=path.name, size=stat.st_size, sha256=digest))
    if fresh != cache:
        keep_manifest(model.path, fresh)
    return ModelManifest(model=model.id, files=files, revision=model_revision(model.path))


class Tickets:
    """The bearer tokens this node gave out, each for one model until it expires (this machine's monotonic clock:
    tickets are judged only where they were issued).

    Bounded: any node's agent may ask, as often as it likes, so at most `limit` tickets live, the least recently
    used given up first. Kept in order of last use, which with one lifetime for all is the order they expire in:
    issuing forgets the expired from the front, and finding one is a lookup (by the token's hash, so that how long
    it takes says nothing of a token's bytes); a flood of asks costs each ask the same."""

    def __init__(self, ttl_s: float = TICKET_S, limit: int = TICKETS_LIVE):
        self.ttl_s, self.limit = ttl_s, limit
        self.issued: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # sha256(token) -> (model, expiry)

    def issue(self, model: str) -> str:
        now = time.monotonic()
        while self.issued and (len(self.issued) >= self.limit or next(iter(self.issued.values()))[1] <= now):
            self.issued.popitem(last=False)
        token = secrets.token_urlsafe(32)
        self.issued[_digest(token)] = (model, now + self.ttl_s)
        return token

    def allows(self, token: str, model: str) -> bool:
        """Whether `token` is a live ticket for `model`; a ticket in use lives on (each use gives it another
        `ttl_s`), so a transfer of hundreds of gigabytes never outlives its ticket, and an unused one dies."""
        now, key = time.monotonic(), _digest(token)
        held = self.issued.get(key)
        if held is None or held[0] != model or held[1] <= now:
            return False
        self.issued[key] = (model, now + self.ttl_s)
        self.issued.move_to_end(key)
        return True


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class WholeChunks(FileResponse):
    chunk_size = CHUNK  # Starlette's 64 KiB means sixteen times the sends for the same bytes


def files_app(store: ModelStore, tickets: Tickets, receiving: Callable[[str], bool] = lambda model: False) -> Starlette:
    """`GET /manifest?model=ID` and `GET /file?model=ID&name=NAME` (Range requests honoured), each with
    `Authorization: Bearer <ticket>`; 401 without a ticket for that model, 404 for what is not here. A model
    `receiving` says is arriving whole is served as it arrives (ops/model_relay.py)."""

    def checked(request: Request) -> str:
        model_id = request.query_params.get("model", "")
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not token or not tickets.allows(token, model_id):
            raise PermissionError
        store.path(model_id)  # a model id, or StoreError: 404
        return model_id

    def answering(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request, checked(request))
            except PermissionError:
                return JSONResponse({"error": "a ticket for this model is needed"}, status_code=401)
            except (FileNotFoundError, StoreError):
                return JSONResponse({"error": "no such model or file here"}, status_code=404)
        return endpoint

    hashing: dict[str, asyncio.Lock] = {}

    async def listed(model_id: str) -> tuple[StoredModel | None, ModelManifest]:
        """The stored model and its manifest, or (None, the source's manifest) for one arriving here."""
        if (model := store.get(model_id)) is None:
            if (arriving := await arriving_manifest(store, model_id, receiving)) is not None:
                return None, arriving
            if (model := store.get(model_id)) is None:  # (it may have entered the store meanwhile)
                raise FileNotFoundError
        # One hashing of a model at a time: a model never served before takes minutes, and every receiver asks.
        async with hashing.setdefault(model.id, asyncio.Lock()):
            return model, await asyncio.to_thread(manifest, model)

    async def get_manifest(request: Request, model_id: str) -> Response:
        return Response(encode((await listed(model_id))[1]), media_type="application/json")

    async def get_file(request: Request, model_id: str) -> Response:
        name = request.query_params.get("name", "")
        model, files = await listed(model_id)
        file = next((f for f in files.files if f.name == name), None)
        if file is None:  # only what the manifest lists: no other path is ever opened
            raise FileNotFoundError
        if model is None:
            return relayed(store, model_id, file, request.headers.get("range", ""), receiving)
        return WholeChunks(model.path / name)

    return Starlette(routes=[Route("/manifest", answering(get_manifest)), Route("/file", answering(get_file))])


async def answer_tickets(nc, node_id: str, store: ModelStore, tickets: Tickets, url: str, certificate: str,
                         receiving: Callable[[str], bool] = lambda model: False):
    """Tickets for this node's file port (at `url`, serving TLS with `certificate`), to the agents of other nodes
    (NATS lets only them ask here), for the models it holds or is `receiving`. Returns the subscription."""
    async def ticket(msg):
        try:
            asked = msgspec.json.decode(msg.data, type=TicketAsk)
            if store.get(asked.model) is None and not receiving(asked.model):
                raise StoreError(f"{asked.model} is not on node {node_id}")
            given = Ticket(url=url, certificate=certificate, token=tickets.issue(asked.model), ttl_s=tickets.ttl_s)
        except (*UNDECODABLE, StoreError) as exc:
            given = Ticket(error=str(exc))
        await answer(msg, encode(given))

    return await nc.subscribe(files_subject(node_id), cb=ticket)


async def ask_ticket(nc, node_id: str, model: str, timeout_s: float = 10.0) -> Ticket:
    msg = await nc.request(files_subject(node_id), encode(TicketAsk(model=model)), timeout=timeout_s)
    ticket = msgspec.json.decode(msg.data, type=Ticket)
    if ticket.error:
        raise FetchError(f"node {node_id} gives no ticket for {model}: {ticket.error}")
    return ticket


class NodeFiles:
    """This node's side: its file port and the tickets for it (what it serves), and the fetches the controller
    ordered (what it receives), with their progress for the node's status."""

    def __init__(self, store: ModelStore, node_id: str, address: str, tls: Path):
        self.store, self.node_id, self.address, self.tls = store, node_id, address, tls  # tls: a private folder
        self.tickets = Tickets()
        self.url, self.certificate, self.server, self.serving = "", "", None, None
        self.fetches: dict[str, asyncio.Task] = {}
        self.receiving: set[str] = set()  # models on their way here whole: passed on as they arrive
        self.progress: dict[str, FetchProgress] = {}
        self.halt = threading.Event()  # set at stop: a fetch's thread stops at its next chunk

    async def start(self) -> None:
        import socket

        import uvicorn

        from ops.serve import SignalFreeServer

        # Bound here (an error here, not an exit inside uvicorn), on a port the system picks; handed out in tickets.
        listener = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.address, 0))
        port = listener.getsockname()[1]
        certificate, key, self.certificate = self_signed(self.tls, "files", [self.address])
        # A peer in the middle of a large file does not hold this node's stop up for more than a few seconds.
        self.server = SignalFreeServer(uvicorn.Config(files_app(self.store, self.tickets, self.receiving.__contains__),
                                                      log_level="warning", ssl_certfile=str(certificate),
                                                      ssl_keyfile=str(key), timeout_graceful_shutdown=2))
        self.serving = asyncio.create_task(self.server.serve(sockets=[listener]))
        while not self.server.started:
            if self.serving.done():
                raise FetchError(f"the model file port could not serve on {self.address}:{port}")
            await asyncio.sleep(0.02)
        self.url = f"https://[{self.address}]:{port}" if ":" in self.address else f"https://{self.address}:{port}"

    async def stop(self) -> None:
        self.halt.set()
        for task in self.fetches.values():
            task.cancel()
        if self.server is not None:
            self.server.should_exit = True
            await asyncio.gather(self.serving, *self.fetches.values(), return_exceptions=True)

    async def answer(self, nc):
        return await answer_tickets(nc, self.node_id, self.store, self.tickets, self.url, self.certificate,
                                    self.receiving.__contains__)

    def fetch(self, link, model: str, sources: list[str], order: str, files: list[str] = ()) -> None:
        """Start fetching `model` (only the weight `files` and its other files, when given) unless it is here or on
        its way (the controller orders it again after a failure); its progress names the order it follows."""
        if self.store.get(model) is not None or (files and set(files) <= set(self.store.shards().get(model, []))):
            self.progress.pop(model, None)
            return
        if model in self.fetches and not self.fetches[model].done():
            self.progress[model] = msgspec.structs.replace(self.progress[model], order=order)
            return
        self.progress[model] = FetchProgress(model=model, order=order)
        if not files:  # from now: the next receiver of a chain may ask for a ticket before this fetch has begun
            self.receiving.add(model)
        self.fetches[model] = asyncio.create_task(self._fetch(link, model, [s for s in sources if s != self.node_id],
                                                              set(files)))

    async def receive(self, ticket: Ticket, model: str, moved: Progress | None = None):
        """`model` whole from the file port the ticket is for, passed on to other receivers while it arrives."""
        owned = model not in self.receiving  # (a fetch the controller ordered stays receiving between its sources)
        self.receiving.add(model)
        try:
            return await fetch_model(ticket, model, self.store, moved, self.halt)
        finally:
            if owned:
                self.receiving.discard(model)

    def report(self) -> list[FetchProgress]:
        return list(self.progress.values())

    async def _fetch(self, link, model: str, sources: list[str], files: set[str]) -> None:
        """From the first source that gives a ticket and the files; the next one goes on from what arrived (a source
        that vanishes mid-transfer is replaced)."""
        errors = []
        for source in sources:
            started = time.monotonic()
            try:
                ticket = await ask_ticket(link.nc, source, model)

                def moved(done: int, total: int, arriving: list[FileProgress]) -> None:
                    rate = done / max(time.monotonic() - started, 1e-3)
                    self.progress[model] = FetchProgress(model=model, order=self.progress[model].order, done=done,
                                                         total=total, source=source, bytes_per_s=round(rate),
                                                         files=arriving)

                if files:
                    await fetch_part(ticket, model, self.store, files, moved, self.halt)
                else:
                    await self.receive(ticket, model, moved)
                log.info("fetched %s from node %s in %.1fs", model, source, time.monotonic() - started)
                self.receiving.discard(model)
                self.progress.pop(model, None)
                return
            except Exception as exc:
                log.warning("could not fetch %s from node %s: %s", model, source, exc)
                errors.append(f"from node {source}: {exc}")
        self.receiving.discard(model)
        self.progress[model] = FetchProgress(model=model, order=self.progress[model].order,
                                             error="; ".join(errors) or "no node holds it")
