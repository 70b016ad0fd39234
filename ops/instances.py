"""What the cluster runs, asked of the first machine: placement previews, and instances added and removed.

An ingress on any node asks (`POST /v1/cluster/placement`, `POST` and `DELETE /v1/cluster/instances`) and the
first machine's `serve --cluster` answers, because only it has what the answers need: the credentials (a new model's workers get a NATS role of
their own, pipeline/access.py) and the operator's rights (a model's consumer, the plan in the control bucket).

Adding an instance does what `serve` does for its own model before the controller places it: the worker role,
the broker's authorization reloaded (and announced to the other brokers at once, ops/brokers.py), the consumer
its jobs wait in, then the plan. The controller, wherever it runs, reads the plan within seconds and places the
new model on what the others leave (ops/controller.py). Requests for it are queued from the moment an ingress
lists it. Removing one takes it out of the plan: the controller drains and stops it. The model `serve` was
started with stays as long as that `serve` runs: a different one is served by restarting it with `--model`.

Changes are made one at a time (a lock `serve` shares between the answers here, `keep_instances` and the loads
the sweep asks for), so two changes never interleave their read and write of the plan, nor unload a model twice
for one room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec

from ops.brokers import announce_users
from ops.credentials import apply_authorization, role_identity
from ops.catalogue import entry_for
from ops.placement import offers, place
from pipeline.access import INSTANCES_SUBJECT, PLACE_SUBJECT, worker_role
from pipeline.catalogue import read_entry
from pipeline.connection import answer, sleep_unless
from pipeline.lease import change_plan, read_plan
from pipeline.nodes import links_between, put_instance, read_instances, read_nodes, state_of
from pipeline.streams import ensure_consumer, model_use
from pipeline.limits import UNDECODABLE
from schemas.cluster import CatalogueEntry, PlacementRequest
from schemas.membership import ControllerPlan, Instance, InstanceChange, InstancePlan, ModelPlacement
from workers.store import DEFAULT_MODEL, ModelStore, StoreError

log = logging.getLogger("conclave.instances")
KEEP_POLL_S = 0.25  # how often placing instances are judged for room (a switch waits for it), and idle ones aged
encode = msgspec.json.Encoder().encode


class Refused(Exception):
    """An answer that is an error: its HTTP status and OpenAI error code, and the message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


async def catalogued(js, store: ModelStore, model: str) -> CatalogueEntry:
    """The model's facts from the cluster's catalogue (ops/catalogue.py: entry_for), or a 404."""
    found = await entry_for(js, store, model)
    if found is None:
        raise Refused(404, "model_not_found", f"{model} is in no node's model store (`conclave models pull` or "
                                              f"`import` it on one: nothing is downloaded here)")
    return found


def refusal(exc: Refused) -> bytes:
    return encode({"type": "error", "status": exc.status, "code": exc.code, "message": str(exc)})


async def answer_previews(nc, store: ModelStore):
    """Placement previews: `place` on the nodes up now, on what the running instances leave there, for any model in
    the catalogue; a Plan or a Refusal, nothing started. Returns the subscription."""
    async def preview(msg):
        try:
            asked = msgspec.json.decode(msg.data, type=ModelPlacement)
            js = nc.jetstream()
            model = await catalogued(js, store, asked.model)
            statuses = [s for s in await read_nodes(js) if state_of(s) == "up"]
            nodes = offers(model.id, statuses, await read_instances(js), everywhere=model.id == DEFAULT_MODEL)
            reply = encode(place(model.facts, nodes, links_between(statuses), asked.request()))
        except Refused as exc:
            reply = refusal(exc)
        except (*UNDECODABLE, ValueError) as exc:
            reply = refusal(Refused(400, "invalid_request", str(exc)))
        except Exception as exc:  # NATS away a moment, or the model's facts unreadable here
            log.warning("could not preview a placement: %s", exc)
            reply = refusal(Refused(503, "controller_unavailable", f"no preview could be made ({exc})"))
        await answer(msg, reply)

    return await nc.subscribe(PLACE_SUBJECT, cb=preview)


async def answer_instances(nc, home: Path, store: ModelStore, keep_alive_s: float | None,
                           changing: asyncio.Lock) -> object:
    """Instances added, loaded on demand (for `keep_alive_s` idle seconds) and removed (`InstanceChange`), into the
    plan the first machine's `serve` wrote, one change at a time (`changing`: also held by `keep_instances` and the
    sweep's loads). Returns the subscription."""
    async def change(msg):
        try:
            asked = msgspec.json.decode(msg.data, type=InstanceChange)
            async with changing:
                if asked.add is not None:
                    reply = await add(nc, home, store, asked.add)
                elif asked.load is not None:
                    reply = await load(nc, home, store, asked.load, keep_alive_s)
                elif asked.remove is not None:
                    reply = await remove(nc, asked.remove)
                else:
                    raise Refused(400, "invalid_request", "say which instance to add, load or remove")
        except Refused as exc:
            reply = refusal(exc)
        except (*UNDECODABLE, StoreError) as exc:
            reply = refusal(Refused(400, "invalid_request", str(exc)))
        except Exception as exc:  # NATS away a moment: the client may try again
            log.warning("could not change the instances: %s", exc)
            reply = refusal(Refused(503, "controller_unavailable", f"the plan could not be changed ({exc})"))
        await answer(msg, reply)

    return await nc.subscribe(INSTANCES_SUBJECT, cb=change)


def planned(plan: ControllerPlan | None) -> ControllerPlan:
    if plan is None:
        raise Refused(503, "controller_unavailable", "the cluster has no plan yet: `serve` is starting")
    return plan


async def add(nc, home: Path, store: ModelStore, asked: ModelPlacement) -> bytes:
    js = nc.jetstream()
    model = await catalogued(js, store, asked.model)
    instance = next((i for i in await read_instances(js) if i.model == model.id), None)
    if instance is not None and instance.state == "stopping":
        raise Refused(409, "instance_stopping", f"{model.id} is being removed (its last jobs are being answered): add "
                                                f"it again once it is gone from GET /v1/cluster/instances")
    # Room first (what to unload for it, or a refusal when it cannot fit at all), before anything is made for it.
    plan = planned(await read_plan(js))
    evicted = [] if model.id == plan.served.model else await make_room(js, model, asked.request(), plan)
    # Its workers' NATS role and its jobs' consumer exist before any controller places it (both made again as
    # they are when they exist).
    await asyncio.to_thread(role_identity, home, worker_role(model.id))
    await asyncio.to_thread(apply_authorization, home)
    await announce_users(nc, home)
    await ensure_consumer(js, model.id, 5 * plan.served.settings.heartbeat_s)
    if instance is None:
        # Listed by every ingress from now (requests wait in its queue), not only once the controller has read the
        # plan; before the plan is written, so that this never overwrites what the controller says of it.
        await put_instance(js, Instance(model=model.id, created=model.created, context_length=model.context_length,
                                        why="added; waiting for the controller", time=time.time()))

    changed = False

    def with_it(plan: ControllerPlan | None) -> ControllerPlan:
        nonlocal changed
        plan, changed = planned(plan), False
        entry = InstancePlan(model=model.id, settings=plan.served.settings, request=asked.request())
        if model.id == plan.served.model:
            if entry != plan.served:
                raise Refused(409, "instance_exists", f"{model.id} is the model `conclave serve` was started with: "
                                                      f"its placement is changed by restarting serve with other flags")
            return plan
        rest = without(plan, evicted)
        keep_alive = {m: s for m, s in rest.keep_alive.items() if m != model.id}
        if asked.keep_alive is not None:
            keep_alive[model.id] = asked.keep_alive
        added = rest.added if entry in rest.added else [i for i in rest.added if i.model != model.id] + [entry]
        new = msgspec.structs.replace(plan, added=added, keep_alive=keep_alive)
        changed = new != plan
        return new

    await change_plan(js, with_it)
    if evicted:
        log.info("unloading %s: the least recently used, idle, to make room for %s", ", ".join(evicted), model.id)
    if changed:
        log.info("instance of %s added (context %d x %d sequences)", model.id, asked.context, asked.sequences)
    return encode({"object": "cluster.instance", "model": model.id, "changed": changed, "unloaded": evicted})


async def load(nc, home: Path, store: ModelStore, model: str, keep_alive_s: float | None) -> bytes:
    """A model a request asked for (an ingress loads it on demand): nothing changes if the plan runs it already;
    else it is added as the served model's context and sequences say, for `keep_alive_s` idle seconds."""
    plan = planned(await read_plan(nc.jetstream()))
    if model in {i.model for i in plan.instances()}:
        return encode({"object": "cluster.instance", "model": model, "changed": False, "unloaded": []})
    request = plan.served.request
    return await add(nc, home, store, ModelPlacement(model=model, context=request.context,
                                                     sequences=request.sequences, keep_alive=keep_alive_s))


async def make_room(js, model: CatalogueEntry, request: PlacementRequest, plan: ControllerPlan) -> list[str]:
    """The added instances to unload so that `model` fits: none if it fits beside them; else the least recently used
    of those serving with no job queued or running (never the served model, never one answering), as few as make it
    fit; none while an instance is leaving (its memory is freed first: judged again then, not unloading another for
    the same room), and none if even all of those would not make room (it then waits, placing, until memory frees).
    Raises Refused when it could not fit even with every added instance unloaded."""
    known = await read_nodes(js)
    statuses = [s for s in known if state_of(s) == "up"]
    planned_models = {i.model for i in plan.instances()}
    others = [i for i in await read_instances(js) if i.model != model.id]
    facts = model.facts

    def fits(instances: list[Instance]) -> bool:
        nodes = offers(model.id, statuses, instances, everywhere=model.id == DEFAULT_MODEL)
        return bool(nodes) and hasattr(place(facts, nodes, links_between(statuses), request), "ranks")

    if not statuses or fits(others) or not offers(model.id, statuses, [], everywhere=model.id == DEFAULT_MODEL):
        return []  # (no node up holds its files: it waits, placing, for one to report them)
    alone = place(facts, offers(model.id, statuses, [i for i in others if i.model == plan.served.model],
                                everywhere=model.id == DEFAULT_MODEL), links_between(statuses), request)
    if not hasattr(alone, "ranks") and len(statuses) == len(known):  # (a lost node may come back with room)
        raise Refused(503, "model_does_not_fit", f"{model.id} cannot run on this cluster even with every model but "
                                                 f"the served one unloaded: {alone.reason}")
    if any(i.state == "stopping" or i.model not in planned_models for i in others):
        return []
    added = {i.model for i in plan.added}
    idle = []
    for instance in others:
        use = await model_use(js, instance.model) if instance.model in added and instance.state == "serving" else None
        if use is not None and use[0] == 0:
            idle.append((max(use[1], instance.time), instance.model))
    evicted = []
    for _, candidate in sorted(idle):
        evicted.append(candidate)
        if fits([i for i in others if i.model not in evicted]):
            return evicted
    return []


async def remove(nc, model: str) -> bytes:
    def without_it(plan: ControllerPlan | None) -> ControllerPlan:
        plan = planned(plan)
        if model == plan.served.model:
            raise Refused(409, "instance_in_use", f"{model} is the model `conclave serve` was started with: it is "
                                                  f"served as long as that serve runs")
        if model not in {i.model for i in plan.added}:
            raise Refused(404, "model_not_found", f"the cluster runs no instance of {model} that was added")
        return without(plan, [model])

    await change_plan(nc.jetstream(), without_it)
    log.info("instance of %s removed: it is drained and stopped", model)
    return encode({"id": model, "object": "cluster.instance", "deleted": True})


def without(plan: ControllerPlan, models: list[str]) -> ControllerPlan:
    """The plan without the added instances of `models` (and their keep-alives)."""
    return msgspec.structs.replace(plan, added=[i for i in plan.added if i.model not in models],
                                   keep_alive={m: s for m, s in plan.keep_alive.items() if m not in models})


async def keep_instances(link, stopping: asyncio.Event, changing: asyncio.Lock) -> None:
    """Until `stopping`, every KEEP_POLL_S: unload each added instance that has a keep-alive once it has served with
    no job queued or running for that long (from its consumer's last delivery, or when it started serving, whichever
    is later); and for each instance waiting to be placed, unload the idle instances that make room for it
    (`make_room`: one that was answering when it was loaded is unloaded once it is idle)."""
    # model -> when this loop last saw it serving with a job in hand, or first saw it serving (this machine's clock)
    busy: dict[str, float] = {}
    while not stopping.is_set():
        try:
            async with changing:
                await keep_round(link.nc.jetstream(), link.nc, busy)
        except Exception as exc:  # NATS away a moment: the next round sees
            log.warning("could not check the instances' keep-alive and room: %s", exc)
        await sleep_unless(stopping, KEEP_POLL_S)


async def keep_round(js, nc, busy: dict[str, float]) -> None:
    plan, instances = await read_plan(js), {i.model: i for i in await read_instances(js)}
    if plan is None:
        return
    for model in [m for m in busy if m not in instances or instances[m].state != "serving"]:
        del busy[model]
    for model, keep_alive_s in plan.keep_alive.items():
        if model not in instances or instances[model].state != "serving":
            continue
        use = await model_use(js, model)
        if use is None or use[0] > 0 or model not in busy:
            busy[model] = time.time()
        elif time.time() - max(busy[model], use[1]) > keep_alive_s:
            log.info("unloading %s: idle for its keep-alive (%gs)", model, keep_alive_s)
            await remove(nc, model)
            return  # the plan changed: read again next round
    for entry in plan.instances():
        waiting = instances.get(entry.model)
        if waiting is None or waiting.state != "placing":
            continue
        try:
            # The catalogue's entry only: reading a model's files here every second would hold the lock up.
            if (model := await read_entry(js, entry.model)) is None:
                continue
            evicted = await make_room(js, model, entry.request, plan)
        except Refused:  # it does not fit at all: its `why` says so
            continue
        except Exception as exc:  # its facts unreadable, say: the others are looked at still
            log.warning("could not judge the room %s needs: %s", entry.model, exc)
            continue
        if evicted:
            log.info("unloading %s: the least recently used, idle, to make room for %s", ", ".join(evicted), model.id)
            await change_plan(js, lambda current: without(planned(current), evicted))
            return
