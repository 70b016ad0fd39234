"""The audit record: one per job outcome, appended to the CONCLAVE_AUDIT stream, hash-chained.

`hash` is the SHA-256 of the record's canonical JSON with `hash` itself left empty; `prev_hash` is the
previous record's `hash` (64 zeros for the first). Editing, inserting or deleting a record breaks the
chain at that point, which `conclave audit verify` reports.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Union

import msgspec
from msgspec import Struct

from schemas.jobs import Job
from schemas.openai import ErrorDetail, Usage

GENESIS = "0" * 64


class AuditRecord(Struct, kw_only=True, forbid_unknown_fields=True):
    n: int  # position in the chain, from 1
    prev_hash: str
    hash: str = ""
    time: float  # unix seconds when the outcome was recorded
    job_id: str
    outcome: Literal["done", "failed", "cancelled"]
    model: str
    model_revision: str  # the model store's revision of the weights that ran (workers/store.py)
    caller: str  # API key id ("key-<sha256 prefix>"), "anonymous", or what a NATS submitter set
    source: str  # "http" or "nats"
    job: Union[Job, None]  # the request as queued: messages/prompt and parameters (None: undecodable)
    output: str = ""
    finish_reason: Union[str, None] = None
    usage: Union[Usage, None] = None
    ttft_ms: float = 0.0
    duration_ms: float = 0.0
    worker: str = ""  # host:pid of the worker, or of the leader of its group
    ranks: int = 1
    attempt: int = 1  # JetStream delivery count
    error: Union[ErrorDetail, None] = None


_canonical = msgspec.json.Encoder(order="sorted")


def record_digest(record: AuditRecord) -> str:
    # Through builtins with string keys: a sorted encoding needs them, and a job's `logit_bias` has integer
    # keys (encoding the record directly raised for every job with a logit_bias: its record was never written).
    # The same bytes as encoding the record directly wherever that worked.
    canonical = msgspec.to_builtins(msgspec.structs.replace(record, hash=""), str_keys=True)
    return hashlib.sha256(_canonical.encode(canonical)).hexdigest()
