"""The audit log as read from NATS: what `conclave audit` (as the operator) and the dashboard (as the auditor role,
ingress/audit.py) read before they show or verify it (pipeline/audit_verify.py)."""

from __future__ import annotations

import msgspec
from nats.js.errors import NotFoundError

from pipeline.audit import NOT_A_RECORD, Entry, decode_record, read_entries, stream_facts
from pipeline.checkpoints import read_checkpoint_messages
from schemas.audit import AuditRecord, StreamFacts


class Log(msgspec.Struct):
    """The audit log as read from NATS: the stream's information (None: no stream), entries, checkpoints."""

    stream: StreamFacts | None
    entries: list[Entry]
    checkpoints: list[bytes]


async def read_audit_log(js, with_checkpoints: bool = True) -> Log:
    """Checkpoints first, then the stream: a checkpoint signed meanwhile could otherwise cover entries this
    read did not reach, and look like entries cut off the end."""
    checkpoints = []
    if with_checkpoints:
        try:
            checkpoints = [message for _, message in await read_checkpoint_messages(js)]
        except NotFoundError:
            pass
    try:
        facts = await stream_facts(js)
        entries = [entry async for entry in read_entries(js, facts.first_seq, facts.last_seq)]
        now_first = (await stream_facts(js)).first_seq
    except NotFoundError:
        facts, entries = None, []
    if facts is not None and now_first > facts.first_seq:  # aged out while being read: not a gap
        facts = msgspec.structs.replace(facts, first_seq=now_first)
        entries = [entry for entry in entries if entry.seq >= now_first]
    return Log(stream=facts, entries=entries, checkpoints=checkpoints)


def records_of(entries: list[Entry]) -> list[tuple[Entry, AuditRecord]]:
    """The entries that are audit records, decoded (a foreign message is left out here; verify reports it)."""
    found = []
    for entry in entries:
        try:
            found.append((entry, decode_record(entry.data)))
        except NOT_A_RECORD:
            continue
    return found
