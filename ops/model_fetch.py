"""How a model arrives at a node from another node's file port (ops/model_files.py serves them): the whole model into
the store by one rename (`fetch_model`), or a pipeline rank's share of it into the node's part of it (`fetch_part`).

Each file is written to a `.partial` file, resumed with a Range request from what is there after an interruption,
hashed as it arrives (what was there first re-hashed), and renamed when its SHA-256 matches the source's manifest; a
file that does not match is deleted and fetched once more, then refused. The disk space is checked first.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import os
import shutil
import ssl
import threading
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Callable

import msgspec

from pipeline.limits import UNDECODABLE
from schemas.catalogue import FileProgress, ModelFile, ModelManifest, Ticket
from workers.files import replace_whole
from workers.store import MANIFEST_CACHE, REVISION_FILE, ModelStore, StoredModel, is_model_dir

log = logging.getLogger("conclave.files")
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a few hundred files at most
FETCH_TRIES = 2
# Files fetched at once from one source: one stream's receiving, hashing and writing keep about one core busy
# (815 MB/s on one core here), and a fast link (10 GbE and up, Thunderbolt) carries several times that, so a
# machine with cores to spare runs several; half its cores at most, since the source's sends, a relay's and the
# ranks need the rest. On this 2-core VM four streams cut one receiver's 2 GB from 4.5 s to 3.8 s but slowed three
# receivers at once from 14.9 s to 16.6 s (README, Benchmark): one stream here.
FETCH_PARALLEL = max(1, min(4, (os.cpu_count() or 2) // 2))
INCOMING_MANIFEST = ".conclave-incoming.json"  # the source's manifest of a model on its way here
Progress = Callable[[int, int, list[FileProgress]], None]  # bytes here, bytes in all, each file on its way


def incoming_path(store: ModelStore, model_id: str) -> Path:
    """Where a whole model arrives, before it enters the store by one rename."""
    return store.root / ".incoming" / store.path(model_id).name


class FetchError(Exception):
    """A model that could not be fetched; the message is for the operator."""


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


def keep_manifest(folder: Path, entries: dict) -> None:
    """The hashes of a model's files beside them (name -> size, mtime_ns, sha256), for `manifest` to trust while
    the files are unchanged; written by the node that hashed them, or that received and checked them."""
    try:
        replace_whole(folder / MANIFEST_CACHE, json.dumps(entries).encode())
    except OSError as exc:  # a read-only store: hashed again next time
        log.warning("could not keep the manifest of %s: %s", folder.name, exc)


async def fetch_model(ticket: Ticket, model_id: str, store: ModelStore,
                      progress: Progress | None = None,
                      halt: threading.Event | None = None) -> StoredModel:
    """Fetch `model_id` from the node whose `ticket` this is into `store` (see the module's docstring); `progress`
    after each chunk (from a thread: fetch_files). What was fetched before (an interrupted transfer) is kept and
    resumed; `halt` set stops it at the next chunk."""
    if (stored := store.get(model_id)) is not None:
        return stored
    incoming = incoming_path(store, model_id)
    (incoming / INCOMING_MANIFEST).unlink(missing_ok=True)  # an earlier attempt's: its source may have changed
    listed = await read_manifest(ticket, model_id)
    incoming.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(tidy, incoming, listed)
    # What this node passes on to the next receiver while the files arrive (ops/model_relay.py).
    (incoming / INCOMING_MANIFEST).write_bytes(msgspec.json.encode(listed))
    await fetch_files(ticket, listed, incoming, progress, halt or threading.Event())
    return await asyncio.to_thread(enter_store, incoming, store, listed)


async def fetch_part(ticket: Ticket, model_id: str, store: ModelStore, only: set[str],
                     progress: Progress | None = None,
                     halt: threading.Event | None = None) -> Path:
    """Fetch the weight files `only` of `model_id` (a pipeline rank's: workers/split.py, stage_files) and the
    model's other files (config, tokenizer) into this node's part of it (`store.shard_path`), beside the files an
    earlier plan brought that still match. Each file is checked as in `fetch_model` and enters the part by its own
    rename and into the part's manifest (what the node reports holding) as it arrives, the small files before the
    weights (fetch_files); the part keeps the whole model's revision (the audit log records that one, not a digest
    of the part)."""
    listed = await read_manifest(ticket, model_id)
    if unknown := only - {f.name for f in listed.files if f.name.endswith(".safetensors")}:
        raise FetchError(f"{model_id} on {ticket.url} has no weight file {', '.join(sorted(unknown))}")
    wanted = msgspec.structs.replace(listed, files=[f for f in listed.files
                                                    if not f.name.endswith(".safetensors") or f.name in only])
    folder = store.shard_path(model_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REVISION_FILE).write_text(listed.revision)
    kept = await asyncio.to_thread(tidy_part, folder, listed, wanted)

    def arrived(file: ModelFile) -> None:  # recorded as it arrives: an interrupted fetch keeps it
        kept[file.name] = {"size": file.size, "mtime_ns": (folder / file.name).stat().st_mtime_ns,
                           "sha256": file.sha256}
        keep_manifest(folder, kept)

    await fetch_files(ticket, wanted, folder, progress, halt or threading.Event(), arrived)
    return folder


async def fetch_files(ticket: Ticket, listed: ModelManifest, folder: Path, progress: Progress | None,
                      halt: threading.Event, arrived: Callable[[ModelFile], None] = lambda file: None) -> None:
    """Each file of `listed` not whole in `folder` yet, fetched (resumed from its part) and checked, after the disk
    space it needs was; `arrived(file)` once each is. FETCH_PARALLEL files at a time, in the manifest's order.
    `progress(done, total, files)` after each chunk: the bytes here of all of them, and of each file on its way."""
    check_room(folder, listed)
    done = sum(present(folder, f) for f in listed.files)
    arriving: dict[str, FileProgress] = {}
    counting = threading.Lock()  # `moved` is called from every file's thread

    def moved(file: ModelFile, count: int) -> None:
        nonlocal done
        with counting:
            done += count
            if file.name in arriving:
                arriving[file.name].done += count
            if progress is not None:
                progress(done, listed.size, [msgspec.structs.replace(f) for f in arriving.values()])

    async def one(file: ModelFile) -> None:
        for attempt in range(1, FETCH_TRIES + 1):
            if attempt > 1:  # what the failed try moved no longer counts
                moved(file, present(folder, file) - file.size)
            with counting:
                arriving[file.name] = FileProgress(name=file.name, done=present(folder, file), total=file.size)
            try:
                await asyncio.to_thread(fetch_file, ticket, listed.model, file, folder, partial(moved, file), halt)
            finally:
                with counting:
                    arriving.pop(file.name, None)
            if halt.is_set():
                raise FetchError(f"the fetch of {listed.model} was stopped")
            if (folder / file.name).is_file():
                arrived(file)
                return
            log.warning("%s of %s did not match its SHA-256 (try %d of %d)", file.name, listed.model, attempt,
                        FETCH_TRIES)
        raise FetchError(f"{file.name} of {listed.model} from {ticket.url} does not match its SHA-256 after "
                         f"{FETCH_TRIES} tries: refused (the source's copy may be damaged)")

    waiting = [f for f in listed.files if not (folder / f.name).is_file()]
    slots = asyncio.Semaphore(FETCH_PARALLEL)

    async def in_turn(file: ModelFile) -> None:
        async with slots:
            await one(file)

    # The model's small files (config, tokenizer) first, then its weights: a part's weight files never stand
    # recorded without them. Every file is tried (a failure leaves the others' parts to resume), then the first
    # failure is raised.
    for batch in ([f for f in waiting if not f.name.endswith(".safetensors")],
                  [f for f in waiting if f.name.endswith(".safetensors")]):
        failures = [r for r in await asyncio.gather(*(in_turn(f) for f in batch), return_exceptions=True) if r]
        if failures:
            raise failures[0]


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


def pinned(ticket: Ticket) -> ssl.SSLContext:
    """TLS that trusts exactly the certificate the ticket carried: the file port's own, made at its start
    (ops/cluster_tls.py: self_signed) and handed out by its node's agent over NATS, where every node is
    authenticated. No host name is checked: the ticket named the address, and only that key can answer."""
    if not ticket.certificate:
        raise FetchError(f"{ticket.url} came without its certificate (a node of an earlier version?): not fetched in "
                         f"clear")
    context = ssl.create_default_context(cadata=ticket.certificate)
    context.check_hostname = False
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # (Python 3.13's default) a self-signed leaf is no CA
    return context


async def read_manifest(ticket: Ticket, model_id: str) -> ModelManifest:
    """The source's manifest, checked: at most MAX_MANIFEST_BYTES, names that are plain file names, each once. No
    read timeout: a source hashes a model it never served before first (minutes for hundreds of GB)."""
    import httpx

    body = bytearray()
    base_url = ticket.url
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {ticket.token}"},
                                 verify=pinned(ticket), timeout=httpx.Timeout(30.0, read=None)) as client:
        async with client.stream("GET", "/manifest", params={"model": model_id}) as got:
            if got.status_code != 200:
                raise FetchError(f"{base_url} gave no manifest of {model_id}: HTTP {got.status_code}")
            async for chunk in got.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise FetchError(f"{base_url} sent a manifest of {model_id} over {MAX_MANIFEST_BYTES} bytes")
    try:
        listed = msgspec.json.decode(bytes(body), type=ModelManifest)
    except UNDECODABLE as exc:
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
    (incoming / INCOMING_MANIFEST).unlink(missing_ok=True)
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
    shutil.rmtree(store.shard_path(listed.model), ignore_errors=True)  # a part of it is no longer needed
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


def fetch_file(ticket: Ticket, model_id: str, file: ModelFile, incoming: Path,
               moved: Callable[[int], None], halt: threading.Event) -> None:
    """One file into `incoming`: `<name>` if its SHA-256 matched, else nothing (a part stays as `<name>.partial`
    when `halt` stopped it, or the source cut it short: FetchError). Blocking: run it in a thread. With http.client
    reading into one 1 MiB buffer, hashing and writing as it goes, it moved 815 MB/s on loopback here; httpx's
    async stream moved 330 MB/s without them."""
    partial = incoming / f"{file.name}.partial"
    have = partial.stat().st_size if partial.is_file() else 0
    if have > file.size:  # longer than the file: not a part of it
        have = 0
    digest = sha256_of(partial, have) if have else hashlib.sha256()
    if have < file.size:
        where = urllib.parse.urlsplit(ticket.url)
        connection = http.client.HTTPSConnection(where.hostname, where.port, timeout=120, context=pinned(ticket))
        got = None
        try:
            headers = {"Authorization": f"Bearer {ticket.token}", **({"Range": f"bytes={have}-"} if have else {})}
            connection.request("GET", "/file?" + urllib.parse.urlencode({"model": model_id, "name": file.name}),
                               headers=headers)
            got = connection.getresponse()
            if got.status == 200 and have:  # the source ignored the range: from the start
                moved(-have)
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
        finally:  # the response too: it holds the socket open, and a TLS peer then waits for its close
            if got is not None:
                got.close()
            connection.close()
    if halt.is_set():
        return
    if have < file.size:  # the source closed the transfer short (it stopped, or a relay was cut): kept, to resume
        raise FetchError(f"{file.name} of {model_id} was cut short at {have} of {file.size} bytes")
    if digest.hexdigest() == file.sha256:
        partial.replace(incoming / file.name)
    else:
        partial.unlink(missing_ok=True)
