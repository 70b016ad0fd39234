"""The cluster's nodes as their agents report them, and the models it serves: JetStream key-value buckets.

Nodes: one key per node id.

Each agent puts its status (schemas/cluster.py: NodeStatus) every second; the bucket keeps one value per
key for NODES_TTL_S, so a node that stopped reporting is first shown as lost (its status older than
LOST_AFTER_S: a reader sees it within seconds) and then, a minute later, forgotten. Readers list the keys
from the stream's subjects and fetch each by direct get, which a permission can limit to this bucket.
"""

from __future__ import annotations

import time

import msgspec
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import NotFoundError

from pipeline.subjects import (INSTANCES_BUCKET, INSTANCES_PREFIX, INSTANCES_STREAM, NODES_BUCKET, NODES_PREFIX,
                               NODES_STREAM, subject_token)
from pipeline.limits import UNDECODABLE
from schemas.catalogue import ClusterModel
from schemas.cluster import Link, NodeStatus
from schemas.membership import Instance

NODES_TTL_S = 60.0
INSTANCES_REFRESH_S = 2.0  # how often an ingress reads the instances (its model list)
LOST_AFTER_S = 3.0  # three reports missed: a node gone is seen within 4 s by a reader polling every second
decode_status = msgspec.json.Decoder(NodeStatus).decode
decode_instance = msgspec.json.Decoder(Instance).decode
encode = msgspec.json.Encoder().encode


# Every node writes its status here every second, and the controller and every ingress decode all of them, on their
# event loops: bounded, so that no node can stall them (a status of 32 MiB, NATS's payload limit here, took seconds
# to decode; one of 1 MiB takes about 0.1 s). A real one is a few kB, and about 6 kB more for each large model it
# holds in part (`shards`: the names of the weight files it has): 1 MiB is some 150 of those.
NODE_STATUS_MAX = 1 << 20


def nodes_bucket_config() -> KeyValueConfig:
    return KeyValueConfig(bucket=NODES_BUCKET, history=1, ttl=NODES_TTL_S, storage=StorageType.MEMORY, direct=True,
                          max_value_size=NODE_STATUS_MAX)


def node_subject(node_id: str) -> str:
    return f"{NODES_PREFIX}.{node_id}"


async def put_status(js, status: NodeStatus) -> None:
    await js.publish(node_subject(status.facts.id), encode(status), stream=NODES_STREAM)


async def read_nodes(js) -> list[NodeStatus]:
    """Every node's latest status, by node id; empty when none reported (or the bucket does not exist).

    A status counts only under its own node's key (an agent may write only there, pipeline/access.py, so one
    claiming another node's id is a forgery), and its time is when the broker stored it, brought onto this
    machine's clock (`on_this_clock`): lost or not is judged on the broker's clock alone, never on a node's or this
    reader's, either of which may be off by any amount (an air-gapped building may have no time server)."""
    statuses, latest = [], None  # latest: the broker's stamp on the report it stored last
    for msg in await read_bucket(js, NODES_STREAM, f"{NODES_PREFIX}.>"):
        try:
            status = decode_status(msg.data or b"")  # a deleted key's marker has no data
        except UNDECODABLE:
            continue
        if msg.subject == node_subject(status.facts.id):
            stamped = msgspec.structs.replace(status, time=msg.time.timestamp() if msg.time else status.time)
            statuses.append(stamped)
            latest = max(latest or (0, 0.0), (msg.seq, stamped.time))
    return on_this_clock(statuses, latest[1] if latest else 0.0, time.time())


# Every agent reports each second, so the report the broker stored last was stored at most this long before it is read.
NEWEST_AGE_S = 1.5


def on_this_clock(statuses: list[NodeStatus], latest: float, now: float) -> list[NodeStatus]:
    """Statuses stamped with the broker's clock (when it stored them), moved onto this machine's: the report the broker
    stored last (stamped `latest`) taken as stored `now`, each other as much older as the broker says. A reader whose
    clock is minutes off the broker's (a joined node's ingress; a controller on a broker node, where the bucket's
    leader is another) would otherwise see every node lost, or a dead one up.

    Anchored on the last report stored, not the latest stamp: after the bucket's leader changed (three brokers), a
    dead node's last report may carry the old leader's clock, ahead of the new one's, and taken as "now" it would
    make every live node look lost. A stamp ahead of `latest` (another clock's) reads as new: such a node looks up
    until it reports again or its report expires (NODES_TTL_S), the failure that stops no group. The costs: while
    no node at all reports, the last reports look fresh until they expire, and a time read here may be up to
    NEWEST_AGE_S later than the truth."""
    return [msgspec.structs.replace(s, time=now - max(0.0, latest - s.time)) for s in statuses]


def instances_bucket_config() -> KeyValueConfig:
    # One value per model, rewritten by the controller at every change; memory, like the nodes: a restarted
    # controller places again and says so.
    return KeyValueConfig(bucket=INSTANCES_BUCKET, history=1, storage=StorageType.MEMORY, direct=True)


async def put_instance(js, instance: Instance) -> None:
    await js.publish(f"{INSTANCES_PREFIX}.{subject_token(instance.model)}", encode(instance), stream=INSTANCES_STREAM)


async def read_instances(js) -> list[Instance]:
    instances = []
    for msg in await read_bucket(js, INSTANCES_STREAM, f"{INSTANCES_PREFIX}.>"):
        try:
            instances.append(decode_instance(msg.data or b""))  # a removed model's marker has no data
        except UNDECODABLE:
            continue
    return instances


async def read_bucket(js, stream: str, subjects: str) -> list:
    """The latest message of every key matching `subjects`; empty when there is none (or the bucket does not
    exist). Keys are listed from the stream's subjects and read by direct get, which a permission can limit to
    this bucket."""
    try:
        info = await js.stream_info(stream, subjects_filter=subjects)
    except NotFoundError:
        return []
    messages = []
    for subject in sorted(info.state.subjects or {}):
        try:
            messages.append(await js.get_last_msg(stream, subject, direct=True))
        except NotFoundError:  # expired or deleted meanwhile
            continue
    return messages


def state_of(status: NodeStatus, now: float | None = None) -> str:
    """"up", or "lost" when its agent has not reported for LOST_AFTER_S."""
    return "lost" if (now if now is not None else time.time()) - status.time > LOST_AFTER_S else "up"


def links_between(statuses: list[NodeStatus]) -> list[Link]:
    """Which nodes are cabled to which (placement's links, ops/placement.py), from their agents' Thunderbolt facts
    (ops/telemetry.py): a bus of one node naming a bus of another as cabled to it is a link, "rdma" when
    `rdma_ctl` says enabled on both ends (jaccl needs it: EXO's rule too), else "thunderbolt". Each pair once.
    Nodes without Thunderbolt facts (Linux, or a Mac whose profiler said nothing) have no links: placement then
    never chooses jaccl on its own."""
    owner = {port.domain: status for status in statuses for port in status.thunderbolt}
    found: dict[frozenset[str], Link] = {}
    for status in statuses:
        for port in status.thunderbolt:
            for peer in (owner.get(domain) for domain in port.peers):
                if peer is None or peer.facts.id == status.facts.id:
                    continue
                pair = frozenset((status.facts.id, peer.facts.id))
                rdma = status.rdma_enabled is True and peer.rdma_enabled is True
                if pair not in found or rdma:
                    a, b = sorted(pair)
                    found[pair] = Link(a=a, b=b, kind="rdma" if rdma else "thunderbolt")
    return sorted(found.values(), key=lambda link: (link.a, link.b))


async def delete_instance(js, model: str) -> None:
    """A model no longer served leaves the instances bucket (and every ingress's model list)."""
    await js.publish(f"{INSTANCES_PREFIX}.{subject_token(model)}", b"", stream=INSTANCES_STREAM,
                     headers={"KV-Operation": "DEL"})


STATUS_OF_STATE = {"serving": "loaded", "placing": "loading", "starting": "loading", "stopping": "unloading"}


def cluster_models(statuses: list[NodeStatus], instances: list[Instance]) -> list[ClusterModel]:
    """The cluster's catalogue: every model on the disk of a node not lost, or with an instance, and its status."""
    held: dict[str, list[str]] = {}
    for status in statuses:
        if state_of(status) != "lost":
            for model in status.facts.models:
                held.setdefault(model, []).append(status.facts.id)
    placed = {i.model: i for i in instances}
    return [ClusterModel(id=model, status=STATUS_OF_STATE[placed[model].state] if model in placed else "idle",
                         files_on=sorted(held.get(model, [])), nodes=placed[model].nodes if model in placed else [],
                         created=placed[model].created if model in placed else 0,
                         context_length=placed[model].context_length if model in placed else None)
            for model in sorted(held.keys() | placed.keys())]
