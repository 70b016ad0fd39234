"""The controller: places the cluster's models on its nodes, starts their ranks through the agents, re-places
them when a node is lost.

One runs at a time, wherever the controller lease is held (pipeline/lease.py): in `conclave serve --cluster` on
the first machine, or, with three brokers, on a broker node once the first machine is gone. It follows the plan
the first machine wrote (`control`): the model `serve` was started with and those added since (ops/instances.py),
one `Controller` each, placed one at a time on what the others leave (ops/placement.py: offers). Its loop, per
model:

1. read the nodes' statuses (pipeline/nodes.py) and place the model on those that are up (ops/placement.py,
   a pure function); while no placement fits, say why in the instances bucket and wait for nodes;
2. turn the plan into a worker group (ops/group.py: one host per rank, each rank started through its node's
   agent, this machine's too, so that any machine can run the controller) and keep it running with the same
   supervisor a single machine uses (ops/supervise.py): a rank that exits or hangs restarts the group where it is;
3. when a node of the plan is lost (no status for LOST_AFTER_S), stop the group and go back to 1 with the nodes
   left. Jobs queued meanwhile wait in JetStream (their consumer outlives every group) and are served by the
   re-placed group; a job a lost rank was running is redelivered after its ack wait (workers/consumer.py);
4. once removed from the plan, it is "stopping": no ingress takes new requests for it, the jobs it has are
   answered (DRAIN_S at most), then its group stops and its consumer and instance are deleted (`retire`).

A node agent's rank looks to the supervisor like a local process (`RemoteRank`): the agent reports its end on
`conclave.agents.<id>.events`, and a rank on a node that is lost is taken for dead. Orders go by NATS
request/reply to the one agent they name (ops/ranks.py is the other side); each carries this controller's
session (one for all the models it controls), so agents drop what an earlier controller started.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec
from nats.errors import NoRespondersError

from ops.catalogue import entry_for
from ops.group import GroupSpec, HostSpec, RankLaunch, fit_group
from ops.placement import offers, place
from ops.supervise import GroupSupervisor
from pipeline.access import AGENTS_PREFIX
from pipeline.catalogue import read_entry
from pipeline.connection import sleep_unless, sleep_until_any
from pipeline.lease import PLAN_SUBJECT, read_plan
from pipeline.nodes import (NEWEST_AGE_S, delete_instance, links_between, put_instance, read_instances, read_nodes,
                            state_of)
from pipeline.streams import jobs_in_hand, retire_consumer
from pipeline.subjects import subject_token
from pipeline.limits import UNDECODABLE
from schemas.cluster import CatalogueEntry, NodeStatus, Plan
from schemas.membership import (FetchOrder, Instance, InstancePlan, OrderReply, PortOrder, RankExit, StartOrder,
                                StopOrder, WorkerSettings)
from workers.split import stage_files
from workers.store import DEFAULT_MODEL, ModelStore

log = logging.getLogger("conclave.controller")
ORDER_TIMEOUT_S = 10.0
PLAN_POLL_S = 0.5  # how soon an instance added or removed is seen (a direct get of one key: cheap)
PLAN_CONFIRM_S = 0.2  # then read again, and acted on when the two reads agree
# The ingresses hear an instance's change at once (ingress/app.py: on_open) and read the instances every 2 s besides:
# this long after a removed instance says "stopping", no ingress that heard it takes a request for it any more.
DRAIN_NOTICE_S = 0.5
PLACE_RETRY_S = 0.25  # how often a model that does not fit yet is placed again (memory freed, a node back)
DRAIN_S = 120.0  # how long a removed instance keeps answering the jobs it was given
FETCH_QUIET_S = 15.0  # a node that lacks a model's files and fetches nothing this long is ordered again
FETCH_RETRY_S = 5.0  # after a failed fetch of a model's files, before it is placed (and fetched) again
CATALOGUE_WAIT_S = 2.0  # how often a model not in the catalogue (yet) is looked for there
encode = msgspec.json.Encoder().encode


class Orders:
    """Requests to node agents, from the supervisor's threads or the event loop; and the ranks they run."""

    def __init__(self, link, session: str):
        self.link, self.session = link, session  # link.nc, read at each use: the link may replace its connection
        self.loop: asyncio.AbstractEventLoop | None = None  # the controller's, set when it runs
        self.ranks: dict[tuple[str, str, int], RemoteRank] = {}  # (node, group, rank)
        self.events = None  # (connection, subscription) of the agents' reports

    async def listen(self) -> None:
        """The agents' reports of ranks that ended, on the link's connection of the moment (it may replace it)."""
        if self.events is None or self.events[0] is not self.link.nc:
            self.events = (self.link.nc, await self.link.nc.subscribe(f"{AGENTS_PREFIX}.*.events", cb=self.on_event))

    async def close(self) -> None:
        if self.events is not None:
            with contextlib.suppress(Exception):
                await self.events[1].unsubscribe()

    async def ask(self, node: str, kind: str, order) -> OrderReply:
        msg = await self.link.nc.request(f"{AGENTS_PREFIX}.{node}.orders.{kind}", encode(order),
                                         timeout=ORDER_TIMEOUT_S)
        return msgspec.json.decode(msg.data, type=OrderReply)

    def request(self, node: str, kind: str, order) -> OrderReply:
        """From a thread: the agent's answer; OSError when there is none (the supervisor retries with backoff)."""
        try:
            reply = asyncio.run_coroutine_threadsafe(self.ask(node, kind, order), self.loop).result(
                ORDER_TIMEOUT_S + 5)
        except Exception as exc:
            raise OSError(f"node {node} did not answer a {kind} order ({type(exc).__name__}: {exc})") from None
        if not reply.ok:
            raise OSError(f"node {node} refused a {kind} order: {reply.error}")
        return reply

    def tell(self, node: str, kind: str, order, unheard: Callable[[], None]) -> None:
        """From a thread, without waiting for the answer; `unheard()` if no agent of that node listens any more (it
        is gone, and its ranks with it: NATS says so at once, where waiting for a report would take a timeout)."""
        async def send() -> None:
            try:
                await self.ask(node, kind, order)
            except NoRespondersError:
                unheard()
            except Exception:  # no answer in time: the supervisor's wait judges the rank
                pass

        asyncio.run_coroutine_threadsafe(send(), self.loop)

    async def on_event(self, msg) -> None:
        try:
            event = msgspec.json.decode(msg.data, type=RankExit)
        except UNDECODABLE:
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
                                                          rank=self.rank, signal=how),
                             lambda: self.ended(-signal.SIGKILL))

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

    def __init__(self, orders: Orders, node: str, model: CatalogueEntry, spec: GroupSpec, settings: WorkerSettings):
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


def rank_files(spec: GroupSpec, model: CatalogueEntry) -> list[list[str]]:
    """Per rank, the weight files its node needs: a pipeline stage's (workers/split.py: stage_files) when the model
    is in several files; else [] (all of them)."""
    if spec.layout != "pipeline" or spec.size < 2 or not model.layer_files:
        return [[] for _ in range(spec.size)]
    starts = [sum(spec.split[:r]) for r in range(spec.size)]
    return [sorted(stage_files(model.layer_files, model.shared_files, start, start + n))
            for start, n in zip(starts, spec.split)]


class Controller:
    """Keeps one model placed and running on the cluster."""

    def __init__(self, link, orders: Orders, model: CatalogueEntry, plan: InstancePlan, workdir: Path,
                 placing: asyncio.Lock):
        self.link, self.orders, self.model, self.workdir, self.placing = link, orders, model, workdir, placing
        self.settings, self.request = plan.settings, plan.request
        self.facts = model.facts
        self.supervisor: GroupSupervisor | None = None
        self.instance = Instance(model=model.id, created=model.created, context_length=model.context_length)

    async def _say(self, **changes) -> None:
        if self.instance.state == "stopping":  # removed: it says so until it is gone
            changes.pop("state", None)
        self.instance = msgspec.structs.replace(self.instance, time=time.time(), **changes)
        try:
            await put_instance(self.link.nc.jetstream(), self.instance)
        except Exception as exc:
            log.warning("could not publish the state of %s: %s", self.model.id, exc)

    async def _plan(self, stopping: asyncio.Event, after: float) -> tuple[Plan, dict[str, NodeStatus]] | None:
        """A placement on the nodes up now (statuses measured after `after`), on what the other instances leave
        there, once one fits. One instance places at a time (`placing`), and its reservation is in the instances
        bucket before the next one reads it."""
        said = None
        while not stopping.is_set():
            async with self.placing:
                js = self.link.nc.jetstream()
                # (read_nodes' times may be NEWEST_AGE_S later than true: a status stored before `after` must not pass)
                statuses = {s.facts.id: s for s in await read_nodes(js)
                            if state_of(s) == "up" and s.time > after + NEWEST_AGE_S}
                up = list(statuses.values())
                nodes = offers(self.model.id, up, await read_instances(js), everywhere=self.model.id == DEFAULT_MODEL)
                result = place(self.facts, nodes, links_between(up), self.request) if nodes else None
                if isinstance(result, Plan):
                    await self._say(state="starting", nodes=[r.node for r in result.ranks], layout=result.layout,
                                    memory=[r.memory.total for r in result.ranks],
                                    layers=[list(r.layers) for r in result.ranks], why=result.why)
                    return result, statuses
            reason = (result.reason if result is not None else
                      "no node up holds its files (`conclave models import` it where it should run)" if statuses else
                      "waiting for the nodes' first reports since the last group stopped" if after else
                      "no node has reported yet")
            if reason != said:
                log.warning("%s is not placed: %s; waiting for nodes", self.model.id, reason)
                await self._say(state="placing", nodes=[], memory=[], layers=[], layout="", why=reason)
                said = reason
            await sleep_unless(stopping, PLACE_RETRY_S)
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        orders = self.orders
        after = 0.0
        try:
            while not stopping.is_set():
                try:
                    await orders.listen()
                    # Its facts as the catalogue has them now: its files may have changed since the last placement.
                    if (fresh := await read_entry(self.link.nc.jetstream(), self.model.id)) is not None:
                        self.model, self.facts = fresh, fresh.facts
                    placed = await self._plan(stopping, after)
                    if placed is None:
                        return
                    plan, statuses = placed
                    spec = fit_group(group_of(plan, statuses), self.facts.layers, self.facts.tensor_sizes,
                                     self.model.refused_layouts)
                except Exception as exc:  # NATS away a moment, or a plan the model's files refuse: try again
                    log.error("could not place %s: %s; trying again", self.model.id, exc)
                    await sleep_unless(stopping, 2.0)
                    continue
                nodes = [r.node for r in plan.ranks]
                log.info("placing %s: %s over %s (%s)", self.model.id, plan.layout, ", ".join(nodes), plan.why)
                if not await self._bring_files(nodes, statuses, stopping, rank_files(spec, self.model)):
                    await sleep_unless(stopping, FETCH_RETRY_S)
                    after = time.time()
                    continue

                def launchers(host: HostSpec, spec=spec):
                    return AgentLauncher(orders, host.node, self.model, spec, self.settings)

                # No command line: each agent makes its rank's own (ops/ranks.py).
                self.supervisor = GroupSupervisor(spec, lambda group_id, folder: [], self.workdir,
                                                  self.settings.heartbeat_s, launchers)
                await self._say(state="serving", why=plan.why)
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

    async def _bring_files(self, nodes: list[str], statuses: dict[str, NodeStatus], stopping: asyncio.Event,
                           parts: list[list[str]]) -> bool:
        """The model's files onto the nodes of the plan that lack them, fetched from a node that holds them
        (ops/model_files.py): the weight files in `parts` (per rank: a pipeline stage's) or, where that is empty,
        all of them; True once every node has them, False if one of them is lost or its fetch failed."""
        model, order = self.model.id, uuid.uuid4().hex[:12]
        wanted = dict(zip(nodes, parts))

        def lacks(status: NodeStatus) -> bool:
            facts = status.facts
            return model not in facts.models and not (wanted[facts.id] and set(wanted[facts.id]) <= set(
                facts.shards.get(model, [])))

        missing = [n for n in nodes if lacks(statuses[n]) and model != DEFAULT_MODEL]
        sources = [n for n, status in statuses.items() if model in status.facts.models]
        # The nodes that need it whole fetch it in a chain, each from the one before it as it arrives there
        # (ops/model_relay.py), with the holders as fallbacks: N nodes in about the time of one copy.
        chain = [n for n in missing if not wanted[n]]
        try:
            for node in missing:
                before = [chain[chain.index(node) - 1]] if node in chain[1:] else []
                reply = await self.orders.ask(node, "fetch", FetchOrder(controller=self.orders.session, order=order,
                                                                        model_id=model, sources=before + sources,
                                                                        files=wanted[node]))
                if not reply.ok:
                    raise OSError(reply.error)
        except Exception as exc:
            log.warning("could not order the files of %s to %s: %s", model, ", ".join(missing), exc)
            return False
        quiet: dict[str, float] = {}
        while missing and not stopping.is_set():
            await sleep_unless(stopping, 1.0)
            try:
                now = {s.facts.id: s for s in await read_nodes(self.link.nc.jetstream())}
            except Exception:  # NATS away a moment: judge nothing on no news
                continue
            if any(n not in now or state_of(now[n]) == "lost" or now[n].facts.session != statuses[n].facts.session
                   for n in missing):
                return False
            missing = [n for n in missing if lacks(now[n])]
            fetches = [(n, p) for n in missing for p in now[n].fetching if p.model == model]
            if failed := [f"node {n}: {p.error}" for n, p in fetches if p.error and p.order == order]:
                await self._say(why=f"its files could not be fetched ({'; '.join(failed)}); trying again")
                return False
            # A node that lacks them and fetches nothing (an earlier order's fetch, of other files, ended): ordered
            # again, by placing again, once it has been quiet FETCH_QUIET_S.
            fetching = {n for n, _ in fetches}
            quiet = {n: quiet.get(n, time.monotonic()) for n in missing if n not in fetching}
            if any(time.monotonic() - since > FETCH_QUIET_S for since in quiet.values()):
                return False
            if fetches:
                await self._say(why="fetching its files: " + ", ".join(
                    f"node {n} {p.done / 1e9:.2f} of {p.total / 1e9:.2f} GB" for n, p in fetches))
        return not missing

    async def drain(self, lost: asyncio.Event) -> None:
        """Removed from the plan: "stopping" from now on (every ingress drops the model from its list, so no new
        request is taken for it), then wait until the jobs already queued are answered, for DRAIN_S at most."""
        await self._say(state="stopping")
        if self.supervisor is None:  # never ran: nothing would answer them
            return
        # What the ingresses take until they hear it is "stopping" is answered too (one that missed the news, being
        # away from NATS then, published nothing meanwhile; a job left on the model's subject once its consumer is
        # gone loads the model again: pipeline/unrouted.py).
        await sleep_unless(lost, DRAIN_NOTICE_S)
        deadline = time.monotonic() + DRAIN_S
        while not lost.is_set() and time.monotonic() < deadline:
            try:
                if not await jobs_in_hand(self.link.nc.jetstream(), self.model.id):
                    return
            except Exception as exc:
                log.warning("could not read %s's queue: %s", self.model.id, exc)
            await sleep_unless(lost, 0.25)

    async def _watch(self, nodes: list[str], sessions: dict[str, str], stopping: asyncio.Event) -> list[str]:
        """Until a node of the plan is lost (returns them) or `stopping` (returns []). An agent that restarted (a new
        session) took its ranks with it, even if it reports again within seconds: that node counts as lost too
        (its rank, perhaps the leader, is gone, and the ranks left would wait on it for good)."""
        while not stopping.is_set():
            await sleep_unless(stopping, 1.0)
            try:
                await self.orders.listen()
                statuses = {s.facts.id: s for s in await read_nodes(self.link.nc.jetstream())}
            except Exception as exc:  # NATS away a moment: judge nothing on no news
                log.warning("could not read the nodes' statuses: %s", exc)
                continue
            lost = [n for n in nodes if n not in statuses or state_of(statuses[n]) == "lost"
                    or statuses[n].facts.session != sessions[n]]
            if lost and not stopping.is_set():  # (a node seen gone as this group stops: its stop, not a loss)
                return lost
        return []


@dataclass
class Running:
    """An instance of the plan, kept running by its controller until `ending`."""

    plan: InstancePlan
    ending: asyncio.Event
    task: asyncio.Task
    controller: Controller | None = None  # None while its model is being found, or if this machine has none


async def control(link, store: ModelStore, workdir: Path, lost: asyncio.Event) -> None:
    """What the holder of the controller lease does (pipeline/lease.py) until `lost`: keep every instance of the
    plan the first machine wrote placed and running, by their facts in the catalogue. The plan is read every
    PLAN_POLL_S: an instance added starts, one removed is drained and stopped (`retire`), one whose settings or
    request changed is stopped and placed again; an instance in the bucket that no plan names (a model the first
    machine served before it restarted with another) is cleared away."""
    orders = Orders(link, uuid.uuid4().hex[:12])  # one session: every agent follows this controller's orders
    orders.loop = asyncio.get_running_loop()
    placing = asyncio.Lock()
    running: dict[str, Running] = {}
    retiring: dict[str, asyncio.Task] = {}
    previous: dict[str, InstancePlan] | None = None  # the plan's instances at the last read

    def start(entry: InstancePlan) -> Running:
        ending = asyncio.Event()
        run = Running(entry, ending, None)
        run.task = asyncio.create_task(keep_instance(link, orders, store, entry, workdir, placing, ending, run))
        return run

    # Woken as the plan is written (a switch waits for this), besides reading it every PLAN_POLL_S.
    written = asyncio.Event()
    watching = None

    async def on_plan(msg) -> None:
        written.set()

    async def end_instances_when_lost() -> None:
        # At once, not when the loop below next looks: as this machine stops, its own agent's status goes too, and an
        # instance that read the nodes before hearing it should end would take this machine for a lost node.
        await lost.wait()
        for run in running.values():
            run.ending.set()

    ending_all = asyncio.create_task(end_instances_when_lost())
    try:
        while not lost.is_set():
            try:
                if watching is None or watching[0] is not link.nc:  # the link may replace its connection
                    watching = (link.nc, await link.nc.subscribe(PLAN_SUBJECT, cb=on_plan))
                placed = {i.model for i in await read_instances(link.nc.jetstream())}
                plan = await read_plan(link.nc.jetstream())
            except Exception as exc:
                log.warning("could not read the cluster's plan: %s", exc)
                await sleep_unless(lost, 1.0)
                continue
            if plan is None:  # not written yet, or an earlier version's: nothing is stopped on no news
                await sleep_unless(lost, 1.0)
                continue
            now = {entry.model: entry for entry in plan.instances()}
            # Acted on once two reads in a row agree (a direct get may come from a replica a moment behind a write);
            # at the first, what to run at once, and nothing to stop.
            first, previous = previous is None, (now if previous is None else previous)
            wanted = {model: entry for model, entry in now.items() if previous.get(model) == entry}
            unwanted = set() if first else (set(running) | placed) - now.keys() - previous.keys()
            settled, previous = now == previous, now
            for model in [m for m, task in retiring.items() if task.done()]:
                del retiring[model]
            for model, run in list(running.items()):
                changed = model in wanted and wanted[model] != run.plan
                if run.task.done() or changed or model in unwanted:
                    del running[model]
                    retiring[model] = asyncio.create_task(retire(link, model, run, model in unwanted, lost))
            for model, entry in wanted.items():
                if model not in running and model not in retiring:
                    running[model] = start(entry)
            for model in unwanted - running.keys() - retiring.keys():  # in the bucket, no plan names it
                retiring[model] = asyncio.create_task(retire(link, model, None, True, lost))
            if settled:  # until the plan is written, PLAN_POLL_S, or the lease is lost
                await sleep_until_any(PLAN_POLL_S, written, lost)
                written.clear()
            await sleep_unless(lost, 0.0 if settled else PLAN_CONFIRM_S)
    finally:
        ending_all.cancel()
        for run in running.values():
            run.ending.set()
        if watching is not None:
            with contextlib.suppress(Exception):
                await watching[1].unsubscribe()
        await asyncio.gather(*(run.task for run in running.values()), *retiring.values(), return_exceptions=True)
        await orders.close()


async def keep_instance(link, orders: Orders, store: ModelStore, entry: InstancePlan, workdir: Path,
                        placing: asyncio.Lock, ending: asyncio.Event, run: Running) -> None:
    said = ""
    while not ending.is_set():  # its facts, from the catalogue (ops/catalogue.py): this machine needs no copy
        try:
            model = await entry_for(link.nc.jetstream(), store, entry.model)
            why = "" if model is not None else "not in the cluster's catalogue: no node has its files"
        except Exception as exc:  # NATS away a moment
            model, why = None, f"its facts could not be read from the catalogue ({exc})"
        if model is not None:
            break
        if why != said:
            log.error("cannot place %s: %s", entry.model, why)
            with contextlib.suppress(Exception):
                await put_instance(link.nc.jetstream(), Instance(model=entry.model, created=0, time=time.time(),
                                                                 why=why))
            said = why
        await sleep_unless(ending, CATALOGUE_WAIT_S)
    else:
        return
    run.controller = Controller(link, orders, model, entry, workdir / subject_token(model.id), placing)
    await run.controller.run(ending)


async def retire(link, model: str, run: Running | None, removed: bool, lost: asyncio.Event) -> None:
    """Stop an instance: drained first when it was removed from the plan (`removed`), then its group stopped; a
    removed model's consumer (jobs still queued for it are then answered `model_not_found`) and instance go."""
    if run is not None:
        if removed and run.controller is not None:
            await run.controller.drain(lost)
        run.ending.set()
        (ended,) = await asyncio.gather(run.task, return_exceptions=True)
        if isinstance(ended, Exception):  # a bug: said, and the next round of `control` starts it again
            log.error("the controller of %s failed: %r", model, ended)
    if removed and not lost.is_set():
        try:
            await retire_consumer(link.nc.jetstream(), model)
            await delete_instance(link.nc.jetstream(), model)
            log.info("%s is no longer served", model)
        except Exception as exc:  # the next round of `control` finds it in the bucket and tries again
            log.warning("could not clear %s away: %s", model, exc)
