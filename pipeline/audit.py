"""The audit log: a hash-chained JetStream stream of job outcomes (schemas/audit.py).

Appends are serialised by JetStream itself: a record is published with `Nats-Expected-Last-Sequence`
set to the sequence it was chained onto, so two workers appending at once cannot both extend the same
record; the loser re-reads the tail and retries. Nothing outside JetStream coordinates the writers.
"""

from __future__ import annotations

import os
from typing import AsyncIterator

import msgspec
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from schemas.audit import GENESIS, AuditRecord, record_digest

AUDIT_STREAM = "CONCLAVE_AUDIT"
AUDIT_SUBJECT = "conclave.audit"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed Nats-Expected-Last-Sequence

decode_record = msgspec.json.Decoder(AuditRecord).decode
encode = msgspec.json.Encoder().encode


def audit_stream_config() -> StreamConfig:
    """File storage; records cannot be deleted or purged through NATS (deny_delete, deny_purge).

    Kept forever unless CONCLAVE_AUDIT_RETENTION_DAYS is set (every process of a deployment inherits it
    from `conclave serve`, so they all declare the same stream); records that age out leave the chain
    verifiable from the oldest one kept.
    """
    days = float(os.environ.get("CONCLAVE_AUDIT_RETENTION_DAYS") or 0)
    return StreamConfig(name=AUDIT_STREAM, subjects=[AUDIT_SUBJECT], storage=StorageType.FILE,
                        max_age=days * 24 * 3600, deny_delete=True, deny_purge=True)


async def append_record(js: JetStreamContext, record: AuditRecord, attempts: int = 100) -> AuditRecord:
    """Chain `record` onto the current tail and append it; returns it with n, prev_hash and hash set."""
    for _ in range(attempts):
        try:
            last = await js.get_last_msg(AUDIT_STREAM, AUDIT_SUBJECT)
            tail = decode_record(last.data)
            n, prev, last_seq = tail.n + 1, tail.hash, last.seq
        except NotFoundError:
            n, prev, last_seq = 1, GENESIS, 0
        chained = msgspec.structs.replace(record, n=n, prev_hash=prev, hash="")
        chained = msgspec.structs.replace(chained, hash=record_digest(chained))
        try:
            await js.publish(AUDIT_SUBJECT, encode(chained), stream=AUDIT_STREAM,
                             headers={"Nats-Expected-Last-Sequence": str(last_seq)})
            return chained
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
    raise RuntimeError(f"could not append to {AUDIT_STREAM} after {attempts} attempts")


async def read_records(js: JetStreamContext) -> AsyncIterator[tuple[int, bytes]]:
    """Every stored record in stream order, as (stream sequence, raw bytes)."""
    info = await js.stream_info(AUDIT_STREAM)
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(AUDIT_STREAM, seq)
            yield seq, msg.data
        except NotFoundError:  # deleted: verify sees the gap in the chain
            pass
        seq += 1


def verify_chain(raw_records: list[bytes]) -> list[str]:
    """Problems with a chain of records given in order; empty when intact.

    The first record may follow GENESIS or, when older records aged out, any hash: the chain is checked
    from the oldest record kept.
    """
    problems = []
    previous: AuditRecord | None = None
    for index, raw in enumerate(raw_records):
        try:
            record = decode_record(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            problems.append(f"record {index + 1}: not an audit record ({exc})")
            previous = None
            continue
        if record.hash != record_digest(record):
            problems.append(f"record n={record.n} (job {record.job_id}): its contents do not match its hash "
                            f"(edited)")
        if previous is not None and (record.prev_hash != previous.hash or record.n != previous.n + 1):
            problems.append(f"record n={record.n} (job {record.job_id}) does not follow n={previous.n}: "
                            f"records missing or inserted between them")
        if previous is None and index == 0 and record.n == 1 and record.prev_hash != GENESIS:
            problems.append("record n=1 does not start the chain")
        previous = record
    return problems

