"""Settling a job: the one place where a job's outcome becomes durable and its message leaves the queue.

A job is settled exactly once, whoever gets there first (the job's own run, a group that lost a rank,
a redelivery of a job already finished, the sweep of jobs nobody serves), in this order:

1. its final event (`done` or `failed`) is stored in CONCLAVE_RESULTS with
   `Nats-Expected-Last-Subject-Sequence: 0`: the first final event of a job wins, and a later one
   (two deliveries that both ran) adopts the stored one instead;
2. its audit record is appended, at most one per job (pipeline/audit.py);
3. the final event goes to the job's reply subject (core NATS, best effort: the result is durable);
4. only then is the message acked. If storing or recording fails for longer than `deadline_s` (NATS
   unreachable, the audit stream refusing), nothing is acked and JetStream redelivers the job: the
   redelivery finds the stored result (if step 1 got through) and settles from it without running the
   job again. The record comes before the final event on the reply subject, so no answer is sent that
   the log lacks. The stored result (step 1) can be read by its submitter a moment earlier, or while the
   audit log refuses records; its record then follows, since the job stays queued until it is written
   (results first, so that of two deliveries that both ran, the record describes the result that stands).

Each `Delivery` carries a lock and the event it was settled with, so settling it twice is harmless:
the second call waits for the first and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError

from pipeline.audit import WRONG_LAST_SEQUENCE, append_record, record_for
from pipeline.connection import persist
from pipeline.subjects import JOBS_STREAM, RESULTS_STREAM, result_subject
from schemas.jobs import Done, Event, Failed, Job

log = logging.getLogger("conclave.settle")
encode = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(Event).decode

async def stored_result(js, model: str, submitter: str, job_id: str) -> Done | Failed | None:
    """The job's stored final event, if it was settled before (by any worker, at any attempt). A direct
    get by subject: the permission to read it can name the subjects (pipeline/access.py)."""
    if not job_id:
        return None
    try:
        msg = await js.get_last_msg(RESULTS_STREAM, result_subject(model, submitter, job_id), direct=True)
    except NotFoundError:
        return None
    return decode_event(msg.data)


@dataclass(eq=False)
class Delivery:
    """A job as taken from JetStream: from a consumer (`msg`, acked when settled) or read from the stream
    by sequence (`stream_seq`, deleted when settled)."""

    job_id: str
    job: Job | None  # None: the message did not decode
    reply_subject: str | None  # where its events go (None: nowhere valid)
    attempt: int = 1  # JetStream's delivery count of the delivery that runs it
    model: str = ""  # the model its subject names
    seq: int = 0  # its sequence in the jobs stream: the same for every redelivery of it
    submitter: str = ""  # who published it: the last token of its subject (pipeline/intake.py: sender)
    msg: Msg | None = None  # the newest delivery: a redelivery to the same worker replaces it
    stream_seq: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    final: Done | Failed | None = None  # set once settled


class Settler:
    """Settles the deliveries of one process (a worker, or the operator's sweep of jobs nobody will take)."""

    def __init__(self, nc, model: str, worker: str, ranks: int = 1, revision: str = "", deadline_s: float = 60.0,
                 stopping: asyncio.Event | None = None, ready_at: float = 0.0):
        self.nc = nc
        self.ready_at = ready_at  # unix seconds when its worker group had loaded the model (0: not a worker)
        self.js = nc.jetstream()
        self.model = model
        self.worker = worker
        self.ranks = ranks
        self.revision = revision
        self.deadline_s = deadline_s
        self.stopping = stopping
        self.audit_failure: str | None = None  # why the last append failed; None once one succeeds

    async def stored(self, delivery: Delivery) -> Done | Failed | None:
        """`stored_result`, retried while NATS is unreachable."""
        return await persist(lambda: stored_result(self.js, self.model_of(delivery), delivery.submitter,
                                                   delivery.job_id), self.deadline_s)

    def load_wait_ms(self, delivery: Delivery) -> float:
        """How long the job waited for this worker group to load: from when the jobs stream stored it (the
        broker's clock, not the submitter's claim) to the group's readiness, when it arrived first."""
        metadata = delivery.msg.metadata if delivery.msg is not None else None
        if not self.ready_at or metadata is None or metadata.timestamp is None:
            return 0.0
        return max(0.0, self.ready_at - metadata.timestamp.timestamp()) * 1000

    def model_of(self, delivery: Delivery) -> str:
        return delivery.model or self.model

    async def settle(self, delivery: Delivery, final: Done | Failed, partial: Done | None = None) -> Done | Failed:
        """Settle `delivery` with `final` (see the module's docstring); returns the final event that stands.
        Raises if NATS stayed unreachable for `deadline_s`: then nothing was acked."""
        async with delivery.lock:
            if delivery.final is not None:
                return delivery.final
            final = await self._keep(delivery, final)
            await self._record(delivery, final, partial)
            if delivery.reply_subject:
                try:
                    await self.nc.publish(delivery.reply_subject, encode(final))
                except nats.errors.Error as exc:  # the result is stored: a submitter can fetch it
                    log.warning("job %s: could not send its final event: %s", delivery.job_id, exc)
            await persist(lambda: self._remove(delivery), self.deadline_s)
            delivery.final = final
            return final

    async def _keep(self, delivery: Delivery, final: Done | Failed) -> Done | Failed:
        if not delivery.job_id:
            return final
        subject = result_subject(self.model_of(delivery), delivery.submitter, delivery.job_id)
        try:
            await persist(lambda: self.js.publish(subject, encode(final), stream=RESULTS_STREAM,
                                                  headers={"Nats-Expected-Last-Subject-Sequence": "0"}),
                          self.deadline_s)
            return final
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
        stored = await self.stored(delivery)  # another delivery of this job settled first: its result stands
        return stored if stored is not None else final

    async def _record(self, delivery: Delivery, final: Done | Failed, partial: Done | None) -> None:
        """Append the job's audit record. While the audit log refuses it (NATS away, the stream gone or
        full), the delivery is held (`in_progress`: not redelivered, so its deliveries are not used up) and
        the append retried, and `audit_failure` says why (the worker's status, so /health, shows it). A
        worker holds every job it finishes meanwhile, so its batch fills and it takes no more: the queue
        keeps them. With `stopping`, it holds on until the process stops (then the job is redelivered);
        without, for `deadline_s`."""
        # The model its subject names (the one this worker serves, and whose audit subjects it may write);
        # what the job itself named is in the record's job.
        record = record_for(delivery.job_id, delivery.job, final, partial, submitter=delivery.submitter,
                            model=self.model_of(delivery), revision=self.revision, worker=self.worker,
                            ranks=self.ranks, attempt=delivery.attempt, job_seq=delivery.seq,
                            load_wait_ms=self.load_wait_ms(delivery))
        started, pause = time.monotonic(), 0.2
        while True:
            try:
                await append_record(self.js, record)
                break
            except Exception as exc:
                if self.audit_failure is None:
                    log.error("job %s: the audit log refused its record (%s: %s); holding the job, unacked, "
                              "until it is accepted", delivery.job_id, type(exc).__name__, exc)
                self.audit_failure = f"records are refused ({type(exc).__name__}: {exc})"
                if self.stopping.is_set() if self.stopping is not None else \
                        time.monotonic() - started > self.deadline_s:
                    raise
            if delivery.msg is not None:
                with contextlib.suppress(nats.errors.Error):
                    await delivery.msg.in_progress()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        if self.audit_failure is not None:
            log.info("the audit log accepts records again")
            self.audit_failure = None

    async def _remove(self, delivery: Delivery) -> None:
        if delivery.msg is not None:
            try:
                await delivery.msg.ack_sync(timeout=5.0)
            except nats.errors.MsgAlreadyAckdError:
                pass
        elif delivery.stream_seq is not None:
            try:
                await self.js.delete_msg(JOBS_STREAM, delivery.stream_seq)
            except NotFoundError:
                pass
