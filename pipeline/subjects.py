"""Every subject and stream name in one place, so producers and consumers cannot drift apart."""

from __future__ import annotations

import re

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
DEAD_PREFIX = "conclave.dead"

_NOT_A_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def subject_token(name: str) -> str:
    """A model id as one subject token and durable name: NATS forbids `.`, `*`, `>` and spaces there."""
    return _NOT_A_TOKEN.sub("_", name)


def job_subject(model: str) -> str:
    return f"{JOBS_PREFIX}.{subject_token(model)}"


def reply_subject(request_id: str) -> str:
    return f"{REPLIES_PREFIX}.{subject_token(request_id)}"


def cancel_subject(job_id: str) -> str:
    return f"{CANCELS_PREFIX}.{subject_token(job_id)}"


def status_subject(model: str) -> str:
    return f"{STATUS_PREFIX}.{subject_token(model)}"


def worker_durable(model: str) -> str:
    """All workers of one model share this durable consumer, so each job goes to exactly one of them."""
    return f"workers-{subject_token(model)}"


def group_wake_subject(group_id: str) -> str:
    """Core NATS: the leader of a worker group wakes its followers here before each job."""
    return f"{GROUPS_PREFIX}.{subject_token(group_id)}.wake"


def dead_subject(model: str) -> str:
    """Where a job that was delivered max_deliver times without finishing is kept (CONCLAVE_DEAD)."""
    return f"{DEAD_PREFIX}.{subject_token(model)}"


def result_subject(job_id: str) -> str:
    """The final event (done or failed) of a job, kept in CONCLAVE_RESULTS for a submitter that reconnects."""
    return f"{RESULTS_PREFIX}.{subject_token(job_id)}"
