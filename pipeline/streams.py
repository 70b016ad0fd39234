"""JetStream stream and consumer definitions."""

from __future__ import annotations

import dataclasses
import logging
import os

from nats.js import JetStreamContext
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType,
                         StreamConfig)
from nats.js.errors import BadRequestError, NotFoundError

from pipeline.audit import audit_stream_config, describe_age
from pipeline.checkpoints import checkpoints_stream_config
from pipeline.catalogue import catalogue_bucket_config
from pipeline.nodes import instances_bucket_config, nodes_bucket_config
from pipeline.lease import control_bucket_config
from pipeline.subjects import (CANCELS_PREFIX, CANCELS_STREAM, CONVERSATIONS_PREFIX, CONVERSATIONS_STREAM, DEAD_PREFIX,
                               DEAD_STREAM, JOBS_PREFIX, JOBS_STREAM, RESULTS_PREFIX, RESULTS_STREAM, job_subject,
                               worker_durable)

log = logging.getLogger("conclave.streams")
DAY = 24 * 3600
# Deliveries of one job before it is dead-lettered: the last one is not run (see workers/worker.py).
MAX_DELIVER = 5


def max_queued() -> int:
    """Jobs one model may have queued or running per submitter (its subject: conclave.jobs.<model>.<submitter>);
    beyond it a publish is refused (HTTP: 429).

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
    # Read by direct get (pipeline/access.py: a permission can then name the subjects a role may read).
    return StreamConfig(
        name=CANCELS_STREAM,
        subjects=[f"{CANCELS_PREFIX}.>"],
        storage=StorageType.FILE,
        max_age=DAY,
        max_msgs_per_subject=1,
        allow_direct=True,
    )


def dead_letter_stream_config() -> StreamConfig:
    # Jobs that kept killing (or losing) their workers, kept for an operator to inspect or re-publish.
    return StreamConfig(name=DEAD_STREAM, subjects=[f"{DEAD_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=30 * DAY, duplicate_window=120.0)


def results_stream_config() -> StreamConfig:
    # The final event of every job, by job id, for CONCLAVE_RESULTS_TTL_HOURS (default 24): a submitter that
    # lost its connection (or an ingress that restarted) fetches it with get_last_msg on its subject.
    hours = float(os.environ.get("CONCLAVE_RESULTS_TTL_HOURS") or 24)
    # Read by direct get by subject: a submitter may read only its own results (pipeline/access.py).
    return StreamConfig(name=RESULTS_STREAM, subjects=[f"{RESULTS_PREFIX}.>"], storage=StorageType.FILE,
                        max_age=hours * 3600, max_msgs_per_subject=1, allow_direct=True)


def conversations_stream_config() -> StreamConfig:
    # A response's input, kept as long as its output (the job's result) is: continuing one needs both. At most
    # CONCLAVE_CONVERSATIONS_MAX_GB (default 1) on disk, the oldest dropped first: it never crowds out the jobs and
    # the audit log, which share the disk.
    gigabytes = float(os.environ.get("CONCLAVE_CONVERSATIONS_MAX_GB") or 1)
    return dataclasses.replace(results_stream_config(), name=CONVERSATIONS_STREAM,
                               subjects=[f"{CONVERSATIONS_PREFIX}.>"], max_bytes=int(gigabytes * 1e9),
                               discard=DiscardPolicy.OLD)


def worker_consumer_config(model: str, ack_wait_s: float) -> ConsumerConfig:
    # Every submitter's jobs for the model: conclave.jobs.<model>.<submitter>.
    return ConsumerConfig(
        durable_name=worker_durable(model),
        filter_subject=job_subject(model, "*"),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=MAX_DELIVER,
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams, or update them to this config: the operator's job (`conclave serve` at start), the
    only role allowed to (pipeline/access.py). `replicas`: the copies JetStream keeps of each, on as many servers
    of a NATS cluster (3 on three servers: any one may be lost), the audit log's included.

    The audit log and its checkpoints are made once and never changed here: a shorter retention set by a
    later start (or a typo in CONCLAVE_AUDIT_RETENTION_DAYS) would silently drop records. A difference is
    said in the log; `conclave audit verify` reports a configuration that changed since a checkpoint.
    """
    for config in (jobs_stream_config(), cancels_stream_config(), dead_letter_stream_config(),
                   results_stream_config(), conversations_stream_config()):
        config.num_replicas = replicas
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    for bucket in (nodes_bucket_config(), instances_bucket_config(), control_bucket_config(),
                   catalogue_bucket_config()):
        bucket.replicas = replicas
        try:
            await js.create_key_value(bucket)
        except BadRequestError:  # made by another version with another TTL: it still works as it is
            log.warning("the key-value bucket %s exists with another configuration; left as it is but for its "
                        "rollups, copies and value size (below)", bucket.bucket)
        # No rollups: a node may write its own key, and a `Nats-Rollup: all` there would wipe every other node's. A
        # value size limit added since the bucket was made applies to it too.
        config = (await js.stream_info(f"KV_{bucket.bucket}")).config
        limit = bucket.max_value_size or config.max_msg_size
        if config.allow_rollup_hdrs or config.num_replicas != replicas or config.max_msg_size != limit:
            config.allow_rollup_hdrs, config.num_replicas, config.max_msg_size = False, replicas, limit
            await js.update_stream(config)
    for config in (audit_stream_config(), checkpoints_stream_config()):
        config.num_replicas = replicas
        try:
            await js.add_stream(config)
        except BadRequestError:
            existing = (await js.stream_info(config.name)).config
            if existing.num_replicas != replicas:  # more (or fewer) copies: nothing of the log changes
                existing.num_replicas = replicas
                await js.update_stream(existing)
            if existing.max_age != config.max_age:
                log.warning("%s keeps its retention of %s; this start asked for %s and was not applied (change "
                            "it deliberately with the NATS tools, and expect `conclave audit verify` to report it)",
                            config.name, describe_age(existing.max_age), describe_age(config.max_age))


async def ensure_consumer(js: JetStreamContext, model: str, ack_wait_s: float) -> None:
    """The durable consumer every worker of `model` takes jobs from; made by the operator before any worker
    starts (a worker may read through it, not make or change it)."""
    # Create, or update in place (a new ack-wait, an earlier version's filter): JetStream keeps the consumer's
    # deliveries and acks. Never deleted here: that would redeliver the jobs its workers are running.
    await js.add_consumer(JOBS_STREAM, worker_consumer_config(model, ack_wait_s))


async def jobs_in_hand(js: JetStreamContext, model: str) -> int | None:
    """Jobs of `model` waiting in its consumer or taken and not yet settled; None when it has no consumer."""
    use = await model_use(js, model)
    return None if use is None else use[0]


async def model_use(js: JetStreamContext, model: str) -> tuple[int, float] | None:
    """`model`'s jobs in hand (as `jobs_in_hand`) and when its consumer last delivered one (unix seconds, 0 if
    never); None when it has no consumer."""
    try:
        info = await js.consumer_info(JOBS_STREAM, worker_durable(model))
    except NotFoundError:
        return None
    last = info.delivered.last_active if info.delivered is not None else None
    return info.num_pending + info.num_ack_pending, last.timestamp() if last is not None else 0.0


async def retire_consumer(js: JetStreamContext, model: str) -> None:
    """Delete `model`'s consumer once the model is no longer served (ops/controller.py: an instance removed): the
    jobs still queued for it are then answered `model_not_found` by the sweep (pipeline/unrouted.py), never left
    waiting for a worker that will not come."""
    try:
        await js.delete_consumer(JOBS_STREAM, worker_durable(model))
    except NotFoundError:
        pass
