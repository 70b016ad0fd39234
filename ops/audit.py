"""`conclave audit list|show|export|verify|replay|key`: read, check and replay the audit log.

Reads the CONCLAVE_AUDIT stream of a running deployment as the operator role (the only one that may), or,
for `verify --file`, a JSONL export, so an auditor can check a copy without access to the cluster.
`verify` vouches only for what signed checkpoints cover (pipeline/audit_verify.py; docs/audit.md says
exactly what it proves, and its exit codes). `replay` re-submits recorded requests that are reproducible
(greedy, or sampled with a seed) and reports the outputs that differ: a check after a model swap or an
upgrade.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import uuid
from pathlib import Path

import msgspec

from ops.credentials import open_private
from ops.deployment import DeploymentError
from pipeline.access import OPERATOR
from pipeline.audit_read import Log, read_audit_log, records_of
from pipeline.audit_export import export_lines, verify_export
from pipeline.audit_verify import verify_log
from pipeline.connection import redacted
from pipeline.checkpoints import (load_signing_key, parse_public_key, public_key_text, signing_key_path)
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
    """The --since/--until/--model/--caller/--submitter filter, with the times parsed once."""
    since, until = parse_time(args.since), parse_time(args.until)
    submitter = getattr(args, "submitter", None)

    def matches(record: AuditRecord) -> bool:
        return ((since is None or record.time >= since) and (until is None or record.time < until)
                and (not args.model or record.model == args.model)
                and (not args.caller or record.caller == args.caller)
                and (not submitter or record.submitter == submitter))

    return matches


def summary_line(seq: int, record: AuditRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.time, datetime.timezone.utc).isoformat(timespec="seconds")
    tokens = f"{record.usage.prompt_tokens}+{record.usage.completion_tokens}" if record.usage else "-"
    detail = record.error.code if record.error else record.finish_reason
    return (f"{seq}\t{when}\t{record.job_id}\t{record.model}\t{record.submitter or '-'}\t{record.caller}\t"
            f"{record.source}\t{record.outcome}\t{detail}\ttokens {tokens}\t{record.duration_ms:.0f} ms")


async def read_log(nc, with_checkpoints: bool = True) -> Log:
    log = await read_audit_log(nc.jetstream(), with_checkpoints)
    if log.stream is None and not log.checkpoints:
        raise DeploymentError(f"there is no audit log at {redacted(nc.connected_url.geturl())}: its stream does not exist "
                              f"(no conclave deployment has used this NATS server)")
    return log


def pinned_key(args) -> tuple[str | None, str]:
    """The key verify trusts, and where it came from: --public-key, else (live) this home's signing key."""
    if args.public_key:
        try:
            return public_key_text(parse_public_key(args.public_key)), "given with --public-key"
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None
    if not args.file:
        try:
            return public_key_text(load_signing_key(signing_key_path(args.home), create=False)), \
                f"this home's signing key ({signing_key_path(args.home)})"
        except (OSError, ValueError):
            pass
    return None, "none"


def report(verdict, args, pinned: str | None, origin: str) -> int:
    if args.expect_seq is not None:
        verdict.expect_seq(args.expect_seq)
    if pinned:
        print(f"pinned key: {pinned} ({origin})")
    for line in verdict.lines():
        print(line)
    return verdict.exit_code


async def run_audit(args) -> int:
    if args.action == "key":
        path = signing_key_path(args.home)
        try:
            print(public_key_text(load_signing_key(path, create=False)))
        except FileNotFoundError:
            raise DeploymentError(f"no audit signing key at {path}: `conclave serve` makes it at its first start "
                                  f"in this home") from None
        return 0
    if args.action == "verify" and args.file:
        pinned, origin = pinned_key(args)
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise DeploymentError(f"cannot read {args.file}: {exc.strerror}") from None
        return report(verify_export(data, pinned=pinned), args, pinned, origin)
    if args.action == "export" and (args.since or args.until or args.model or args.caller
                                    or getattr(args, "submitter", None)):
        raise DeploymentError("export writes the whole log (a filtered copy could not be verified); filter "
                              "with list instead")
    from ops.deployment import operator_connection

    nc = await operator_connection(args.home, args.nats_url, "conclave-audit")
    try:
        if args.action == "replay":
            return await replay(nc, args)
        log = await read_log(nc, with_checkpoints=args.action in ("verify", "export"))
        return show(args, log)
    finally:
        await nc.close()


def show(args, log: Log) -> int:
    if args.action == "verify":
        pinned, origin = pinned_key(args)
        verdict = verify_log(log.entries, log.checkpoints, log.stream, stream_missing=log.stream is None,
                             pinned=pinned)
        return report(verdict, args, pinned, origin)
    if args.action == "export":
        lines = export_lines(log.stream, log.entries, log.checkpoints, stream_missing=log.stream is None)
        if args.output:  # every prompt and answer: owner-only, as a secret is (an existing file is made so first)
            with open_private(Path(args.output)) as out:
                out.writelines(lines)
        else:
            sys.stdout.buffer.writelines(lines)
            sys.stdout.buffer.flush()
        return 0
    matches = record_filter(args)
    records = [(entry, record) for entry, record in records_of(log.entries) if matches(record)]
    if args.action == "list":
        for entry, record in records[-args.limit:]:
            print(summary_line(entry.seq, record))
    elif args.action == "show":
        found = [entry for entry, record in records if record.job_id == args.job_id]
        if not found:
            print(f"no audit record for job {args.job_id}", file=sys.stderr)
            return 1
        for entry in found:  # as stored, not as this version would re-encode it
            print(msgspec.json.format(entry.data, indent=2).decode())
    return 0


def replayable(record: AuditRecord) -> str | None:
    """Why a record cannot be replayed to the same output, or None if it can."""
    if record.job is None:
        return "job not readable"
    if record.outcome != "done":
        return f"outcome {record.outcome}"
    params = record.job.params
    if params.temperature > 0 and params.seed is None:
        return "sampled without a seed"
    return None


async def replay(nc, args) -> int:
    """Re-submit recorded requests to the current deployment, as the operator; report which outputs differ."""
    from ingress.errors import APIError
    from ingress.relay import submit

    report = {"replayed": 0, "same": 0, "different": [], "skipped": {}}
    log = await read_log(nc, with_checkpoints=False)
    matches = record_filter(args)
    chosen = [r for _, r in records_of(log.entries) if matches(r) and r.source != "replay"][-args.limit:]
    for record in chosen:
        if (why := replayable(record)) is not None:
            report["skipped"][why] = report["skipped"].get(why, 0) + 1
            continue
        job_id = f"replay-{uuid.uuid4().hex}"
        job = msgspec.structs.replace(record.job, id=job_id, reply_subject=reply_subject(OPERATOR, job_id),
                                      stream=False, created=time.time(), source="replay",
                                      caller=f"replay-of:{record.job_id}")
        try:
            final = [event async for event in submit(nc, job, OPERATOR, args.timeout, args.timeout)][-1]
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
