"""The audit log's records and checkpoints, as stored (docs/audit.md has the formats and the formulas).

A record is stored once, as bytes, and those bytes are what the log vouches for: an entry's digest is the
SHA-256 of its stored bytes. Nothing is ever re-encoded to be checked: a hash over a re-encoding by today's
schema made every record older than a new field (`prompt_tokens_details`) look edited. So readers tolerate
fields they do not know (a newer writer's) and fill in defaults for the ones an older writer lacked.

The stored bytes of a new record are the RFC 8785 (JSON Canonicalization Scheme) form of the record, which
any RFC 8785 implementation reproduces from the parsed JSON. A record that is not I-JSON (an integer beyond
±2**53, such as a large seed) cannot be put in that form; it is stored in msgspec's sorted-key encoding
instead, and an export carries such bytes verbatim (pipeline/audit.py).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Union

import msgspec
import rfc8785
from msgspec import Struct

from schemas.jobs import Job
from schemas.openai import ErrorDetail, Usage

GENESIS = "0" * 64  # c_0: the chain value before the first entry of a segment (32 zero bytes, in hex)
LEGACY_FIELDS = ("n", "prev_hash", "hash")  # the chain each record carried before version 0.5


class AuditRecord(Struct, kw_only=True):
    time: float  # unix seconds when the outcome was recorded
    job_id: str
    outcome: Literal["done", "failed", "cancelled"]
    model: str
    model_revision: str  # the model store's revision of the weights that ran (workers/store.py)
    # Who published the job: the authenticated NATS identity its subject names ("ingress", "operator", an
    # internal system's name). "" in records written before version 0.5.
    submitter: str = ""
    # Who asked, as far as Conclave vouches: from the ingress (an API key's name, "anonymous") and the
    # operator (`replay-of:<job>`) the job's own `caller`; from any other submitter `nats:<submitter>`.
    caller: str
    source: str  # "http" or "replay" (from the ingress, the operator), else "nats"
    # What a submitter that is not believed put in its job's `caller` and `source`: a claim, kept as one.
    claimed_caller: Union[str, None] = None
    claimed_source: Union[str, None] = None
    job: Union[Job, None]  # the request as queued: messages/prompt and parameters (None: undecodable)
    output: str = ""  # the answer's text (without its tool calls)
    # The calls the answer made, and with `n` > 1 the other answers (the fields above are the first's): as
    # schemas/jobs.py's ToolCall and Choice, read loosely so that a newer writer's extra fields still decode.
    tool_calls: Union[list[dict[str, Any]], None] = None
    choices: Union[list[dict[str, Any]], None] = None
    finish_reason: Union[str, None] = None
    usage: Union[Usage, None] = None
    ttft_ms: float = 0.0
    duration_ms: float = 0.0
    # How long the job waited in the queue for the worker group that answered it to load its model (a model loaded
    # on demand, a switch, a group placed again): from its arrival in the jobs stream to that group's readiness.
    load_wait_ms: float = 0.0
    worker: str = ""  # host:pid of the worker, or of the leader of its group
    ranks: int = 1
    attempt: int = 1  # JetStream delivery count
    # The job message's sequence in CONCLAVE_JOBS: one record per queued message (its redeliveries share it; the
    # same id published again later is another message and gets its own record). 0: before this field.
    job_seq: int = 0
    error: Union[ErrorDetail, None] = None
    # Legacy: a record written before version 0.5 carried its position, the previous record's hash and its
    # own (schemas-independent check: pipeline/audit.py, legacy_digest). New records omit all three.
    n: Union[int, None] = None
    prev_hash: Union[str, None] = None
    hash: Union[str, None] = None


class StreamFacts(Struct, kw_only=True):
    """What the audit stream's own information said, when it was read (pipeline/audit.py: stream_facts)."""

    name: str
    created: str  # ISO 8601, as the server reported it: changes when the stream is deleted and made again
    config: dict[str, Any]  # its retention-relevant configuration (pipeline/audit.py: retention_config)
    first_seq: int
    last_seq: int
    messages: int
    time: float  # unix seconds just before it was read


class Checkpoint(Struct, kw_only=True):
    """A signed statement: entries from_seq..to_seq of the audit stream chain from chain_before to chain_after.

    Signed with Ed25519 over its RFC 8785 bytes (pipeline/checkpoints.py); `format` keeps the signature from
    being taken for any other statement's.
    """

    format: str  # "conclave-audit-checkpoint/1"
    stream: str
    stream_created: str
    config: dict[str, Any]
    config_digest: str  # SHA-256 of the RFC 8785 bytes of `config`
    max_age_s: float  # the retention itself (also in `config`), for a reader
    first_seq: int  # the stream's first sequence when it was read
    last_seq: int  # its last sequence then: every later entry was appended after `time`
    from_seq: int
    to_seq: int
    count: int  # entries stored in from_seq..to_seq (fewer than to_seq - from_seq + 1 only if some were deleted)
    chain_before: str  # c_{from_seq - 1}; GENESIS when the span starts a segment
    chain_after: str  # c_{to_seq}
    new_segment: bool  # the chain restarts at from_seq (the first checkpoint, or entries aged out unsigned)
    time: float  # unix seconds just before the stream's information was read
    signer: str  # "ed25519:<base64 of the 32-byte public key>"


# msgspec's sorted-key encoding, without whitespace: what a record that is not I-JSON is stored as, and what
# a pre-0.5 record's own hash is over (pipeline/audit.py: legacy_digest).
sorted_json = msgspec.json.Encoder(order="sorted").encode


def canonical(value: Any) -> bytes:
    """RFC 8785 bytes of a JSON value (builtins); msgspec's sorted-key encoding if it is not I-JSON."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:  # an integer beyond ±2**53, a NaN, a lone surrogate
        return sorted_json(value)


def stored_bytes(record: AuditRecord) -> bytes:
    """The bytes a record is stored as. String keys: a job's `logit_bias` has integer keys (a sorted
    encoding refused them, and every record of a job with a logit_bias was lost)."""
    value = msgspec.to_builtins(record, str_keys=True)
    for name in LEGACY_FIELDS:
        if value.get(name) is None:
            value.pop(name, None)
    return canonical(value)


def record_digest(record: AuditRecord) -> str:
    """The digest its entry will have: SHA-256 of its stored bytes, in hex."""
    return hashlib.sha256(stored_bytes(record)).hexdigest()
