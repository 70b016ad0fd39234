"""The cluster's catalogue of models: a JetStream key-value bucket of each model's facts, one key per model and
node that holds it (`<model>.<node>`).

A node's agent writes the entries of the models in its own store, and only under its own keys (pipeline/access.py:
a node describes only its own copy, so one node cannot forge the facts of another's), and deletes them when a
model leaves its store. The bucket is kept on disk, as the plan is: the catalogue outlives a restart of the brokers,
and a node that is down keeps its entries (its files are still on its disk). Readers are the first machine (loads,
previews, room) and the controller wherever it runs (placement, per-rank files): neither needs the model's files.
"""

from __future__ import annotations

import msgspec
from nats.js.api import KeyValueConfig, StorageType

from pipeline.nodes import read_bucket, read_nodes, state_of
from pipeline.subjects import CATALOGUE_BUCKET, CATALOGUE_PREFIX, CATALOGUE_STREAM, subject_token
from pipeline.limits import UNDECODABLE
from schemas.cluster import CatalogueEntry, NodeStatus
from workers.store import StoreError, check_model_id

decode_entry = msgspec.json.Decoder(CatalogueEntry).decode
encode = msgspec.json.Encoder().encode


def catalogue_bucket_config() -> KeyValueConfig:
    # Bounded, so that no node can fill the brokers' disks through it: an entry is a few kB (a model of 64 weight
    # files and 61 layers, about 15 kB), so 64 MiB holds thousands.
    return KeyValueConfig(bucket=CATALOGUE_BUCKET, history=1, storage=StorageType.FILE, direct=True,
                          max_value_size=1 << 20, max_bytes=64 << 20)


def entry_subject(model: str, node: str) -> str:
    return f"{CATALOGUE_PREFIX}.{subject_token(model)}.{node}"


async def put_entry(js, entry: CatalogueEntry) -> None:
    await js.publish(entry_subject(entry.id, entry.node), encode(entry), stream=CATALOGUE_STREAM)


async def delete_entry(js, model: str, node: str) -> None:
    await js.publish(entry_subject(model, node), b"", stream=CATALOGUE_STREAM, headers={"KV-Operation": "DEL"})


async def read_entries(js, model: str | None = None, node: str = "*") -> list[CatalogueEntry]:
    """The entries of `model` (every model's if None) by `node` (any node's if "*"); an entry counts only under its
    own model's and node's key, as put_entry writes it, and with a model id a store could hold (anything else there
    is a forgery or garbage). Its time is when the broker stored it, not the node's claim."""
    subjects = f"{CATALOGUE_PREFIX}.{subject_token(model) if model is not None else '*'}.{node}"
    entries = []
    for msg in await read_bucket(js, CATALOGUE_STREAM, subjects):
        try:
            entry = decode_entry(msg.data or b"")  # a deleted key's marker has no data
        except UNDECODABLE:
            continue
        try:
            check_model_id(entry.id)
        except StoreError:
            continue
        if msg.subject == entry_subject(entry.id, entry.node):
            entries.append(msgspec.structs.replace(entry, time=msg.time.timestamp() if msg.time else 0.0))
    return entries


def best_entry(entries: list[CatalogueEntry], statuses: list[NodeStatus]) -> CatalogueEntry | None:
    """The entry to place a model by: one from a node up that reports it holds the model now (the newest written
    first), else the newest of any (its holder may be down for a moment). Holders of one revision agree on its
    facts."""
    holding = {s.facts.id for s in statuses if entries and entries[0].id in s.facts.models and state_of(s) == "up"}
    return max(entries, key=lambda e: (e.node in holding, e.time), default=None)


async def read_entry(js, model: str) -> CatalogueEntry | None:
    """The entry to place `model` by (`best_entry` among its holders' entries, against the nodes' statuses now), or
    None when the catalogue has none."""
    entries = await read_entries(js, model)
    return best_entry(entries, await read_nodes(js)) if entries else None
