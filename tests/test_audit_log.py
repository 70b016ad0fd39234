"""The audit log survives time and tells the truth: stored bytes, a stream-order chain, signed checkpoints.

Mostly pure: records are built with record_for, stored as a worker stores them, exported and tampered with
in memory, and checked with the same functions `conclave audit verify` uses. A few tests run against a real
nats-server (the `bare_nats` fixture: an authenticated server, an operator's connection).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import stat
import time

import msgspec
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit import (Entry, append_record, chain, decode_record, legacy_problems, read_entries, record_for,
                            stream_facts)
from pipeline.audit_export import entry_line, export_lines, parse_export, verify_export
from pipeline.audit_verify import BROKEN, NOTE, UNVOUCHED, verify_log
from pipeline.checkpoints import (keep_checkpointing, load_signing_key, make_checkpoint, next_span,
                                  parse_public_key, public_key_text, read_checkpoint_messages, read_signed,
                                  signed_message)
from pipeline.subjects import AUDIT_STREAM, CHECKPOINTS_STREAM, audit_subject
from schemas.audit import GENESIS, AuditRecord, StreamFacts, stored_bytes
from schemas.jobs import Done, Failed, Job, SamplingParams
from schemas.openai import ChatMessage, ErrorDetail, TextPart, Usage

DAY = 86400.0
CREATED = "2026-01-01T00:00:00+00:00"
T0 = 1_780_000_000.0
KEY = Ed25519PrivateKey.generate()
PUBLIC = public_key_text(KEY)


# --- helpers -------------------------------------------------------------------------------------------


def full_job(job_id: str = "job-1", text: str = "What is the capital of France?", **params) -> Job:
    """A chat job that sets every parameter a job can carry."""
    sampling = dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1234, max_tokens=64,
                    stop=["\n\n", "END"], presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.1,
                    logit_bias={50256: -100.0, 13: 2.5})
    sampling.update(params)
    return Job(id=job_id, model="m", reply_subject=f"conclave.replies.ingress.{job_id}", kind="chat",
               messages=[ChatMessage(role="system", content="Be brief."),
                         ChatMessage(role="user", content=[TextPart(type="text", text=text)], name="alice")],
               params=SamplingParams(**sampling), stream=False, created=T0, source="http", caller="key:alice:ab12")


def done(job_id: str, text: str = "Paris.") -> Done:
    return Done(id=job_id, text=text, finish_reason="stop", ttft_ms=12.5, duration_ms=80.0, worker="host:1",
                usage=Usage(prompt_tokens=9, completion_tokens=2, total_tokens=11))


def a_record(job_id: str, text: str = "What is the capital of France?", **params) -> AuditRecord:
    job = full_job(job_id, text, **params)
    return record_for(job_id, job, done(job_id), submitter="ingress", model="m", revision="rev", worker="host:1")


def log_of(*records: AuditRecord, first: int = 1) -> list[Entry]:
    return [Entry(seq=first + i, subject=audit_subject(r.model, r.submitter, r.job_id), data=stored_bytes(r))
            for i, r in enumerate(records)]


def config(max_age_s: float = 0.0, **changes) -> dict:
    base = {"subjects": ["conclave.audit.>"], "retention": "limits", "discard": "old", "max_age_s": max_age_s,
            "max_msgs": -1, "max_bytes": -1, "max_msgs_per_subject": -1, "deny_delete": True, "deny_purge": True,
            "allow_rollup_hdrs": False, "allow_msg_ttl": False, "sealed": False, "mirror": False, "sources": False}
    return {**base, **changes}


def facts(entries: list[Entry], at: float, max_age_s: float = 0.0, created: str = CREATED, **changes) -> StreamFacts:
    seqs = [e.seq for e in entries]
    first, last = (seqs[0], seqs[-1]) if seqs else (1, 0)
    return StreamFacts(name=AUDIT_STREAM, created=created, config=config(max_age_s, **changes), first_seq=first,
                       last_seq=last, messages=len(entries), time=at)


def sign(entries: list[Entry], previous, at: float, key=KEY, **fact_changes):
    """The checkpoint `conclave serve` would sign over the stream holding `entries`, and its message."""
    stream = facts(entries, at, **fact_changes)
    span = next_span(previous, stream)
    assert span is not None
    start, before, new_segment = span
    covered = [e for e in entries if e.seq >= start]
    checkpoint = make_checkpoint(stream, start, before, new_segment, covered, stream.last_seq, public_key_text(key))
    return checkpoint, signed_message(key, checkpoint)


def signed_log(count: int = 6, per_checkpoint: int = 3, **fact_changes):
    """`count` records, with a checkpoint after every `per_checkpoint`: (entries, checkpoint messages)."""
    entries = log_of(*(a_record(f"job-{i}") for i in range(1, count + 1)))
    messages, previous = [], None
    for upto in range(per_checkpoint, count + 1, per_checkpoint):
        previous, message = sign(entries[:upto], previous, T0 + upto, **fact_changes)
        messages.append(message)
    return entries, messages


def findings(verdict, level: str) -> list[str]:
    return [f.text for f in verdict.findings if f.level == level]


def replace_data(entries: list[Entry], seq: int, data: bytes) -> list[Entry]:
    return [Entry(e.seq, e.subject, data) if e.seq == seq else e for e in entries]


# --- records: stored bytes that anyone can reproduce -----------------------------------------------------


def test_every_job_parameter_survives_a_stored_round_trip():
    chat = a_record("job-chat")
    completion_job = Job(id="job-tokens", model="m", reply_subject="conclave.replies.ingress.t", kind="completion",
                         prompt=[1, 2, 3], params=SamplingParams(temperature=0, logit_bias={7: 1.0}))
    failed = Failed(id="job-tokens", status=400, error=ErrorDetail(message="bad", type="invalid_request_error",
                                                                   param="logit_bias", code="invalid_value"))
    completion = record_for("job-tokens", completion_job, failed, submitter="ingress", model="m", revision="r",
                            worker="w", ranks=2, attempt=3)
    for record in (chat, completion):
        raw = stored_bytes(record)
        # RFC 8785: what any implementation makes of the parsed JSON (numbers as doubles) is the same bytes.
        assert rfc8785.dumps(json.loads(raw, parse_int=float)) == raw
        assert decode_record(raw) == record
        value = json.loads(raw)
        assert not {"n", "prev_hash", "hash"} & set(value)  # the legacy chain fields are not written any more
    params = decode_record(stored_bytes(chat)).job.params
    assert params.logit_bias == {50256: -100.0, 13: 2.5} and params.stop == ["\n\n", "END"] and params.seed == 1234
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert (completion.outcome, completion.error.param, completion.ranks, completion.attempt) == \
        ("failed", "logit_bias", 2, 3)
    # The export carries the stored bytes exactly, and verification reproduces them.
    entries = log_of(chat, completion)
    assert [e.data for e in parse_export(b"".join(entry_line(e) + b"\n" for e in entries)).entries] == \
        [e.data for e in entries]


def test_a_record_that_is_not_i_json_is_stored_sorted_and_still_verifies():
    record = a_record("job-huge-seed", seed=2**60 + 1)  # beyond ±2**53: no RFC 8785 form exists
    raw = stored_bytes(record)
    assert raw == msgspec.json.Encoder(order="sorted").encode(
        {k: v for k, v in msgspec.to_builtins(record, str_keys=True).items() if k not in ("n", "prev_hash", "hash")})
    assert decode_record(raw).job.params.seed == 2**60 + 1
    assert b'"text":' in entry_line(Entry(1, "s", raw))  # carried verbatim, not re-canonicalised
    entries = log_of(a_record("job-a"), record)
    _, message = sign(entries, None, T0)
    verdict = verify_export(b"".join(export_lines(facts(entries, T0), entries, [message])), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (0, 2), verdict.lines()


def test_caller_and_source_are_vouched_for_only_from_attesting_submitters():
    job = full_job("j")
    http = record_for("j", job, done("j"), submitter="ingress", model="m", revision="r", worker="w")
    assert (http.submitter, http.caller, http.source, http.claimed_caller, http.claimed_source) == \
        ("ingress", "key:alice:ab12", "http", None, None)
    forged = record_for("j", job, done("j"), submitter="billing", model="m", revision="r", worker="w")
    assert (forged.caller, forged.source, forged.claimed_caller, forged.claimed_source) == \
        ("nats:billing", "nats", "key:alice:ab12", "http")
    unreadable = record_for("j", None, done("j"), submitter="billing", model="m", revision="r", worker="w")
    assert (unreadable.caller, unreadable.claimed_caller) == ("nats:billing", None)
    assert record_for("j", None, done("j"), submitter="ingress", model="m", revision="r", worker="w").caller == \
        "unknown"
    replayed = msgspec.structs.replace(job, source="replay", caller="replay-of:j0")
    record = record_for("j", replayed, done("j"), submitter="operator", model="m", revision="r", worker="w")
    assert (record.caller, record.source) == ("replay-of:j0", "replay")
    assert decode_record(stored_bytes(forged)) == forged


class OldUsage(msgspec.Struct):  # Usage before `prompt_tokens_details` was added
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OldRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):  # the record as version 0.4 wrote it
    n: int
    prev_hash: str
    hash: str = ""
    time: float
    job_id: str
    outcome: str
    model: str
    model_revision: str
    caller: str
    source: str
    job: Job | None
    output: str = ""
    finish_reason: str | None = None
    usage: OldUsage | None = None
    ttft_ms: float = 0.0
    duration_ms: float = 0.0
    worker: str = ""
    ranks: int = 1
    attempt: int = 1
    error: ErrorDetail | None = None


def old_chain(count: int) -> list[Entry]:
    """Records chained and stored exactly as version 0.4 did (its own digest and encoder)."""
    entries, previous = [], None
    for n in range(1, count + 1):
        record = OldRecord(n=n, prev_hash=previous.hash if previous else GENESIS, time=T0 + n, job_id=f"old-{n}",
                           outcome="done", model="m", model_revision="r", caller="anonymous", source="http",
                           job=full_job(f"old-{n}"), output="Paris.", finish_reason="stop",
                           usage=OldUsage(9, 2, 11), ttft_ms=1.5, duration_ms=3.0, worker="w")
        canonical = msgspec.to_builtins(msgspec.structs.replace(record, hash=""), str_keys=True)
        record = msgspec.structs.replace(record, hash=hashlib.sha256(
            msgspec.json.Encoder(order="sorted").encode(canonical)).hexdigest())
        entries.append(Entry(n, "conclave.audit", msgspec.json.encode(record)))
        previous = record
    return entries


def test_records_written_by_an_older_schema_still_verify_and_decode():
    entries = old_chain(3)
    assert legacy_problems(entries) == []
    record = decode_record(entries[0].data)
    assert (record.n, record.usage.prompt_tokens_details, record.submitter, record.job.params.seed) == (1, None, "", 1234)
    # Today's schema re-encodes it with `prompt_tokens_details`: a hash over that re-encoding (0.4's check)
    # would call every old record edited.
    reencoded = msgspec.to_builtins(msgspec.structs.replace(record, hash=""), str_keys=True)
    assert hashlib.sha256(msgspec.json.Encoder(order="sorted").encode(reencoded)).hexdigest() != record.hash
    # Their own hashes still catch an edit and a removal, and the stream's chain covers them like any entry.
    edited = replace_data(entries, 2, entries[1].data.replace(b"Paris.", b"Lyon."))
    assert [seq for seq, _ in legacy_problems(edited)] == [2]
    assert [seq for seq, _ in legacy_problems([entries[0], entries[2]])] == [3]
    _, message = sign(entries, None, T0)
    verdict = verify_export(b"".join(export_lines(facts(entries, T0), entries, [message])), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (0, 3), verdict.lines()


def test_a_record_written_by_a_newer_schema_verifies_and_decodes():
    value = json.loads(stored_bytes(a_record("job-new")))
    value["sentiment"] = "neutral"  # a field this version does not know
    value["job"]["params"]["typical_p"] = 0.9  # and one inside the job, whose schema forbids unknown fields
    raw = rfc8785.dumps(value)
    record = decode_record(raw)
    assert (record.job_id, record.output, record.job) == ("job-new", "Paris.", None)  # the job is in the bytes
    entries = [*log_of(a_record("job-old")), Entry(2, "conclave.audit.m.ingress.job-new", raw)]
    _, message = sign(entries, None, T0)
    verdict = verify_export(b"".join(export_lines(facts(entries, T0), entries, [message])), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.records) == (0, 2, 2), verdict.lines()


def test_an_export_with_line_separators_inside_prompts_verifies():
    texts = ["Ünïcödé 漢字 🐉", "one\u2028two", "para\u2029graph", "next\u0085line", "tab\there\nnewline\r\n"]
    entries = log_of(*(a_record(f"job-{i}", text) for i, text in enumerate(texts)))
    _, message = sign(entries, None, T0)
    export = b"".join(export_lines(facts(entries, T0), entries, [message]))
    assert len(export.decode().splitlines()) > len(export.split(b"\n"))  # what str.splitlines() would break
    verdict = verify_export(export, pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.broken) == (0, len(texts), False), verdict.lines()
    assert decode_record(parse_export(export).entries[1].data).job.messages[1].content[0].text == "one\u2028two"


# --- verify: what it vouches for, and the first thing it cannot ------------------------------------------


def test_an_untouched_signed_log_is_vouched_for_and_unpinned_is_not_enough():
    entries, messages = signed_log()
    verdict = verify_log(entries, messages, facts(entries, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.unvouched, verdict.checkpoints) == (0, 6, 0, 2)
    unpinned = verify_log(entries, messages, facts(entries, T0 + 10))
    assert unpinned.exit_code == 3 and any("not pinned" in text for text in findings(unpinned, NOTE))
    assert PUBLIC in "\n".join(unpinned.lines())
    for verdict in (verdict, unpinned):
        assert "intact" not in "\n".join(verdict.lines())


def test_an_edit_is_found_even_when_everything_a_writer_can_recompute_is_recomputed():
    entries, messages = signed_log()
    value = json.loads(entries[1].data)
    value["output"] = "Lyon."
    edited = replace_data(entries, 2, rfc8785.dumps(value))  # a perfectly canonical, decodable record
    verdict = verify_log(edited, messages, facts(edited, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    assert any("seq 1..3 do not match checkpoint 1" in text for text in findings(verdict, BROKEN))
    assert verdict.vouched == 3  # the other checkpoint's span still holds

    # The chain value in the checkpoint recomputed too: its signature no longer holds.
    checkpoint = read_signed(messages[0]).checkpoint
    forged = msgspec.structs.replace(checkpoint, chain_after=chain(GENESIS, (e.data for e in edited[:3])))
    body = rfc8785.dumps(msgspec.to_builtins(forged))
    tampered = body.join([b'{"checkpoint":', b',"signature":' + json.dumps(json.loads(messages[0])["signature"])
                          .encode() + b"}"])
    verdict = verify_log(edited, [tampered, messages[1]], facts(edited, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("valid signature" in text for text in findings(verdict, BROKEN))

    # Re-signed with a key of the forger's own: not the pinned key, so nothing is vouched for (never 0).
    other = Ed25519PrivateKey.generate()
    resigned = [signed_message(other, msgspec.structs.replace(cp, signer=public_key_text(other)))
                for cp in (forged, read_signed(messages[1]).checkpoint)]
    verdict = verify_log(edited, resigned, facts(edited, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (3, 0)
    assert any(public_key_text(other) in text and "not trusted" in text for text in findings(verdict, NOTE))


def test_records_cut_off_the_end_are_missing_not_intact():
    entries, messages = signed_log()
    export = b"".join(export_lines(facts(entries[:4], T0 + 10), entries[:4], messages))
    verdict = verify_export(export, pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 4
    assert any("seq 5..6 were cut off its end" in text for text in findings(verdict, BROKEN))
    # Also when the stream's header was dropped from the export along with them.
    lines = [line for line in export.split(b"\n") if line and b"conclave_audit_export" not in line]
    assert verify_export(b"\n".join(lines), pinned=PUBLIC).exit_code == 1


def test_reordered_inserted_and_removed_entries_are_found():
    entries, messages = signed_log()
    swapped = replace_data(replace_data(entries, 4, entries[4].data), 5, entries[3].data)
    verdict = verify_log(swapped, messages, facts(swapped, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 4
    shifted = [*entries[:2], Entry(3, "conclave.audit.x", b"junk"),
               *(Entry(e.seq + 1, e.subject, e.data) for e in entries[2:])]
    verdict = verify_log(shifted, messages, facts(shifted, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    removed = [e for e in entries if e.seq != 2]
    verdict = verify_export(b"".join(export_lines(None, removed, messages)), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 2 is missing" in text for text in findings(verdict, BROKEN))


def test_a_foreign_message_stays_in_the_chain_and_is_reported():
    records = log_of(a_record("job-1"), a_record("job-2"))
    entries = [records[0], Entry(2, "conclave.audit.m.evil.x", b"not a record\n"),
               Entry(3, records[1].subject, records[1].data)]
    _, message = sign(entries, None, T0)
    export = b"".join(export_lines(facts(entries, T0), entries, [message]))
    verdict = verify_export(export, pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.unvouched, verdict.broken) == (3, 2, 1, False)
    assert verdict.first_unvouched.seq == 2 and "foreign message on conclave.audit.m.evil.x" in \
        verdict.first_unvouched.text


def test_records_after_the_last_checkpoint_and_without_any_are_not_vouched_for():
    entries, messages = signed_log(count=5)
    verdict = verify_log(entries, messages, facts(entries, T0 + 10), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched, verdict.first_unvouched.seq) == (3, 3, 4)
    assert "after the last checkpoint" in verdict.first_unvouched.text
    nothing = verify_log(entries, [], facts(entries, T0 + 10), pinned=PUBLIC)
    assert (nothing.exit_code, nothing.vouched) == (3, 0)
    assert any("no signed checkpoints" in text for text in findings(nothing, NOTE))


def test_a_changed_stream_is_reported_against_the_checkpoints():
    entries, messages = signed_log()
    shortened = verify_log(entries, messages, facts(entries, T0 + 10, max_age_s=2.0), pinned=PUBLIC)
    assert shortened.exit_code == 1 and any("configuration changed" in text and "max_age_s" in text
                                            for text in findings(shortened, BROKEN))
    remade = verify_log(entries, messages, facts(entries, T0 + 10, created="2026-02-02T00:00:00+00:00"),
                        pinned=PUBLIC)
    assert remade.exit_code == 1 and any("deleted and made again" in text for text in findings(remade, BROKEN))
    deleted = verify_log([], messages, None, stream_missing=True, pinned=PUBLIC)
    assert deleted.exit_code == 1 and any("does not exist" in text for text in findings(deleted, BROKEN))
    # Kept forever, yet its first records are gone.
    verdict = verify_log(entries[3:], messages, facts(entries[3:], T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 1..3" in text and "removed" in text
                                          for text in findings(verdict, BROKEN))
    # Bad signature, and a checkpoint missing from the middle.
    body = json.loads(messages[0])
    body["signature"] = base64.b64encode(bytes(64)).decode()
    verdict = verify_log(entries, [json.dumps(body).encode(), messages[1]], facts(entries, T0 + 10), pinned=PUBLIC)
    assert verdict.exit_code == 1 and verdict.first_unvouched.seq == 1
    entries9, messages9 = signed_log(count=9)
    verdict = verify_log(entries9, [messages9[0], messages9[2]], facts(entries9, T0 + 20), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("does not continue checkpoint 1" in text for text in findings(verdict, BROKEN))


def test_records_that_aged_out_are_told_apart_from_records_removed_too_early():
    entries, messages = signed_log(count=6, max_age_s=30 * DAY)
    kept = entries[3:]
    aged = verify_log(kept, messages, facts(kept, T0 + 60 * DAY, max_age_s=30 * DAY), pinned=PUBLIC)
    assert (aged.exit_code, aged.vouched) == (0, 3), aged.lines()
    assert any("seq 1..3" in text and "aged out" in text for text in findings(aged, NOTE))
    # Retention shortened to seconds and put back: the configuration matches again, but seq 4..6 were
    # appended after checkpoint 1 (T0 + 3) and are gone a day later, though they are kept for 30 days.
    checkpoint1, message1 = sign(entries[:3], None, T0 + 3, max_age_s=30 * DAY)
    _, message2 = sign(entries[:6], checkpoint1, T0 + 6, max_age_s=30 * DAY)
    later = log_of(a_record("job-7"), first=7)
    verdict = verify_log(later, [message1, message2], facts(later, T0 + DAY, max_age_s=30 * DAY), pinned=PUBLIC)
    assert verdict.exit_code == 1 and any("seq 4..6" in text and "before they could age out" in text
                                          for text in findings(verdict, BROKEN)), verdict.lines()


def test_entries_that_aged_out_unsigned_start_a_new_segment():
    entries = log_of(*(a_record(f"job-{i}") for i in range(1, 10)))
    checkpoint1, message1 = sign(entries[:3], None, T0, max_age_s=DAY)
    # Seq 4..5 aged out before the next round: it starts over from GENESIS at the stream's first sequence.
    checkpoint2, message2 = sign(entries[5:], checkpoint1, T0 + 2 * DAY, max_age_s=DAY)
    assert (checkpoint2.new_segment, checkpoint2.from_seq, checkpoint2.chain_before) == (True, 6, GENESIS)
    verdict = verify_log(entries[5:], [message1, message2], facts(entries[5:], T0 + 2 * DAY, max_age_s=DAY),
                         pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (0, 4), verdict.lines()
    assert any("seq 4..5" in text and "never signed" in text for text in findings(verdict, NOTE))
    assert findings(verdict, UNVOUCHED) == []


# --- the signing key ---------------------------------------------------------------------------------------


def test_the_signing_key_is_made_once_for_the_owner_only(tmp_path):
    path = tmp_path / "home" / "credentials" / "audit-signing.key"
    with pytest.raises(FileNotFoundError):
        load_signing_key(path, create=False)
    key = load_signing_key(path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    again = load_signing_key(path, create=True)
    assert public_key_text(again) == public_key_text(key) == public_key_text(load_signing_key(path, create=False))
    text = public_key_text(key)
    assert text.startswith("ed25519:") and public_key_text(parse_public_key(text)) == text
    with pytest.raises(ValueError):
        parse_public_key("ed25519:" + base64.b64encode(b"short").decode())


# --- against a real nats-server -----------------------------------------------------------------------------


async def until(condition, timeout_s: float = 20.0):
    """Wait for an async condition, checking often, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return result


async def test_a_job_gets_at_most_one_record_and_a_foreign_message_stops_nothing(bare_nats):
    from pipeline.access import worker_role
    from tests.conftest import MODEL

    broker, operator = bare_nats
    worker = await broker.connect(worker_role(MODEL))  # writers append without reading the log
    try:
        js = worker.jetstream()
        first = record_for("job-a", full_job("job-a"), done("job-a"), submitter="ingress", model=MODEL,
                           revision="r", worker="w")
        assert await append_record(js, first) is True
        again = msgspec.structs.replace(first, output="a second run")
        assert await append_record(js, again) is False
        await js.publish(audit_subject(MODEL, "ingress", "junk"), b"\x00 not a record", stream=AUDIT_STREAM)
        second = msgspec.structs.replace(first, job_id="job-b")
        assert await append_record(js, second) is True
    finally:
        await worker.close()
    stored = [entry async for entry in read_entries(operator.jetstream())]
    assert [e.data for e in stored] == [stored_bytes(first), b"\x00 not a record", stored_bytes(second)]


async def test_checkpoints_are_signed_verify_and_resume_after_a_restart(bare_nats, tmp_path, caplog):
    broker, nc = bare_nats
    js = nc.jetstream()
    key = load_signing_key(tmp_path / "credentials" / "audit-signing.key", create=True)

    async def checkpointed_up_to(seq: int):
        messages = [m for _, m in await read_checkpoint_messages(js)]
        return messages if messages and read_signed(messages[-1]).checkpoint.to_seq >= seq else None

    async def run_signer_until(seq: int):
        stopping = asyncio.Event()
        signer = asyncio.create_task(keep_checkpointing(nc, key, 0.1, stopping))
        try:
            return await until(lambda: checkpointed_up_to(seq))
        finally:
            stopping.set()
            await asyncio.wait_for(signer, 10)

    for i in range(3):
        assert await append_record(js, a_record(f"job-{i}"))
    await run_signer_until(3)
    for i in range(3, 5):  # written while no signer runs
        assert await append_record(js, a_record(f"job-{i}"))
    messages = await run_signer_until(5)
    checkpoints = [read_signed(m).checkpoint for m in messages]
    assert (checkpoints[0].from_seq, checkpoints[0].new_segment) == (1, True)
    assert (checkpoints[-1].to_seq, checkpoints[-1].new_segment) == (5, False)
    assert all(b.from_seq == a.to_seq + 1 and b.chain_before == a.chain_after
               for a, b in zip(checkpoints, checkpoints[1:]))

    stream = await stream_facts(js)
    entries = [entry async for entry in read_entries(js)]
    verdict = verify_log(entries, messages, stream, pinned=public_key_text(key))
    assert (verdict.exit_code, verdict.vouched) == (0, 5), verdict.lines()
    assert verify_export(b"".join(export_lines(stream, entries, messages)), pinned=public_key_text(key)).exit_code == 0

    # Without its checkpoint stream it says so, one line per round, and keeps going.
    await js.delete_stream(CHECKPOINTS_STREAM)
    caplog.set_level(logging.WARNING, logger="conclave.checkpoints")
    stopping = asyncio.Event()
    signer = asyncio.create_task(keep_checkpointing(nc, key, 0.05, stopping))

    async def warned_twice():
        return len([r for r in caplog.records if "audit checkpoint not signed" in r.getMessage()]) >= 2

    await until(warned_twice)
    stopping.set()
    await asyncio.wait_for(signer, 10)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)


async def test_appends_and_checkpoints_go_on_after_every_record_aged_out(bare_nats, tmp_path):
    from nats.js.api import StreamConfig

    from pipeline.checkpoints import sign_new_entries

    broker, nc = bare_nats
    js = nc.jetstream()
    await js.delete_stream(AUDIT_STREAM)  # made again with a retention of one second
    await js.add_stream(StreamConfig(name=AUDIT_STREAM, subjects=["conclave.audit.>"], max_age=1.0,
                                     deny_delete=True, deny_purge=True))
    key = load_signing_key(tmp_path / "audit.key", create=True)
    assert await append_record(js, a_record("job-1")) and await append_record(js, a_record("job-2"))
    [first] = await sign_new_entries(js, key)

    async def emptied():
        return (await js.stream_info(AUDIT_STREAM)).state.messages == 0

    await until(emptied)
    # Version 0.4 chained onto the tail and found none: from here on every append failed.
    assert await append_record(js, a_record("job-3")) is True
    [second] = await sign_new_entries(js, key)
    # Seq 1..2 were signed before they aged out: the chain goes on from the value signed for them.
    assert (first.from_seq, first.to_seq, second.from_seq, second.new_segment) == (1, 2, 3, False)
    assert second.chain_before == first.chain_after and second.first_seq == 3
    entries = [entry async for entry in read_entries(js)]
    messages = [m for _, m in await read_checkpoint_messages(js)]
    verdict = verify_log(entries, messages, await stream_facts(js), pinned=public_key_text(key))
    assert (verdict.exit_code, verdict.vouched) == (0, 1), verdict.lines()
    assert any("seq 1..2" in text and "aged out" in text for text in findings(verdict, NOTE))


async def test_the_audit_command_lists_exports_and_verifies(bare_nats):
    import subprocess
    import sys

    from pipeline.checkpoints import sign_new_entries

    broker, nc = bare_nats
    js = nc.jetstream()
    key = load_signing_key(broker.home / "credentials" / "audit-signing.key", create=True)
    job = full_job("job-1", "one\u2028two")
    await append_record(js, record_for("job-1", job, done("job-1"), submitter="billing", model="m", revision="r",
                                       worker="w"))
    await append_record(js, a_record("job-2"))
    await sign_new_entries(js, key)
    await append_record(js, a_record("job-3"))  # not signed yet

    def audit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(broker.home), "audit", *args,
                               "--nats-url", broker.url], capture_output=True, text=True, timeout=120)

    key_text = audit("key")
    assert key_text.returncode == 0 and key_text.stdout.strip() == public_key_text(key)
    listed = audit("list", "--submitter", "billing").stdout.splitlines()
    assert len(listed) == 1 and "\tbilling\tnats:billing\tnats\tdone" in listed[0]
    shown = audit("show", "job-1")
    assert msgspec.json.decode(shown.stdout, type=AuditRecord).claimed_caller == "key:alice:ab12"
    live = audit("verify")  # pins this home's key
    assert live.returncode == 3, live.stdout + live.stderr
    assert "first entry not vouched for: seq 3 (job job-3): appended after the last checkpoint" in live.stdout
    export = broker.home / "audit.jsonl"
    assert audit("export", "--output", str(export)).returncode == 0
    checked = audit("verify", "--file", str(export), "--public-key", public_key_text(key))
    assert checked.returncode == 3 and "result: nothing found wrong, but 1 of 3 entries" in checked.stdout
    lines = export.read_bytes().split(b"\n")
    (broker.home / "cut.jsonl").write_bytes(b"\n".join(line for line in lines if b'"seq":2' not in line))
    cut = audit("verify", "--file", str(broker.home / "cut.jsonl"), "--public-key", public_key_text(key))
    assert cut.returncode == 1 and "BROKEN" in cut.stdout
