"""Every subject and stream name in one place, so producers and consumers cannot drift apart."""

from __future__ import annotations

import re
import urllib.parse

JOBS_STREAM = "CONCLAVE_JOBS"
JOBS_PREFIX = "conclave.jobs"
REPLIES_PREFIX = "conclave.replies"
STATUS_PREFIX = "conclave.status"
CANCELS_STREAM = "CONCLAVE_CANCELS"
CANCELS_PREFIX = "conclave.cancels"
GROUPS_PREFIX = "conclave.groups"
DEAD_STREAM = "CONCLAVE_DEAD"
RESULTS_STREAM = "CONCLAVE_RESULTS"
RESULTS_PREFIX = "conclave.results"
# The input of each Responses API response, by its id (the output is its job's result): previous_response_id.
CONVERSATIONS_STREAM = "CONCLAVE_CONVERSATIONS"
CONVERSATIONS_PREFIX = "conclave.conversations"
DEAD_PREFIX = "conclave.dead"
AUDIT_STREAM = "CONCLAVE_AUDIT"
AUDIT_PREFIX = "conclave.audit"  # one subject per job message: conclave.audit.<model>.<submitter>.<id>.<seq>
NODES_BUCKET = "CONCLAVE_NODES"  # key-value bucket: each node's latest status, by node id (pipeline/nodes.py)
NODES_STREAM = f"KV_{NODES_BUCKET}"
NODES_PREFIX = f"$KV.{NODES_BUCKET}"
INSTANCES_BUCKET = "CONCLAVE_INSTANCES"  # key-value bucket: each served model's placement (ops/controller.py)
INSTANCES_STREAM = f"KV_{INSTANCES_BUCKET}"
INSTANCES_PREFIX = f"$KV.{INSTANCES_BUCKET}"
CONTROL_BUCKET = "CONCLAVE_CONTROL"  # key-value bucket: the controller lease and the plan it follows (pipeline/lease.py)
CONTROL_STREAM = f"KV_{CONTROL_BUCKET}"
CONTROL_PREFIX = f"$KV.{CONTROL_BUCKET}"
CATALOGUE_BUCKET = "CONCLAVE_CATALOGUE"  # key-value bucket: each model's facts, by model and holder (pipeline/catalogue.py)
CATALOGUE_STREAM = f"KV_{CATALOGUE_BUCKET}"
CATALOGUE_PREFIX = f"$KV.{CATALOGUE_BUCKET}"
CHECKPOINTS_STREAM = "CONCLAVE_AUDIT_CHECKPOINTS"
CHECKPOINTS_SUBJECT = "conclave.checkpoints"  # signed checkpoints of the audit log (pipeline/checkpoints.py)

_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A subject a message may be published to: dot-separated tokens, none empty, no wildcard, no whitespace.
_PUBLISH_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def subject_token(name: str) -> str:
    """A name (model id, job id) as one subject token and consumer name, one to one.

    Letters, digits, `_` and `-` stay; every other character becomes `%XX` per UTF-8 byte (NATS forbids
    `.`, `*`, `>` and whitespace in a token, and `/` in a consumer name). One to one, so that two names
    never share a subject: `a.b` is `a%2Eb` and `a_b` stays `a_b` (a lossy mapping once let two models
    share one consumer, and would let one job's cancel or result reach another job).
    """
    return "".join(c if c in _KEPT else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


def name_of_token(token: str) -> str:
    """The name `subject_token` made `token` from (it is percent-encoding)."""
    return urllib.parse.unquote(token)


def is_publish_subject(subject: str, max_length: int = 256) -> bool:
    """Whether `subject` is one a message can be published to (nats-server closes the connection of a
    client that publishes to an invalid one)."""
    return len(subject) <= max_length and _PUBLISH_SUBJECT.fullmatch(subject) is not None


def job_subject(model: str, submitter: str) -> str:
    """Where `submitter` publishes jobs for `model`. NATS lets each submitter publish only on subjects ending
    in its own name (pipeline/access.py), so the subject a job arrives on says who really sent it."""
    return f"{JOBS_PREFIX}.{subject_token(model)}.{submitter}"


def parse_job_subject(subject: str) -> tuple[str, str] | None:
    """(model token, submitter) of a job subject, or None for one of another form (published before jobs
    carried their submitter). The token is as published: it may not be canonical (`%41bc` for `Abc`), and then
    no consumer takes it (see `is_canonical_token`)."""
    parts = subject.split(".")
    return (parts[2], parts[3]) if len(parts) == 4 and subject.startswith(JOBS_PREFIX + ".") else None


def is_canonical_token(token: str) -> bool:
    """Whether `token` is what `subject_token` makes of some name: only those are any consumer's subject."""
    return subject_token(name_of_token(token)) == token


def reply_prefix(submitter: str) -> str:
    """Everything a submitter receives lies under this prefix: job events and its own NATS inbox."""
    return f"{REPLIES_PREFIX}.{submitter}"


def reply_subject(submitter: str, request_id: str) -> str:
    return f"{reply_prefix(submitter)}.{subject_token(request_id)}"


def is_reply_subject_of(subject: str, submitter: str) -> bool:
    """Whether a job's reply subject lies under its submitter's own prefix (anything else could name another
    job's replies or the audit log)."""
    return subject.startswith(reply_prefix(submitter) + ".") and is_publish_subject(subject)


def cancel_subject(submitter: str, job_id: str) -> str:
    return f"{CANCELS_PREFIX}.{submitter}.{subject_token(job_id)}"


def status_subject(model: str) -> str:
    return f"{STATUS_PREFIX}.{subject_token(model)}"


def worker_durable(model: str) -> str:
    """All workers of one model share this durable consumer, so each job goes to exactly one of them."""
    return f"workers-{subject_token(model)}"


def group_wake_subject(model: str, group_id: str) -> str:
    """Core NATS: the leader of a worker group wakes its followers here before each job. Under the model, so
    that a worker role reaches only its own model's groups (a stray wake runs a batch without its leader)."""
    return f"{GROUPS_PREFIX}.{subject_token(model)}.{subject_token(group_id)}.wake"


def dead_subject(model: str) -> str:
    """Where a job that was delivered max_deliver times without finishing is kept (CONCLAVE_DEAD)."""
    return f"{DEAD_PREFIX}.{subject_token(model)}"


def result_subject(model: str, submitter: str, job_id: str) -> str:
    """The final event (done or failed) of a job, kept in CONCLAVE_RESULTS for a submitter that reconnects.
    Job ids are the submitter's own: two submitters' jobs with the same id never share a result."""
    return f"{RESULTS_PREFIX}.{subject_token(model)}.{submitter}.{subject_token(job_id)}"


def conversation_subject(response_id: str) -> str:
    """What a Responses API response was asked (ingress/responses.py), for a later one that continues it."""
    return f"{CONVERSATIONS_PREFIX}.{subject_token(response_id)}"


def audit_subject(model: str, submitter: str, job_id: str, job_seq: int = 0) -> str:
    """A job message's audit record: one subject per queued message (`job_seq`, its sequence in the jobs stream),
    so that a second record for it can be refused. An id that is empty becomes `%` (a token no id encodes to)."""
    subject = f"{AUDIT_PREFIX}.{subject_token(model)}.{submitter}.{subject_token(job_id) or '%'}"
    return f"{subject}.{job_seq}" if job_seq else subject
