"""The audit log: one hash-chained record per job outcome; verify finds edits and gaps."""

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

from ops.config import free_port
from pipeline.audit import append_record, read_records, verify_chain
from pipeline.nats_server import EmbeddedNats
from pipeline.streams import ensure_streams
from schemas.audit import AuditRecord
from tests.conftest import FRANCE, MODEL, wait_for_audit_record


def audit(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "audit", *args, "--nats-url", server.nats_url],
                          capture_output=True, text=True, timeout=60)


async def test_every_request_is_recorded_and_the_chain_verifies(server, client, http, tmp_path):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    await wait_for_audit_record(server.nats_url, lambda r: r.job_id == reply.id)
    shown = audit(server, "show", reply.id)
    assert shown.returncode == 0, shown.stderr
    record = msgspec.json.decode(shown.stdout, type=AuditRecord)
    assert (record.outcome, record.source, record.caller, record.model) == ("done", "http", "anonymous", MODEL)
    assert record.output == reply.choices[0].message.content
    assert record.usage.completion_tokens == reply.usage.completion_tokens
    assert record.job.messages[0].content == FRANCE[0]["content"] and record.job.params.max_tokens == 12
    assert len(record.model_revision) == 16 and record.ttft_ms > 0 and record.worker

    # A refused request is recorded too, with its error, under the id its answer named.
    refused = http.post("/chat/completions", json={"model": MODEL, "messages": FRANCE, "seed": -1})
    assert refused.status_code == 400
    refused_id = refused.headers["x-request-id"]
    record = await wait_for_audit_record(server.nats_url, lambda r: r.job_id == refused_id)
    assert record.error.param == "seed"
    listed = [line for line in audit(server, "list", "--limit", "1000").stdout.splitlines() if refused_id in line]
    assert len(listed) == 1 and "failed\tinvalid_value" in listed[0]

    third = client.completions.create(model=MODEL, prompt="Paris is", temperature=0, max_tokens=2)
    await wait_for_audit_record(server.nats_url, lambda r: r.job_id == third.id)
    verified = audit(server, "verify")
    assert verified.returncode == 0 and "chain intact" in verified.stdout

    export = tmp_path / "audit.jsonl"
    assert audit(server, "export", "--output", str(export)).returncode == 0
    lines = export.read_text().splitlines()
    assert any(json.loads(line)["job_id"] == reply.id for line in lines)

    # An auditor's copy with one output edited, or one record removed, fails verification.
    edited = [json.loads(line) for line in lines]
    target = next(r for r in edited if r["job_id"] == reply.id)
    target["output"] = "The capital of France is Lyon."
    (tmp_path / "edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    result = audit(server, "verify", "--file", str(tmp_path / "edited.jsonl"))
    assert result.returncode == 1 and f"job {reply.id}): its contents do not match its hash" in result.stdout

    assert len(lines) >= 3
    (tmp_path / "gap.jsonl").write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")
    result = audit(server, "verify", "--file", str(tmp_path / "gap.jsonl"))
    assert result.returncode == 1 and "records missing or inserted" in result.stdout


async def test_concurrent_appends_form_one_chain(tmp_path):
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    server.start()
    writers = [await nats.connect(server.url) for _ in range(4)]
    try:
        await ensure_streams(writers[0].jetstream())
        template = AuditRecord(n=0, prev_hash="", time=0.0, job_id="", outcome="done", model="m",
                               model_revision="r", caller="c", source="nats", job=None)

        async def write(nc, i):
            return await append_record(nc.jetstream(), msgspec.structs.replace(template, job_id=f"job-{i}"))

        written = await asyncio.gather(*(write(writers[i % 4], i) for i in range(24)))
        assert sorted(r.n for r in written) == list(range(1, 25))
        stored = [raw async for _, raw in read_records(writers[0].jetstream())]
        assert len(stored) == 24 and verify_chain(stored) == []
        # NATS itself refuses to delete an audit record.
        with pytest.raises(nats.js.errors.APIError):
            await writers[0].jetstream().delete_msg("CONCLAVE_AUDIT", 3)
    finally:
        for nc in writers:
            await nc.close()
        server.stop()


async def test_replay_reports_no_difference_on_an_unchanged_deployment(server, client):
    start = time.time()
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    sampled = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=1.0, max_tokens=2)  # no seed
    await wait_for_audit_record(server.nats_url, lambda r: r.job_id == sampled.id)
    since = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat()
    result = audit(server, "replay", "--since", since)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["replayed"], report["same"], report["different"]) == (1, 1, [])
    assert report["skipped"] == {"sampled without a seed": 1}
    # The replay is itself audited, marked as such.
    await wait_for_audit_record(server.nats_url, lambda r: r.caller == f"replay-of:{reply.id}")
