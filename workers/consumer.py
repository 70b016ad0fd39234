"""Taking one model's jobs from JetStream and running each to its settlement (pipeline/settle.py).

The consumer fetches one job at a time (a fetch of n > 1 that gets fewer waits for the rest until its
timeout) while the batch has room, one asyncio task per job: check it, answer it from its stored result
if it was settled before, validate it on the tokenizing thread, hand it to the model's thread, move
its events to the requester, settle it. Every job ends settled, handed back (`nak`, when the worker
stops) or unacked (NATS unreachable, or a bug: JetStream redelivers it after its ack-wait).

A job message runs once per worker: a redelivery of a job this worker is still running (its ack-wait
passed during a NATS outage, or while the process was stopped) does not start a second run; the
running one adopts the newer delivery, whose ack is the one that counts. Two workers that both run
a job (the first was away past the ack-wait) are reconciled by settling: the first result stands,
and the ingress ignores events of a superseded attempt (every event carries its attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from pipeline.connection import persist
from pipeline.intake import open_delivery
from pipeline.limits import LARGE_MESSAGE, PayloadLimits
from pipeline.settle import Delivery, Settler
from pipeline.streams import MAX_DELIVER
from pipeline.subjects import CANCELS_STREAM, DEAD_STREAM, JOBS_STREAM, cancel_subject, dead_subject, worker_durable
from schemas.jobs import Accepted, Cancel, Choice, Chunk, Done, Failed, Heartbeat, Requeued
from schemas.openai import ErrorDetail
from workers.generation import Generation, Halted
from workers.prepare import JobError, LoadedModel, prepare
from workers.scheduler import BatchScheduler
from workers.status import ServiceTimes

log = logging.getLogger("conclave.worker")
encode = msgspec.json.Encoder().encode
decode_cancel = msgspec.json.Decoder(Cancel).decode
# 499: the requester went away (nginx's "client closed request"); nobody is expected to read it.
CANCELLED = ErrorDetail(message="The request was cancelled.", type="invalid_request_error", code="cancelled")


def read_cancel(data: bytes) -> Cancel:
    """A cancel message; one that does not decode still cancels (it was published on the job's subject)."""
    try:
        return decode_cancel(data)
    except msgspec.MsgspecError:
        return Cancel(id="", reason="an unreadable cancel")


def joined(answers: list[Done]) -> Done:
    """A job's final event from the Done of each of its answers (`n`, in choice order): the first's, with the others
    as `choices`, and the usage of all (the prompt counted once, as OpenAI's)."""
    first = answers[0]
    if len(answers) == 1:
        return first
    usage = first.usage
    generated = sum(a.usage.completion_tokens for a in answers)
    return msgspec.structs.replace(
        first, usage=msgspec.structs.replace(usage, completion_tokens=generated,
                                             total_tokens=usage.prompt_tokens + generated),
        duration_ms=max(a.duration_ms for a in answers), ttft_ms=min(a.ttft_ms for a in answers),
        choices=[Choice(index=i, text=a.text, finish_reason=a.finish_reason, logprobs=a.logprobs,
                        tool_calls=a.tool_calls) for i, a in enumerate(answers) if i])


class JobConsumer:
    def __init__(self, nc, model_id: str, loaded: LoadedModel, scheduler: BatchScheduler, settler: Settler,
                 name: str, heartbeat_s: float, queue_ttl_s: float, max_batch: int, default_max_tokens: int,
                 limits: PayloadLimits):
        self.nc = nc
        self.js = nc.jetstream()
        self.model_id = model_id
        self.loaded = loaded
        self.scheduler = scheduler
        self.settler = settler
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.queue_ttl_s = queue_ttl_s
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.limits = limits
        # The job is kept alive every heartbeat; missing five in a row means this worker is gone.
        self.ack_wait_s = 5 * heartbeat_s
        self.active: dict[int, Delivery] = {}  # jobs taken and not yet settled, by stream sequence
        self.extra_rows = 0  # rows beyond one per job taken (answers 2 to n of jobs asking for several): room they use
        self.jobs_done = 0
        self.times = ServiceTimes()
        # Templating and tokenising off the event loop, on one thread: a Hugging Face fast tokenizer can
        # fail ("Already borrowed") when several threads encode with it at once.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and start jobs while the batch has room, until `stopping`; then wait for every job's task
        (the scheduler's halt hands unfinished ones back)."""
        tasks: set[asyncio.Task] = set()
        room = asyncio.Event()  # a task ended: room to fetch another
        sub = None
        try:
            # The consumer is the operator's to make (`conclave serve`, before it starts workers): a worker
            # may only read through it, never create or change one (pipeline/access.py).
            await persist(lambda: self.js.consumer_info(JOBS_STREAM, worker_durable(self.model_id)),
                          self.ack_wait_s * 10)
            sub = await self.js.pull_subscribe_bind(durable=worker_durable(self.model_id), stream=JOBS_STREAM)
            while not stopping.is_set():
                if len(tasks) + self.extra_rows >= self.max_batch:
                    room.clear()
                    waits = [asyncio.create_task(room.wait()), asyncio.create_task(stopping.wait())]
                    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    continue
                try:
                    msgs = await sub.fetch(1, timeout=self.heartbeat_s)
                except nats.errors.TimeoutError:
                    continue
                except nats.errors.Error:  # NATS reconnecting (pipeline/connection.py says so once)
                    await asyncio.sleep(self.heartbeat_s)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self.take(msg))
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), room.set()))
        finally:
            self.scheduler.halt()
            if tasks:
                await asyncio.wait(tasks)
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def take(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered if msg.metadata else 1
        if len(msg.data) > LARGE_MESSAGE:
            delivery, error, status = await asyncio.to_thread(open_delivery, msg.subject, msg.data, attempt,
                                                              self.limits)
        else:
            delivery, error, status = open_delivery(msg.subject, msg.data, attempt, self.limits)
        delivery.msg = msg
        delivery.seq = msg.metadata.sequence.stream if msg.metadata else 0
        # Keyed by the message (its stream sequence, which a redelivery keeps), not the job id: two submitters may
        # use one id, and an id may be published again; each message is run, settled and recorded on its own.
        key = delivery.seq
        running = self.active.get(key) if delivery.job is not None else None
        if running is not None:
            log.warning("job %s: delivery %d arrived while delivery %d still runs here; the run goes on",
                        delivery.job_id, attempt, running.attempt)
            running.msg = msg  # acks and progress now go to the newest delivery
            return
        if delivery.job is not None:
            self.active[key] = delivery
        try:
            await self.handle(delivery, error, status)
        except Exception:  # NATS unreachable past the settle deadline, or a bug: JetStream redelivers it
            log.exception("job %s: not settled; it will be redelivered", delivery.job_id)
        finally:
            if self.active.get(key) is delivery:
                del self.active[key]

    async def fail(self, delivery: Delivery, status: int, error: ErrorDetail, partial: Done | None = None) -> None:
        await self.settler.settle(delivery, Failed(id=delivery.job_id, status=status, error=error,
                                                   attempt=delivery.attempt), partial)

    async def handle(self, delivery: Delivery, error: ErrorDetail | None, status: int) -> None:
        if error is not None:
            log.warning("job %s refused: %s", delivery.job_id or "(no id)", error.message[:200])
            await self.fail(delivery, status, error)
            return
        job = delivery.job
        stored = await self.settler.stored(delivery)
        if stored is not None:  # settled before (its ack was lost, or the same id was published again)
            log.info("job %s was settled before; answering with its stored result", job.id)
            await self.settler.settle(delivery, stored)
            return
        if job.model != self.model_id:
            await self.fail(delivery, 404, ErrorDetail(
                message=f"The model `{job.model}` does not exist or is not served on this subject.",
                type="invalid_request_error", param="model", code="model_not_found"))
            return
        if delivery.attempt >= MAX_DELIVER:
            # Every earlier delivery ended unsettled: its worker died, hung, was stopped or restarted, or lost
            # NATS. Do not risk a crash loop: keep the job for an operator and tell the requester.
            await persist(lambda: self.js.publish(
                dead_subject(job.model), delivery.msg.data, stream=DEAD_STREAM,
                headers={"Nats-Msg-Id": job.id, "Conclave-Deliveries": str(delivery.attempt)}), self.ack_wait_s)
            await self.fail(delivery, 500, ErrorDetail(
                message=f"The job was delivered {delivery.attempt} times and no delivery finished it (each time its "
                        f"worker stopped, crashed, hung or lost its connection to NATS before settling it); it was "
                        f"moved to {dead_subject(job.model)} and will not be retried.",
                type="server_error", code="max_deliveries"))
            return
        if job.created and time.time() - job.created > self.queue_ttl_s:
            await self.fail(delivery, 503, ErrorDetail(
                message=f"The job waited in the queue longer than {self.queue_ttl_s:.0f}s and was dropped.",
                type="server_error", code="queue_timeout"))
            return
        cancelled = threading.Event()
        refused: list[Cancel] = []  # a cancel from a submitter that answered 503 before it knew the job was queued

        async def on_cancel(msg):
            if (cancel := read_cancel(msg.data)).refused:
                refused.append(cancel)
            cancelled.set()

        # Listen first, then look for a cancel stored earlier, so one published in between is not missed.
        cancels = await self.nc.subscribe(cancel_subject(delivery.submitter, job.id), cb=on_cancel)
        try:
            try:
                stored = read_cancel((await persist(
                    lambda: self.js.get_last_msg(CANCELS_STREAM, cancel_subject(delivery.submitter, job.id),
                                                 direct=True), self.ack_wait_s)).data)
                cancelled.set()
                if stored.refused:
                    refused.append(stored)
            except NotFoundError:
                pass
            if cancelled.is_set():
                await self.withdraw(delivery, refused)
                return
            await self.run_job(delivery, cancelled, refused)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await cancels.unsubscribe()

    async def withdraw(self, delivery: Delivery, refused: list[Cancel], partial: Done | None = None) -> None:
        """Settle a cancelled job: 499 if its requester went away, or, if its submitter already answered 503
        because it could not tell the job was queued, that 503: such a job must not run at all."""
        if refused:
            await self.fail(delivery, 503, ErrorDetail(
                message=f"The job was withdrawn: its submitter was answered 503 ({refused[0].reason}) before it "
                        f"knew the job was queued.", type="server_error", code="queue_unavailable"), partial)
        else:
            await self.fail(delivery, 499, CANCELLED, partial)

    async def run_job(self, delivery: Delivery, cancelled: threading.Event, refused: list[Cancel]) -> None:
        """Validate the job, put it in the batch, and move its events to the requester until it settles."""
        job, start = delivery.job, time.perf_counter()
        loop = asyncio.get_running_loop()
        # Kept alive from the moment it is taken: a job waiting its turn on the one tokenizing thread behind others'
        # long prompts would otherwise pass its ack wait (5 heartbeats) and be redelivered to another worker.
        generations: list[Generation] = []
        alive = asyncio.create_task(self.keep_alive(delivery, generations))
        try:
            try:
                prompt, max_tokens, constraints = await loop.run_in_executor(
                    self.tokenizing, prepare, self.loaded, job, self.default_max_tokens)
            except JobError as exc:
                await self.fail(delivery, exc.status, exc.detail)
                return
            except Exception as exc:  # a bug, not the requester's fault
                log.exception("job %s could not start", job.id)
                await self.fail(delivery, 500, ErrorDetail(
                    message=f"The worker could not start the job: {type(exc).__name__}: {exc}", type="server_error",
                    code="worker_error"))
                return
            log.info("job %s started: %d prompt tokens, up to %d new, attempt %d, caller %s", job.id, len(prompt),
                     max_tokens, delivery.attempt, job.caller or "-")
            await self.nc.publish(delivery.reply_subject, encode(
                Accepted(id=job.id, prompt_tokens=len(prompt), worker=self.name, attempt=delivery.attempt)))
            events: asyncio.Queue = asyncio.Queue()
            shard = self.loaded.shard
            # One row per answer asked for (`n`), in choice order: the others start from the prompt cache the first
            # one leaves (workers/lockstep.py: share_prefill).
            def emitter(choice: int):
                return lambda event: loop.call_soon_threadsafe(events.put_nowait, (choice, event))

            share = self.limits.output_bytes // len(constraints)  # of the one Done that carries every answer
            generations.extend(Generation(job, prompt, max_tokens, shard.tokenizer, shard.vocab_size, self.name,
                                          emitter(choice), cancelled, start, delivery.attempt, share, constraint, choice)
                               for choice, constraint in enumerate(constraints))
            self.extra_rows += len(generations) - 1
            for generation in generations:
                self.scheduler.submit(generation)
            answers: dict[int, Done] = {}
            try:
                while True:
                    choice, event = await events.get()
                    if isinstance(event, Chunk):
                        if job.stream:
                            await self.nc.publish(delivery.reply_subject, encode(event))
                    elif isinstance(event, Halted):
                        # Stopped by shutdown: hand the job back for another worker rather than ending it short.
                        with contextlib.suppress(nats.errors.Error):
                            await delivery.msg.nak()
                        log.info("job %s handed back to the queue (the worker is stopping)", job.id)
                        return
                    elif isinstance(event, Failed):
                        cancelled.set()  # the job's other answers, if any, stop too
                        await self.fail(delivery, event.status, event.error)
                        self.log_end(delivery, "failed", generations)
                        return
                    else:
                        answers[choice] = event
                        if len(answers) < len(generations):
                            continue
                        finished = time.perf_counter()
                        done = joined([answers[i] for i in range(len(generations))])
                        if cancelled.is_set():
                            await self.withdraw(delivery, refused, partial=done)
                        else:
                            await self.settler.settle(delivery, done)
                        self.times.observe(generations[0], finished)
                        self.jobs_done += 1
                        self.log_end(delivery, "cancelled" if cancelled.is_set() else done.finish_reason, generations)
                        return
            finally:
                self.extra_rows -= len(generations) - 1  # (its task's end wakes the fetch loop)
                if delivery.final is None:
                    cancelled.set()  # not settled (an error above): the row leaves the batch at its next step
        finally:
            alive.cancel()

    def log_end(self, delivery: Delivery, how: str, generations: list[Generation]) -> None:
        log.info("job %s ended (%s): %d tokens in %.1fs", delivery.job_id, how, sum(g.generated for g in generations),
                 time.perf_counter() - generations[0].start)

    async def keep_alive(self, delivery: Delivery, generations: list[Generation]) -> None:
        """Every heartbeat: `in_progress` (so only a dead worker's job is redelivered) and, once it is in the batch
        (`generations`), a heartbeat event (so the requester can tell a long prefill from a dead worker). Not before:
        until its Accepted the requester waits as for a queued job, and a refusal (a 400) is still its answer."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await delivery.msg.in_progress()
                if generations:
                    await self.nc.publish(delivery.reply_subject, encode(
                        Heartbeat(id=delivery.job_id, tokens=sum(g.generated for g in generations),
                                  attempt=delivery.attempt)))
            except nats.errors.Error:  # NATS reconnecting: try again at the next beat
                pass

    async def requeue_all(self, reason: str) -> None:
        """Give every job taken and not yet settled back to JetStream, unsettled (a group that lost a rank: the jobs
        are not at fault, and the group placed after it runs them). Each is redelivered at once; a job that keeps
        breaking groups is dead-lettered at its last delivery (pipeline/streams.py: MAX_DELIVER), as any other."""
        for delivery in list(self.active.values()):
            try:
                if delivery.reply_subject:
                    await self.nc.publish(delivery.reply_subject, encode(
                        Requeued(id=delivery.job_id, reason=reason, attempt=delivery.attempt)))
                if delivery.msg is not None:
                    await delivery.msg.nak()
            except Exception as exc:  # it comes back after its ack wait instead
                log.error("job %s: could not be handed back (%s); it will be redelivered", delivery.job_id, exc)

    async def fail_all(self, status: int, error: ErrorDetail) -> None:
        """Settle every job taken and not yet settled with this error (a group that lost a rank, a hung
        model thread). Settling is idempotent: a job settling at the same moment keeps its own result."""
        for delivery in list(self.active.values()):
            try:
                await self.fail(delivery, status, error)
            except Exception as exc:
                log.error("job %s: could not be settled (%s); it will be redelivered", delivery.job_id, exc)
