"""Model files between nodes: each node serves its model store read-only over HTTP, and a node that lacks a model
fetches it from one that has it, so that each byte enters the building once and then travels over the LAN.

Not over NATS: nats-py's object store moved 41-133 MB/s on loopback here and has open large-object problems
(nats.py #703, nats-server #4680); NATS carries who may read (below) and, later, the catalogue and the progress.

- **What is served** (`files_app`): a model's manifest (each file's name, size and SHA-256, `manifest`) and its
  files, with HTTP Range requests (Starlette's FileResponse), nothing else: a file is named by the model and a name
  the manifest lists, so no request reaches outside a model's directory.
- **Who may read**: the holder of a ticket this node issued (`Tickets`), asked for over NATS on
  `conclave.agents.<id>.files` (`answer_tickets`, `ask_ticket`), where every node is authenticated by its own
  keys (pipeline/access.py). A ticket is a random bearer token for one model, alive while used (TICKET_S after
  its last use). The HTTP port answers 401 to a request without one before it opens a file. The bytes themselves
  travel in clear (plain HTTP, like `mx.distributed`'s ring between ranks): their integrity is the SHA-256 the
  receiver checks, their confidentiality that of the LAN segment; TLS with a certificate per node is the next
  step (README, Limits).
- **How a model arrives** (`fetch_model`): the disk space it needs is checked first (a clear error with the
  numbers). Each file is written to `<store>/.incoming/<model>/<name>.partial`, resumed with a Range request from
  what is there after an interruption, hashed as it arrives (what was there first re-hashed), and renamed when its
  SHA-256 matches the manifest; a file that does not match is deleted and fetched once more, then refused. The
  model enters the store whole, by one rename of its directory: a node never lists, nor starts a rank on, half a
  model.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import os
import secrets
import shutil
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.access import AGENTS_PREFIX
from schemas.catalogue import FILE_NAME, FetchProgress, ModelFile, ModelManifest, Ticket, TicketAsk
from workers.store import (MANIFEST_CACHE, REVISION_FILE, ModelStore, StoredModel, StoreError, is_model_dir,
                           model_revision)

log = logging.getLogger("conclave.files")
TICKET_S = 600.0  # a ticket unused this long dies; each request it is used for gives it this long again
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a few hundred files at most
FETCH_TRIES = 2
encode = msgspec.json.Encoder().encode


class FetchError(Exception):
    """A model that could not be fetched; the message is for the operator."""


def files_subject(node_id: str) -> str:
    return f"{AGENTS_PREFIX}.{node_id}.files"


def sha256_of(path: Path, start: int | None = None):
    """The SHA-256 object of the file's first `start` bytes (all of them by default), to update further."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = start
        while chunk := f.read(CHUNK if remaining is None else min(CHUNK, remaining)):
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest


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


def keep_manifest(folder: Path, entries: dict) -> None:
    """The hashes of a model's files beside them (name -> size, mtime_ns, sha256), for `manifest` to trust while
    the files are unchanged; written by the node that hashed them, or that received and checked them."""
    try:
        temporary = folder / f"{MANIFEST_CACHE}.{os.getpid()}"
        temporary.write_text(json.dumps(entries))
        temporary.replace(folder / MANIFEST_CACHE)
    except OSError as exc:  # a read-only store: hashed again next time
        log.warning("could not keep the manifest of %s: %s", folder.name, exc)


class Tickets:
    """The bearer tokens this node gave out, each for one model until it expires (this machine's monotonic clock:
    tickets are judged only where they were issued)."""

    def __init__(self, ttl_s: float = TICKET_S):
        self.ttl_s = ttl_s
        self.issued: dict[str, tuple[str, float]] = {}  # token -> (model, expiry)

    def issue(self, model: str) -> str:
        now = time.monotonic()
        self.issued = {t: held for t, held in self.issued.items() if held[1] > now}  # forget the expired
        token = secrets.token_urlsafe(32)
        self.issued[token] = (model, now + self.ttl_s)
        return token

    def allows(self, token: str, model: str) -> bool:
        """Whether `token` is a live ticket for `model`; a ticket in use lives on (each use gives it another
        `ttl_s`), so a transfer of hundreds of gigabytes never outlives its ticket, and an unused one dies."""
        now = time.monotonic()
        found = next((t for t in self.issued if secrets.compare_digest(t.encode(), token.encode())), None)
        if found is None or self.issued[found][0] != model or self.issued[found][1] <= now:
            return False
        self.issued[found] = (model, now + self.ttl_s)
        return True


class WholeChunks(FileResponse):
    chunk_size = CHUNK  # Starlette's 64 KiB means sixteen times the sends for the same bytes


def files_app(store: ModelStore, tickets: Tickets) -> Starlette:
    """`GET /manifest?model=ID` and `GET /file?model=ID&name=NAME` (Range requests honoured), each with
    `Authorization: Bearer <ticket>`; 401 without a ticket for that model, 404 for what is not in the store."""

    def checked(request: Request) -> StoredModel:
        model_id = request.query_params.get("model", "")
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not token or not tickets.allows(token, model_id):
            raise PermissionError
        model = store.get(model_id)
        if model is None:
            raise FileNotFoundError
        return model

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

    async def listed(model: StoredModel) -> ModelManifest:
        # One hashing of a model at a time: a model never served before takes minutes, and every receiver asks.
        async with hashing.setdefault(model.id, asyncio.Lock()):
            return await asyncio.to_thread(manifest, model)

    async def get_manifest(request: Request, model: StoredModel) -> Response:
        return Response(encode(await listed(model)), media_type="application/json")

    async def get_file(request: Request, model: StoredModel) -> Response:
        name = request.query_params.get("name", "")
        listed_names = {f.name for f in (await listed(model)).files}
        if name not in listed_names:  # only what the manifest lists: no other path is ever opened
            raise FileNotFoundError
        return WholeChunks(model.path / name)

    return Starlette(routes=[Route("/manifest", answering(get_manifest)), Route("/file", answering(get_file))])


async def answer_tickets(nc, node_id: str, store: ModelStore, tickets: Tickets, url: str):
    """Tickets for this node's file port (at `url`), to the agents of other nodes (NATS lets only them ask here).
    Returns the subscription."""
    async def ticket(msg):
        try:
            asked = msgspec.json.decode(msg.data, type=TicketAsk)
            if store.get(asked.model) is None:
                raise StoreError(f"{asked.model} is not on node {node_id}")
            answer = Ticket(url=url, token=tickets.issue(asked.model), ttl_s=tickets.ttl_s)
        except (msgspec.MsgspecError, StoreError) as exc:
            answer = Ticket(error=str(exc))
        await msg.respond(encode(answer))

    return await nc.subscribe(files_subject(node_id), cb=ticket)


async def ask_ticket(nc, node_id: str, model: str, timeout_s: float = 10.0) -> Ticket:
    msg = await nc.request(files_subject(node_id), encode(TicketAsk(model=model)), timeout=timeout_s)
    ticket = msgspec.json.decode(msg.data, type=Ticket)
    if ticket.error:
        raise FetchError(f"node {node_id} gives no ticket for {model}: {ticket.error}")
    return ticket


async def fetch_model(base_url: str, token: str, model_id: str, store: ModelStore,
                      progress: Callable[[int, int], None] | None = None,
                      halt: threading.Event | None = None) -> StoredModel:
    """Fetch `model_id` from the node at `base_url` into `store` (see the module's docstring); `progress(done,
    total)` after each chunk (from a thread). What was fetched before (an interrupted transfer) is kept and
    resumed; `halt` set stops it at the next chunk."""
    if (stored := store.get(model_id)) is not None:
        return stored
    listed = await read_manifest(base_url, token, model_id)
    incoming = store.root / ".incoming" / store.path(model_id).name
    incoming.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(tidy, incoming, listed)
    await fetch_files(base_url, token, listed, incoming, progress, halt or threading.Event())
    return await asyncio.to_thread(enter_store, incoming, store, listed)


async def fetch_part(base_url: str, token: str, model_id: str, store: ModelStore, only: set[str],
                     progress: Callable[[int, int], None] | None = None,
                     halt: threading.Event | None = None) -> Path:
    """Fetch the weight files `only` of `model_id` (a pipeline rank's: workers/split.py, stage_files) and the
    model's other files (config, tokenizer) into this node's part of it (`store.shard_path`), beside the files an
    earlier plan brought that still match. Each file is checked as in `fetch_model` and enters the part by its own
    rename; the part's manifest (what the node reports holding) is written once all of them are there, with the
    whole model's revision (the audit log records that one, not a digest of the part)."""
    listed = await read_manifest(base_url, token, model_id)
    if unknown := only - {f.name for f in listed.files if f.name.endswith(".safetensors")}:
        raise FetchError(f"{model_id} on {base_url} has no weight file {', '.join(sorted(unknown))}")
    wanted = msgspec.structs.replace(listed, files=[f for f in listed.files
                                                    if not f.name.endswith(".safetensors") or f.name in only])
    folder = store.shard_path(model_id)
    folder.mkdir(parents=True, exist_ok=True)
    kept = await asyncio.to_thread(tidy_part, folder, listed, wanted)
    await fetch_files(base_url, token, wanted, folder, progress, halt or threading.Event())
    (folder / REVISION_FILE).write_text(listed.revision)
    keep_manifest(folder, {**kept, **{f.name: {"size": f.size, "mtime_ns": (folder / f.name).stat().st_mtime_ns,
                                               "sha256": f.sha256} for f in wanted.files}})
    return folder


async def fetch_files(base_url: str, token: str, listed: ModelManifest, folder: Path,
                      progress: Callable[[int, int], None] | None, halt: threading.Event) -> None:
    """Each file of `listed` not whole in `folder` yet, fetched (resumed from its part) and checked, after the disk
    space it needs was."""
    check_room(folder, listed)
    for file in listed.files:
        if (folder / file.name).is_file():
            continue
        for attempt in range(1, FETCH_TRIES + 1):
            done = sum(present(folder, f) for f in listed.files)

            def moved(arrived: int) -> None:
                nonlocal done
                done += arrived
                if progress is not None:
                    progress(done, listed.size)

            await asyncio.to_thread(fetch_file, base_url, token, listed.model, file, folder, moved, halt)
            if halt.is_set():
                raise FetchError(f"the fetch of {listed.model} was stopped")
            if (folder / file.name).is_file():
                break
            log.warning("%s of %s did not match its SHA-256 (try %d of %d)", file.name, listed.model, attempt,
                        FETCH_TRIES)
        else:
            raise FetchError(f"{file.name} of {listed.model} from {base_url} does not match its SHA-256 after "
                             f"{FETCH_TRIES} tries: refused (the source's copy may be damaged)")


def tidy_part(folder: Path, listed: ModelManifest, wanted: ModelManifest) -> dict:
    """A part's folder made to agree with the source's manifest without hashing it again: a whole file stays if its
    recorded hash is the manifest's (a file of another stage, from an earlier plan, too), a partial one if it is
    wanted; the rest goes. Returns the kept files' records, now the part's manifest (what the node reports)."""
    try:
        recorded = json.loads((folder / MANIFEST_CACHE).read_text())
    except (OSError, ValueError):
        recorded = {}
    files, wanted_names = {f.name: f for f in listed.files}, {f.name for f in wanted.files}
    kept = {}
    for path in folder.iterdir():
        if path.name in (MANIFEST_CACHE, REVISION_FILE):
            continue
        file, entry = files.get(path.name), recorded.get(path.name)
        if file is not None and entry and path.is_file() and not path.is_symlink() and entry["sha256"] == file.sha256 \
                and entry["size"] == path.stat().st_size == file.size and entry["mtime_ns"] == path.stat().st_mtime_ns:
            kept[path.name] = entry
        elif path.name.endswith(".partial") and path.name.removesuffix(".partial") in wanted_names and path.is_file():
            continue
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    keep_manifest(folder, kept)
    return kept


async def read_manifest(base_url: str, token: str, model_id: str) -> ModelManifest:
    """The source's manifest, checked: at most MAX_MANIFEST_BYTES, names that are plain file names, each once. No
    read timeout: a source hashes a model it never served before first (minutes for hundreds of GB)."""
    import httpx

    body = bytearray()
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(30.0, read=None)) as client:
        async with client.stream("GET", "/manifest", params={"model": model_id}) as got:
            if got.status_code != 200:
                raise FetchError(f"{base_url} gave no manifest of {model_id}: HTTP {got.status_code}")
            async for chunk in got.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise FetchError(f"{base_url} sent a manifest of {model_id} over {MAX_MANIFEST_BYTES} bytes")
    try:
        listed = msgspec.json.decode(bytes(body), type=ModelManifest)
    except msgspec.MsgspecError as exc:
        raise FetchError(f"{base_url} sent a manifest of {model_id} that is not one: {exc}") from None
    if listed.model != model_id:
        raise FetchError(f"{base_url} sent the manifest of {listed.model} for {model_id}")
    if len({f.name.lower() for f in listed.files}) != len(listed.files):  # one file each, on any file system
        raise FetchError(f"{base_url} sent a manifest of {model_id} that names a file twice")
    return listed


def tidy(incoming: Path, listed: ModelManifest) -> None:
    """What an earlier attempt left, made to agree with this manifest (the source may have a newer revision): what
    it does not list goes, and a whole file stays only if it still matches."""
    files = {f.name: f for f in listed.files}
    for path in incoming.iterdir():
        file = files.get(path.name.removesuffix(".partial"))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif file is None or (path.name == file.name and (path.stat().st_size != file.size
                                                          or sha256_of(path).hexdigest() != file.sha256)):
            path.unlink()


def enter_store(incoming: Path, store: ModelStore, listed: ModelManifest) -> StoredModel:
    """The model into the store whole, by one rename, with the hashes it was checked against (the next node it
    serves need not hash it again)."""
    if not is_model_dir(incoming):
        raise FetchError(f"{listed.model} arrived without config.json and *.safetensors: not a model")
    keep_manifest(incoming, {f.name: {"size": f.size, "mtime_ns": (incoming / f.name).stat().st_mtime_ns,
                                      "sha256": f.sha256} for f in listed.files})
    if (stored := store.get(listed.model)) is not None:  # it arrived another way meanwhile (an import, a pull)
        shutil.rmtree(incoming, ignore_errors=True)
        return stored
    target = store.path(listed.model)
    if target.exists():  # not a model: perhaps a pull writing into it now, which must not be deleted under it
        raise FetchError(f"{target} exists and is not a model (a `conclave models pull` in progress?): remove it "
                         f"for {listed.model} to be fetched")
    incoming.replace(target)
    return store.get(listed.model)


def present(incoming: Path, file: ModelFile) -> int:
    """Bytes of `file` already here (whole, or the part an interrupted transfer left)."""
    for path in (incoming / file.name, incoming / f"{file.name}.partial"):
        if path.is_file():
            return min(path.stat().st_size, file.size)
    return 0


def check_room(incoming: Path, listed: ModelManifest) -> None:
    needed = listed.size - sum(present(incoming, f) for f in listed.files)
    free = shutil.disk_usage(incoming).free
    if needed > free:
        raise FetchError(f"{listed.model} needs {needed / 1e9:.1f} GB more on this node's disk "
                         f"({incoming.parent.parent}) and {free / 1e9:.1f} GB are free")


def fetch_file(base_url: str, token: str, model_id: str, file: ModelFile, incoming: Path,
               moved: Callable[[int], None], halt: threading.Event) -> None:
    """One file into `incoming`: `<name>` if its SHA-256 matched, else nothing (a part stays as `<name>.partial`
    when `halt` stopped it). Blocking: run it in a thread. With http.client reading into one 1 MiB buffer, hashing
    and writing as it goes, it moved 815 MB/s on loopback here; httpx's async stream moved 330 MB/s without them."""
    partial = incoming / f"{file.name}.partial"
    have = partial.stat().st_size if partial.is_file() else 0
    if have > file.size:  # longer than the file: not a part of it
        have = 0
    digest = sha256_of(partial, have) if have else hashlib.sha256()
    if have < file.size:
        where = urllib.parse.urlsplit(base_url)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
        try:
            headers = {"Authorization": f"Bearer {token}", **({"Range": f"bytes={have}-"} if have else {})}
            connection.request("GET", "/file?" + urllib.parse.urlencode({"model": model_id, "name": file.name}),
                               headers=headers)
            got = connection.getresponse()
            if got.status == 200 and have:  # the source ignored the range: from the start
                have, digest = 0, hashlib.sha256()
            elif got.status not in (200, 206):
                raise FetchError(f"{file.name} of {model_id}: HTTP {got.status}")
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            with open(partial, "ab" if have else "wb") as out:
                while have < file.size and not halt.is_set() and (n := got.readinto(buffer)):
                    n = min(n, file.size - have)  # never more than the manifest said
                    out.write(view[:n])
                    digest.update(view[:n])
                    have += n
                    moved(n)
        finally:
            connection.close()
    if halt.is_set():
        return
    if have == file.size and digest.hexdigest() == file.sha256:
        partial.replace(incoming / file.name)
    else:
        partial.unlink(missing_ok=True)


class NodeFiles:
    """This node's side: its file port and the tickets for it (what it serves), and the fetches the controller
    ordered (what it receives), with their progress for the node's status."""

    def __init__(self, store: ModelStore, node_id: str, address: str):
        self.store, self.node_id, self.address = store, node_id, address
        self.tickets = Tickets()
        self.url, self.server, self.serving = "", None, None
        self.fetches: dict[str, asyncio.Task] = {}
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
        # A peer in the middle of a large file does not hold this node's stop up for more than a few seconds.
        self.server = SignalFreeServer(uvicorn.Config(files_app(self.store, self.tickets), log_level="warning",
                                                      timeout_graceful_shutdown=2))
        self.serving = asyncio.create_task(self.server.serve(sockets=[listener]))
        while not self.server.started:
            if self.serving.done():
                raise FetchError(f"the model file port could not serve on {self.address}:{port}")
            await asyncio.sleep(0.02)
        self.url = f"http://[{self.address}]:{port}" if ":" in self.address else f"http://{self.address}:{port}"

    async def stop(self) -> None:
        self.halt.set()
        for task in self.fetches.values():
            task.cancel()
        if self.server is not None:
            self.server.should_exit = True
            await asyncio.gather(self.serving, *self.fetches.values(), return_exceptions=True)

    async def answer(self, nc):
        return await answer_tickets(nc, self.node_id, self.store, self.tickets, self.url)

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
        self.fetches[model] = asyncio.create_task(self._fetch(link, model, [s for s in sources if s != self.node_id],
                                                              set(files)))

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

                def moved(done: int, total: int) -> None:
                    rate = done / max(time.monotonic() - started, 1e-3)
                    self.progress[model] = FetchProgress(model=model, order=self.progress[model].order, done=done,
                                                         total=total, source=source, bytes_per_s=round(rate))

                if files:
                    await fetch_part(ticket.url, ticket.token, model, self.store, files, moved, self.halt)
                else:
                    await fetch_model(ticket.url, ticket.token, model, self.store, moved, self.halt)
                log.info("fetched %s from node %s in %.1fs", model, source, time.monotonic() - started)
                self.progress.pop(model, None)
                return
            except Exception as exc:
                log.warning("could not fetch %s from node %s: %s", model, source, exc)
                errors.append(f"from node {source}: {exc}")
        self.progress[model] = FetchProgress(model=model, order=self.progress[model].order,
                                             error="; ".join(errors) or "no node holds it")
