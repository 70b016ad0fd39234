"""Jobs for models nobody serves: answered with a 404 and settled, never left in the queue forever.

A job published on `conclave.jobs.<model>` for a model no worker serves would wait in the jobs stream
until its max age (7 days) with no answer: no consumer takes that subject. A consumer cannot be made
for "every subject except the served ones" (a work-queue stream forbids overlapping consumers), so the
ingress sweeps instead: every SWEEP_S it lists the stream's subjects, and each job older than GRACE_S on
the subject of a model that nobody serves is read by sequence, answered 404 `model_not_found` on its
reply subject, audited and deleted (pipeline/settle.py). A model counts as served when this ingress
serves it, when a worker for it was heard from (loading included), or when its consumer exists (the
workers of another deployment on the same NATS). Several ingresses sweeping at once settle each job once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Callable

from nats.js.errors import NotFoundError

from pipeline.intake import open_delivery
from pipeline.limits import PayloadLimits
from pipeline.settle import Settler
from pipeline.subjects import JOBS_PREFIX, JOBS_STREAM, model_of_job_subject
from schemas.jobs import Failed
from schemas.openai import ErrorDetail

log = logging.getLogger("conclave.ingress")
SWEEP_S = 5.0
GRACE_S = 10.0  # a job this young may be waiting for a worker that is about to subscribe


async def has_consumer(js, subject: str) -> bool:
    try:
        await js.consumer_info(JOBS_STREAM, f"workers-{model_of_job_subject(subject)}")
        return True
    except NotFoundError:
        return False


async def sweep(settler: Settler, served: Callable[[str], bool]) -> int:
    """Settle every queued job, older than GRACE_S, of a model nobody serves (`served` takes a subject
    token); returns how many."""
    js, limits = settler.js, PayloadLimits(settler.nc.max_payload)
    info = await js.stream_info(JOBS_STREAM, subjects_filter=f"{JOBS_PREFIX}.>")
    now = datetime.datetime.now(datetime.timezone.utc)
    settled = 0
    for subject in info.state.subjects or {}:
        if served(model_of_job_subject(subject)) or await has_consumer(js, subject):
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
            delivery, error, status = await asyncio.to_thread(open_delivery, msg.data, 1, limits)
            delivery.stream_seq = msg.seq
            if error is None:
                status, error = 404, ErrorDetail(
                    message=f"The model `{delivery.job.model}` is not served here (nothing takes jobs on {subject}).",
                    type="invalid_request_error", param="model", code="model_not_found")
            await settler.settle(delivery, Failed(id=delivery.job_id, status=status, error=error))
            log.warning("job %s on %s: no such model here; answered %d", delivery.job_id or "(no id)", subject, status)
            settled += 1
    return settled


async def keep_sweeping(link, name: str, served: Callable[[str], bool]) -> None:
    """`sweep` every SWEEP_S on the link's current connection, for as long as the ingress runs."""
    failing = False
    while True:
        await asyncio.sleep(SWEEP_S)
        try:
            await sweep(Settler(link.nc, "", name, deadline_s=SWEEP_S), served)
            failing = False
        except Exception as exc:  # NATS away, or a job that cannot be settled: the next sweep tries again
            if not failing:
                log.warning("could not sweep jobs for unserved models: %s", exc)
            failing = True
