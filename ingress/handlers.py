"""The HTTP routes, one function each. What they share (NATS, the models, admission) is the app's
`Ingress` (ingress/app.py), reached through `request.app.state.ingress`."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ingress.errors import APIError
from ingress.reading import read_request
from ingress.requests import chat_job, completion_job
from ingress.respond import respond
from ingress.shapes import CHAT, COMPLETION
from pipeline.access import INSTANCES_SUBJECT, PLACE_SUBJECT
from pipeline.limits import PayloadLimits
from pipeline.lease import read_lease
from pipeline.nodes import links_between, read_instances, read_nodes, state_of
from schemas.membership import InstanceChange, ModelPlacement
from schemas.openai import ChatCompletionRequest, CompletionRequest, ModelList

encode = msgspec.json.Encoder().encode
LOAD_RETRY_S = 1.0  # between asks to load a model that is being unloaded


def request_limit(ingress) -> int:
    """The largest body a job can be made of (a job is at most a quarter of NATS's max_payload)."""
    return PayloadLimits(ingress.link.nc.max_payload).job_bytes


async def chat_completions(request: Request) -> Response:
    return await complete(request, ChatCompletionRequest, chat_job, CHAT)


async def completions(request: Request) -> Response:
    return await complete(request, CompletionRequest, completion_job, COMPLETION)


async def complete(request: Request, request_type, make_job, shape) -> Response:
    ingress = request.app.state.ingress
    req = await read_request(request, request_type, request_limit(ingress))
    job = make_job(req, request.state.caller)  # set by the API key check (ingress/app.py: guarded)
    await model_for(ingress, req.model)  # after the request was checked: a refused one loads nothing
    return await respond(request, ingress, job, req.stream, include_usage(req), shape)


def include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def list_models(request: Request) -> Response:
    """Every model of the cluster's catalogue, loaded or not, each with its `status` (Conclave's field)."""
    ingress = request.app.state.ingress
    return Response(encode(ModelList(data=ingress.cards())), media_type="application/json")


async def get_model(request: Request) -> Response:
    ingress = request.app.state.ingress
    name = request.path_params["model"]
    card = next((c for c in ingress.cards() if c.id == name), None) or ingress.require_model(name)
    return Response(encode(card), media_type="application/json")


async def model_for(ingress, name: str) -> None:
    """A request's model: one this ingress serves, or one of the cluster's catalogue that nothing runs, which the
    first machine is asked to load (ops/instances.py: load); the request then waits in the model's queue until it
    serves, like any queued job. A model being unloaded is loaded again once it is gone. Anything else: 404."""
    if name in ingress.models:
        return
    if name not in ingress.catalogue:
        ingress.require_model(name)  # raises model_not_found
    deadline = time.monotonic() + ingress.config.queue_timeout_s
    while True:
        try:
            await ask_first_machine(ingress, INSTANCES_SUBJECT, InstanceChange(load=name))
            break
        except APIError as exc:
            if exc.detail.code != "instance_stopping" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(LOAD_RETRY_S)
    ingress.loading(name)


async def cluster(request: Request) -> Response:
    """The nodes as their agents last reported them (a lost one is listed as lost, not dropped), the instances
    (each served model's live workers), and where the controller runs (null: none holds the lease)."""
    ingress = request.app.state.ingress
    try:
        statuses = await read_nodes(ingress.link.nc.jetstream())
        placed = {i.model: i for i in await read_instances(ingress.link.nc.jetstream())}
        lease = await read_lease(ingress.link.nc.jetstream())
    except Exception as exc:  # NATS away (or reconnecting)
        raise APIError(503, f"The cluster's state cannot be read right now ({type(exc).__name__}).",
                       type="server_error", code="nats_unavailable") from None
    now = time.time()  # after read_nodes, which puts its times on this clock as it reads (never in the future)
    nodes = [{**msgspec.to_builtins(status), "state": state_of(status, now), "last_seen_s": round(now - status.time, 3)}
             for status in statuses]
    instances = [{**(msgspec.to_builtins(placed[model]) if model in placed else {"model": model}),
                  "workers": [msgspec.to_builtins(s) for s in ingress.workers.live(model)]}
                 for model in {**ingress.models, **placed}]
    controller = {"node_id": lease.node_id, "host": lease.host} if lease is not None else None
    links = [msgspec.to_builtins(link) for link in links_between([s for s in statuses if state_of(s, now) == "up"])]
    return JSONResponse({"object": "cluster", "nodes": nodes, "links": links, "instances": instances,
                         "controller": controller})


async def placement(request: Request) -> Response:
    """A placement preview: where a model would run on the nodes up now, with each rank's memory, or why it cannot
    run (the first machine answers, ops/instances.py); nothing starts. Only on a cluster (`serve --cluster`)."""
    asked = await read_request(request, ModelPlacement, 65536)
    return JSONResponse(await ask_first_machine(request.app.state.ingress, PLACE_SUBJECT, asked))


async def list_instances(request: Request) -> Response:
    """The models the cluster runs, each with its state, nodes and the memory it reserves there."""
    ingress = request.app.state.ingress
    try:
        instances = await read_instances(ingress.link.nc.jetstream())
    except Exception as exc:  # NATS away (or reconnecting)
        raise APIError(503, f"The cluster's state cannot be read right now ({type(exc).__name__}).",
                       type="server_error", code="nats_unavailable") from None
    return JSONResponse({"object": "list", "data": [msgspec.to_builtins(i) for i in instances]})


async def add_instance(request: Request) -> Response:
    """Run another model on the cluster (ops/instances.py): 202 once it is in the plan (the controller places it
    within seconds: its state is in `GET /v1/cluster/instances`; requests for it wait in the queue meanwhile), 200
    when the plan had it already, exactly so."""
    asked = await read_request(request, ModelPlacement, 65536)
    answer = await ask_first_machine(request.app.state.ingress, INSTANCES_SUBJECT, InstanceChange(add=asked))
    return JSONResponse(answer, status_code=202 if answer.get("changed") else 200)


async def remove_instance(request: Request) -> Response:
    """Stop running a model that was added: no new request is taken for it, the ones it has are answered, then its
    ranks stop."""
    change = InstanceChange(remove=request.path_params["model"])
    return JSONResponse(await ask_first_machine(request.app.state.ingress, INSTANCES_SUBJECT, change))


async def ask_first_machine(ingress, subject: str, asked) -> dict:
    """The first machine's answer (ops/instances.py), or its error as OpenAI's error object."""
    try:
        msg = await ingress.link.nc.request(subject, encode(asked), timeout=30)
    except nats.errors.NoRespondersError:
        try:
            lease = await read_lease(ingress.link.nc.jetstream())
        except Exception:  # NATS away: as if none
            lease = None
        if lease is not None:  # a cluster whose first machine is gone: a controller holds the lease
            raise APIError(503, "The cluster's first machine is not running: it answers this (placement previews "
                           "and instances need it; serving does not).", code="first_machine_unavailable") from None
        raise APIError(404, "This deployment is not a cluster: this needs `conclave serve --cluster` (on one "
                       "machine, use `conclave place`).", code="not_a_cluster") from None
    except Exception as exc:  # NATS away, or the first machine busy
        raise APIError(503, f"The first machine did not answer ({type(exc).__name__}).",
                       code="controller_unavailable") from None
    answer = msgspec.json.decode(msg.data)
    if answer.get("type") == "error":
        code = answer.get("code")
        raise APIError(answer.get("status", 400), answer["message"], code=code,
                       param="model" if code == "model_not_found" else None)
    return answer


async def metrics(request: Request) -> Response:
    """Prometheus's text format; behind the API key like the /v1 routes (Prometheus sends it as a bearer token)."""
    ingress = request.app.state.ingress
    return Response(await ingress.metrics.render(ingress), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    """200 when NATS is connected and every model has a live worker with no problem (one whose audit records
    are refused settles nothing), else 503. With a valid API key (or none configured) the live workers and
    their problems are listed; without, only the status (hosts, pids and jobs are not for anyone who can
    reach the port)."""
    ingress = request.app.state.ingress
    connected = ingress.link.is_connected
    live = {m: ingress.workers.live(m) for m in ingress.models}
    problems = sorted({s.problem for workers in live.values() for s in workers if s.problem})
    ready = connected and all(live.values()) and not problems
    body: dict = {"status": "ok" if ready else "unavailable"}
    if getattr(request.state, "caller", None) is not None:
        body |= {"nats": "connected" if connected else "disconnected", "problems": problems,
                 "models": {m: {"live_workers": [msgspec.to_builtins(s) for s in w]} for m, w in live.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)
