"""The cluster's nodes as their agents report them: a JetStream key-value bucket, one key per node id.

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

from pipeline.subjects import NODES_BUCKET, NODES_PREFIX, NODES_STREAM
from schemas.cluster import NodeStatus

NODES_TTL_S = 60.0
LOST_AFTER_S = 5.0
decode_status = msgspec.json.Decoder(NodeStatus).decode
encode = msgspec.json.Encoder().encode


def nodes_bucket_config() -> KeyValueConfig:
    return KeyValueConfig(bucket=NODES_BUCKET, history=1, ttl=NODES_TTL_S, storage=StorageType.MEMORY, direct=True)


def node_subject(node_id: str) -> str:
    return f"{NODES_PREFIX}.{node_id}"


async def put_status(js, status: NodeStatus) -> None:
    await js.publish(node_subject(status.facts.id), encode(status), stream=NODES_STREAM)


async def read_nodes(js) -> list[NodeStatus]:
    """Every node's latest status, by node id; empty when none reported (or the bucket does not exist)."""
    try:
        info = await js.stream_info(NODES_STREAM, subjects_filter=f"{NODES_PREFIX}.>")
    except NotFoundError:
        return []
    statuses = []
    for subject in sorted(info.state.subjects or {}):
        try:
            statuses.append(decode_status((await js.get_last_msg(NODES_STREAM, subject, direct=True)).data))
        except (NotFoundError, msgspec.MsgspecError):  # expired meanwhile, or not a status
            continue
    return statuses


def state_of(status: NodeStatus, now: float | None = None) -> str:
    """"up", or "lost" when its agent has not reported for LOST_AFTER_S."""
    return "lost" if (now if now is not None else time.time()) - status.time > LOST_AFTER_S else "up"
