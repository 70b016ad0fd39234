"""The worker process: takes jobs for one model from JetStream, runs them on MLX, sends events back.

    python -m workers.worker --model-id ID --model-dir DIR --nats-url URL

The model lives on one dedicated thread (MLX work is synchronous); the asyncio side only moves
messages. A job is acked only after its final event is published, and kept alive with
`in_progress` while it runs, so JetStream redelivers it if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import nats
from nats.js.errors import NotFoundError
from nats.aio.msg import Msg

from pipeline.streams import ensure_streams, worker_consumer_config
from pipeline.subjects import CANCELS_STREAM, JOBS_STREAM, cancel_subject, job_subject, status_subject, worker_durable
from schemas.jobs import Chunk, Done, Failed, Heartbeat, Job, ReplyAddress, WorkerStatus
from schemas.openai import ErrorDetail
from workers.engine import JobError, LoadedModel, open_model, run_job

log = logging.getLogger("conclave.worker")
encode = msgspec.json.Encoder().encode
# 499: the requester went away (nginx's "client closed request"); nobody is expected to read it.
CANCELLED = ErrorDetail(message="The request was cancelled.", type="invalid_request_error", code="cancelled")
decode_job = msgspec.json.Decoder(Job).decode


async def iterate_in_thread(executor: ThreadPoolExecutor, make_iter):
    """Run a blocking iterator on `executor`'s thread and yield its items here as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    def pump():
        try:
            for item in make_iter():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as exc:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        loop.call_soon_threadsafe(queue.put_nowait, end)

    future = loop.run_in_executor(executor, pump)
    try:
        while (item := await queue.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await future


class Worker:
    def __init__(self, nc, model_id: str, model_dir: Path, heartbeat_s: float, queue_ttl_s: float):
        self.nc = nc
        self.js = nc.jetstream()
        self.model_id = model_id
        self.model_dir = model_dir
        # The job is kept alive every heartbeat; missing five in a row means this worker is gone.
        self.ack_wait_s = 5 * heartbeat_s
        self.heartbeat_s = heartbeat_s
        self.queue_ttl_s = queue_ttl_s
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state = "loading"
        self.jobs_done = 0
        self.loaded: LoadedModel | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self.stopping = asyncio.Event()
        self.cancel_current = threading.Event()

    async def publish_status(self) -> None:
        status = WorkerStatus(
            worker=self.name, model=self.model_id, pid=os.getpid(), host=socket.gethostname(), state=self.state,
            context_length=self.loaded.context_length if self.loaded else 0, jobs_done=self.jobs_done,
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
        self.loaded = await loop.run_in_executor(self.executor, open_model, self.model_id, self.model_dir)
        self.state = "ready"
        await self.publish_status()
        log.info("model %s ready (context %d)", self.model_id, self.loaded.context_length)
        sub = await self.js.pull_subscribe(
            job_subject(self.model_id), durable=worker_durable(self.model_id), stream=JOBS_STREAM,
            config=worker_consumer_config(self.model_id, self.ack_wait_s),
        )
        while not self.stopping.is_set():
            try:
                msgs = await sub.fetch(1, timeout=self.heartbeat_s)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                self.state = "busy"
                await self.publish_status()
                await self.handle(msg)
                self.state = "ready"
                await self.publish_status()
        self.state = "stopping"
        await self.publish_status()
        status.cancel()
        await sub.unsubscribe()

    async def fail(self, reply: str | None, job_id: str, status: int, error: ErrorDetail) -> None:
        if reply:
            await self.nc.publish(reply, encode(Failed(id=job_id, status=status, error=error)))

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
                type="invalid_request_error", param="model", code="model_not_found"))
            await msg.term()
            return
        if job.created and time.time() - job.created > self.queue_ttl_s:
            await self.fail(job.reply_subject, job.id, 503, ErrorDetail(
                message=f"The job waited in the queue longer than {self.queue_ttl_s:.0f}s and was dropped.",
                type="server_error", code="queue_timeout"))
            await msg.term()
            return

        attempt = msg.metadata.num_delivered if msg.metadata else 1
        self.cancel_current.clear()

        async def on_cancel(_):
            self.cancel_current.set()

        # Listen first, then look for a cancel stored earlier, so one published in between is not missed.
        cancels = await self.nc.subscribe(cancel_subject(job.id), cb=on_cancel)
        try:
            await self.js.get_last_msg(CANCELS_STREAM, cancel_subject(job.id))
            self.cancel_current.set()
        except NotFoundError:
            pass
        if self.cancel_current.is_set():
            await cancels.unsubscribe()
            await self.fail(job.reply_subject, job.id, 499, CANCELLED)
            await msg.ack_sync()
            return
        progress = {"tokens": 0}

        async def keep_alive():
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await msg.in_progress()
                await self.nc.publish(job.reply_subject, encode(Heartbeat(id=job.id, tokens=progress["tokens"])))

        alive = asyncio.create_task(keep_alive())
        try:
            async for event in iterate_in_thread(
                self.executor, lambda: run_job(self.loaded, job, self.name, attempt, self.cancel_current)
            ):
                if isinstance(event, Chunk):
                    progress["tokens"] = event.tokens
                    if not job.stream:
                        continue
                if self.stopping.is_set():
                    break  # shutdown, not a cancel: the job goes back to the queue below
                if isinstance(event, Done) and self.cancel_current.is_set():
                    event = Failed(id=job.id, status=499, error=CANCELLED)
                await self.nc.publish(job.reply_subject, encode(event))
            else:
                await self.nc.flush()
                await msg.ack_sync()
                self.jobs_done += 1
                return
            # Stopped by shutdown mid-job: hand the job back for another worker rather than ending it short.
            await msg.nak()
        except JobError as exc:
            await self.fail(job.reply_subject, job.id, exc.status, exc.detail)
            await msg.ack_sync()
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self.fail(job.reply_subject, job.id, 500, ErrorDetail(
                message=f"The worker failed while generating: {type(exc).__name__}: {exc}", type="server_error",
                code="worker_error"))
            await msg.term()
        finally:
            alive.cancel()
            await cancels.unsubscribe()


async def main_async(args) -> None:
    nc = await nats.connect(args.nats_url, name=f"conclave-worker:{args.model_id}", max_reconnect_attempts=-1)
    worker = Worker(nc, args.model_id, Path(args.model_dir), args.heartbeat, args.queue_ttl)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (worker.stopping.set(), worker.cancel_current.set()))
    try:
        await worker.run()
    finally:
        # close, not drain: draining waits on the pull subscription's pending request for up to 30s.
        await nc.flush()
        await nc.close()
        # Join the MLX thread before the interpreter exits; tearing it down mid-exit aborts the process.
        worker.executor.shutdown(wait=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between status/progress messages")
    parser.add_argument("--queue-ttl", type=float, default=600.0, help="drop jobs that waited longer than this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
