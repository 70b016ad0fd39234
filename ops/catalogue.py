"""A node's models in the cluster's catalogue (pipeline/catalogue.py), and a model's entry for those who place it.

Each node's agent reads the facts of every model in its store once (`catalogue_entry`: the files with their sizes
and SHA-256, what placement needs, the layouts its architecture allows, which weight files hold which layers) and
writes them under its own key; again when the model's files change, and the key goes when the model leaves the
store. So a model imported or pulled on any node is in the catalogue once its node has read it (seconds; the first
hashing of hundreds of GB takes minutes), and the first machine (which answers loads and previews) and the
controller (which places it and orders each rank's files) read its facts from NATS: neither needs a copy of a model
that another node holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import nats.errors

from ops.model_facts import model_facts
from ops.model_files import manifest
from pipeline.catalogue import delete_entry, put_entry, read_entries, read_entry
from pipeline.connection import sleep_unless
from schemas.catalogue import ModelFile
from schemas.cluster import CatalogueEntry
from workers.split import layer_files, weight_map
from workers.store import DEFAULT_MODEL, ModelStore, StoredModel, StoreError, model_context_length, model_revision

log = logging.getLogger("conclave.catalogue")
CATALOGUE_POLL_S = 2.0  # how often a node's agent compares its store with its entries
CATALOGUE_CHECK_S = 30.0  # and its entries with what the bucket holds


def catalogue_entry(model: StoredModel, node: str, files: list[ModelFile]) -> CatalogueEntry:
    """The model's entry as `node` holds it, with `files` (ops/model_files.py: manifest, or [] where nobody reads
    them). Refused (StoreError) while a weight file its index names is missing: a pull or a copy still writing it
    would give facts too small. Blocks: run it in a thread."""
    weights = weight_map(model.path)
    if weights and (missing := set(weights.values()) - {p.name for p in model.path.glob("*.safetensors")}):
        raise StoreError(f"its weight files {', '.join(sorted(missing))} are not there (yet)")
    from workers.shard import refused_layouts  # mlx-lm: seconds to import, not for every process that reads entries

    per_layer, shared = layer_files(weights) if weights and len(set(weights.values())) > 1 else ([], [])
    return CatalogueEntry(id=model.id, node=node, revision=model_revision(model.path), created=model.created,
                          context_length=model_context_length(model.path), facts=model_facts(model.id, model.path),
                          refused_layouts=refused_layouts(model.path), layer_files=per_layer, shared_files=shared,
                          files=files, time=time.time())


def published_entry(model: StoredModel, node: str) -> CatalogueEntry:
    """The entry a node publishes: with every file's size and SHA-256 (hashed once, then kept beside the files)."""
    return catalogue_entry(model, node, manifest(model).files)


def files_stamp(path: Path) -> tuple:
    """What changes when a model's files do (names, sizes, modification times), read without opening them."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                        if p.is_file() and not p.name.startswith(".")))


async def keep_catalogue(link, store: ModelStore, node: str, stopping: asyncio.Event) -> None:
    """Until `stopping`: this node's entries in the catalogue follow its store, every CATALOGUE_POLL_S, and are
    compared with what the bucket holds every CATALOGUE_CHECK_S (an entry lost with a bucket made again is written
    again). A model whose facts cannot be read (a broken config, files still arriving) has no entry, is said once,
    and is read again when its files change; one model's trouble does not hold up the others'."""
    written: dict[str, tuple] = {}  # model -> the stamp of the files its entry was read from
    refused: dict[str, tuple] = {}  # model -> the stamp of the files whose facts could not be read
    leftover: set[str] = set()  # entries in the bucket by this node that no model of its store may match
    checked, failing = -CATALOGUE_CHECK_S, False
    while not stopping.is_set():
        try:
            js = link.nc.jetstream()
            if time.monotonic() - checked > CATALOGUE_CHECK_S:
                there = {e.id for e in await read_entries(js, node=node)}
                leftover |= there - written.keys()
                written = {m: stamp for m, stamp in written.items() if m in there}
                checked = time.monotonic()
            models = {m.id: m for m in await asyncio.to_thread(store.list)}
            for model_id in sorted((written.keys() | leftover) - models.keys()):
                await delete_entry(js, model_id, node)
                written.pop(model_id, None)
                leftover.discard(model_id)
            refused = {m: stamp for m, stamp in refused.items() if m in models}
            for model_id, model in models.items():
                await keep_entry(js, model, node, written, refused)
                leftover.discard(model_id)
            if failing:
                log.info("the catalogue is written again")
            failing = False
        except Exception as exc:  # NATS away a moment: the next round writes what this one could not
            if not failing:
                log.warning("could not write this node's models to the catalogue: %s", exc)
            failing = True
        await sleep_unless(stopping, CATALOGUE_POLL_S)


async def keep_entry(js, model: StoredModel, node: str, written: dict[str, tuple], refused: dict[str, tuple]) -> None:
    """One model's entry, written again if its files changed since (`written` and `refused` updated); raises only
    when NATS could not be reached."""
    try:
        stamp = await asyncio.to_thread(files_stamp, model.path)
    except OSError:  # deleted while this round looked: the next round deletes its entry
        return
    if stamp in (written.get(model.id), refused.get(model.id)):
        return
    try:
        entry = await asyncio.to_thread(published_entry, model, node)
        await put_entry(js, entry)
    except nats.errors.MaxPayloadError as exc:
        problem = f"its entry is larger than the broker's message limit ({exc})"
    except (nats.errors.Error, asyncio.TimeoutError):
        raise
    except Exception as exc:  # the model's own: facts unreadable, or files still arriving
        problem = str(exc)
    else:
        log.info("%s (revision %s) is in the cluster's catalogue", model.id, entry.revision)
        refused.pop(model.id, None)
        written[model.id] = stamp
        return
    log.warning("%s is not in the cluster's catalogue: %s; read again when its files change", model.id, problem)
    refused[model.id] = stamp
    if written.pop(model.id, None) is not None:  # what it said no longer describes the files
        await delete_entry(js, model.id, node)


async def entry_for(js, store: ModelStore, model_id: str) -> CatalogueEntry | None:
    """The facts to place `model_id` by: its catalogue entry from a node that holds it (pipeline/catalogue.py:
    best_entry); else, read here without hashing its files, the bundled model (every node can make it) or one in
    this machine's store whose entry is not written yet (its node hashes a large model for minutes first); None if
    neither knows it."""
    if (entry := await read_entry(js, model_id)) is not None:
        return entry
    try:
        model = await asyncio.to_thread(store.resolve if model_id == DEFAULT_MODEL else store.get, model_id)
        return None if model is None else await asyncio.to_thread(catalogue_entry, model, "", [])
    except StoreError:
        return None
