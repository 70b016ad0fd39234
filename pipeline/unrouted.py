"""Jobs nobody will take: answered and settled, never left in the queue forever.

A job published on `conclave.jobs.<model>.<submitter>` for a model no worker serves would wait in the
jobs stream until its max age (7 days) with no answer: no consumer takes that subject. A consumer cannot
be made for "every subject except the served ones" (a work-queue stream forbids overlapping consumers),
so the operator's side of `conclave serve` sweeps instead: every SWEEP_S it lists the stream's subjects,
and each job older than GRACE_S on the subject of a model without a consumer (`conclave serve` makes a
model's consumer before its workers start) is offered to be loaded (a cluster's model that is not running: it is
loaded and the job waits for it) or else read by sequence, answered 404 `model_not_found`, audited
and deleted (pipeline/settle.py). So is a job on a subject without a submitter (published before
submitters were authenticated): nobody vouches for who sent it, so it is answered 403 and not run.
Several deployments sweeping one NATS settle each job once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Awaitable, Callable

from nats.js.errors import NotFoundError

from pipeline.intake import open_delivery
from pipeline.limits import PayloadLimits
from pipeline.settle import Settler
from pipeline.subjects import (JOBS_PREFIX, JOBS_STREAM, is_canonical_token, name_of_token, parse_job_subject,
                               worker_durable)
from schemas.jobs import Failed
from schemas.openai import ErrorDetail

log = logging.getLogger("conclave.sweep")
SWEEP_S = 5.0
GRACE_S = 10.0  # a job this young may be waiting for a worker that is about to subscribe


async def has_consumer(js, model: str) -> bool:
    try:
        await js.consumer_info(JOBS_STREAM, worker_durable(model))
        return True
    except NotFoundError:
        return False


# What a model's loader says of the jobs waiting for it: None, left queued (it is being loaded); else the answer
# they get, as (HTTP status, OpenAI error code, message).
Loaded = Callable[[str], Awaitable["tuple[int, str, str] | None"]]


async def sweep(settler: Settler, load: Loaded | None = None) -> int:
    """Settle every queued job, older than GRACE_S, that nobody will take; returns how many. With `load`, a job for
    a model without a consumer is first offered to it (on a cluster: a model of its catalogue is loaded, which makes
    the consumer that then takes the job: ops/instances.py): left queued, or answered as it says."""
    js, limits = settler.js, PayloadLimits(settler.nc.max_payload)
    info = await js.stream_info(JOBS_STREAM, subjects_filter=f"{JOBS_PREFIX}.>")
    now = datetime.datetime.now(datetime.timezone.utc)
    settled = 0
    for subject in info.state.subjects or {}:
        parsed = parse_job_subject(subject)
        authenticated, token = parsed is not None, parsed[0] if parsed else ""
        # A token that is not canonical (`%41bc`) names a model no consumer's filter matches: unserved.
        if authenticated and is_canonical_token(token) and await has_consumer(js, name_of_token(token)):
            continue
        refused = None
        if authenticated and is_canonical_token(token) and load is not None and await old_enough(js, subject, now):
            if (refused := await load(name_of_token(token))) is None:
                log.info("jobs on %s wait for %s, loaded for them", subject, name_of_token(token))
                continue
        seq = 1
        while True:
            try:
                msg = await js.get_msg(JOBS_STREAM, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            seq = msg.seq + 1
            if msg.time is not None and (now - msg.time).total_seconds() < GRACE_S:
                break  # this one and the later ones: next sweep
            delivery, error, status = await asyncio.to_thread(open_delivery, subject, msg.data, 1, limits)
            delivery.stream_seq = delivery.seq = msg.seq
            if not authenticated:
                status, error = 403, ErrorDetail(
                    message=f"The job was published on {subject}, which names no submitter (the form used before "
                            f"NATS submitters were authenticated); it was not run. Publish it again with your "
                            f"credentials, on conclave.jobs.<model>.<your name>.",
                    type="invalid_request_error", code="unauthenticated_submitter")
            elif error is None and refused is not None:
                status, code, message = refused
                error = ErrorDetail(message=message, type="invalid_request_error" if status < 500 else "server_error",
                                    param="model", code=code)
            elif error is None:
                status, error = 404, ErrorDetail(
                    message=f"The model `{delivery.job.model}` is not served here (nothing takes jobs on {subject}).",
                    type="invalid_request_error", param="model", code="model_not_found")
            await settler.settle(delivery, Failed(id=delivery.job_id, status=status, error=error))
            log.warning("job %s on %s: no such model here; answered %d", delivery.job_id or "(no id)", subject, status)
            settled += 1
    return settled


async def old_enough(js, subject: str, now: datetime.datetime) -> bool:
    """Whether the first job on `subject` has waited GRACE_S (a younger one may wait for a consumer being made)."""
    try:
        msg = await js.get_msg(JOBS_STREAM, seq=1, subject=subject, next=True)
    except NotFoundError:
        return False
    return msg.time is None or (now - msg.time).total_seconds() >= GRACE_S


async def keep_sweeping(link, name: str, load: Loaded | None = None) -> None:
    """`sweep` every SWEEP_S on the link's current connection (the operator's), for as long as it runs."""
    failing = False
    while True:
        await asyncio.sleep(SWEEP_S)
        try:
            await sweep(Settler(link.nc, "", name, deadline_s=SWEEP_S), load)
            failing = False
        except Exception as exc:  # NATS away, or a job that cannot be settled: the next sweep tries again
            if not failing:
                log.warning("could not sweep jobs for unserved models: %s", exc)
            failing = True
