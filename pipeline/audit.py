"""The audit log: a hash-chained JetStream stream of job outcomes (schemas/audit.py).

Appends are serialised by JetStream itself: a record is published with `Nats-Expected-Last-Sequence`
set to the sequence it was chained onto, so two workers appending at once cannot both extend the same
record; the loser re-reads the tail and retries. Nothing outside JetStream coordinates the writers.

Each record goes on its job's own subject (`conclave.audit.<job id>`) with
`Nats-Expected-Last-Subject-Sequence: 0`, so a job has at most one record: a second delivery of a job
that was already settled (a redelivery after an outage, two workers that both ran it) is refused by
JetStream and writes nothing. Records of earlier versions sit on the single subject `conclave.audit`
and stay in the chain.
"""

from __future__ import annotations

import os
import time
from typing import AsyncIterator

import msgspec
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM, audit_subject
from schemas.audit import GENESIS, AuditRecord, record_digest
from schemas.jobs import Done, Failed, Job

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed Nats-Expected-Last-(Subject-)Sequence

decode_record = msgspec.json.Decoder(AuditRecord).decode
encode = msgspec.json.Encoder().encode


def audit_stream_config() -> StreamConfig:
    """File storage; records cannot be deleted or purged through NATS (deny_delete, deny_purge).

    Kept forever unless CONCLAVE_AUDIT_RETENTION_DAYS is set (every process of a deployment inherits it
    from `conclave serve`, so they all declare the same stream); records that age out leave the chain
    verifiable from the oldest one kept.
    """
    days = float(os.environ.get("CONCLAVE_AUDIT_RETENTION_DAYS") or 0)
    return StreamConfig(name=AUDIT_STREAM, subjects=[f"{AUDIT_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=days * 24 * 3600, deny_delete=True, deny_purge=True)


def record_for(job_id: str, job: Job | None, final: Done | Failed, partial: Done | None = None, *, model: str,
               revision: str, worker: str, ranks: int = 1, attempt: int = 1) -> AuditRecord:
    """The audit record of a job that ended with `final`. `partial` is what a cancelled job had generated."""
    done = final if isinstance(final, Done) else partial
    error = final.error if isinstance(final, Failed) else None
    outcome = "done" if error is None else "cancelled" if error.code == "cancelled" else "failed"
    return AuditRecord(
        n=0, prev_hash="", time=time.time(), job_id=job_id, outcome=outcome, model=model, model_revision=revision,
        caller=job.caller if job else "", source=job.source if job else "", job=job,
        output=done.text if done else "", finish_reason=done.finish_reason if outcome == "done" else None,
        usage=done.usage if done else None, ttft_ms=done.ttft_ms if done else 0.0,
        duration_ms=done.duration_ms if done else 0.0, worker=worker, ranks=ranks, attempt=attempt, error=error,
    )


async def has_record(js: JetStreamContext, job_id: str) -> bool:
    try:
        await js.get_last_msg(AUDIT_STREAM, audit_subject(job_id))
        return True
    except NotFoundError:
        return False


async def append_record(js: JetStreamContext, record: AuditRecord, attempts: int = 100) -> AuditRecord | None:
    """Chain `record` onto the current tail and append it; returns it with n, prev_hash and hash set, or
    None if its job already has a record. Jobs without an id (malformed) are not fenced."""
    fence = {"Nats-Expected-Last-Subject-Sequence": "0"} if record.job_id else {}
    for _ in range(attempts):
        try:
            last = await js.get_last_msg(AUDIT_STREAM, ">")  # the tail, whatever its subject
            tail = decode_record(last.data)
            n, prev, last_seq = tail.n + 1, tail.hash, last.seq
        except NotFoundError:
            n, prev, last_seq = 1, GENESIS, 0
        chained = msgspec.structs.replace(record, n=n, prev_hash=prev, hash="")
        chained = msgspec.structs.replace(chained, hash=record_digest(chained))
        try:
            await js.publish(audit_subject(record.job_id), encode(chained), stream=AUDIT_STREAM,
                             headers={"Nats-Expected-Last-Sequence": str(last_seq), **fence})
            return chained
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            if fence and await has_record(js, record.job_id):
                return None
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
