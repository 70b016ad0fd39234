"""`conclave serve`: nats-server (embedded unless --nats-url), one worker group per model, the ingress.

Every child is supervised (ops/supervise.py): a nats-server or worker that exits or hangs is restarted
with backoff and said so in one log line. Shutdown order on Ctrl-C / SIGTERM: stop taking HTTP
requests, stop the workers (their unfinished jobs go back to JetStream), then stop nats-server, so
nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import uvicorn

from ingress.app import IngressConfig, answering_hosts, create_app
from ops.catalogue import keep_catalogue
from ops.agent import Offer, keep_reporting, node_id
from ops.controller import control as control_model
from ops.instances import Refused, answer_instances, answer_previews, keep_instances, load
from ops.model_files import NodeFiles
from ops.node import LOST_BROKER_S, follow_the_controller
from ops.ranks import RankKeeper, obey
from pipeline.lease import change_plan, lead
from ops.discovery import default_cluster_name, host_addresses
from ops.cluster_tls import ensure_cluster_tls, fingerprint, tls_dir
from ops.config import ROUTE_PORT
from ops.brokers import FirstBroker, broker_routes, keep_announcing_users, make_streams
from ops.join import DEFAULT_BROKER_PORT, answer_joins, broker_url, make_token
from ops.credentials import cluster_ca, public_keys, role_identity, write_authorization
from ops.deployment import Deployment, DeploymentError, claim_home, forget_deployment, record_deployment
from ops.group import GroupSpec, GroupSpecError, plan_group, rank_arguments
from ops.supervise import GroupSupervisor, keep_broker_running
from pipeline.access import AUDITOR, INGRESS, JOINER, OPERATOR, Identity, worker_role
from pipeline.checkpoints import (keep_checkpointing, load_signing_key, public_key_text, sign_new_entries,
                                  signing_key_path)
from pipeline.connection import Link, NatsUnreachable, connect_once, persist, redacted
from pipeline.nodes import put_instance
from pipeline.nats_server import KEY_VARIABLE, EmbeddedNats
from pipeline.streams import ensure_consumer, ensure_streams
from pipeline.unrouted import keep_sweeping
from schemas.cluster import PlacementRequest
from schemas.membership import ControllerPlan, Instance, InstancePlan, Lease, WorkerSettings
from schemas.openai import ModelCard
from workers.cpu_path import rank_command
from workers.store import ModelStore, StoredModel, StoreError, model_context_length

log = logging.getLogger("conclave.serve")
READY_LINE = "Conclave is serving"  # printed once the worker is ready; launchers wait for it


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` owns the signals so it can stop the children too."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def stop(self) -> None:
        """Stop serving: through uvicorn's exit handler, which sse-starlette also hears, so the dashboard's live
        streams end (ingress/live.py) instead of holding the shutdown open."""
        self.handle_exit(signal.SIGTERM, None)


@dataclass
class ClusterSettings:
    """`conclave serve --cluster`: the broker listens on the LAN (TLS from the first byte, ops/cluster_tls.py)."""

    listen: str = "0.0.0.0"  # the broker's address on this machine
    name: str = field(default_factory=default_cluster_name)
    address: str | None = None  # what other machines dial; default: this machine's first non-loopback IPv4
    memory_limit: int | None = None  # bytes this node offers placement at most
    mdns: bool = True  # advertise the cluster on the LAN (ops/discovery.py)
    request: PlacementRequest = field(default_factory=PlacementRequest)  # context, batch and pins to place for
    brokers: int = 1  # 1: this machine's; 3: with two nodes that join with --broker (ops/brokers.py)
    route_port: int = ROUTE_PORT  # with 3 brokers: this one's route listener
    keep_alive_s: float = 300.0  # idle seconds a model loaded on demand stays loaded (ops/instances.py)

    def advertised_host(self) -> str:
        return self.address or next(iter(host_addresses()), None) or socket.gethostname()

    def advertised(self, port: int) -> str:
        return self.advertised_host() if port == DEFAULT_BROKER_PORT else f"{self.advertised_host()}:{port}"

    def first_broker(self, port: int) -> FirstBroker:
        return FirstBroker(url=broker_url(self.advertised(port)),
                           route=f"{self.advertised_host()}:{self.route_port}" if self.brokers > 1 else None)


async def advertise_cluster(cluster: ClusterSettings, ca: str, nats_port: int, http_port: int):
    """The cluster on the LAN by mDNS, for `conclave join` without an address; a convenience only: a network that
    drops multicast is said in one line, and joining by address always works."""
    from ops.discovery import Advert, advertise_async

    if not cluster.mdns:
        return None
    try:
        return await advertise_async(Advert(name=cluster.name, cluster_id=ca[:16], port=nats_port, ca=ca,
                                            addresses=(cluster.advertised_host(),), http_port=http_port))
    except Exception as exc:
        log.warning("could not advertise the cluster by mDNS (%s): nodes must join by address", exc)
        return None


def worker_command(model: StoredModel, spec: GroupSpec, nats_url: str, identity: Identity,
                   settings: WorkerSettings) -> Callable[[str, Path], list[str]]:
    # The seed's path, not the seed: arguments are visible to every local user (ps). Ranks on other hosts
    # read the same path there (copy the home's credentials/roles/worker-*.nk with the model).
    def command(group_id: str, folder: Path) -> list[str]:
        return rank_command("workers.worker", "--model-id", model.id, "--model-dir", str(model.path),
                            "--nats-url", nats_url, "--nats-seed", str(identity.seed_file), "--group-id",
                            group_id, "--alive-dir", str(folder), *settings.arguments(), *rank_arguments(spec),
                            *(["--nats-ca", str(identity.ca_file)] if identity.ca_file else []))

    return command


async def serve_plan(js, served: InstancePlan) -> None:
    """The cluster's plan as this `serve` starts: its model, and the instances added before (ops/instances.py) that
    are not its model; a model an earlier `serve` was started with is no longer served (ops/controller.py)."""
    await change_plan(js, lambda before: ControllerPlan(served=served, added=[
        i for i in (before.added if before is not None else []) if i.model != served.model],
        keep_alive={m: s for m, s in (before.keep_alive if before is not None else {}).items() if m != served.model}))


async def serve(home: Path, model_spec: str, host: str, port: int, nats_url: str | None, nats_port: int,
                api_keys: dict[str, str], worker_timeout_s: float, max_queue_wait_s: float, group: GroupSpec,
                settings: WorkerSettings, checkpoint_interval_s: float = 60.0, cluster: ClusterSettings | None = None,
                replicas: int = 1) -> None:
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    claim_home(home)
    model = ModelStore(home / "models").resolve(model_spec)
    group = plan_group(group, model.path)
    if nats_url is not None and redacted(nats_url) != nats_url:
        # It would reach every worker's command line, readable by any local user; Conclave's processes prove
        # who they are with the home's nkeys instead (ops/credentials.py).
        raise DeploymentError("--nats-url must not carry a user name or password: Conclave authenticates to NATS "
                              "with the nkeys in <home>/credentials (see README, Trust)")
    if nats_url is None and not all(h.is_local for h in group.hosts):
        raise GroupSpecError("a group with ranks on other hosts needs --nats-url: a NATS server every host can "
                             "reach (the embedded one listens on 127.0.0.1 only)")
    if group.size > 1:
        log.info("serving %s on %d ranks (%s parallel, %s backend%s)", model.id, group.size, group.layout,
                 group.backend, f", layers per rank {group.split}" if group.split else "")
    log.info("API keys: %s", ", ".join(api_keys) if api_keys else
             "none configured, /v1 routes are open to anyone who reaches the port")
    stopping = asyncio.Event()
    # Every role's key exists before the server's authorization is written from them (ops/credentials.py).
    operator, ingress, auditor = (role_identity(home, role) for role in (OPERATOR, INGRESS, AUDITOR))
    worker = role_identity(home, worker_role(model.id))
    signing_key = load_signing_key(signing_key_path(home), create=True)
    nats_server = broker = tls = None
    own = node_id(home)
    if cluster is not None:
        if nats_url is not None:
            raise DeploymentError("--cluster opens the embedded broker to the LAN; with --nats-url, your own NATS "
                                  "server is the cluster's broker (see README, Cluster)")
        if group.size > 1:
            raise DeploymentError("--cluster places the model on the cluster's nodes itself; preview it with "
                                  "`conclave place`, and leave out --tensor-parallel, --pipeline-parallel and --group")
        tls = ensure_cluster_tls(home)
        role_identity(home, JOINER)  # the join token's key, in the authorization before the server starts
        operator, ingress, auditor, worker = (replace(i, ca_file=cluster_ca(home))
                                              for i in (operator, ingress, auditor, worker))
        first = cluster.first_broker(nats_port)
        if first.route is not None:
            replicas = cluster.brokers
    if nats_url is None:
        nats_server = EmbeddedNats(home / "nats", port=nats_port, encryption_key=os.environ.get(KEY_VARIABLE),
                                   host=cluster.listen if cluster else "127.0.0.1", tls_dir=tls,
                                   **({"name": own, "cluster_port": cluster.route_port,
                                       "routes": broker_routes(home, first)} if cluster and first.route else {}))
        write_authorization(nats_server.store_dir, public_keys(home))
        await asyncio.to_thread(nats_server.start)
        nats_url = nats_server.url
        broker = asyncio.create_task(keep_broker_running(nats_server, stopping))
    # The operator's own connection: it makes the streams and the model's consumer (no other role may),
    # answers jobs nobody will take, and signs the audit log's checkpoints.
    try:  # once, without retrying: a server that refuses this home's keys would be retried forever below
        await (await connect_once(nats_url, "conclave-serve", operator)).close()
    except NatsUnreachable as exc:
        if "authorization" not in str(exc).lower():
            raise
        raise DeploymentError(f"the NATS server at {redacted(nats_url)} does not know this home's operator key: "
                              f"install the output of `conclave --home {home} credentials server-config --model "
                              f"{model.id}` in its configuration and reload it (see README, Trust)") from None
    reopen: list[Callable] = []  # subscriptions made again on every connection the link opens

    async def subscribe(nc) -> None:
        for made in reopen:
            await made(nc)

    control = Link(nats_url, "conclave-operator", operator, on_open=subscribe)
    advertising = None
    if cluster is not None:  # before the streams: with three brokers, two more machines must join first
        reopen.append(lambda nc: answer_joins(nc, home, own, cluster.name, first))
    await control.open()
    if cluster is not None:
        ca = fingerprint(cluster_ca(home).read_bytes())
        advertising = await advertise_cluster(cluster, ca, nats_port, port)
        print(f"Other machines join this cluster with:\n  conclave join {cluster.advertised(nats_port)} --token "
              f"{make_token(home, ca)}" + (" (two of them with --broker)" if first.route else ""), flush=True)
    if cluster is not None and first.route:
        await make_streams(control, replicas)
    else:
        await persist(lambda: ensure_streams(control.nc.jetstream(), replicas), 30.0)
    await persist(lambda: ensure_consumer(control.nc.jetstream(), model.id, 5 * settings.heartbeat_s), 30.0)
    log.info("audit checkpoints are signed with %s (give it to your auditors: conclave audit verify "
             "--public-key)", public_key_text(signing_key))
    shutil.rmtree(home / "groups", ignore_errors=True)  # folders of groups an earlier serve left behind
    offer = Offer(memory_limit=cluster.memory_limit if cluster else None,
                  address=cluster.advertised_host() if cluster else "127.0.0.1")
    context_length = model_context_length(model.path)
    if cluster is not None:
        # The model is placed on the cluster's nodes, this one included, by the controller, not by flags: this
        # machine's while it holds the lease (a broker node's once it is gone), through each node's agent.
        store = ModelStore(home / "models")
        await persist(lambda: serve_plan(control.nc.jetstream(), InstancePlan(model=model.id, settings=settings,
                                                                              request=cluster.request)), 30.0)
        changing = asyncio.Lock()  # one change of the plan at a time: asked for, kept (keep-alive, room), swept
        for answering in (lambda nc: answer_previews(nc, store),
                          lambda nc: answer_instances(nc, home, store, cluster.keep_alive_s, changing)):
            reopen.append(answering)
            await answering(control.nc)
        # This machine's agent; its ranks of each model connect as that model's worker role (ops/instances.py
        # makes one for every model added).
        keeper = RankKeeper(home, own, offer.address, nats_url, lambda model_id: replace(
            role_identity(home, worker_role(model_id)), ca_file=cluster_ca(home)))
        files = NodeFiles(store, own, offer.address, tls_dir(home))  # this machine's model files, for the others
        await files.start()
        lease = Lease(node_id=own, session=offer.session, host=socket.gethostname())

        async def run_node_parts() -> None:
            # The controller stops its group through the agents, this one's included: the agent stops after it.
            await follow_the_controller(lead(control, lease, stopping, lambda lost: control_model(
                control, store, home / "controller", lost), first=True),
                lambda done: obey(control, keeper, files, done, LOST_BROKER_S), stopping)

        running, fetching, workers = keeper.running, files.report, asyncio.create_task(run_node_parts())
    else:
        supervisor = GroupSupervisor(group, worker_command(model, group, nats_url, worker, settings), home / "groups",
                                     settings.heartbeat_s)
        running, fetching, workers = supervisor.running, list, asyncio.create_task(supervisor.run())
        instance = Instance(model=model.id, created=model.created, context_length=context_length, state="serving",
                            nodes=[own], layout=group.layout, why="this machine (serve without --cluster)",
                            time=time.time())
        await persist(lambda: put_instance(control.nc.jetstream(), instance), 30.0)
    sweeping = None
    if cluster is not None:
        async def sweeping(model: str):  # a job for an idle model of the cluster loads it
            try:
                async with changing:
                    await load(control.nc, home, ModelStore(home / "models"), model, cluster.keep_alive_s)
                return None
            except Refused as exc:  # unloading: loaded again once gone; else its jobs get the refusal
                return None if exc.code == "instance_stopping" else (exc.status, exc.code, str(exc))
            except StoreError as exc:  # not a model id
                return 404, "model_not_found", str(exc)
            except Exception as exc:  # NATS away a moment: left for the next sweep
                log.warning("could not load %s for the jobs waiting for it: %s", model, exc)
                return None
    background = [asyncio.create_task(keep_sweeping(control, f"{socket.gethostname()}:{os.getpid()}", sweeping)),
                  asyncio.create_task(keep_reporting(control, home, running, stopping, offer, fetching)),
                  asyncio.create_task(keep_checkpointing(control, signing_key, checkpoint_interval_s, stopping))]
    if cluster is not None and first.route:
        background.append(asyncio.create_task(keep_announcing_users(control, home, stopping)))
    if cluster is not None:
        background.append(asyncio.create_task(keep_instances(control, stopping, changing)))
        background.append(asyncio.create_task(keep_catalogue(control, ModelStore(home / "models"), own, stopping)))
    http_url = f"http://{host}:{port}/v1"
    # Other commands (conclave audit, ...) find this deployment's NATS through this record (ops/deployment.py).
    record_deployment(home, Deployment(pid=os.getpid(), http_url=http_url, nats_url=nats_url,
                                         cluster=cluster is not None))
    card = ModelCard(id=model.id, created=model.created, context_length=context_length)
    app = create_app(IngressConfig(nats_url=nats_url, identity=ingress, models=[card], cluster=cluster is not None,
                                   queue_timeout_s=settings.queue_ttl_s,
                                   worker_timeout_s=worker_timeout_s, api_keys=api_keys,
                                   status_ttl_s=4 * settings.heartbeat_s, max_queue_wait_s=max_queue_wait_s,
                                   auditor=auditor, audit_key=public_key_text(signing_key),
                                   hosts=answering_hosts(host, api_keys)))
    server = SignalFreeServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)

    async def announce_when_ready():
        while not server.started:
            await asyncio.sleep(0.05)
        await app.state.ingress.workers.wait_live(model.id)
        print(f"{READY_LINE} {model.id} at {http_url} (NATS {redacted(nats_url)})", flush=True)

    ready = asyncio.create_task(announce_when_ready())

    def ended(task: asyncio.Task) -> None:
        if not server.should_exit:  # the workers' supervisor, or the controller and this machine's agent, failed
            log.error("the workers' supervision ended (%s): stopping, for the service manager to restart it",
                      "cancelled" if task.cancelled() else task.exception())
            server.stop()

    workers.add_done_callback(ended)
    try:
        await server.serve()
    finally:
        stopping.set()
        ready.cancel()
        if cluster is None:
            await asyncio.to_thread(supervisor.stop)
            workers.cancel()
        else:  # the controller stops its group itself once `stopping` is set
            await asyncio.gather(workers, return_exceptions=True)
            await files.stop()
        if advertising is not None:
            await advertising.close()
        for task in background:
            task.cancel()
        try:  # the workers are stopped: a last checkpoint vouches for every record they wrote
            await asyncio.wait_for(sign_new_entries(control.nc.jetstream(), signing_key), 10.0)
        except Exception as exc:
            log.warning("no last audit checkpoint at shutdown (%s); the next start signs one", exc)
        await control.close()
        if nats_server is not None:
            await asyncio.to_thread(nats_server.stop)
            await broker
        forget_deployment(home)
        print("Conclave stopped.", flush=True)
