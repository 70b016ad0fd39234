"""A job message as it arrives from JetStream: untrusted bytes, checked before anything uses them.

Nesting is checked before anything decodes the bytes (msgspec decodes nested values recursively), the
size before the job decodes (its audit record must hold the job and its output within the NATS payload
limit: pipeline/limits.py), the id and reply subject before anything is published with them (nats-server
closes the connection of a client that publishes to an invalid subject or sends a malformed header).

Who sent a job is the subject it arrived on (NATS lets a submitter publish only on subjects ending in its
own name: pipeline/access.py), never what the job says. Its reply subject must lie under that submitter's
own prefix: otherwise a job could direct its answer into another job's stream of events, or anywhere a
worker may publish (results, the audit log). NATS permissions stop a submitter from listening elsewhere;
this check stops a worker from publishing there for it.
A job that fails any of these is settled at once with an error, never retried: it would fail the same
way on every delivery.
"""

from __future__ import annotations

import re

import msgspec

from pipeline.limits import UNDECODABLE, PayloadLimits, too_deep
from pipeline.settle import Delivery
from pipeline.access import UNAUTHENTICATED
from pipeline.subjects import is_reply_subject_of, name_of_token, parse_job_subject, reply_prefix
from schemas.jobs import Job, ReplyAddress
from schemas.openai import ErrorDetail

decode_job = msgspec.json.Decoder(Job).decode
decode_address = msgspec.json.Decoder(ReplyAddress).decode
encode_job = msgspec.json.Encoder().encode
# A job id is also a message header (Nats-Msg-Id) and a subject token: printable ASCII, no spaces.
_JOB_ID = re.compile(r"[!-~]{1,200}")


def job_problem(job: Job, submitter: str) -> str | None:
    """What makes a decoded job unusable as a message (its id and reply subject), or None."""
    if not _JOB_ID.fullmatch(job.id):
        return "'id' must be 1 to 200 printable ASCII characters without spaces"
    if len(job.caller) > 256 or len(job.source) > 32:  # kept in its record: the record's size is budgeted
        return "'caller' must be at most 256 characters and 'source' at most 32"
    if not is_reply_subject_of(job.reply_subject, submitter):
        return (f"'reply_subject' must be a NATS subject under {reply_prefix(submitter)}. (this submitter's own), "
                f"without wildcards or spaces, at most 256 characters")
    return None


def sender(subject: str) -> tuple[str, str]:
    """(model, submitter) of the subject a job arrived on. A job on a subject of the form used before
    submitters were authenticated has no submitter anyone vouches for."""
    parsed = parse_job_subject(subject)
    token, submitter = parsed if parsed is not None else (subject.rsplit(".", 1)[-1], UNAUTHENTICATED)
    return name_of_token(token), submitter


def invalid_job(message: str, code: str = "invalid_job") -> ErrorDetail:
    return ErrorDetail(message=message, type="invalid_request_error", code=code)


def open_delivery(subject: str, data: bytes, attempt: int,
                  limits: PayloadLimits) -> tuple[Delivery, ErrorDetail | None, int]:
    """A job message that arrived on `subject` as a Delivery, or why it cannot run at all (and the HTTP status
    to answer with). A job that does not decode is answered on its `reply_subject` and recorded under its
    `id` when those are readable and usable. (Large messages take a while to scan: call it off the event
    loop.)"""
    model, submitter = sender(subject)
    try:  # (past about 1,000 levels msgspec cannot skip what it does not read either: then no address)
        address = decode_address(data)
    except UNDECODABLE:
        address = ReplyAddress()
    reply = address.reply_subject if address.reply_subject and is_reply_subject_of(address.reply_subject,
                                                                                    submitter) else None
    job_id = address.id if address.id and _JOB_ID.fullmatch(address.id) else ""
    unreadable = Delivery(job_id, None, reply, attempt, model=model, submitter=submitter)
    if too_deep(data):  # answered on its reply subject like any job that cannot run
        return unreadable, invalid_job("Invalid job message: JSON nested too deeply."), 400
    if len(data) > limits.job_bytes:
        return unreadable, invalid_job(f"The job is {len(data)} bytes; this deployment takes jobs of at most "
                                       f"{limits.job_bytes} bytes.", code="job_too_large"), 413
    try:
        job = decode_job(data)
    except UNDECODABLE as exc:
        return unreadable, invalid_job(f"Invalid job message: {exc}"), 400
    # Its record holds the job as decoded, every field written out: `{"role":"user"}` becomes five times longer. The
    # budget is the record's, so it is checked on that: a job within it as sent, not as stored, made a record over
    # the server's payload limit, whose append failed for good, and the job was held unanswered.
    if (stored := len(encode_job(job))) > limits.job_bytes:
        return unreadable, invalid_job(f"The job takes {stored} bytes as its audit record keeps it (every field "
                                       f"written out); this deployment takes jobs of at most {limits.job_bytes} "
                                       f"bytes.", code="job_too_large"), 413
    if (problem := job_problem(job, submitter)) is not None:
        return unreadable, invalid_job(f"Invalid job message: {problem}."), 400
    return Delivery(job.id, job, job.reply_subject, attempt, model=model, submitter=submitter), None, 0
