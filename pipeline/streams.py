"""JetStream stream and consumer definitions."""

from __future__ import annotations

import os

from nats.js import JetStreamContext
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType,
                         StreamConfig)
from nats.js.errors import BadRequestError

from pipeline.audit import audit_stream_config
from pipeline.subjects import (CANCELS_PREFIX, CANCELS_STREAM, DEAD_PREFIX, DEAD_STREAM, JOBS_PREFIX, JOBS_STREAM,
                               RESULTS_PREFIX, RESULTS_STREAM, job_subject, worker_durable)

DAY = 24 * 3600
# Deliveries of one job before it is dead-lettered: the last one is not run (see workers/worker.py).
MAX_DELIVER = 5


def max_queued() -> int:
    """Jobs one model may have queued or running; beyond it a publish is refused (HTTP: 429).

    From CONCLAVE_MAX_QUEUED (default 1000), which `conclave serve --max-queued` sets for every process it
    starts, so they all declare the same stream.
    """
    return int(os.environ.get("CONCLAVE_MAX_QUEUED") or 1000)


def jobs_stream_config(max_age_s: float = 7 * DAY) -> StreamConfig:
    # A work queue: a job stays stored while it is queued or running and is removed once acked (the audit
    # stream is the record of what was asked and answered). File storage: queued jobs survive a restart.
    # At most max_queued() jobs per model subject, and a publish beyond that is refused by JetStream itself
    # (discard new, per subject), so HTTP and NATS submitters meet the same limit.
    return StreamConfig(
        name=JOBS_STREAM,
        subjects=[f"{JOBS_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=max_age_s,
        max_msgs_per_subject=max_queued(),
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        duplicate_window=120.0,  # a re-published Nats-Msg-Id inside this window is dropped
    )


def cancels_stream_config() -> StreamConfig:
    # Cancels are durable too: a job cancelled while queued, or while its worker was restarting, is
    # skipped when a worker reaches it. One message per job id is all that matters.
    return StreamConfig(
        name=CANCELS_STREAM,
        subjects=[f"{CANCELS_PREFIX}.>"],
        storage=StorageType.FILE,
        max_age=DAY,
        max_msgs_per_subject=1,
    )


def dead_letter_stream_config() -> StreamConfig:
    # Jobs that kept killing (or losing) their workers, kept for an operator to inspect or re-publish.
    return StreamConfig(name=DEAD_STREAM, subjects=[f"{DEAD_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=30 * DAY, duplicate_window=120.0)


def results_stream_config() -> StreamConfig:
    # The final event of every job, by job id, for CONCLAVE_RESULTS_TTL_HOURS (default 24): a submitter that
    # lost its connection (or an ingress that restarted) fetches it with get_last_msg on its subject.
    hours = float(os.environ.get("CONCLAVE_RESULTS_TTL_HOURS") or 24)
    return StreamConfig(name=RESULTS_STREAM, subjects=[f"{RESULTS_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=hours * 3600, max_msgs_per_subject=1)


def worker_consumer_config(model: str, ack_wait_s: float) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=worker_durable(model),
        filter_subject=job_subject(model),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=MAX_DELIVER,
    )


async def ensure_streams(js: JetStreamContext) -> None:
    """Create the streams, or update them to this config; safe to call from every process at start."""
    for config in (jobs_stream_config(), cancels_stream_config(), dead_letter_stream_config(), results_stream_config(),
                   audit_stream_config()):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
