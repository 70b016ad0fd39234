"""A node's models in the cluster's catalogue (pipeline/catalogue.py), and a model's entry for those who place it.

Each node's agent reads the facts of every model in its store once (`catalogue_entry`: the files with their sizes
and SHA-256, what placement needs, the layouts its architecture allows, which weight files hold which layers) and
writes them under its own key; again when the model's files change, and the key goes when the model leaves the
store. So a model imported or pulled on any node is in the catalogue within seconds, and the first machine (which
answers loads and previews) and the controller (which places it and orders each rank's files) read its facts from
NATS: neither needs a copy of a model that another node holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ops.model_facts import model_facts
from ops.model_files import manifest
from pipeline.catalogue import best_entry, delete_entry, put_entry, read_entries
from pipeline.connection import sleep_unless
from pipeline.nodes import read_nodes
from schemas.cluster import CatalogueEntry
from workers.shard import refused_layouts
from workers.split import layer_files, weight_map
from workers.store import DEFAULT_MODEL, ModelStore, StoredModel, StoreError, model_context_length

log = logging.getLogger("conclave.catalogue")
CATALOGUE_POLL_S = 2.0  # how often a node's agent compares its store with its entries


def catalogue_entry(model: StoredModel, node: str) -> CatalogueEntry:
    """The model's entry as `node` holds it. Blocks (its files are hashed once, then kept: ops/model_files.py):
    run it in a thread."""
    listed = manifest(model)
    weights = weight_map(model.path)
    per_layer, shared = layer_files(weights) if weights and len(set(weights.values())) > 1 else ([], [])
    return CatalogueEntry(id=model.id, node=node, revision=listed.revision, created=model.created,
                          context_length=model_context_length(model.path), facts=model_facts(model.id, model.path),
                          refused_layouts=refused_layouts(model.path), layer_files=per_layer, shared_files=shared,
                          files=listed.files, time=time.time())


def files_stamp(path: Path) -> tuple:
    """What changes when a model's files do (names, sizes, modification times), read without opening them."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                        if p.is_file() and not p.name.startswith(".")))


async def keep_catalogue(link, store: ModelStore, node: str, stopping: asyncio.Event) -> None:
    """Until `stopping`: this node's entries in the catalogue follow its store, every CATALOGUE_POLL_S. A model
    whose facts cannot be read (a broken config) is said once and tried again when its files change."""
    written: dict[str, tuple] = {}  # model -> the stamp of the files its entry was read from
    leftover: set[str] | None = None  # entries an earlier run of this node wrote, until each is checked
    failing = False
    while not stopping.is_set():
        try:
            js = link.nc.jetstream()
            if leftover is None:
                leftover = {e.id for e in await read_entries(js, node=node)}
            models = {m.id: m for m in await asyncio.to_thread(store.list)}
            for model_id in sorted((written.keys() | leftover) - models.keys()):
                await delete_entry(js, model_id, node)
                written.pop(model_id, None)
                leftover.discard(model_id)
            for model_id, model in models.items():
                stamp = await asyncio.to_thread(files_stamp, model.path)
                if written.get(model_id) == stamp:
                    continue
                try:
                    entry = await asyncio.to_thread(catalogue_entry, model, node)
                except Exception as exc:  # the model's own fault (or its files still being written)
                    log.warning("%s is not in the cluster's catalogue: its facts could not be read (%s); read again "
                                "when its files change", model_id, exc)
                else:
                    await put_entry(js, entry)
                    log.info("%s (revision %s) is in the cluster's catalogue", model_id, entry.revision)
                written[model_id] = stamp
                leftover.discard(model_id)
            if failing:
                log.info("the catalogue is written again")
            failing = False
        except Exception as exc:  # NATS away a moment: the next round writes what this one could not
            if not failing:
                log.warning("could not write this node's models to the catalogue: %s", exc)
            failing = True
        await sleep_unless(stopping, CATALOGUE_POLL_S)


async def entry_for(js, store: ModelStore, model_id: str) -> CatalogueEntry | None:
    """The facts to place `model_id` by: its catalogue entry from a node that holds it (pipeline/catalogue.py:
    best_entry); else, read here, the bundled model (every node can make it) or one in this machine's store whose
    entry is not written yet; None if neither knows it."""
    if entries := await read_entries(js, model_id):
        return best_entry(entries, await read_nodes(js))
    try:
        model = await asyncio.to_thread(store.resolve if model_id == DEFAULT_MODEL else store.get, model_id)
    except StoreError:
        return None
    return None if model is None else await asyncio.to_thread(catalogue_entry, model, "")
