"""The cluster's catalogue (ops/catalogue.py, pipeline/catalogue.py): a node's store in it under the node's own keys,
read back as written, a forgery ignored, and a model gone from the store gone from it; against a real nats-server."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from types import SimpleNamespace

import msgspec

from ops.catalogue import keep_catalogue
from ops.model_files import manifest
from pipeline.catalogue import best_entry, entry_subject, read_entries
from pipeline.subjects import CATALOGUE_STREAM
from schemas.cluster import NodeFacts, NodeStatus
from tests.conftest import MODEL
from workers.store import ModelStore

NODE, OTHER = "0123456789ab", "ba9876543210"


async def entries_until(js, model: str, predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate(entries := await read_entries(js, model)):
        assert time.monotonic() < deadline, f"the catalogue never agreed: {entries}"
        await asyncio.sleep(0.1)
    return entries


async def test_a_nodes_models_enter_the_catalogue_under_its_own_key_and_leave_with_the_model(bare_nats, server,
                                                                                               tmp_path):
    _, nc = bare_nats
    js = nc.jetstream()
    store = ModelStore(tmp_path / "models")
    copied = store.path("copied")
    copied.mkdir(parents=True)
    for file in (server.home / "models" / MODEL).iterdir():  # the bundled model, linked in (no copy of its bytes)
        if file.is_file() and not file.name.startswith("."):
            os.link(file, copied / file.name)
    stopping = asyncio.Event()
    keeping = asyncio.create_task(keep_catalogue(SimpleNamespace(nc=nc), store, NODE, stopping))
    try:
        (entry,) = await entries_until(js, "copied", bool)
        assert entry.node == NODE and entry.id == "copied"
        assert entry.files == manifest(store.get("copied")).files  # every file, with its size and SHA-256
        assert entry.facts.layers == 30 and entry.context_length == 8192 and entry.refused_layouts == {}
        assert entry.layer_files == []  # one weight file: every rank fetches it whole
        # An entry claiming this node under another node's key is not this node's word, nor the other's.
        forged = msgspec.structs.replace(entry, revision="0" * 16)
        await js.publish(entry_subject("copied", OTHER), msgspec.json.encode(forged), stream=CATALOGUE_STREAM)
        assert await read_entries(js, "copied") == [entry]
        # Placement takes the entry of a node that reports holding the model, before a newer one of a node without it.
        elsewhere = msgspec.structs.replace(entry, node=OTHER, time=entry.time + 1)
        holder = NodeStatus(facts=NodeFacts(id=NODE, memory_total=1, memory_available=1, models=["copied"]), memory_used=0, time=time.time())
        assert best_entry([entry, elsewhere], [holder]) == entry and best_entry([entry, elsewhere], []) == elsewhere
        shutil.rmtree(copied)
        await entries_until(js, "copied", lambda entries: entries == [])
    finally:
        stopping.set()
        await keeping
