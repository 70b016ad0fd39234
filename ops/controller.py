"""The controller: places a model on the cluster's nodes, starts its ranks through their agents, re-places it
when a node is lost.

One runs at a time, wherever the controller lease is held (pipeline/lease.py): in `conclave serve --cluster` on
the first machine, or, with three brokers, on a broker node once the first machine is gone. It follows the plan
the first machine wrote (`control`). Its loop, per model:

1. read the nodes' statuses (pipeline/nodes.py) and place the model on those that are up (ops/placement.py,
   a pure function); while no placement fits, say why in the instances bucket and wait for nodes;
2. turn the plan into a worker group (ops/group.py: one host per rank, each rank started through its node's
   agent, this machine's too, so that any machine can run the controller) and keep it running with the same supervisor a single machine uses
   (ops/supervise.py): a rank that exits or hangs restarts the group where it is;
3. when a node of the plan is lost (no status for LOST_AFTER_S), stop the group and go back to 1 with the nodes
   left. Jobs queued meanwhile wait in JetStream (their consumer outlives every group) and are served by the
   re-placed group; a job a lost rank was running is redelivered after its ack wait (workers/consumer.py).

A node agent's rank looks to the supervisor like a local process (`RemoteRank`): the agent reports its end on
`conclave.agents.<id>.events`, and a rank on a node that is lost is taken for dead. Orders go by NATS
request/reply to the one agent they name (ops/ranks.py is the other side); each carries this controller's
session, so agents drop what an earlier controller started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import msgspec

from ops.group import GroupSpec, HostSpec, RankLaunch, plan_group
from ops.model_facts import model_facts
from ops.placement import place
from ops.supervise import GroupSupervisor
from pipeline.access import AGENTS_PREFIX, PLACE_SUBJECT
from pipeline.connection import sleep_unless
from pipeline.lease import read_plan
from pipeline.nodes import links_between, put_instance, read_nodes, state_of
from schemas.cluster import NodeStatus, Plan, PlacementRequest
from schemas.membership import (Instance, OrderReply, PlacementPreview, PortOrder, RankExit, StartOrder, StopOrder,
                                WorkerSettings)
from workers.store import ModelStore, StoredModel, model_context_length

log = logging.getLogger("conclave.controller")
ORDER_TIMEOUT_S = 10.0
encode = msgspec.json.Encoder().encode


class Orders:
    """Requests to node agents, from the supervisor's threads or the event loop; and the ranks they run."""

    def __init__(self, link, session: str):
        self.link, self.session = link, session  # link.nc, read at each use: the link may replace its connection
        self.loop: asyncio.AbstractEventLoop | None = None  # the controller's, set when it runs
        self.ranks: dict[tuple[str, str, int], RemoteRank] = {}  # (node, group, rank)

    async def _request(self, node: str, kind: str, order) -> OrderReply:
        msg = await self.link.nc.request(f"{AGENTS_PREFIX}.{node}.orders.{kind}", encode(order),
                                         timeout=ORDER_TIMEOUT_S)
        return msgspec.json.decode(msg.data, type=OrderReply)

    def request(self, node: str, kind: str, order) -> OrderReply:
        """From a thread: the agent's answer; OSError when there is none (the supervisor retries with backoff)."""
        try:
            reply = asyncio.run_coroutine_threadsafe(self._request(node, kind, order), self.loop).result(
                ORDER_TIMEOUT_S + 5)
        except Exception as exc:
            raise OSError(f"node {node} did not answer a {kind} order ({type(exc).__name__}: {exc})") from None
        if not reply.ok:
            raise OSError(f"node {node} refused a {kind} order: {reply.error}")
        return reply

    def tell(self, node: str, kind: str, order) -> None:
        """Fire and forget, from a thread."""
        asyncio.run_coroutine_threadsafe(self.link.nc.publish(f"{AGENTS_PREFIX}.{node}.orders.{kind}",
                                                              encode(order)), self.loop)

    async def on_event(self, msg) -> None:
        try:
            event = msgspec.json.decode(msg.data, type=RankExit)
        except msgspec.MsgspecError:
            return
        if msg.subject != f"{AGENTS_PREFIX}.{event.node_id}.events":  # an agent speaks for itself only
            return
        rank = self.ranks.get((event.node_id, event.group_id, event.rank))
        if rank is not None:
            rank.ended(event.code)

    def node_lost(self, node: str) -> None:
        for (where, _, _), rank in list(self.ranks.items()):
            if where == node:
                rank.ended(-signal.SIGKILL)


class RemoteRank:
    """A rank a node agent runs, with the methods the supervisor uses on a local process."""

    def __init__(self, orders: Orders, node: str, group_id: str, rank: int, pid: int):
        self.orders, self.node, self.group_id, self.rank, self.pid = orders, node, group_id, rank, pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._ended.set()
        self.orders.ranks.pop((self.node, self.group_id, self.rank), None)

    def poll(self) -> int | None:
        return self.returncode

    def _stop(self, how: str) -> None:
        if self.returncode is None:
            self.orders.tell(self.node, "stop", StopOrder(controller=self.orders.session, group_id=self.group_id,
                                                          rank=self.rank, signal=how))

    def send_signal(self, sig: int) -> None:
        self._stop("TERM" if sig == signal.SIGTERM else "KILL")

    def kill(self) -> None:
        self._stop("KILL")

    def wait(self, timeout: float | None = None) -> int:
        # Without a timeout (after kill): an agent that cannot answer any more has lost the rank with it.
        if not self._ended.wait(timeout if timeout is not None else ORDER_TIMEOUT_S):
            if timeout is not None:
                raise subprocess.TimeoutExpired(f"rank {self.rank} on {self.node}", timeout)
            log.warning("node %s did not report the end of rank %d; taken for dead", self.node, self.rank)
            self.ended(-signal.SIGKILL)
        return self.returncode


class AgentLauncher:
    """Starts a rank through the agent of `node` (ops/group.py: Launcher)."""

    def __init__(self, orders: Orders, node: str, model: StoredModel, spec: GroupSpec, settings: WorkerSettings):
        self.orders, self.node, self.model, self.spec, self.settings = orders, node, model, spec, settings

    def ring_port(self, host: HostSpec, suggested: int) -> int:
        return self.orders.request(self.node, "port", PortOrder(controller=self.orders.session)).port

    def start(self, launch: RankLaunch, argv: list[str], workdir: Path) -> RemoteRank:
        group_id = workdir.name  # the supervisor's group folder is named by the group id
        order = StartOrder(controller=self.orders.session, group_id=group_id, rank=launch.rank, model_id=self.model.id,
                           layout=self.spec.layout, backend=self.spec.backend,
                           split=list(self.spec.split or []), env=launch.env, files=launch.files,
                           settings=self.settings)
        # Known before the order goes: its end may be reported before the answer arrives.
        rank = RemoteRank(self.orders, self.node, group_id, launch.rank, 0)
        self.orders.ranks[(self.node, group_id, launch.rank)] = rank
        try:
            rank.pid = self.orders.request(self.node, "start", order).pid or 0
        except OSError:
            rank.kill()  # an answer lost, not an order: a rank that did start must not hold its memory for nothing
            rank.ended(-signal.SIGKILL)
            raise
        return rank


def group_of(plan: Plan, nodes: dict[str, NodeStatus]) -> GroupSpec:
    """The worker group a plan describes: one host per rank, in rank order."""
    hosts = [HostSpec(ssh="localhost", ip=nodes[r.node].facts.address or "127.0.0.1", node=r.node)
             for r in plan.ranks]
    split = [r.layers[1] - r.layers[0] for r in plan.ranks] if plan.layout == "pipeline" else None
    backend = "jaccl" if plan.backend == "jaccl" else "ring"
    return GroupSpec(layout=plan.layout, backend=backend, split=split, hosts=hosts)


class Controller:
    """Keeps one model placed and running on the cluster."""

    def __init__(self, link, model: StoredModel, settings: WorkerSettings, request: PlacementRequest, workdir: Path,
                 context_length: int | None = None):
        self.link, self.model, self.settings, self.request, self.workdir = link, model, settings, request, workdir
        self.session = uuid.uuid4().hex[:12]
        self.orders = Orders(link, self.session)
        self.facts = model_facts(model.id, model.path)
        self.supervisor: GroupSupervisor | None = None
        self.events = None  # (connection, subscription) of the agents' reports
        self.instance = Instance(model=model.id, created=model.created, context_length=context_length)

    async def _say(self, **changes) -> None:
        self.instance = msgspec.structs.replace(self.instance, time=time.time(), **changes)
        try:
            await put_instance(self.link.nc.jetstream(), self.instance)
        except Exception as exc:
            log.warning("could not publish the state of %s: %s", self.model.id, exc)

    async def _plan(self, stopping: asyncio.Event, after: float) -> tuple[Plan, dict[str, NodeStatus]] | None:
        """A placement on the nodes up now (statuses measured after `after`), once one fits."""
        said = None
        while not stopping.is_set():
            statuses = {s.facts.id: s for s in await read_nodes(self.link.nc.jetstream())
                        if state_of(s) == "up" and s.time > after}
            result = (place(self.facts, [s.facts for s in statuses.values()], links_between(list(statuses.values())),
                            self.request) if statuses else None)
            if isinstance(result, Plan):
                return result, statuses
            reason = (result.reason if result is not None else "no node has reported yet" if not after else
                      "waiting for the nodes' first reports since the last group stopped")
            if reason != said:
                log.warning("%s is not placed: %s; waiting for nodes", self.model.id, reason)
                await self._say(state="placing", nodes=[], layout="", why=reason)
                said = reason
            await sleep_unless(stopping, 1.0)
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        orders = self.orders
        orders.loop = asyncio.get_running_loop()
        after = 0.0
        try:
            while not stopping.is_set():
                try:
                    await self._listen()
                    placed = await self._plan(stopping, after)
                    if placed is None:
                        return
                    plan, statuses = placed
                    spec = plan_group(group_of(plan, statuses), self.model.path)
                except Exception as exc:  # NATS away a moment, or a plan the model's files refuse: try again
                    log.error("could not place %s: %s; trying again", self.model.id, exc)
                    await sleep_unless(stopping, 2.0)
                    continue
                nodes = [r.node for r in plan.ranks]
                log.info("placing %s: %s over %s (%s)", self.model.id, plan.layout, ", ".join(nodes), plan.why)

                def launchers(host: HostSpec, spec=spec):
                    return AgentLauncher(orders, host.node, self.model, spec, self.settings)

                # No command line: each agent makes its rank's own (ops/ranks.py).
                self.supervisor = GroupSupervisor(spec, lambda group_id, folder: [], self.workdir,
                                                  self.settings.heartbeat_s, launchers)
                await self._say(state="serving", nodes=nodes, layout=plan.layout, why=plan.why)
                supervising = asyncio.create_task(self.supervisor.run())
                lost = await self._watch(nodes, {n: statuses[n].facts.session for n in nodes}, stopping)
                if lost:
                    log.warning("node(s) %s lost: stopping %s's group and placing it again", ", ".join(lost),
                                self.model.id)
                    for node in lost:
                        orders.node_lost(node)
                await asyncio.to_thread(self.supervisor.stop)
                supervising.cancel()
                after = time.time()  # place on statuses measured once this group's ranks are gone
        finally:
            if self.supervisor is not None:
                await asyncio.to_thread(self.supervisor.stop)
            if self.events is not None:
                with contextlib.suppress(Exception):
                    await self.events[1].unsubscribe()

    async def _listen(self) -> None:
        """The agents' reports of ranks that ended, on the link's connection of the moment (it may replace it)."""
        if self.events is None or self.events[0] is not self.link.nc:
            self.events = (self.link.nc, await self.link.nc.subscribe(f"{AGENTS_PREFIX}.*.events",
                                                                      cb=self.orders.on_event))

    async def _watch(self, nodes: list[str], sessions: dict[str, str], stopping: asyncio.Event) -> list[str]:
        """Until a node of the plan is lost (returns them) or `stopping` (returns []). An agent that restarted (a new
        session) took its ranks with it, even if it reports again within seconds: that node counts as lost too
        (its rank, perhaps the leader, is gone, and the ranks left would wait on it for good)."""
        while not stopping.is_set():
            await sleep_unless(stopping, 1.0)
            try:
                await self._listen()
                statuses = {s.facts.id: s for s in await read_nodes(self.link.nc.jetstream())}
            except Exception as exc:  # NATS away a moment: judge nothing on no news
                log.warning("could not read the nodes' statuses: %s", exc)
                continue
            lost = [n for n in nodes if n not in statuses or state_of(statuses[n]) == "lost"
                    or statuses[n].facts.session != sessions[n]]
            if lost:
                return lost
        return []


async def control(link, store: ModelStore, workdir: Path, lost: asyncio.Event) -> None:
    """What the holder of the controller lease does (pipeline/lease.py) until `lost`: place and keep running the
    model of the plan the first machine wrote, from this machine's model store."""
    plan = None
    while plan is None and not lost.is_set():
        try:
            plan = await read_plan(link.nc.jetstream())
        except Exception as exc:
            log.warning("could not read the cluster's plan: %s", exc)
        if plan is None:
            await sleep_unless(lost, 1.0)
    if plan is None:
        return
    model = await asyncio.to_thread(store.resolve, plan.model)  # the first use copies the bundled model in
    controller = Controller(link, model, plan.settings, plan.request, workdir,
                            await asyncio.to_thread(model_context_length, model.path))
    ending = asyncio.Event()

    async def watch_plan() -> None:
        # The first machine restarted with another model or other flags while another machine controls: this one
        # ends, hands the lease over, and whoever takes it next places the new plan.
        while not lost.is_set():
            await sleep_unless(lost, 2.0)
            if lost.is_set():
                break
            try:
                now = await read_plan(link.nc.jetstream())
            except Exception:
                continue
            if now is not None and now != plan:
                log.warning("the cluster's plan changed (now %s): handing the controller lease over", now.model)
                break
        ending.set()

    watching = asyncio.create_task(watch_plan())
    try:
        await controller.run(ending)
    finally:
        watching.cancel()


async def answer_previews(nc, store: ModelStore):
    """Placement previews (`POST /v1/cluster/placement`): `place` on the nodes up now, for any model in this
    machine's store; a Plan or a Refusal, nothing started. Returns the subscription."""
    async def preview(msg):
        try:
            asked = msgspec.json.decode(msg.data, type=PlacementPreview)
            model = store.get(asked.model)
            if model is None:
                raise ValueError(f"{asked.model} is not in the first machine's model store (`conclave models pull` or "
                                 f"`import` it there first; a preview never downloads)")
            statuses = [s for s in await read_nodes(nc.jetstream()) if state_of(s) == "up"]
            facts = await asyncio.to_thread(model_facts, model.id, model.path)
            answer = msgspec.json.encode(place(facts, [s.facts for s in statuses], links_between(statuses),
                                               asked.request()))
        except (msgspec.MsgspecError, ValueError, OSError) as exc:
            answer = msgspec.json.encode({"type": "error", "message": str(exc)})
        await msg.respond(answer)

    return await nc.subscribe(PLACE_SUBJECT, cb=preview)
