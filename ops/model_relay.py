"""A model on its way to this node, passed on to the next receiver as it arrives: fan-out without a tree of sources.

When several nodes need one model, the controller orders them in a chain (ops/controller.py: the first fetches from
a node that holds the model, each next one from the one before it, the holders after it as fallbacks), so that
every node sends the model once and receives it once: N receivers take about the time of one copy plus the chain's
delay, where N receivers of one source would take N copies' time on its link.

A receiver serves what it has of a model it is fetching whole (ops/model_fetch.py: `fetch_model`): the source's
manifest (kept beside the arriving files), and each file from the bytes written so far, following the file as it
grows, until all of it has been sent. Each byte is read back from the receiver's disk (the page cache, right after
its write); the next receiver checks each file's SHA-256 as every receiver does, so a relay can delay or cut a
transfer but not change what is accepted. A transfer is cut (the connection closed short, which the next receiver
resumes from another source) when this node stops fetching without the file whole, or starts the file over.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Callable

import msgspec
from starlette.responses import Response, StreamingResponse

from ops.model_fetch import CHUNK, INCOMING_MANIFEST, incoming_path
from schemas.catalogue import ModelFile, ModelManifest
from workers.store import ModelStore

POLL_S = 0.05  # how often a relayed file that has nothing new yet is looked at again
MANIFEST_WAIT_S = 60.0  # the manifest is there once this node has read its own source's (a round trip or two)
RANGE = re.compile(r"^bytes=(\d+)-$")  # the only form a receiver asks for (ops/model_fetch.py: fetch_file)


class RelayCut(Exception):
    """A relayed file that will not arrive here whole: its transfer is cut for the receiver to resume elsewhere."""


async def arriving_manifest(store: ModelStore, model_id: str, receiving: Callable[[str], bool]) -> ModelManifest | None:
    """The source's manifest of `model_id`, once this node has it; None if it stops fetching first (or the model
    entered the store meanwhile: then it is served as a stored one)."""
    path = incoming_path(store, model_id) / INCOMING_MANIFEST
    for _ in range(int(MANIFEST_WAIT_S / POLL_S)):
        if not receiving(model_id) or store.get(model_id) is not None:
            return None
        try:
            return msgspec.json.decode(path.read_bytes(), type=ModelManifest)
        except (OSError, msgspec.MsgspecError):  # not written yet (or being written)
            await asyncio.sleep(POLL_S)
    return None


def relayed(store: ModelStore, model_id: str, file: ModelFile, range_header: str,
            receiving: Callable[[str], bool]) -> Response:
    """`file` of a model arriving here, from the byte the Range header asks for, as it arrives."""
    asked = RANGE.fullmatch(range_header) if range_header else None
    start = int(asked.group(1)) if asked else 0
    if start > file.size:
        return Response(status_code=416, headers={"content-range": f"bytes */{file.size}"})
    headers = {"content-length": str(file.size - start), "accept-ranges": "bytes"}
    if asked:
        headers["content-range"] = f"bytes {start}-{file.size - 1}/{file.size}"
    incoming = incoming_path(store, model_id)
    places = [incoming / f"{file.name}.partial", incoming / file.name, store.path(model_id) / file.name]
    return StreamingResponse(follow(places, file.size, start, lambda: receiving(model_id)),
                             status_code=206 if asked else 200, headers=headers,
                             media_type="application/octet-stream")


async def follow(places: list[Path], size: int, start: int, receiving: Callable[[], bool]):
    """The bytes [start, size) of the file at the first of `places` that exists (its part, the whole file here, the
    model in the store), read as they are written; raises RelayCut when they will not all come."""
    fd = await opened(places, receiving)
    try:
        position = start
        while position < size:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, size - position), position)
            if chunk:
                yield chunk
                position += len(chunk)
            elif not receiving() and os.fstat(fd).st_size < size or started_over(fd, places[0]):
                raise RelayCut(f"{places[0].name} stopped arriving at {position} of {size} bytes")
            else:
                await asyncio.sleep(POLL_S)
    finally:
        os.close(fd)


async def opened(places: list[Path], receiving: Callable[[], bool]) -> int:
    """A file descriptor of the first of `places` there, once one is (it stays valid through the renames that
    follow: part to file, incoming folder to store)."""
    while True:
        for place in places:
            try:
                return os.open(place, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a model's own files only
            except (FileNotFoundError, OSError):  # not there (yet), or a link
                continue
        if not receiving():
            raise RelayCut(f"{places[1].name} is no longer arriving here")
        await asyncio.sleep(POLL_S)


def started_over(fd: int, partial: Path) -> bool:
    """Whether the file being followed was replaced by another part (a failed check, or a source that ignored the
    range): what was sent from the old one is not the file's beginning any more."""
    try:
        return os.stat(partial).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:  # renamed whole (or deleted: then nothing more is written to it, and `receiving` ends)
        return False
