"""The worker process: takes jobs for one model from JetStream, runs them on MLX, sends events back.

    python -m workers.worker --model-id ID --model-dir DIR --nats-url URL [--layout tensor|pipeline ...]

The model lives on one dedicated thread (MLX work is synchronous), which runs the batch of
workers/lockstep.py whenever jobs wait. The asyncio side takes up to --max-batch jobs from the
consumer, one task per job: it validates the job, hands it to the batch, and moves the job's events
to NATS. A job is acked only after its final event is published, and kept alive with `in_progress`
while it runs, so JetStream redelivers it if this process dies.

In a group (started by ops/group.py with MLX's distributed environment) rank 0 is this `Worker`, the
leader; every other rank runs `follow`. Followers wait for a wake-up on core NATS between batches, not
inside an MLX collective: MLX's ring backend busy-polls its sockets, so an idle follower parked in a
collective would burn a whole core. The batch itself (who joins and leaves, every sampled token)
reaches them through MLX collectives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import msgspec
import nats
from nats.js.errors import NotFoundError
from nats.aio.msg import Msg

from pipeline.audit import append_record
from pipeline.streams import MAX_DELIVER, ensure_streams, worker_consumer_config
from pipeline.subjects import (CANCELS_STREAM, DEAD_STREAM, JOBS_STREAM, RESULTS_STREAM, cancel_subject,
                               dead_subject, group_wake_subject, job_subject, result_subject, status_subject,
                               worker_durable)
from schemas.audit import AuditRecord
from schemas.jobs import Accepted, Chunk, Done, Failed, Heartbeat, Job, ReplyAddress, WorkerStatus
from schemas.openai import ErrorDetail
from workers.engine import Generation, Halted, JobError, LoadedModel, open_model, prepare
from workers.lockstep import BatchEngine
from workers.rank import RankArgs, add_rank_arguments, barrier, join_group

log = logging.getLogger("conclave.worker")
encode = msgspec.json.Encoder().encode
# 499: the requester went away (nginx's "client closed request"); nobody is expected to read it.
CANCELLED = ErrorDetail(message="The request was cancelled.", type="invalid_request_error", code="cancelled")
decode_job = msgspec.json.Decoder(Job).decode


class Worker:
    def __init__(self, nc, model_id: str, model_dir: Path, heartbeat_s: float, queue_ttl_s: float,
                 executor: ThreadPoolExecutor, rank: RankArgs, group: mx.distributed.Group | None,
                 max_batch: int, prefix_cache_bytes: int):
        self.nc = nc
        self.js = nc.jetstream()
        self.model_id = model_id
        self.model_dir = model_dir
        self.rank = rank
        self.group = group
        self.ranks = group.size() if group is not None else 1
        # The job is kept alive every heartbeat; missing five in a row means this worker is gone.
        self.ack_wait_s = 5 * heartbeat_s
        self.heartbeat_s = heartbeat_s
        self.queue_ttl_s = queue_ttl_s
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state = "loading"
        self.jobs_done = 0
        self.loaded: LoadedModel | None = None
        self.executor = executor
        # Templating and tokenising off the event loop, on one thread: a Hugging Face fast tokenizer can
        # fail ("Already borrowed") when several threads encode with it at once.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.stopping = asyncio.Event()
        self.max_batch = max_batch
        self.prefix_cache_bytes = prefix_cache_bytes
        self.engine: BatchEngine | None = None
        self.engine_busy = False  # the model's thread is inside a batch (read by the group watchdog)
        self.group_lost_reason = ""
        self.active: dict[str, tuple[Msg, Job, int]] = {}  # accepted jobs not yet settled, by id
        # Jobs validated and waiting to join the batch; the model's thread takes them between steps.
        self.waiting: deque[Generation] = deque()
        self.waiting_lock = threading.Lock()
        self.work = threading.Event()  # set while `waiting` is not empty, or to wake the thread to stop
        self.closed = threading.Event()

    async def publish_status(self) -> None:
        state = ("busy" if self.active else "ready") if self.state == "ready" else self.state
        status = WorkerStatus(
            worker=self.name, model=self.model_id, pid=os.getpid(), host=socket.gethostname(), state=state,
            context_length=self.loaded.context_length if self.loaded else 0, jobs_done=self.jobs_done,
            layout=self.rank.layout, ranks=self.ranks, active=len(self.active),
        )
        await self.nc.publish(status_subject(self.model_id), encode(status))

    async def status_loop(self, parent_pid: int) -> None:
        while not self.stopping.is_set():
            await self.publish_status()
            if os.getppid() != parent_pid:  # our supervisor is gone: do not linger as an orphan
                log.warning("parent process exited; stopping")
                self.stopping.set()
            try:
                await asyncio.wait_for(self.stopping.wait(), self.heartbeat_s)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> None:
        parent = os.getppid()
        await ensure_streams(self.js)
        status = asyncio.create_task(self.status_loop(parent))
        loop = asyncio.get_running_loop()
        self.loaded = await loop.run_in_executor(
            self.executor, open_model, self.model_id, self.model_dir, self.rank.layout, self.group, self.rank.split)
        await loop.run_in_executor(self.executor, barrier, self.group)  # every follower is listening now
        self.state = "ready"
        await self.publish_status()
        log.info("model %s ready (context %d)", self.model_id, self.loaded.context_length)
        sub = await self.js.pull_subscribe(
            job_subject(self.model_id), durable=worker_durable(self.model_id), stream=JOBS_STREAM,
            config=worker_consumer_config(self.model_id, self.ack_wait_s),
        )
        # On the model's thread: in a group, making the engine is a collective (workers/lockstep.py: plain_kv).
        self.engine = await loop.run_in_executor(
            self.executor, BatchEngine, self.loaded.shard, self.max_batch, self.prefix_cache_bytes)
        batches = loop.run_in_executor(self.executor, self.serve_batches, loop)
        watchdog = asyncio.create_task(self.watch_group()) if self.ranks > 1 else None
        jobs: set[asyncio.Task] = set()
        settled = asyncio.Event()  # a job left `jobs`: room to fetch another
        try:
            while not self.stopping.is_set():
                free = self.max_batch - len(jobs)
                if free <= 0:
                    settled.clear()
                    waits = [asyncio.create_task(settled.wait()), asyncio.create_task(self.stopping.wait())]
                    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    continue
                # One at a time: a fetch of n > 1 that gets fewer waits for the rest until its timeout.
                try:
                    msgs = await sub.fetch(1, timeout=self.heartbeat_s)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self.handle(msg))
                    jobs.add(task)
                    task.add_done_callback(lambda t: (jobs.discard(t), settled.set()))
        finally:
            # Stopping (or failing): unfinished jobs go back to the queue (Halted), the model's thread ends.
            self.state = "stopping"
            self.halt()
            if jobs:
                await asyncio.wait(jobs)
            await batches
            if watchdog is not None:
                watchdog.cancel()
            status.cancel()
        await self.publish_status()
        await sub.unsubscribe()

    def serve_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        """The model's thread: run a batch whenever jobs are waiting, until the worker stops."""
        engine = self.engine
        while not self.closed.is_set():
            if not self.work.wait(timeout=self.heartbeat_s) or self.closed.is_set():
                continue
            self.loaded.shard.last_step = time.monotonic()
            self.engine_busy = True
            try:
                if self.ranks > 1:  # followers wait on NATS between batches, not in a busy-polling collective
                    asyncio.run_coroutine_threadsafe(
                        self.nc.publish(group_wake_subject(self.rank.group_id), b""), loop).result()
                engine.run(self.admit)
            except Exception as exc:
                log.exception("batch failed")
                loop.call_soon_threadsafe(self.batch_failed, exc, engine.drop())
                if self.ranks > 1:
                    return  # the group is out of step: batch_failed exits the process
            finally:
                self.engine_busy = False

    def submit(self, generation: Generation) -> None:
        with self.waiting_lock:
            if self.closed.is_set():  # stopping: the model's thread takes no more jobs
                generation.on_leave("halted")
                return
            self.waiting.append(generation)
            self.work.set()

    def admit(self, take: bool) -> Generation | None:
        """With `take`, the first waiting job, which joins the batch now. Jobs cancelled while waiting end
        here, whether or not one is taken."""
        joining = None
        with self.waiting_lock:
            for generation in [g for g in self.waiting if g.cancelled.is_set()]:  # even when the batch is full
                self.waiting.remove(generation)
                generation.on_leave("cancelled")
            if take and self.waiting:
                joining = self.waiting.popleft()
            if not self.waiting:
                self.work.clear()
        return joining

    def halt(self) -> None:
        """Stop: the batch drops its jobs at its next step, waiting jobs are handed back, the thread ends."""
        self.engine.halt = True
        with self.waiting_lock:
            while self.waiting:
                self.waiting.popleft().on_leave("halted")
        self.closed.set()
        self.work.set()

    def batch_failed(self, exc: Exception, generations: list[Generation]) -> None:
        """A step raised. In a group the ranks are out of step: fail every job and exit (the supervisor
        restarts the group). A single process drops the batch, fails its jobs and serves on."""
        reason = f"generation failed: {type(exc).__name__}: {exc}"
        if self.ranks > 1:
            asyncio.ensure_future(self.group_lost(reason))
            return
        for generation in generations:
            generation.emit(Failed(id=generation.job.id, status=500, error=ErrorDetail(
                message=f"The worker failed while generating: {type(exc).__name__}: {exc}", type="server_error",
                code="worker_error")))

    async def fail(self, reply: str | None, job_id: str, status: int, error: ErrorDetail, job: Job | None = None,
                   attempt: int = 1) -> None:
        """The job's final event is this error: tell the submitter (if it said where), then audit it."""
        failed = Failed(id=job_id, status=status, error=error)
        if reply:
            await self.nc.publish(reply, encode(failed))
        await self.keep_result(failed)
        await self.record(job, job_id, "cancelled" if error.code == "cancelled" else "failed", attempt, error=error)

    async def keep_result(self, event: Done | Failed) -> None:
        """The final event, also in CONCLAVE_RESULTS under the job id (best effort, like the audit record)."""
        if not event.id:
            return
        try:
            await self.js.publish(result_subject(event.id), encode(event), stream=RESULTS_STREAM)
        except Exception:
            log.exception("job %s: could not keep its result", event.id)

    async def record(self, job: Job | None, job_id: str, outcome: str, attempt: int = 1, done: Done | None = None,
                     error: ErrorDetail | None = None) -> None:
        """Append the job's outcome to the audit log, before the job is acked (so a crash in between
        leads to a redelivery, not a missing record). A failed append is logged, never raised: the
        requester already has the answer."""
        record = AuditRecord(
            n=0, prev_hash="", time=time.time(), job_id=job_id, outcome=outcome, model=self.model_id,
            model_revision=self.loaded.revision if self.loaded else "", caller=job.caller if job else "",
            source=job.source if job else "", job=job, output=done.text if done else "",
            finish_reason=done.finish_reason if done else None, usage=done.usage if done else None,
            ttft_ms=done.ttft_ms if done else 0.0, duration_ms=done.duration_ms if done else 0.0, worker=self.name,
            ranks=self.ranks, attempt=attempt, error=error,
        )
        try:
            await append_record(self.js, record)
        except Exception:
            log.exception("job %s: could not append its audit record", job_id)

    async def watch_group(self) -> None:
        """A group whose model thread made no step for too long has lost or hung a rank.

        Nothing can unblock a rank stuck in a collective, so the leader answers every requester with a
        clean error, settles their jobs, and exits; the supervisor then restarts the whole group. When
        the supervisor is already stopping us (SIGTERM) because another rank died, one heartbeat
        without a step is enough.
        """
        while True:
            await asyncio.sleep(self.heartbeat_s)
            stalled_s = time.monotonic() - self.loaded.shard.last_step
            limit = self.heartbeat_s if self.stopping.is_set() else self.rank.step_timeout_s
            if self.engine_busy and stalled_s > limit:
                await self.group_lost(f"no step for {stalled_s:.1f}s; a rank is gone or hung")

    async def group_lost(self, reason: str) -> None:
        """Answer every requester, settle every job, and exit so that the supervisor restarts the group.

        Called when a step stalls or raises (MLX reports a dead peer as "[ring] connection to a peer
        was lost"): either way the followers are in an unknown state, so no further job may use them.
        """
        if self.group_lost_reason:  # the watchdog and a failed step can both get here
            return
        self.group_lost_reason = reason
        log.error("group %s: %s (%d jobs); exiting so the whole group restarts", self.rank.group_id, reason,
                  len(self.active))
        try:
            for msg, job, attempt in list(self.active.values()):
                await self.fail(job.reply_subject, job.id, 503, ErrorDetail(
                    message="The worker group serving this model lost a rank while generating; it is restarting. "
                            "Retry the request.", type="server_error", code="worker_lost"), job, attempt)
                await msg.ack_sync(timeout=self.heartbeat_s)
            await self.nc.flush(timeout=self.heartbeat_s)
        finally:  # even if NATS is unreachable: a leader that stays would hold the group hung for good
            os._exit(70)

    async def handle(self, msg: Msg) -> None:
        try:
            job = decode_job(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # Tell the submitter if the message says where to, then drop it for good: a malformed
            # job fails the same way on every redelivery.
            try:
                address = msgspec.json.decode(msg.data, type=ReplyAddress)
            except (msgspec.ValidationError, msgspec.DecodeError):
                address = ReplyAddress()
            log.warning("malformed job message: %s", exc)
            await self.fail(address.reply_subject, address.id or "", 400,
                            ErrorDetail(message=f"Invalid job message: {exc}", type="invalid_request_error",
                                        code="invalid_job"))
            await msg.term()
            return

        if job.model != self.model_id:
            await self.fail(job.reply_subject, job.id, 404, ErrorDetail(
                message=f"The model `{job.model}` does not exist or is not served on this subject.",
                type="invalid_request_error", param="model", code="model_not_found"), job)
            await msg.term()
            return
        if job.created and time.time() - job.created > self.queue_ttl_s:
            await self.fail(job.reply_subject, job.id, 503, ErrorDetail(
                message=f"The job waited in the queue longer than {self.queue_ttl_s:.0f}s and was dropped.",
                type="server_error", code="queue_timeout"), job)
            await msg.term()
            return

        attempt = msg.metadata.num_delivered if msg.metadata else 1
        if attempt >= MAX_DELIVER:
            # Every earlier delivery ended without an answer (its worker died, hung or was stopped): do not
            # risk another crash loop. Keep the job for an operator and tell the requester.
            await self.js.publish(dead_subject(job.model), msg.data, stream=DEAD_STREAM,
                                  headers={"Nats-Msg-Id": job.id, "Conclave-Deliveries": str(attempt)})
            await self.fail(job.reply_subject, job.id, 500, ErrorDetail(
                message=f"The job was delivered {attempt} times without finishing (its workers died or were "
                        f"stopped); it was moved to {dead_subject(job.model)} and will not be retried.",
                type="server_error", code="max_deliveries"), job, attempt)
            await msg.term()
            return

        cancelled = threading.Event()

        async def on_cancel(_):
            cancelled.set()

        # Listen first, then look for a cancel stored earlier, so one published in between is not missed.
        cancels = await self.nc.subscribe(cancel_subject(job.id), cb=on_cancel)
        self.active[job.id] = (msg, job, attempt)
        try:
            await self.run_job(msg, job, attempt, cancelled)
        except Exception:  # NATS gone mid-job, or a bug: unacked, the job is redelivered after ack-wait
            log.exception("job %s: could not be settled", job.id)
        finally:
            del self.active[job.id]
            with contextlib.suppress(nats.errors.Error):
                await cancels.unsubscribe()

    async def run_job(self, msg: Msg, job: Job, attempt: int, cancelled: threading.Event) -> None:
        """Validate the job, put it in the batch, and move its events to the requester until it ends."""
        start = time.perf_counter()
        try:
            await self.js.get_last_msg(CANCELS_STREAM, cancel_subject(job.id))
            cancelled.set()
        except NotFoundError:
            pass
        if cancelled.is_set():
            await self.fail(job.reply_subject, job.id, 499, CANCELLED, job, attempt)
            await msg.ack_sync()
            return
        try:
            prompt, max_tokens = await asyncio.get_running_loop().run_in_executor(
                self.tokenizing, prepare, self.loaded, job)
        except JobError as exc:
            await self.fail(job.reply_subject, job.id, exc.status, exc.detail, job, attempt)
            await msg.ack_sync()
            return
        except Exception as exc:  # a bug, not the requester's fault
            log.exception("job %s could not start", job.id)
            await self.fail(job.reply_subject, job.id, 500, ErrorDetail(
                message=f"The worker could not start the job: {type(exc).__name__}: {exc}", type="server_error",
                code="worker_error"), job, attempt)
            await msg.term()
            return
        await self.nc.publish(job.reply_subject, encode(
            Accepted(id=job.id, prompt_tokens=len(prompt), worker=self.name, attempt=attempt)))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self.submit(Generation(job, prompt, max_tokens, self.loaded.shard.tokenizer, self.name,
                               lambda event: loop.call_soon_threadsafe(events.put_nowait, event), cancelled, start))
        tokens = 0

        async def keep_alive():
            while True:
                await asyncio.sleep(self.heartbeat_s)
                try:
                    await msg.in_progress()
                    await self.nc.publish(job.reply_subject, encode(Heartbeat(id=job.id, tokens=tokens)))
                except nats.errors.Error as exc:  # NATS reconnecting: keep watching, try again next beat
                    log.warning("job %s: could not send progress: %s", job.id, exc)

        alive = asyncio.create_task(keep_alive())
        try:
            while True:
                event = await events.get()
                if isinstance(event, Chunk):
                    tokens = event.tokens
                    if job.stream:
                        await self.nc.publish(job.reply_subject, encode(event))
                elif isinstance(event, Halted):
                    # Stopped by shutdown: hand the job back for another worker rather than ending it short.
                    await msg.nak()
                    return
                elif isinstance(event, Failed):
                    await self.fail(job.reply_subject, job.id, event.status, event.error, job, attempt)
                    await msg.term()
                    return
                else:
                    done = event
                    final = Failed(id=job.id, status=499, error=CANCELLED) if cancelled.is_set() else done
                    await self.nc.publish(job.reply_subject, encode(final))
                    await self.nc.flush()
                    await self.keep_result(final)
                    await self.record(job, job.id, "cancelled" if final is not done else "done", attempt, done,
                                      CANCELLED if final is not done else None)
                    await msg.ack_sync()
                    self.jobs_done += 1
                    return
        finally:
            alive.cancel()


async def follow(nc, args, executor: ThreadPoolExecutor, rank: RankArgs, group: mx.distributed.Group,
                 stopping: asyncio.Event) -> None:
    """A follower rank: load this rank's shard, then run each batch the leader wakes us for."""
    loop = asyncio.get_running_loop()
    parent = os.getppid()
    wake = await nc.subscribe(group_wake_subject(rank.group_id))
    loaded = await loop.run_in_executor(
        executor, open_model, args.model_id, Path(args.model_dir), rank.layout, group, rank.split)
    await loop.run_in_executor(executor, barrier, group)
    log.info("rank %d/%d of %s ready (layers %s)", group.rank(), group.size(), args.model_id, loaded.shard.layers)
    engine = await loop.run_in_executor(
        executor, BatchEngine, loaded.shard, args.max_batch, int(args.prefix_cache_gb * 2**30))
    while not stopping.is_set():
        try:
            await wake.next_msg(timeout=args.heartbeat)
        except nats.errors.TimeoutError:
            if os.getppid() != parent:
                log.warning("parent process exited; stopping")
                return
            continue
        await loop.run_in_executor(executor, engine.run)


async def main_async(args) -> None:
    rank = RankArgs(args.layout, args.backend, args.split, args.group_id, args.step_timeout)
    executor = ThreadPoolExecutor(1, thread_name_prefix="mlx")
    loop = asyncio.get_running_loop()
    group = await loop.run_in_executor(executor, join_group, rank)
    leader = group is None or group.rank() == 0
    nc = await nats.connect(args.nats_url, name=f"conclave-worker:{args.model_id}", max_reconnect_attempts=-1)
    stopping = asyncio.Event()
    worker = None
    if leader:
        worker = Worker(nc, args.model_id, Path(args.model_dir), args.heartbeat, args.queue_ttl, executor, rank, group,
                        args.max_batch, int(args.prefix_cache_gb * 2**30))
        stopping = worker.stopping
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        if worker is not None:
            await worker.run()
        else:
            await follow(nc, args, executor, rank, group, stopping)
    finally:
        # close, not drain: draining waits on the pull subscription's pending request for up to 30s.
        with contextlib.suppress(Exception):  # NATS gone: the MLX cleanup below must still run
            await nc.flush(timeout=args.heartbeat)
            await nc.close()
        # Finish MLX's queued work (a generation's last, discarded step may still be running) and join the
        # MLX thread before the interpreter exits: tearing either down mid-exit aborts the process.
        await loop.run_in_executor(executor, mx.synchronize)
        executor.shutdown(wait=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between status/progress messages")
    parser.add_argument("--queue-ttl", type=float, default=600.0, help="drop jobs that waited longer than this")
    add_rank_arguments(parser)
    parser.add_argument("--group-id", default="", help="names this group's wake-up subject")
    parser.add_argument("--step-timeout", type=float, default=60.0,
                        help="a group with no decode/prefill step for this long has lost a rank: fail and exit")
    parser.add_argument("--max-batch", type=int, default=16, help="jobs generated at once (continuous batching)")
    parser.add_argument("--prefix-cache-gb", type=float, default=4.0,
                        help="KV caches of finished requests kept for prompts that extend them, in GiB (0: off)")
    args = parser.parse_args(argv)
    # mpirun starts ranks without MLX_RANK; Open MPI names the rank itself.
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[rank {rank} pid {os.getpid()}] %(levelname)s %(message)s")
    asyncio.run(main_async(args))
    # Everything is settled: NATS flushed and closed, MLX synchronized, its thread joined. Skip the C++
    # static destructors: tearing down MLX's internal threads at interpreter exit occasionally aborts
    # ("terminate called without an active exception"), turning a clean stop into a crash (exit -6).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
