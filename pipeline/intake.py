"""A job message as it arrives from JetStream: untrusted bytes, checked before anything uses them.

Nesting is checked before anything decodes the bytes (msgspec decodes nested values recursively), the
size before the job decodes (its audit record must hold the job and its output within the NATS payload
limit: pipeline/limits.py), the id and reply subject before anything is published with them (nats-server
closes the connection of a client that publishes to an invalid subject or sends a malformed header).
A job that fails any of these is settled at once with an error, never retried: it would fail the same
way on every delivery.
"""

from __future__ import annotations

import re

import msgspec

from pipeline.limits import PayloadLimits, too_deep
from pipeline.settle import Delivery
from pipeline.subjects import is_publish_subject
from schemas.jobs import Job, ReplyAddress
from schemas.openai import ErrorDetail

decode_job = msgspec.json.Decoder(Job).decode
decode_address = msgspec.json.Decoder(ReplyAddress).decode
# A job id is also a message header (Nats-Msg-Id) and a subject token: printable ASCII, no spaces.
_JOB_ID = re.compile(r"[!-~]{1,200}")


def job_problem(job: Job) -> str | None:
    """What makes a decoded job unusable as a message (its id and reply subject), or None."""
    if not _JOB_ID.fullmatch(job.id):
        return "'id' must be 1 to 200 printable ASCII characters without spaces"
    if not is_publish_subject(job.reply_subject):
        return "'reply_subject' must be a NATS subject without wildcards or spaces, at most 256 characters"
    return None


def invalid_job(message: str, code: str = "invalid_job") -> ErrorDetail:
    return ErrorDetail(message=message, type="invalid_request_error", code=code)


def open_delivery(data: bytes, attempt: int, limits: PayloadLimits) -> tuple[Delivery, ErrorDetail | None, int]:
    """A job message as a Delivery, or why it cannot run at all (and the HTTP status to answer with). A job
    that does not decode is answered on its `reply_subject` and recorded under its `id` when those are
    readable and usable. (Large messages take a while to scan: call it off the event loop.)"""
    if too_deep(data):
        return Delivery("", None, None, attempt), invalid_job("Invalid job message: JSON nested too deeply."), 400
    try:
        address = decode_address(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        address = ReplyAddress()
    reply = address.reply_subject if address.reply_subject and is_publish_subject(address.reply_subject) else None
    job_id = address.id if address.id and _JOB_ID.fullmatch(address.id) else ""
    unreadable = Delivery(job_id, None, reply, attempt)
    if len(data) > limits.job_bytes:
        return unreadable, invalid_job(f"The job is {len(data)} bytes; this deployment takes jobs of at most "
                                       f"{limits.job_bytes} bytes.", code="job_too_large"), 413
    try:
        job = decode_job(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        return unreadable, invalid_job(f"Invalid job message: {exc}"), 400
    if (problem := job_problem(job)) is not None:
        return unreadable, invalid_job(f"Invalid job message: {problem}."), 400
    return Delivery(job.id, job, job.reply_subject, attempt), None, 0
