"""The audit log: a JetStream stream of job outcomes (schemas/audit.py), chained by the stream's own order.

Writers never read the log (only the operator role may): a record is published on its job message's own
subject (`conclave.audit.<model>.<submitter>.<job id>.<job seq>`, the message's sequence in the jobs stream)
with `Nats-Expected-Last-Subject-Sequence: 0`, so a queued message has at most one record: a second delivery
of one that was already settled (a redelivery after an outage, two workers that both ran it) is refused by
JetStream and writes nothing. There is no tail to read and chain onto, so nothing another message did to the
tail (retention emptied the stream, a foreign message on an audit subject) can stop an append.

The chain is defined over the stream instead (docs/audit.md): d_s = SHA-256(stored bytes of entry s),
c_s = SHA-256(c_{s-1} || d_s), c_0 = 32 zero bytes, over every message in sequence order, records or
not. Signed checkpoints (pipeline/checkpoints.py) state c at chosen sequences; verification
(pipeline/audit_verify.py) recomputes it.

Records written before version 0.5 carry their own chain (n, prev_hash, hash) and stay in the stream's
chain like any entry; their own hash is still checked, on the stored JSON rather than a re-encoding.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, AsyncIterator, Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from pipeline.access import ATTESTING_SUBMITTERS
from pipeline.limits import UNDECODABLE
from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM, audit_subject
from schemas.audit import GENESIS, AuditRecord, StreamFacts, sorted_json, stored_bytes
from schemas.jobs import Done, Failed, Job

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed Nats-Expected-Last-(Subject-)Sequence

_decode = msgspec.json.Decoder(AuditRecord).decode


class Entry(msgspec.Struct):
    """One message of the audit stream: its sequence, subject and stored bytes, whatever they hold."""

    seq: int
    subject: str
    data: bytes


def describe_age(max_age_s: float | None) -> str:
    """A stream's retention for a reader: "forever" (0 or unset), days, or seconds under a day."""
    if not max_age_s:
        return "forever"
    return f"{max_age_s / 86400:g} days" if max_age_s >= 86400 else f"{max_age_s:g} s"


def audit_stream_config() -> StreamConfig:
    """File storage; records cannot be deleted or purged through NATS (deny_delete, deny_purge).

    Kept forever unless CONCLAVE_AUDIT_RETENTION_DAYS is set when the stream is first made (it is never
    changed afterwards: pipeline/streams.py). Records that age out leave the rest verifiable.
    """
    days = float(os.environ.get("CONCLAVE_AUDIT_RETENTION_DAYS") or 0)
    return StreamConfig(name=AUDIT_STREAM, subjects=[f"{AUDIT_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=days * 24 * 3600, deny_delete=True, deny_purge=True)


def record_for(job_id: str, job: Job | None, final: Done | Failed, partial: Done | None = None, *, submitter: str,
               model: str, revision: str, worker: str, ranks: int = 1, attempt: int = 1,
               job_seq: int = 0, load_wait_ms: float = 0.0) -> AuditRecord:
    """The audit record of a job that `submitter` (its authenticated NATS identity) published and that ended
    with `final`. `partial` is what a cancelled job had generated. Only an attesting submitter's `caller`
    and `source` are believed; any other's are kept as claims next to `nats:<submitter>`."""
    done = final if isinstance(final, Done) else partial
    error = final.error if isinstance(final, Failed) else None
    outcome = "done" if error is None else "cancelled" if error.code == "cancelled" else "failed"
    if submitter in ATTESTING_SUBMITTERS:
        caller, source = (job.caller, job.source) if job else ("unknown", "unknown")
        claimed_caller = claimed_source = None
    else:
        caller, source = f"nats:{submitter or 'unknown'}", "nats"
        claimed_caller, claimed_source = (job.caller, job.source) if job else (None, None)
    return AuditRecord(
        time=time.time(), job_id=job_id, outcome=outcome, model=model, model_revision=revision, submitter=submitter,
        caller=caller, source=source, claimed_caller=claimed_caller, claimed_source=claimed_source, job=job,
        output=done.text if done else "", tool_calls=msgspec.to_builtins(done.tool_calls) if done and done.tool_calls else None,
        choices=msgspec.to_builtins(done.choices) if done and done.choices else None, finish_reason=done.finish_reason if outcome == "done" else None,
        usage=done.usage if done else None, ttft_ms=done.ttft_ms if done else 0.0,
        duration_ms=done.duration_ms if done else 0.0, load_wait_ms=round(load_wait_ms, 1), worker=worker,
        ranks=ranks, attempt=attempt, error=error,
        job_seq=job_seq,
    )


async def append_record(js: JetStreamContext, record: AuditRecord) -> bool:
    """Append `record`: True when appended, False when its job message already had one (JetStream refused a
    second). Any other failure raises: the caller retries, and does not ack a job whose record is not stored.
    The fence is per queued message (its stream sequence), not per job id: results expire, so an id published
    again a day later runs again and must get a record of its own. A record without a sequence (written
    outside a queue) is fenced by its job id, and one without either is not fenced."""
    fence = {"Nats-Expected-Last-Subject-Sequence": "0"} if record.job_id or record.job_seq else None
    try:
        await js.publish(audit_subject(record.model, record.submitter, record.job_id, record.job_seq),
                         stored_bytes(record), stream=AUDIT_STREAM, headers=fence)
    except APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


# What `decode_record` raises for bytes that are not an audit record: msgspec's errors (RecursionError past about 1,000
# levels, pipeline/limits.py), and those of a conversion a record's fields refuse. Every reader of the log skips them.
NOT_A_RECORD = (*UNDECODABLE, ValueError, TypeError)


def decode_record(raw: bytes) -> AuditRecord:
    """A stored record, whichever version wrote it. A job of a newer schema (a field this version does not
    know) is left out (`job` None): the stored bytes still hold it. Raises one of NOT_A_RECORD for bytes that
    are not an audit record."""
    try:
        return _decode(raw)
    except msgspec.ValidationError:
        value = msgspec.json.decode(raw)
        if not isinstance(value, dict) or value.get("job") is None:
            raise
        return msgspec.convert({**value, "job": None}, AuditRecord)


# --- the chain ---------------------------------------------------------------------------------------


def entry_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chain(before: str, entries: Iterable[bytes]) -> str:
    """c after `entries` (their stored bytes, in sequence order), starting from `before` (hex)."""
    value = bytes.fromhex(before)
    for data in entries:
        value = hashlib.sha256(value + entry_digest(data)).digest()
    return value.hex()


def legacy_digest(value: dict[str, Any]) -> str:
    """A pre-0.5 record's own hash, recomputed from its stored JSON (decoded generically, so that no schema
    change can alter it): SHA-256 of msgspec's sorted-key encoding with `hash` set to ""."""
    return hashlib.sha256(sorted_json({**value, "hash": ""})).hexdigest()


def _is_record(raw: bytes) -> bool:
    try:
        decode_record(raw)
        return True
    except NOT_A_RECORD:
        return False


def legacy_problems(entries: list[Entry]) -> list[tuple[int, str]]:
    """(seq, problem) for pre-0.5 records whose own hash or chain does not hold. These hashes prove little
    (anyone who can edit a record can recompute them): only signed checkpoints vouch for a record."""
    problems = []
    previous: dict | None = None
    for entry in entries:
        try:
            value = msgspec.json.decode(entry.data)
        except (msgspec.DecodeError, RecursionError):
            value = None
        if not isinstance(value, dict) or "hash" not in value or "prev_hash" not in value:
            if isinstance(value, dict) and _is_record(entry.data):
                # The legacy era ends at the first record of today's kind: anything shaped like a legacy record
                # after it was written since by someone else (a worker may publish anything on its model's
                # subjects), and judged by its own "hash" it would call the log edited, for good.
                break
            previous = None
            continue
        job = value.get("job_id")
        if value["hash"] != legacy_digest(value):
            problems.append((entry.seq, f"seq {entry.seq} (job {job}): its contents do not match its own legacy "
                                        f"hash (edited)"))
        if previous is not None and (value["prev_hash"] != previous["hash"] or value.get("n") != previous.get("n", 0) + 1):
            problems.append((entry.seq, f"seq {entry.seq} (job {job}) does not follow the legacy record before it "
                                        f"(n={previous.get('n')}): records missing or inserted between them"))
        if previous is None and value.get("n") == 1 and value["prev_hash"] != GENESIS:
            problems.append((entry.seq, f"seq {entry.seq} (job {job}): legacy record n=1 does not start its chain"))
        previous = value
    return problems


# --- reading (operator only) -------------------------------------------------------------------------


def retention_config(config: StreamConfig) -> dict[str, Any]:
    """What in a stream's configuration decides which records it keeps, normalised (the server leaves out
    defaults): a checkpoint signs it, and verify reports any change."""
    def number(value) -> int:
        return -1 if value is None else int(value)

    def enum(value) -> str:
        return "" if value is None else str(getattr(value, "value", value))

    return {
        "subjects": sorted(config.subjects or []),
        "retention": enum(config.retention) or "limits",
        "discard": enum(config.discard) or "old",
        "max_age_s": float(config.max_age or 0),
        "max_msgs": number(config.max_msgs),
        "max_bytes": number(config.max_bytes),
        "max_msgs_per_subject": number(config.max_msgs_per_subject),
        "deny_delete": bool(config.deny_delete),
        "deny_purge": bool(config.deny_purge),
        "allow_rollup_hdrs": bool(config.allow_rollup_hdrs),
        "allow_msg_ttl": bool(getattr(config, "allow_msg_ttl", False)),
        "sealed": bool(config.sealed),
        "mirror": bool(config.mirror),
        "sources": bool(config.sources),
    }


async def stream_facts(js: JetStreamContext) -> StreamFacts:
    """The audit stream's information now. Raises NotFoundError when there is no audit stream."""
    now = time.time()
    info = await js.stream_info(AUDIT_STREAM)
    created = info.created.isoformat() if info.created is not None else ""
    return StreamFacts(name=AUDIT_STREAM, created=created, config=retention_config(info.config),
                       first_seq=info.state.first_seq, last_seq=info.state.last_seq, messages=info.state.messages,
                       time=now)


async def stored_messages(js: JetStreamContext, stream: str, first: int | None = None, last: int | None = None,
                          newest_first: bool = False) -> AsyncIterator[RawStreamMsg]:
    """Every message `stream` stores in first..last (default: all it holds), in sequence order or newest first.
    One gone meanwhile (aged out, deleted) is skipped: the caller sees the gap. Raises NotFoundError when
    there is no such stream."""
    if first is None or last is None:
        info = await js.stream_info(stream)
        first = info.state.first_seq if first is None else first
        last = info.state.last_seq if last is None else last
    seqs = range(max(first, 1), last + 1)
    for seq in reversed(seqs) if newest_first else seqs:
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        yield msg


async def read_entries(js: JetStreamContext, first: int | None = None, last: int | None = None
                       ) -> AsyncIterator[Entry]:
    """Every stored message in first..last (default: the whole stream), in sequence order."""
    async for msg in stored_messages(js, AUDIT_STREAM, first, last):
        yield Entry(seq=msg.seq or 0, subject=msg.subject or "", data=msg.data or b"")


async def read_records(js: JetStreamContext) -> AsyncIterator[tuple[int, bytes]]:
    """Every stored message in stream order, as (stream sequence, stored bytes)."""
    async for entry in read_entries(js):
        yield entry.seq, entry.data
