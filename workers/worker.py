"""The worker process: takes jobs for one model from JetStream, runs them on MLX, sends events back.

    python -m workers.worker --model-id ID --model-dir DIR --nats-url URL [--layout tensor|pipeline ...]

The pieces, each in its own module: the consumer takes jobs and settles them (workers/consumer.py,
pipeline/settle.py), the model's thread runs the batch (workers/scheduler.py, workers/lockstep.py),
status and liveness go out every heartbeat (workers/status.py). This module wires them together and
watches the model's progress.

In a group (started by ops/group.py with MLX's distributed environment) rank 0 is the `Worker`, the
leader; every other rank runs `follow`. Followers wait for a wake-up on core NATS between batches, not
inside an MLX collective: MLX's ring backend busy-polls its sockets, so an idle follower parked in a
collective would burn a whole core. The batch itself (who joins and leaves, every sampled token)
reaches them through MLX collectives.

Step watchdog: nothing can interrupt a model thread blocked in MLX (a rank of its group gone or hung
inside a collective, a hung kernel). When the batch makes no step for `--step-timeout`, the leader
answers every requester with a clean 503, settles their jobs and exits; its supervisor restarts it
(a group as a whole). A process that is stopped altogether cannot do even that: its supervisor sees
its liveness file go stale (workers/status.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import nats

from pipeline.access import Identity, worker_role
from pipeline.connection import connect, quiet_tls_eof_warning
from pipeline.limits import PayloadLimits
from pipeline.settle import Settler
from pipeline.subjects import group_wake_subject, status_subject
from schemas.jobs import WorkerStatus
from schemas.openai import ErrorDetail
from workers.consumer import JobConsumer
from workers.lockstep import BatchEngine
from workers.prepare import LoadedModel, open_model
from workers.rank import RankArgs, add_rank_arguments, barrier, join_group
from workers.scheduler import BatchScheduler
from workers.status import Progress, alive_file, encode, keep_alive, report_status

log = logging.getLogger("conclave.worker")
LOST = 70  # exit code after the step watchdog or a failed group step: the supervisor restarts the group
NATS_CLOSED = 75  # exit code when NATS closed the connection for good (EX_TEMPFAIL): restarted too


class Worker:
    """The leader (or only) rank of a model's worker group."""

    def __init__(self, nc, args, executor: ThreadPoolExecutor, rank: RankArgs, group: mx.distributed.Group | None,
                 loop: asyncio.AbstractEventLoop, progress: Progress):
        self.nc = nc
        self.progress = progress
        self.loop = loop
        self.args = args
        self.executor = executor
        self.rank = rank
        self.group = group
        self.ranks = group.size() if group is not None else 1
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state = "loading"
        self.loaded: LoadedModel | None = None
        self.consumer: JobConsumer | None = None
        self.scheduler: BatchScheduler | None = None
        self.lost_reason = ""

    def status(self) -> WorkerStatus:
        consumer = self.consumer
        busy = consumer is not None and consumer.active
        return WorkerStatus(
            worker=self.name, model=self.args.model_id, pid=os.getpid(), host=socket.gethostname(),
            state=("busy" if busy else "ready") if self.state == "ready" else self.state,
            context_length=self.loaded.context_length if self.loaded else 0,
            jobs_done=consumer.jobs_done if consumer else 0, layout=self.rank.layout, ranks=self.ranks,
            active=len(consumer.active) if consumer else 0, max_batch=self.args.max_batch,
            job_s=consumer.times.job_s if consumer else 0.0, prefill_s=consumer.times.prefill_s if consumer else 0.0,
            problem=f"audit log: {consumer.settler.audit_failure}" if consumer and consumer.settler.audit_failure
            else "", tokens=self.progress.tokens, ttft_s=consumer.times.ttft_s if consumer else 0.0,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        args, loop = self.args, self.loop
        status = asyncio.create_task(report_status(self.nc, self.status, args.heartbeat, stopping))
        self.loaded = await loop.run_in_executor(
            self.executor, open_model, args.model_id, Path(args.model_dir), self.rank.layout, self.group,
            self.rank.split)
        await loop.run_in_executor(self.executor, barrier, self.group)  # every follower is listening now
        engine = await make_engine(loop, self.executor, self.loaded.shard, args, self.progress)
        self.scheduler = BatchScheduler(engine, args.heartbeat)
        # Settling retries for ten ack-waits while NATS is unreachable (a restart, JetStream recovering its store).
        settler = Settler(self.nc, args.model_id, self.name, self.ranks, self.loaded.revision, 50 * args.heartbeat,
                          stopping, ready_at=time.time())
        self.consumer = JobConsumer(
            self.nc, args.model_id, self.loaded, self.scheduler, settler, self.name, args.heartbeat, args.queue_ttl,
            args.max_batch, args.default_max_tokens, PayloadLimits(self.nc.max_payload))
        self.state = "ready"
        log.info("model %s ready (context %d). %s", args.model_id, self.loaded.context_length,
                 self.loaded.shard.cpu_path)
        thread = loop.run_in_executor(self.executor, self.scheduler.run, self.wake_followers, self.batch_failed)
        watchdog = asyncio.create_task(self.watch_steps(stopping))
        try:
            await self.consumer.run(stopping)  # until stopping; hands back what it has not finished
        finally:
            self.state = "stopping"
            self.scheduler.halt()  # (again: the consumer halts it, unless it failed before it started)
            await thread
            watchdog.cancel()
            status.cancel()
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(status_subject(args.model_id), encode(self.status()))

    def wake_followers(self) -> None:
        """On the model's thread, as a batch starts: followers wait on NATS between batches."""
        if self.ranks > 1:
            asyncio.run_coroutine_threadsafe(self.nc.publish(group_wake_subject(self.args.model_id, self.rank.group_id), b""),
                                             self.loop).result()

    def batch_failed(self, exc: Exception, rows: list) -> bool:
        """On the model's thread: a step raised. A single process fails that batch's jobs and serves on; in
        a group the ranks are out of step, so every job fails and the process exits (see `lose`)."""
        if self.ranks > 1:
            asyncio.run_coroutine_threadsafe(self.lose(f"generation failed: {type(exc).__name__}: {exc}"), self.loop)
            return False
        for row in rows:
            row.fail(exc)
        return True

    async def watch_steps(self, stopping: asyncio.Event) -> None:
        """A batch that made no step for too long has lost or hung a rank, or its model thread hung. When a
        group's supervisor is already stopping us (SIGTERM) because another rank died, one heartbeat
        without a step is enough."""
        while True:
            await asyncio.sleep(self.args.heartbeat)
            stalled = self.scheduler.stalled_s()
            limit = self.args.heartbeat if stopping.is_set() and self.ranks > 1 else self.rank.step_timeout_s
            if stalled > limit:
                what = "a rank is gone or hung" if self.ranks > 1 else "the model thread is hung"
                await self.lose(f"no step for {stalled:.1f}s; {what}")

    async def lose(self, reason: str) -> None:
        """Deal with every job taken and exit so that the supervisor restarts us: a group that lost a rank hands
        its jobs back to the queue for the next group; a single worker whose model thread hung fails them (503).

        The model's thread is in an unknown state (a group's followers too), so no further job may use it.
        """
        if self.lost_reason:  # the watchdog and a failed step can both get here
            return
        self.lost_reason = reason
        log.error("%s: %s (%d jobs); exiting so that it restarts", self.rank.group_id or "worker", reason,
                  len(self.consumer.active))
        try:
            if self.ranks > 1:  # the jobs are not at fault: the group placed next runs them
                await asyncio.wait_for(self.consumer.requeue_all(f"the worker group lost a rank: {reason}"),
                                       timeout=10 * self.args.heartbeat)
            else:
                await asyncio.wait_for(self.consumer.fail_all(503, ErrorDetail(
                    message="The worker serving this model stopped making progress while generating; it is "
                            "restarting. Retry the request.", type="server_error", code="worker_lost")),
                    timeout=10 * self.args.heartbeat)
            await self.nc.flush(timeout=self.args.heartbeat)
        finally:  # even if NATS is unreachable: a process that stays would hold the group hung for good
            os._exit(LOST)


async def make_engine(loop, executor: ThreadPoolExecutor, shard, args, progress: Progress) -> BatchEngine:
    # On the model's thread: in a group, making the engine is a collective (workers/lockstep.py: plain_kv).
    return await loop.run_in_executor(executor, functools.partial(
        BatchEngine, shard, args.max_batch, int(args.prefix_cache_gb * 2**30), progress=progress))


async def follow(nc, args, executor: ThreadPoolExecutor, rank: RankArgs, group: mx.distributed.Group,
                 stopping: asyncio.Event, progress: Progress) -> None:
    """A follower rank: load this rank's shard, then run each batch the leader wakes us for."""
    loop = asyncio.get_running_loop()
    wake = await nc.subscribe(group_wake_subject(args.model_id, rank.group_id))
    loaded = await loop.run_in_executor(
        executor, open_model, args.model_id, Path(args.model_dir), rank.layout, group, rank.split)
    await loop.run_in_executor(executor, barrier, group)
    log.info("rank %d/%d of %s ready (layers %s). %s", group.rank(), group.size(), args.model_id, loaded.shard.layers,
             loaded.shard.cpu_path)
    engine = await make_engine(loop, executor, loaded.shard, args, progress)
    while not stopping.is_set():
        try:
            await wake.next_msg(timeout=args.heartbeat)
        except nats.errors.TimeoutError:
            continue
        await loop.run_in_executor(executor, engine.run)


async def main_async(args) -> int:
    rank = RankArgs(args.layout, args.backend, args.split, args.group_id, args.step_timeout)
    executor = ThreadPoolExecutor(1, thread_name_prefix="mlx")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    rank_index = int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    path = alive_file(Path(args.alive_dir), rank_index) if args.alive_dir else None
    progress = Progress()
    liveness = asyncio.create_task(keep_alive(path, args.heartbeat, stopping, progress))
    exit_code = 0

    async def nats_closed():
        nonlocal exit_code
        if not stopping.is_set():
            log.error("NATS closed this worker's connection for good; exiting so that it restarts")
            exit_code = NATS_CLOSED
            stopping.set()

    group = await loop.run_in_executor(executor, join_group, rank)
    identity = Identity(worker_role(args.model_id), Path(args.nats_seed), Path(args.nats_ca) if args.nats_ca else None)
    nc = await connect(args.nats_url, f"conclave-worker:{args.model_id}", identity, on_closed=nats_closed)
    try:
        if group is None or group.rank() == 0:
            await Worker(nc, args, executor, rank, group, loop, progress).run(stopping)
        else:
            await follow(nc, args, executor, rank, group, stopping, progress)
    finally:
        liveness.cancel()
        # close, not drain: draining waits on the pull subscription's pending request for up to 30s.
        with contextlib.suppress(Exception):  # NATS gone: the MLX cleanup below must still run
            await nc.flush(timeout=args.heartbeat)
            await nc.close()
        # Finish MLX's queued work (a generation's last, discarded step may still be running) and join the
        # MLX thread before the interpreter exits: tearing either down mid-exit aborts the process.
        await loop.run_in_executor(executor, mx.synchronize)
        executor.shutdown(wait=True)
    return exit_code


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--nats-seed", required=True, help="file holding the nkey seed of this model's worker role "
                        "(pipeline/access.py; `conclave serve` makes it in <home>/credentials/roles)")
    parser.add_argument("--nats-ca", default=None, help="a cluster's broker: the CA certificate its TLS must lead to "
                        "(ops/cluster_tls.py)")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between status/progress messages")
    parser.add_argument("--queue-ttl", type=float, default=600.0, help="drop jobs that waited longer than this")
    add_rank_arguments(parser)
    parser.add_argument("--group-id", default="", help="names this group's wake-up subject")
    parser.add_argument("--step-timeout", type=float, default=60.0,
                        help="a batch with no decode/prefill step for this long is hung: fail its jobs and exit")
    parser.add_argument("--max-batch", type=int, default=16, help="jobs generated at once (continuous batching)")
    parser.add_argument("--prefix-cache-gb", type=float, default=4.0,
                        help="KV caches of finished requests kept for prompts that extend them, in GiB (0: off)")
    parser.add_argument("--default-max-tokens", type=int, default=2048,
                        help="tokens a job may generate when it does not say (capped by the context)")
    parser.add_argument("--alive-dir", default=None, help="touch rank-<rank>.alive here every heartbeat")
    args = parser.parse_args(argv)
    # mpirun starts ranks without MLX_RANK; Open MPI names the rank itself.
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[rank {rank} pid {os.getpid()}] %(levelname)s %(message)s")
    quiet_tls_eof_warning()
    code = asyncio.run(main_async(args))
    # Everything is settled: NATS flushed and closed, MLX synchronized, its thread joined. Skip the C++
    # static destructors: tearing down MLX's internal threads at interpreter exit occasionally aborts
    # ("terminate called without an active exception"), turning a clean stop into a crash (exit -6).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
