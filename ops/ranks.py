"""A node agent's worker ranks: started, watched and stopped on the controller's orders.

The controller (ops/controller.py) orders; this side obeys only what an order may say (schemas/membership.py):
which model, which rank of which group, the MLX variables of its group, the worker settings. The command
line is made here, from this node's own model store, credentials and broker address, so an order can start a
worker rank and nothing else, and the controller needs to know nothing of this machine's paths.

A rank is watched like `conclave serve` watches its own (ops/supervise.py): it has ended when its process
exits, or hung when its liveness file is older than STALE_HEARTBEATS heartbeats; either way the agent kills what
is left and reports a `RankExit`, and the controller restarts or re-places the group. An order from a newer
controller session first stops every rank an earlier one started: after a controller restart, nothing it does
not know of keeps running (a rank blocked in a collective with a departed peer would never exit by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec

from ops.config import free_port
from ops.model_files import NodeFiles
from ops.group import GroupSpec, HostSpec, LocalLauncher, RankLaunch, rank_arguments
from ops.supervise import STALE_HEARTBEATS, describe_exit
from pipeline.access import AGENTS_PREFIX, Identity
from pipeline.connection import answer, sleep_unless
from pipeline.nats_server import stop_process
from pipeline.limits import UNDECODABLE
from schemas.membership import (ORDER_ENV, ORDER_FILES, FetchOrder, OrderReply, PortOrder, RankExit, StartOrder,
                                StopOrder)
from workers.cpu_path import rank_command
from workers.status import alive_file
from workers.store import DEFAULT_MODEL, ModelStore

log = logging.getLogger("conclave.agent")
GROUP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
encode = msgspec.json.Encoder().encode


@dataclass
class Rank:
    order: StartOrder
    process: subprocess.Popen
    folder: Path
    stale_s: float


class RankKeeper:
    """The ranks this agent runs, by (group id, rank)."""

    def __init__(self, home: Path, node_id: str, address: str, nats_url: str, worker: Callable[[str], Identity]):
        self.home, self.node_id, self.address = Path(home), node_id, address
        # The NATS identity a rank of a model connects as: a joined node's worker user (rights for every model the
        # cluster serves), or on the first machine the model's own worker role.
        self.nats_url, self.worker = nats_url, worker
        self.workdir = self.home / "groups"
        shutil.rmtree(self.workdir, ignore_errors=True)  # folders of ranks an earlier agent left behind
        self.ranks: dict[tuple[str, int], Rank] = {}
        self.lock = threading.Lock()  # orders run in threads; `ended` on the event loop
        self.starts = 0  # each start gets a folder of its own: a restarted rank never shares its predecessor's
        self.controller = ""  # the session of the controller whose orders it follows

    def running(self) -> list[Path]:
        """The liveness files of the ranks running here (the node's status reports their MLX counters)."""
        with self.lock:
            return [alive_file(rank.folder, rank.order.rank) for rank in self.ranks.values()
                    if rank.process.poll() is None]

    def follow(self, controller: str) -> None:
        if controller != self.controller:
            if self.ranks:
                log.info("a new controller (%s): stopping the %d rank(s) the last one started", controller,
                         len(self.ranks))
            self.stop_all()
            self.controller = controller

    def command(self, order: StartOrder, folder: Path) -> list[str]:
        store = ModelStore(self.home / "models")
        model = store.get(order.model_id) or (store.ensure_default() if order.model_id == DEFAULT_MODEL else None)
        # The whole model, else the part of it fetched for a pipeline rank here (its worker checks it holds its
        # stage's files: workers/shard.py).
        model_dir = model.path if model is not None else store.shard_path(order.model_id)
        if model is None and order.model_id not in store.shards():
            raise ValueError(f"model {order.model_id} is not on node {self.node_id} (`conclave models pull` or "
                             f"`import` it there)")
        spec = GroupSpec(layout=order.layout, backend=order.backend, split=order.split or None)
        identity = self.worker(order.model_id)
        return rank_command(
            "workers.worker", "--model-id", order.model_id, "--model-dir", str(model_dir), "--nats-url", self.nats_url,
            "--nats-seed", str(identity.seed_file), "--nats-ca", str(identity.ca_file), "--group-id",
            order.group_id, "--alive-dir", str(folder), *order.settings.arguments(), *rank_arguments(spec))

    def start(self, order: StartOrder) -> OrderReply:
        self.follow(order.controller)
        if set(order.env) - ORDER_ENV or set(order.files) - ORDER_FILES or any(
                len(v) > 65536 for v in (*order.env.values(), *order.files.values())):
            return OrderReply(ok=False, error=f"an order may set only {sorted(ORDER_ENV | ORDER_FILES)}")
        if not GROUP_ID.fullmatch(order.group_id) or not 0 <= order.rank < 1024:
            # Both name a folder under this home: nothing but a plain name and a small number.
            return OrderReply(ok=False, error="a group id is 1 to 64 of A-Z, a-z, 0-9, '_' and '-'; a rank 0 to 1023")
        key = (order.group_id, order.rank)
        self.stop(key, "KILL")
        with self.lock:
            self.starts += 1
            folder = self.workdir / f"{order.group_id}-{order.rank}-{self.starts}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            argv = self.command(order, folder)
            # (ranks: how many this node runs with this one, so that their BLAS threads share its cores)
            with self.lock:
                here = 1 + sum(rank.process.poll() is None for rank in self.ranks.values())
            launch = RankLaunch(order.rank, HostSpec(ip=self.address, ranks=here), dict(order.env), dict(order.files))
            process = LocalLauncher().start(launch, argv, folder)
        except (OSError, ValueError) as exc:
            return OrderReply(ok=False, error=str(exc))
        with self.lock:
            self.ranks[key] = Rank(order, process, folder, max(STALE_HEARTBEATS * order.settings.heartbeat_s, 10.0))
        log.info("started rank %d of group %s (%s), pid %d", order.rank, order.group_id, order.model_id, process.pid)
        return OrderReply(ok=True, pid=process.pid)

    def stop(self, key: tuple[str, int], how: str) -> None:
        with self.lock:
            rank = self.ranks.get(key)
        if rank is None or rank.process.poll() is not None:
            return
        if how == "KILL":
            rank.process.kill()
        else:
            rank.process.send_signal(signal.SIGTERM)

    def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every rank at once, then SIGKILL what is left after `timeout_s` in all."""
        with self.lock:
            ranks, self.ranks = list(self.ranks.values()), {}
        for rank in ranks:
            if rank.process.poll() is None:
                rank.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for rank in ranks:
            stop_process(rank.process, max(0.0, deadline - time.monotonic()))
            shutil.rmtree(rank.folder, ignore_errors=True)

    def ended(self) -> list[RankExit]:
        """Ranks that exited or hung since the last call (hung ones are killed here)."""
        exits = []
        with self.lock:
            ranks = list(self.ranks.items())
        for key, rank in ranks:
            if rank.process.poll() is None:
                try:
                    stale = time.time() - alive_file(rank.folder, rank.order.rank).stat().st_mtime
                except FileNotFoundError:
                    stale = 0.0
                if stale <= rank.stale_s:
                    continue
                rank.process.kill()
                rank.process.wait()
                why = f"stopped responding (no heartbeat for {stale:.0f}s): killed"
            else:
                why = f"exited with {describe_exit(rank.process.returncode)}"
            exits.append(RankExit(node_id=self.node_id, group_id=key[0], rank=key[1], code=rank.process.returncode,
                                  why=why))
            shutil.rmtree(rank.folder, ignore_errors=True)
            with self.lock:
                if self.ranks.get(key) is rank:  # not replaced by a new start meanwhile
                    del self.ranks[key]
        return exits


async def obey(link, keeper: RankKeeper, files: NodeFiles, stopping: asyncio.Event, lost_after_s: float) -> None:
    """Answer the controller's orders and report ranks that end, until `stopping`; then stop every rank. Cut off
    from the broker for `lost_after_s`, it stops its ranks too: the controller has taken this node for lost and
    placed them elsewhere, and two groups must not serve one model's queue with half their ranks each. Other nodes'
    asks for tickets to this node's model files are answered too (`files`, ops/model_files.py)."""
    prefix = f"{AGENTS_PREFIX}.{keeper.node_id}"
    nc = link.nc

    async def on_order(msg):
        kind = msg.subject.rsplit(".", 1)[-1]
        try:
            if kind == "start":
                reply = await asyncio.to_thread(keeper.start, msgspec.json.decode(msg.data, type=StartOrder))
            elif kind == "stop":
                order = msgspec.json.decode(msg.data, type=StopOrder)
                # Only the controller it follows stops its ranks: a controller that lost the lease may still be
                # stopping its group while its successor starts one here.
                if order.controller == keeper.controller:
                    keeper.stop((order.group_id, order.rank), order.signal)
                reply = OrderReply(ok=True)
            elif kind == "port":
                msgspec.json.decode(msg.data, type=PortOrder)
                reply = OrderReply(ok=True, port=free_port(keeper.address))
            elif kind == "fetch":
                order = msgspec.json.decode(msg.data, type=FetchOrder)
                files.fetch(link, order.model_id, order.sources, order.order, order.files)
                reply = OrderReply(ok=True)
            else:
                reply = OrderReply(ok=False, error=f"no order {kind!r}")
        except UNDECODABLE as exc:
            reply = OrderReply(ok=False, error=f"not a valid order: {exc}")
        except Exception as exc:  # answered, so that the controller does not wait its timeout out
            log.exception("order %s failed", kind)
            reply = OrderReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await answer(msg, encode(reply))

    subscription, tickets = await nc.subscribe(f"{prefix}.orders.*", cb=on_order), await files.answer(nc)
    cut_off_since = None
    try:
        while not stopping.is_set():
            if link.nc is not nc:  # the link replaced a connection the server closed for good: listen on the new one
                nc = link.nc
                subscription, tickets = await nc.subscribe(f"{prefix}.orders.*", cb=on_order), await files.answer(nc)
            if nc.is_connected:
                cut_off_since = None
            elif cut_off_since is None:
                cut_off_since = time.monotonic()
            elif time.monotonic() - cut_off_since > lost_after_s and keeper.ranks:
                log.warning("cut off from the broker for %.0fs: stopping this node's ranks", lost_after_s)
                await asyncio.to_thread(keeper.stop_all)
            for event in keeper.ended():
                log.warning("rank %d of group %s %s", event.rank, event.group_id, event.why)
                try:
                    await link.nc.publish(f"{prefix}.events", encode(event))
                except Exception as exc:  # the controller also learns it from the group's silence
                    log.warning("could not report the end of rank %d: %s", event.rank, exc)
            await sleep_unless(stopping, 0.2)
    finally:
        with contextlib.suppress(Exception):  # its connection may be gone
            await subscription.unsubscribe()
            await tickets.unsubscribe()
        await asyncio.to_thread(keeper.stop_all)

