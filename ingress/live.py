"""The dashboard's live view: one server-sent event stream per page (`GET /v1/cluster/events`), fed by NATS.

What a page sees changes when the cluster changes, and is pushed to it; nothing polls the whole state. One `Live`
per ingress follows NATS once, whatever the number of pages, and hands every page the same events:

- `snapshot`, first on every (re)connection: the nodes, the cluster view and the throughput history, so a page
  that reconnects after a drop is whole again;
- `node`, as each agent's status arrives (every second, from the nodes bucket's subject), and when this ingress
  judges a node lost (nothing heard for LOST_AFTER_S): a lost node stays on the page, marked lost, until the
  bucket forgets it too (`forget`, NODES_TTL_S later: a node removed from the cluster);
- `cluster` (links, controller, models with their instances and downloads), when it differs from the last sent;
- `throughput` every TICK_S: per served model, tokens per second (the growth of its workers' token counters),
  their time to first token, the jobs they run and those waiting in the model's queue;
- `audit`, when a record is stored (the first machine's dashboard only: ingress/audit.py).

A page that cannot keep up (its queue full) is dropped; its browser reconnects and starts again from a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import anyio
import msgspec
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from ingress.errors import APIError
from pipeline.lease import read_lease
from pipeline.nodes import LOST_AFTER_S, NODES_TTL_S, cluster_models, links_between, node_subject, read_nodes, state_of
from pipeline.subjects import NODES_PREFIX
from pipeline.limits import UNDECODABLE
from schemas.cluster import NodeStatus
from schemas.jobs import WorkerStatus
from schemas.membership import Instance

TICK_S = 0.5  # how often lost nodes, the cluster view and throughput are judged
HISTORY = 240  # throughput samples kept per model for a page that connects: two minutes
PAGE_QUEUE = 512  # events a page may fall behind by before it is dropped
PING_S = 15.0  # a comment line on an idle stream, so that proxies keep it open
SEND_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0  # a stopping server's wait for each open stream to end (it ends at once: `end_when_stopping`)
decode_status = msgspec.json.Decoder(NodeStatus).decode
encode = msgspec.json.Encoder().encode


def node_view(status: NodeStatus, now: float) -> dict:
    """A node as a page shows it: its status, up or lost, and how long ago it was heard."""
    return {**msgspec.to_builtins(status), "state": state_of(status, now), "last_seen_s": round(now - status.time, 1)}


def model_views(ingress, statuses: list[NodeStatus], instances: list[Instance]) -> list[dict]:
    """Every model the page lists: the catalogue (a cluster's; one machine's: the model it serves) with each one's
    instance (layout, nodes, layers, memory) and the downloads of its files under way on any node."""
    placed = {i.model: i for i in instances}
    if ingress.config.cluster:
        listed = [msgspec.to_builtins(m) for m in cluster_models(statuses, instances)]
    else:
        listed = [{"id": card.id, "status": card.status or "loaded", "files_on": [], "nodes": [],
                   "created": card.created, "context_length": card.context_length} for card in ingress.models.values()]
    views = []
    for model in listed:
        downloads = [{"node": s.facts.id, **msgspec.to_builtins(fetch)}
                     for s in statuses if state_of(s) == "up" for fetch in s.fetching if fetch.model == model["id"]]
        instance = placed.get(model["id"])
        views.append({**model, "instance": msgspec.to_builtins(instance) if instance else None,
                      "downloads": downloads})
    return views


class Live:
    def __init__(self, ingress):
        self.ingress = ingress
        self.pages: set[asyncio.Queue] = set()
        self.nodes: dict[str, NodeStatus] = {}  # by id; `time`: when it was stored (broker) or heard (here)
        self.lost: set[str] = set()
        self.last_cluster = b""
        self.pushing = asyncio.Lock()
        self.rates: dict[str, tuple[int, float, float]] = {}  # worker -> (its tokens, when heard, tokens/s)
        self.history: dict[str, deque] = {}
        self.connected = True  # this ingress's NATS connection, at the last tick
        self.since = 0.0  # when it last changed

    async def on_open(self, nc) -> None:
        await nc.subscribe(f"{NODES_PREFIX}.>", cb=self.on_node)

    async def on_node(self, msg) -> None:
        try:
            status = decode_status(msg.data or b"")  # a deleted or expired key's marker has no data
        except UNDECODABLE:
            return
        if msg.subject != node_subject(status.facts.id):  # not under its own key: forged (pipeline/nodes.py)
            return
        status = msgspec.structs.replace(status, time=time.time())  # judged on this clock, never the node's
        self.nodes[status.facts.id] = status
        self.lost.discard(status.facts.id)
        self.send("node", node_view(status, status.time))

    def send(self, event: str, data) -> None:
        message = {"event": event, "data": encode(data).decode()}
        for page in list(self.pages):
            try:
                page.put_nowait(message)
            except asyncio.QueueFull:  # too far behind: dropped; it reconnects and starts from a snapshot
                self.end(page)

    def end(self, page: asyncio.Queue) -> None:
        """End a page's stream: what it had not read yet is dropped, and its stream's next message is the end."""
        self.pages.discard(page)
        while not page.empty():
            page.get_nowait()
        page.put_nowait(None)

    async def run(self) -> None:
        """Every TICK_S: lost nodes, and a throughput sample (kept for pages that connect later); while pages are
        connected, the sample and the cluster view (when it changed) to each."""
        with contextlib.suppress(Exception):
            self.nodes.update({s.facts.id: s for s in await read_nodes(self.ingress.link.nc.jetstream())})
        while True:
            await asyncio.sleep(TICK_S)
            now = time.time()
            if (connected := self.ingress.link.is_connected) != self.connected:
                self.connected, self.since = connected, now
                self.send("nats", {"connected": connected})
            # Without NATS nothing is heard from any node: that says nothing of the nodes, and none is judged lost
            # until they have had time to report again.
            if connected and now - self.since > LOST_AFTER_S:
                self.judge(now)
            with contextlib.suppress(Exception):  # NATS away a moment: the next tick tries again
                sample = await self.throughput()
                for model in set(self.history) - set(sample):  # no longer served
                    del self.history[model]
                for model, figures in sample.items():
                    self.history.setdefault(model, deque(maxlen=HISTORY)).append({"time": now, **figures})
                if self.pages:
                    self.send("throughput", {"time": now, "models": sample})
                    await self.push_cluster()

    def judge(self, now: float) -> None:
        """Lost nodes to every page; nodes the bucket forgot (a removed node), off them."""
        for node_id, status in list(self.nodes.items()):
            if now - status.time > NODES_TTL_S:  # gone from the bucket too (a removed node): off the page
                del self.nodes[node_id]
                self.lost.discard(node_id)
                self.send("forget", {"id": node_id})
            elif node_id not in self.lost and state_of(status, now) == "lost":
                self.lost.add(node_id)
                self.send("node", node_view(status, now))

    async def push_cluster(self) -> None:
        """The cluster view to every page, if it changed: at each tick, and at once when the instances changed (a
        model's load goes placing, starting, serving within a second: each state is shown). One at a time, each from
        the latest state, so that pages never see an older view after a newer one."""
        async with self.pushing:
            view = await self.cluster_view()
            if (encoded := encode(view)) != self.last_cluster:
                self.last_cluster = encoded
                self.send("cluster", view)

    async def throughput(self) -> dict[str, dict]:
        """Per model served: from its workers' statuses, and (only while a page looks: it asks NATS) its queue."""
        ingress = self.ingress
        sample = {}
        live = {model: ingress.workers.live(model) for model in ingress.models}
        running = {status.worker for workers in live.values() for status in workers}
        self.rates = {worker: rate for worker, rate in self.rates.items() if worker in running}
        for model, workers in live.items():
            rate = sum(self.rate_of(w) for w in workers)
            in_flight = sum(w.active for w in workers)
            held = await ingress.admission.queued(ingress.link.nc.jetstream(), model) if self.pages else None
            ttfts = [w.ttft_s for w in workers if w.ttft_s]
            sample[model] = {"tokens_per_s": round(rate, 1), "in_flight": in_flight,
                             "queued": max(0, held - in_flight) if held is not None else None,
                             "ttft_s": round(sum(ttfts) / len(ttfts), 3) if ttfts else None}
        return sample

    def rate_of(self, status: WorkerStatus) -> float:
        """A worker's tokens per second between its last two statuses (a worker reports every heartbeat; the ticks
        here need not meet them): 0 for its first, or when its count fell (it restarted)."""
        heard = self.ingress.workers.seen[status.worker][1]
        tokens, before, rate = self.rates.get(status.worker, (status.tokens, heard, 0.0))
        if heard > before:
            rate = (status.tokens - tokens) / (heard - before) if status.tokens >= tokens else 0.0
        self.rates[status.worker] = (status.tokens, heard, rate)
        return rate

    async def cluster_view(self) -> dict:
        ingress = self.ingress
        js = ingress.link.nc.jetstream()
        statuses = list(self.nodes.values())
        up = [s for s in statuses if state_of(s) == "up"]
        lease = await read_lease(js)
        return {"cluster": ingress.config.cluster, "links": [msgspec.to_builtins(link) for link in links_between(up)],
                "controller": lease.node_id if lease is not None else None,
                "models": model_views(ingress, statuses, ingress.instances),
                "audit": ingress.audit is not None}

    async def snapshot(self) -> dict:
        now = time.time()
        view = await self.cluster_view()
        return {"nodes": [node_view(s, now) for s in self.nodes.values()], **view, "nats": self.connected,
                "history": {model: list(samples) for model, samples in self.history.items()}}


async def events(request: Request):
    """`GET /v1/cluster/events`: the page's live stream (above), behind the API key like every /v1 route."""
    live: Live = request.app.state.ingress.live
    page: asyncio.Queue = asyncio.Queue(PAGE_QUEUE)
    live.pages.add(page)  # before the snapshot: nothing sent meanwhile is missed (each event replaces, not adds)
    try:
        first = await live.snapshot()
    except Exception:  # NATS away: the page shows what it had, and its banner, and tries again
        live.pages.discard(page)
        raise APIError(503, "The cluster's state cannot be read right now.", type="server_error",
                       code="nats_unavailable") from None

    async def stream():
        try:
            yield {"event": "snapshot", "data": encode(first).decode()}
            while (message := await page.get()) is not None:
                yield message
        finally:
            live.pages.discard(page)

    # When the server stops, sse-starlette sets `stopping` and waits up to the grace period before it cancels the
    # stream: ended here, by a task of the response's own (sse-starlette runs `data_sender_callable` beside the stream
    # and cancels it with it), the response completes as a stream should (cancelled, uvicorn logs "ASGI callable
    # returned without completing response" for every open page).
    stopping = anyio.Event()

    async def end_when_stopping():
        await stopping.wait()
        live.end(page)

    # A page that stops reading (its machine asleep) is let go after SEND_TIMEOUT_S, not kept until TCP gives up.
    return EventSourceResponse(stream(), ping=PING_S, send_timeout=SEND_TIMEOUT_S, headers={"Cache-Control": "no-store"},
                               shutdown_event=stopping, shutdown_grace_period=STOP_GRACE_S,
                               data_sender_callable=end_when_stopping)
