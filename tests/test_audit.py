"""The audit log: one record per job outcome, chained and vouched for by signed checkpoints (docs/audit.md);
verify finds edits and cuts."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import time

import msgspec
import nats
import pytest

import nats.js.errors

from pipeline.access import worker_role
from pipeline.audit import append_record, decode_record, read_records, record_for
from pipeline.subjects import AUDIT_STREAM
from schemas.audit import AuditRecord
from schemas.jobs import Done
from schemas.openai import Usage
from tests.conftest import FRANCE, MODEL, SUBMITTER, wait_for_audit_record


def audit(server, *args: str) -> subprocess.CompletedProcess:
    # As the operator of the server's home (the only role that may read the audit log).
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(server.home), "audit", *args],
                          capture_output=True, text=True, timeout=60)


def verified_until_covered(server) -> subprocess.CompletedProcess:
    """`audit verify`, once a signed checkpoint covers every record (the session server signs every second)."""
    deadline = time.monotonic() + 60
    while (result := audit(server, "verify")).returncode == 3:
        assert time.monotonic() < deadline, result.stdout
    return result


async def test_every_request_is_recorded_and_verify_vouches_for_the_log(server, client, http, tmp_path):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    await wait_for_audit_record(server, lambda r: r.job_id == reply.id)
    shown = audit(server, "show", reply.id)
    assert shown.returncode == 0, shown.stderr
    record = msgspec.json.decode(shown.stdout, type=AuditRecord)
    assert (record.outcome, record.submitter, record.source, record.caller, record.model) == (
        "done", "ingress", "http", "anonymous", MODEL)
    assert record.output == reply.choices[0].message.content
    assert record.usage.completion_tokens == reply.usage.completion_tokens
    assert record.job.messages[0].content == FRANCE[0]["content"] and record.job.params.max_tokens == 12
    assert len(record.model_revision) == 16 and record.ttft_ms > 0 and record.worker

    # A refused request is recorded too, with its error, under the id its answer named.
    refused = http.post("/chat/completions", json={"model": MODEL, "messages": FRANCE, "seed": -1})
    assert refused.status_code == 400
    refused_id = refused.headers["x-request-id"]
    record = await wait_for_audit_record(server, lambda r: r.job_id == refused_id)
    assert record.error.param == "seed"
    listed = [line for line in audit(server, "list", "--limit", "1000").stdout.splitlines() if refused_id in line]
    assert len(listed) == 1 and "failed" in listed[0] and "invalid_value" in listed[0]

    # A prompt with the characters str.splitlines() takes for line ends, and a logit_bias (integer keys).
    odd = "Line\u2028separator, paragraph\u2029separator, next line\u0085and ünïcödé: say hi"
    third = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": odd}], temperature=0,
                                           max_tokens=2, logit_bias={"2": -1})
    await wait_for_audit_record(server, lambda r: r.job_id == third.id)
    verified = verified_until_covered(server)
    assert verified.returncode == 0 and "BROKEN" not in verified.stdout, verified.stdout

    export = tmp_path / "audit.jsonl"
    assert audit(server, "export", "--output", str(export)).returncode == 0
    assert audit(server, "verify", "--file", str(export), "--public-key", public_key(server)).returncode == 0
    lines = export.read_bytes().split(b"\n")
    entry = next(i for i, line in enumerate(lines) if reply.id.encode() in line and b'"record"' in line)

    # An auditor's copy with one output edited, or records cut off its end, fails verification.
    edited = lines.copy()
    edited[entry] = edited[entry].replace(b'"output":"', b'"output":"Not ')
    assert edited[entry] != lines[entry]
    (tmp_path / "edited.jsonl").write_bytes(b"\n".join(edited))
    result = audit(server, "verify", "--file", str(tmp_path / "edited.jsonl"), "--public-key", public_key(server))
    assert result.returncode == 1 and "edited" in result.stdout, result.stdout

    records = [i for i, line in enumerate(lines) if line.startswith(b'{"seq":')]
    cut = [line for i, line in enumerate(lines) if i not in records[-2:]]
    (tmp_path / "cut.jsonl").write_bytes(b"\n".join(cut))
    result = audit(server, "verify", "--file", str(tmp_path / "cut.jsonl"), "--public-key", public_key(server))
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout


def public_key(server) -> str:
    printed = audit(server, "key")
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.strip().split()[-1]


async def test_concurrent_appends_keep_one_record_per_job_and_nats_refuses_deletes(bare_nats):
    broker, operator = bare_nats
    writers = [await broker.connect(worker_role(MODEL)) for _ in range(4)]
    try:
        done = Done(id="", text="out", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1,
                    total_tokens=2), ttft_ms=1.0, duration_ms=1.0, worker="w")

        async def write(nc, i):
            record = record_for(f"job-{i % 12}", None, done, submitter=SUBMITTER, model=MODEL, revision="r",
                                worker=f"w{i}")
            return await append_record(nc.jetstream(), record)

        written = await asyncio.gather(*(write(writers[i % 4], i) for i in range(24)))
        assert sorted(written) == [False] * 12 + [True] * 12  # each job's second record is refused
        stored = [decode_record(raw) async for _, raw in read_records(operator.jetstream())]
        assert sorted(r.job_id for r in stored) == sorted(f"job-{i}" for i in range(12))
        # NATS itself refuses to delete or purge an audit record, even for the operator.
        with pytest.raises(nats.js.errors.APIError):
            await operator.jetstream().delete_msg(AUDIT_STREAM, 3)
        with pytest.raises(nats.js.errors.APIError):
            await operator.jetstream().purge_stream(AUDIT_STREAM)
    finally:
        for nc in writers:
            await nc.close()


async def test_replay_reports_no_difference_on_an_unchanged_deployment(server, client):
    start = time.time()
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    sampled = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=1.0, max_tokens=2)  # no seed
    await wait_for_audit_record(server, lambda r: r.job_id == sampled.id)
    since = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat()
    result = audit(server, "replay", "--since", since)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["replayed"], report["same"], report["different"]) == (1, 1, [])
    assert report["skipped"] == {"sampled without a seed": 1}
    # The replay is itself audited, marked as such.
    record = await wait_for_audit_record(server, lambda r: r.caller == f"replay-of:{reply.id}")
    assert (record.submitter, record.source) == ("operator", "replay")
