"""NATS's payload limit never breaks anything: limits enforced at the edge, every record kept whatever its size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from pipeline.limits import EMBEDDED_MAX_PAYLOAD, PayloadLimits, too_deep
from pipeline.subjects import job_subject
from schemas.jobs import Failed, Job
from schemas.openai import ChatMessage
from tests.conftest import FRANCE, MODEL, SUBMITTER, wait_for_audit_record
from tests.test_durability import final_event
from tests.test_errors import error_of, still_serves

LIMITS = PayloadLimits(EMBEDDED_MAX_PAYLOAD)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_nesting_depth_is_counted_outside_strings():
    assert not too_deep(b"[[[]]]", 3) and too_deep(b"[[[[]]]]", 3)
    assert not too_deep(b'{"a": "[[[[[[[[[[", "b": [1, [2]]}', 3)
    assert too_deep(b'{"a": {"b": [{}]}}', 3) and not too_deep(b'{"a": {"b": [1]}}', 3)
    assert not too_deep(b'[' + b'[],' * 10000 + b'[]]', 3)  # wide is fine
    assert too_deep(b"[[[[", 3)  # unclosed brackets count too: a decoder recurses into each it opens


async def test_a_megabyte_request_is_answered_and_recorded_and_the_server_keeps_serving(server, http, client):
    # About 1 MiB: once it fit nats-py's own check but not the server's limit with its header, and the
    # ingress lost its NATS connection for good (every later request a 500).
    prompt = "The quick brown fox jumps over the lazy dog. " * (2**20 // 45)
    response = http.post("/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"
    job_id = response.headers["x-request-id"]
    record = await wait_for_audit_record(server, lambda r: r.job_id == job_id)
    assert record.job.prompt == prompt and record.error.code == "context_length_exceeded"
    assert server.health()["nats"] == "connected"
    still_serves(client)


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(server, http, client):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (LIMITS.job_bytes + 1)}]}
    response = http.post("/chat/completions", json=huge)
    assert response.status_code == 413
    error = error_of(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert str(LIMITS.job_bytes) in error["message"]
    assert server.health()["nats"] == "connected"
    still_serves(client)


def test_deeply_nested_json_is_400(http, client):
    body = '{"model": "%s", "messages": %s, "tools": [%s]}' % (MODEL, json.dumps(FRANCE), nested(100_000))
    response = http.post("/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and error_of(response)["code"] == "nesting_too_deep"
    still_serves(client)


async def test_nats_jobs_too_large_or_too_deep_are_refused_recorded_and_the_worker_goes_on(server, client):
    pid = server.worker_pid()
    nc = await server.connect()
    try:
        js = nc.jetstream()
        replies = await nc.subscribe("conclave.replies.tests.huge")
        # Fits the server's max_payload, not the job limit: its audit record could not hold it and an output.
        huge = Job(id="job-huge", model=MODEL, reply_subject="conclave.replies.tests.huge", kind="chat", created=time.time(),
                   messages=[ChatMessage(role="user", content="y" * (LIMITS.job_bytes + 10))])
        await js.publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(huge), headers={"Nats-Msg-Id": huge.id})
        failed = await final_event(replies)
        assert isinstance(failed, Failed) and (failed.status, failed.error.code) == (413, "job_too_large")
        record = await wait_for_audit_record(server, lambda r: r.job_id == huge.id)
        assert record.outcome == "failed" and record.job is None and record.error.code == "job_too_large"

        # Within the job limit as sent (1.9 MB), over it as its record keeps it (every field of 120,000 messages
        # written out: 9.7 MB): once its record could not be stored at all, and the job was held, unanswered.
        wide_replies = await nc.subscribe("conclave.replies.tests.wide")
        wide = msgspec.json.encode({"id": "job-wide", "model": MODEL, "reply_subject": "conclave.replies.tests.wide",
                                    "kind": "chat", "messages": [{"role": "user"}] * 120_000})
        assert len(wide) < LIMITS.job_bytes
        await js.publish(job_subject(MODEL, SUBMITTER), wide, headers={"Nats-Msg-Id": "job-wide"})
        failed = await final_event(wide_replies)
        assert isinstance(failed, Failed) and (failed.status, failed.error.code) == (413, "job_too_large")
        record = await wait_for_audit_record(server, lambda r: r.job_id == "job-wide")
        assert record.outcome == "failed" and record.job is None

        # 100 levels deep (a JSON Schema of that depth, say): answered on its reply subject, recorded under its id;
        # refused once without a word to its submitter, who waited out its own timeout.
        deep_replies = await nc.subscribe("conclave.replies.tests.deep")
        deep = '{"id": "job-deep", "reply_subject": "conclave.replies.tests.deep", "x": %s}' % nested(100)
        await js.publish(job_subject(MODEL, SUBMITTER), deep.encode(), headers={"Nats-Msg-Id": "job-deep"})
        failed = await final_event(deep_replies)
        assert isinstance(failed, Failed) and (failed.status, failed.error.code) == (400, "invalid_job")
        record = await wait_for_audit_record(server, lambda r: r.job_id == "job-deep")
        assert (record.outcome, record.error.code) == ("failed", "invalid_job")
        assert "nested too deeply" in record.error.message
        # 100,000 levels deep: once a RecursionError that left the job unsettled, redelivered again and again. Too
        # deep for even its id to be read: recorded as failed.
        deeper = '{"id": "job-deeper", "reply_subject": "conclave.replies.tests.deep", "x": %s}' % nested(100_000)
        await js.publish(job_subject(MODEL, SUBMITTER), deeper.encode(), headers={"Nats-Msg-Id": "job-deeper"})
        record = await wait_for_audit_record(
            server, lambda r: r.error is not None and "nested too deeply" in r.error.message and r.job_id != "job-deep")
        assert (record.outcome, record.error.code) == ("failed", "invalid_job")
    finally:
        await nc.close()
    still_serves(client)
    assert server.worker_pid() == pid


async def test_a_record_of_several_megabytes_is_kept(server):
    # A prompt far longer than the context: refused before it is tokenised, and recorded whole.
    nc = await server.connect()
    try:
        replies = await nc.subscribe("conclave.replies.tests.long")
        text = "z" * (6 * 2**20)
        job = Job(id="job-long", model=MODEL, reply_subject="conclave.replies.tests.long", kind="completion", prompt=text,
                  created=time.time())
        await nc.jetstream().publish(job_subject(MODEL, SUBMITTER), msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
        failed = await final_event(replies)
        assert failed.status == 400 and failed.error.code == "context_length_exceeded"
        record = await wait_for_audit_record(server, lambda r: r.job_id == job.id)
        assert record.job.prompt == text
    finally:
        await nc.close()


def test_generation_stops_at_the_output_limit(server, tokenizer):
    """An output as large as a message may carry ends with finish_reason `length`, so that its final event
    and audit record always fit (pipeline/limits.py)."""
    import threading

    from schemas.jobs import Chunk, Done, SamplingParams
    from workers.generation import Generation

    events = []
    job = Job(id="job-cap", model=MODEL, reply_subject="r", kind="completion", prompt="x",
              params=SamplingParams(temperature=0))
    generation = Generation(job, [1, 2, 3], 1000, tokenizer, 49152, "w", events.append, threading.Event(), 0.0,
                            output_limit=40)
    word = tokenizer.encode(" hello")[0]
    steps = next(n for n in range(1, 1000) if generation.on_token(word))
    assert steps < 20
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "length"
    assert 40 <= len(done.text) < 40 + len(" hello")
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == done.text


@pytest.mark.parametrize("max_payload", [2**20, EMBEDDED_MAX_PAYLOAD])
def test_a_record_of_the_largest_job_and_output_fits_the_payload(max_payload):
    from pipeline.audit import record_for
    from schemas.audit import stored_bytes
    from schemas.jobs import Done
    from schemas.openai import Usage

    limits = PayloadLimits(max_payload)
    job = Job(id="j" * 200, model=MODEL, reply_subject="r" * 256, kind="completion", prompt="")
    job.prompt = "p" * (limits.job_bytes - len(msgspec.json.encode(job)))  # as large as a worker takes
    assert len(msgspec.json.encode(job)) == limits.job_bytes
    done = Done(id=job.id, text="o" * limits.output_bytes, finish_reason="length",
                usage=Usage(prompt_tokens=10**6, completion_tokens=10**6, total_tokens=2 * 10**6), ttft_ms=1.0,
                duration_ms=1.0, worker="w" * 300)
    record = record_for(job.id, job, done, submitter="s" * 63, model=MODEL, revision="r", worker="w" * 300)
    headers = 1024  # Nats-Expected-Last-Subject-Sequence and its framing
    assert len(stored_bytes(record)) + headers < max_payload



def test_an_unterminated_string_of_escaped_quotes_is_scanned_in_one_pass():
    # Every quote after the first would start a scan to the end that fails: quadratic, an hour for this body, with
    # the GIL held (the ingress or a worker frozen). Run apart, so that a regression fails instead of hanging.
    probe = r"""from pipeline.limits import too_deep; print(too_deep(b"[" * 65 + b'"' + b'\\"' * 400_000 + TAIL))"""
    for tail in (r"b''", r"b'\\'"):  # and one lone backslash at the very end
        done = subprocess.run([sys.executable, "-c", probe.replace("TAIL", tail)], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).parent.parent)
        assert done.stdout.strip() == "True", done.stderr
