"""The audit log's records, as stored and chained: bytes anyone can reproduce, whichever version wrote them.

Mostly pure: records are built with record_for, stored as a worker stores them, exported and checked with
the same functions `conclave audit verify` uses. The helpers here serve tests/test_audit_log_checkpoints.py
too (checkpoints, verify, the export). One test runs against a real nats-server (the `bare_nats` fixture: an
authenticated server, an operator's connection).
"""

from __future__ import annotations

import hashlib
import json

import msgspec
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit import Entry, append_record, decode_record, legacy_problems, read_entries, record_for
from pipeline.audit_export import entry_line, export_lines, parse_export, verify_export
from pipeline.checkpoints import make_checkpoint, next_span, public_key_text, signed_message
from pipeline.subjects import AUDIT_STREAM, audit_subject
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
    # After the first record of today's kind nothing is legacy any more: a worker may publish anything on its model's
    # subjects, and a message shaped like a legacy record there must not call the log edited for good.
    today = Entry(4, "conclave.audit.m.ingress.job-4.4", stored_bytes(a_record("job-4")))
    forged = Entry(5, "conclave.audit.m.x", b'{"hash": "x", "prev_hash": "y", "n": 9}')
    assert legacy_problems([*entries, today, forged]) == []
    assert {seq for seq, _ in legacy_problems([*entries, forged])} == {5}  # before it: judged as legacy
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


# --- against a real nats-server -----------------------------------------------------------------------------


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
        # Fenced per queued message: the same id published again later is another message, with a record of
        # its own; its redelivery is refused like any.
        queued = [msgspec.structs.replace(first, job_seq=seq, output=f"run {seq}") for seq in (7, 9)]
        assert [await append_record(js, record) for record in (*queued, queued[0])] == [True, True, False]
    finally:
        await worker.close()
    stored = [entry async for entry in read_entries(operator.jetstream())]
    assert [e.data for e in stored] == [stored_bytes(first), b"\x00 not a record", stored_bytes(second),
                                        *map(stored_bytes, queued)]



def test_a_record_not_where_its_worker_writes_it_is_not_vouched_for_though_a_checkpoint_covers_it():
    # A worker may publish anything on its model's audit subjects, and a checkpoint signs whatever is there: a record
    # naming another model or job than its subject, or a second record for one job message, is another hand's.
    genuine = [msgspec.structs.replace(a_record(f"job-{i}"), job_seq=i) for i in (1, 2)]
    entries = [Entry(i + 1, audit_subject(r.model, r.submitter, r.job_id, r.job_seq), stored_bytes(r))
               for i, r in enumerate(genuine)]
    other_model = msgspec.structs.replace(a_record("job-3"), model="another-model", job_seq=3)
    second = msgspec.structs.replace(a_record("job-2", text="Something else"), job_seq=2)
    forged = [Entry(3, audit_subject("m", "ingress", "job-3", 3), stored_bytes(other_model)),
              Entry(4, audit_subject("m", "ingress", "job-2", 2), stored_bytes(second))]
    for log, vouched in ((entries, 2), ([*entries, *forged], 2)):
        _, message = sign(log, None, T0)
        verdict = verify_export(b"".join(export_lines(facts(log, T0), log, [message])), pinned=PUBLIC)
        assert (verdict.exit_code, verdict.vouched) == ((0 if log is entries else 3), vouched), verdict.lines()
    text = "\n".join(verdict.lines())
    assert "seq 3: a record on conclave.audit.m.ingress.job-3.3 that names conclave.audit.another-model" in text
    assert "seq 4: a second record for job message 2 of 'm'" in text


def test_a_message_nested_too_deep_to_decode_is_skipped_by_the_logs_readers_as_not_a_record():
    # A worker may publish anything on its model's audit subjects; msgspec raises RecursionError (not one of its own
    # errors) past about 1,000 levels, which `conclave audit list` and the dashboard's view must skip, as verify does.
    from pipeline.audit_read import records_of

    entries = [*log_of(a_record("job-1")), Entry(2, "conclave.audit.m.x", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}")]
    assert [record.job_id for _, record in records_of(entries)] == ["job-1"]
    _, message = sign(entries, None, T0)
    verdict = verify_export(b"".join(export_lines(facts(entries, T0), entries, [message])), pinned=PUBLIC)
    assert (verdict.exit_code, verdict.vouched) == (3, 1), verdict.lines()
