"""`conclave audit list|show|export|verify`: read and check the hash-chained audit log.

Reads the CONCLAVE_AUDIT stream of a running deployment (--nats-url), or, for `verify --file`, a JSONL
export, so an auditor can check a copy without access to the cluster.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import msgspec
import nats

from pipeline.audit import decode_record, read_records, verify_chain
from schemas.audit import AuditRecord


def parse_time(text: str | None) -> float | None:
    """ISO 8601 (2026-11-26T12:00:00, UTC when no zone is given) to unix seconds."""
    if text is None:
        return None
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def matches(record: AuditRecord, args) -> bool:
    since, until = parse_time(getattr(args, "since", None)), parse_time(getattr(args, "until", None))
    return ((since is None or record.time >= since) and (until is None or record.time < until)
            and (not getattr(args, "model", None) or record.model == args.model)
            and (not getattr(args, "caller", None) or record.caller == args.caller))


async def stored_records(nats_url: str) -> list[bytes]:
    nc = await nats.connect(nats_url, name="conclave-audit")
    try:
        return [raw async for _, raw in read_records(nc.jetstream())]
    finally:
        await nc.close()


def summary_line(record: AuditRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.time, datetime.timezone.utc).isoformat(timespec="seconds")
    tokens = f"{record.usage.prompt_tokens}+{record.usage.completion_tokens}" if record.usage else "-"
    detail = record.error.code if record.error else record.finish_reason
    return (f"{record.n}\t{when}\t{record.job_id}\t{record.model}\t{record.caller}\t{record.source}\t"
            f"{record.outcome}\t{detail}\ttokens {tokens}\t{record.duration_ms:.0f} ms")


async def run_audit(args) -> int:
    if args.action == "verify" and args.file:
        raw = [line.encode() for line in Path(args.file).read_text().splitlines() if line.strip()]
    else:
        raw = await stored_records(args.nats_url)
    if args.action == "verify":
        problems = verify_chain(raw)
        for problem in problems:
            print(f"BROKEN: {problem}")
        print(f"{len(raw)} records, chain {'intact' if not problems else 'BROKEN'}")
        return 1 if problems else 0
    records = [decode_record(r) for r in raw]
    if args.action == "list":
        for record in [r for r in records if matches(r, args)][-args.limit:]:
            print(summary_line(record))
    elif args.action == "show":
        found = [r for r in records if r.job_id == args.job_id]
        if not found:
            print(f"no audit record for job {args.job_id}", file=sys.stderr)
            return 1
        for record in found:
            print(msgspec.json.format(msgspec.json.encode(record)).decode())
    elif args.action == "export":
        lines = "".join(data.decode() + "\n" for record, data in zip(records, raw) if matches(record, args))
        if args.output:
            Path(args.output).write_text(lines)
        else:
            sys.stdout.write(lines)
    return 0
