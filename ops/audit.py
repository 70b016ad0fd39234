"""`conclave audit list|show|export|verify|replay`: read, check and replay the hash-chained audit log.

Reads the CONCLAVE_AUDIT stream of a running deployment (--nats-url), or, for `verify --file`, a JSONL
export, so an auditor can check a copy without access to the cluster. `replay` re-submits recorded
requests that are reproducible (greedy, or sampled with a seed) and reports the outputs that differ:
a check after a model swap or an upgrade.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import uuid
from pathlib import Path

import msgspec
from nats.js.errors import NotFoundError

from ops.deployment import DeploymentError, nats_url_of
from pipeline.audit import decode_record, read_records, verify_chain
from pipeline.connection import connect_once
from pipeline.subjects import reply_subject
from schemas.audit import AuditRecord
from schemas.jobs import Done


def parse_time(text: str | None) -> float | None:
    """ISO 8601 (2026-11-26T12:00:00, UTC when no zone is given) to unix seconds."""
    if text is None:
        return None
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def record_filter(args):
    """The --since/--until/--model/--caller filter, with the times parsed once."""
    since, until = parse_time(args.since), parse_time(args.until)

    def matches(record: AuditRecord) -> bool:
        return ((since is None or record.time >= since) and (until is None or record.time < until)
                and (not args.model or record.model == args.model)
                and (not args.caller or record.caller == args.caller))

    return matches


async def stored_records(nc) -> list[bytes]:
    try:
        return [raw async for _, raw in read_records(nc.jetstream())]
    except NotFoundError:
        raise DeploymentError(f"there is no audit log at {nc.connected_url.geturl()}: its stream does not exist "
                              f"(no conclave deployment has used this NATS server)") from None


def summary_line(record: AuditRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.time, datetime.timezone.utc).isoformat(timespec="seconds")
    tokens = f"{record.usage.prompt_tokens}+{record.usage.completion_tokens}" if record.usage else "-"
    detail = record.error.code if record.error else record.finish_reason
    return (f"{record.n}\t{when}\t{record.job_id}\t{record.model}\t{record.caller}\t{record.source}\t"
            f"{record.outcome}\t{detail}\ttokens {tokens}\t{record.duration_ms:.0f} ms")


async def run_audit(args) -> int:
    if args.action == "verify" and args.file:
        raw = [line.encode() for line in Path(args.file).read_text().splitlines() if line.strip()]
        return report_verification(raw)
    nc = await connect_once(nats_url_of(args.home, args.nats_url), "conclave-audit")
    try:
        if args.action == "replay":
            return await replay(nc, args)
        return show(args, await stored_records(nc))
    finally:
        await nc.close()


def report_verification(raw: list[bytes]) -> int:
    problems = verify_chain(raw)
    for problem in problems:
        print(f"BROKEN: {problem}")
    print(f"{len(raw)} records, chain {'intact' if not problems else 'BROKEN'}")
    return 1 if problems else 0


def show(args, raw: list[bytes]) -> int:
    if args.action == "verify":
        return report_verification(raw)
    records = [decode_record(r) for r in raw]
    matches = record_filter(args)
    if args.action == "list":
        for record in [r for r in records if matches(r)][-args.limit:]:
            print(summary_line(record))
    elif args.action == "show":
        found = [r for r in records if r.job_id == args.job_id]
        if not found:
            print(f"no audit record for job {args.job_id}", file=sys.stderr)
            return 1
        for record in found:
            print(msgspec.json.format(msgspec.json.encode(record)).decode())
    elif args.action == "export":
        lines = "".join(data.decode() + "\n" for record, data in zip(records, raw) if matches(record))
        if args.output:
            Path(args.output).write_text(lines)
        else:
            sys.stdout.write(lines)
    return 0


def replayable(record: AuditRecord) -> str | None:
    """Why a record cannot be replayed to the same output, or None if it can."""
    if record.outcome != "done" or record.job is None:
        return f"outcome {record.outcome}"
    params = record.job.params
    if params.temperature > 0 and params.seed is None:
        return "sampled without a seed"
    return None


async def replay(nc, args) -> int:
    """Re-submit recorded requests to the current deployment; report which outputs differ."""
    from ingress.errors import APIError
    from ingress.relay import submit

    report = {"replayed": 0, "same": 0, "different": [], "skipped": {}}
    records = [decode_record(raw) for raw in await stored_records(nc)]
    matches = record_filter(args)
    for record in [r for r in records if matches(r) and r.source != "replay"][-args.limit:]:
        if (why := replayable(record)) is not None:
            report["skipped"][why] = report["skipped"].get(why, 0) + 1
            continue
        job_id = f"replay-{uuid.uuid4().hex}"
        job = msgspec.structs.replace(record.job, id=job_id, reply_subject=reply_subject(job_id), stream=False,
                                      created=time.time(), source="replay", caller=f"replay-of:{record.job_id}")
        try:
            final = [event async for event in submit(nc, job, args.timeout, args.timeout)][-1]
            output = final.text if isinstance(final, Done) else f"<failed: {final.error.message}>"
        except APIError as exc:
            output = f"<failed: {exc.detail.message}>"
        report["replayed"] += 1
        if output == record.output:
            report["same"] += 1
        else:
            report["different"].append({"job_id": record.job_id, "replay_id": job_id, "recorded": record.output,
                                        "replayed": output, "recorded_revision": record.model_revision})
    print(json.dumps(report, indent=2))
    return 1 if report["different"] else 0
