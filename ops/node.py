"""`conclave join`: this machine as a node of a cluster, without a broker of its own.

It joins once (ops/join.py: by address, or found on the LAN by mDNS, ops/discovery.py) and from then on
runs the node agent: it reports the node's status every second (ops/agent.py), obeys the controller's orders
to start and stop worker ranks (ops/ranks.py) and, with `--port`, serves the OpenAI API too: an HTTP request
to any node reaches the same queue. After a reboot it reconnects with what it kept, without the token.

Two machines presenting one node id (a copied home) are refused twice: at join, when the keys differ, and
here, when an agent with another session is reporting under this id right now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

from ops.catalogue import keep_catalogue
from ops.cluster_tls import tls_dir
from ops.agent import REPORT_S, Offer, keep_reporting, node_id
from ops.deployment import DeploymentError
from ops.brokers import follow_users, offer
from ops.join import JoinError, broker_url, join, node_identities, parse_token, read_membership
from ops.supervise import keep_broker_running
from ops.model_files import NodeFiles
from ops.ranks import RankKeeper, obey
from pipeline.connection import Link, servers
from pipeline.nodes import decode_status, node_subject
from pipeline.subjects import NODES_STREAM
from workers.store import ModelStore

log = logging.getLogger("conclave.node")
READY_LINE = "Conclave node"  # printed once the agent reports; launchers wait for it
TWIN_WATCH_S = 3 * REPORT_S + 1.0
LOST_BROKER_S = 15.0  # an agent cut off this long stops its ranks: the controller has re-placed them by then


def route_address(url: str) -> str:
    """The address of this machine on the way to `url`'s host: the one other nodes can reach it on."""
    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    with contextlib.closing(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)) as s:
        s.connect((host, 9))  # UDP: nothing is sent; the kernel only picks the route
        return s.getsockname()[0]


async def find_brokers(token: str) -> list[str]:
    """The addresses of the token's cluster as mDNS found them. Anyone may advertise the token's (public) CA hash
    with another address: each is tried, and only the broker that proves the CA is joined (ops/join.py)."""
    from ops.discovery import browse_async, choose_cluster

    fingerprint, _ = parse_token(token)
    advert = choose_cluster(await browse_async(3.0), token_ca=fingerprint)
    print(f"found cluster {advert.describe()} by mDNS", flush=True)
    return [f"{address}:{advert.port}" for address in advert.addresses]


REFUSED_FOR_S = 30.0  # the broker reloads a new node's users within moments; refused this long, it was removed


async def open_link(url: str, name: str, identity, on_open=None) -> Link:
    """The agent's connection. Right after joining, the broker may not have reloaded its users yet; after a reboot
    the first machine may still be starting: retried, said once. Refused for REFUSED_FOR_S: removed, said so."""
    link, pause, said, started = Link(url, name, identity, on_open), 0.5, False, time.monotonic()
    while True:
        try:
            await link.open()
            return link
        except Exception as exc:
            if "authorization" in str(exc).lower() and time.monotonic() - started > REFUSED_FOR_S:
                raise JoinError(f"the cluster at {url} refuses this node's keys: it was removed (`conclave nodes "
                                f"remove`); join again with a token") from None
            if not said:
                log.warning("cannot reach the cluster's broker at %s yet (%s); retrying", url, exc)
                said = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def last_report(link: Link, own: str):
    try:
        return decode_status((await link.nc.jetstream().get_last_msg(NODES_STREAM, node_subject(own), direct=True)).data)
    except Exception:  # nothing reported under this id (or deleted at a clean stop): the usual case
        return None


async def refuse_a_twin(link: Link, own: str, offer: Offer) -> None:
    """Stop if another agent keeps reporting under this node id (a copied home on a second machine). A report of
    this machine's previous agent (a restart within seconds of a crash) is not a twin: that one stops reporting."""
    first = await last_report(link, own)
    if first is None or first.facts.session == offer.session:
        return
    await asyncio.sleep(TWIN_WATCH_S)  # whether it reports again: one more report, or none
    again = await last_report(link, own)
    if again is not None and again.facts.session == first.facts.session and again.time > first.time:
        raise DeploymentError(f"node id {own} is reporting from {again.facts.host} right now: this home is a copy of "
                              f"another machine's (a cloned disk or VM image). Stop one, or on this machine remove "
                              f"<home>/node-id and <home>/credentials and join again")


async def run_node(home: Path, address: str | None, token: str | None, memory_limit: int | None,
                   advertise: str | None, http: tuple[str, int] | None, api_keys: dict[str, str],
                   broker: tuple[int, int] | None = None) -> None:
    """`broker`: (client port, route port) of the broker this node offers to run when it joins (ops/brokers.py);
    a broker node runs it at every start after."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    own = node_id(home)
    membership = read_membership(home)
    if token:
        for candidate in [address] if address else await find_brokers(token):
            url = broker_url(candidate)
            make_offer = (lambda key: offer(home, advertise or route_address(url), *broker, key)) if broker else None
            try:
                membership = await join(home, url, token, own, make_offer)
                break
            except JoinError as exc:
                if address or "refused this node" in str(exc) or "refused the token" in str(exc):
                    raise
                log.warning("%s; trying the next address", exc)
        else:
            raise JoinError("no address the cluster was advertised at proved to be its broker")
        print(f"joined cluster {membership.cluster or '?'} at {membership.broker} as node {own}"
              + (" and broker" if membership.own_broker else ""), flush=True)
    elif membership is None:
        raise JoinError("this machine is not a member of a cluster yet: conclave join ADDRESS --token TOKEN (the "
                        "line `conclave serve --cluster` printed on the first machine)")
    elif broker and membership.own_broker is None:
        raise JoinError("a node offers a broker when it joins: join again with a token and --broker")
    identities = node_identities(home, own)
    offered = Offer(memory_limit=memory_limit, address=advertise or route_address(membership.broker))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with running_broker(home, own, membership, stopping) as nats_server:
        await run_agent(home, own, membership, identities, offered, http, api_keys, stopping, nats_server)


@contextlib.asynccontextmanager
async def running_broker(home: Path, own: str, membership, stopping: asyncio.Event):
    """A broker node's own nats-server (ops/brokers.py), supervised while the node runs and stopped after
    everything else (the ranks' and the ingress's jobs are settled through it); None on other nodes."""
    if membership.own_broker is None:
        yield None
        return
    nats_server = broker_server(home, own, membership)
    await asyncio.to_thread(nats_server.start)
    supervising = asyncio.create_task(keep_broker_running(nats_server, stopping))
    try:
        yield nats_server
    finally:
        stopping.set()
        await asyncio.to_thread(nats_server.stop)
        await supervising


async def run_agent(home: Path, own: str, membership, identities, offered: Offer, http, api_keys,
                    stopping: asyncio.Event, nats_server) -> None:
    urls = membership.urls()
    if nats_server is not None:  # this node's own server first; every other broker after
        urls = ",".join([nats_server.url, *servers(urls)])
    link = await open_link(urls, f"conclave-agent:{own}", identities["agent"])
    await refuse_a_twin(link, own, offered)
    keeper = RankKeeper(home, own, offered.address, urls, lambda model: identities["worker"])
    files = NodeFiles(ModelStore(home / "models"), own, offered.address, tls_dir(home))  # its model files, for others
    await files.start()
    server = standby = None

    def obeying(done: asyncio.Event):
        return obey(link, keeper, files, done, LOST_BROKER_S)

    if nats_server is not None:  # a broker node may control the cluster when the first machine is gone
        # Its own user (a broker node's controller), which also hears the users its server must admit.
        standby = await open_link(urls, f"conclave-controller:{own}", identities["controller"],
                                  lambda nc: follow_users(nc, nats_server.store_dir))
        agent = follow_the_controller(stand_by(home, standby, offered, stopping), obeying, stopping)
    else:
        agent = obeying(stopping)
    tasks = [asyncio.create_task(keep_reporting(link, home, keeper.running, stopping, offered, files.report)),
             asyncio.create_task(keep_catalogue(link, ModelStore(home / "models"), own, stopping)),
             asyncio.create_task(agent)]
    if http is not None:
        log.info("API keys: %s", ", ".join(api_keys) if api_keys else
                 "none configured, /v1 routes are open to anyone who reaches the port")  # as `serve` says it
        server = ingress_server(urls, identities["ingress"], http, api_keys)
        tasks.append(asyncio.create_task(server.serve()))
    where = f", OpenAI API at http://{http[0]}:{http[1]}/v1" if http else ""
    print(f"{READY_LINE} {own} is serving in cluster {membership.cluster or '?'} (brokers {urls}, "
          f"address {offered.address}{where})", flush=True)
    failed = None
    try:
        # Until stopped, or until a part of the node fails: a node that reports "up" but obeys nothing would hold
        # its share of a model hostage, so it exits (non-zero) and its service manager restarts it.
        waiting = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = next((task for task in done if task is not waiting), None)
    finally:
        stopping.set()
        if server is not None:
            server.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await files.stop()
        # A part that failed while stopping (an agent that failed stops its controller first, which sets `stopping`).
        failed = failed or next((t for t in tasks if not t.cancelled() and t.exception() is not None), None)
        await link.close()
        if standby is not None:
            await standby.close()
        print("Conclave node stopped.", flush=True)
    if failed is not None:
        raise DeploymentError(f"a part of this node stopped ({failed.exception() or 'it returned'}); exiting so that "
                              f"it restarts")


async def follow_the_controller(controlling, obeying, stopping: asyncio.Event) -> None:
    """Run a controller (`controlling`, a coroutine that ends once `stopping` and its group stopped) and this
    machine's agent (`obeying(done)`), and stop the agent only after the controller: the controller stops its
    ranks through the agents, this one's included, which must still be there to answer. An agent that fails
    stops the controller too, and its error is raised (the node exits, for its service manager to restart it)."""
    done = asyncio.Event()
    agent, controller = asyncio.create_task(obeying(done)), asyncio.ensure_future(controlling)
    try:
        await asyncio.wait([agent, controller], return_when=asyncio.FIRST_COMPLETED)
        if agent.done():
            stopping.set()
        await controller
    finally:
        done.set()
    await agent


async def stand_by(home: Path, link: Link, offered: Offer, stopping: asyncio.Event) -> None:
    """A broker node's controller: it takes the lease when the first machine's controller stops renewing it
    (pipeline/lease.py) and then places the cluster's plan like it would (ops/controller.py)."""
    from ops.controller import control
    from pipeline.lease import lead
    from schemas.membership import Lease

    lease = Lease(node_id=node_id(home), session=offered.session, host=socket.gethostname())
    store = ModelStore(home / "models")
    await lead(link, lease, stopping, lambda lost: control(link, store, home / "controller", lost))


def broker_server(home: Path, own: str, membership):
    """This node's nats-server, one of the cluster's brokers (ops/brokers.py): on every address, TLS with the
    certificate the first machine made for it, routes to the other brokers; its store encrypted like the first
    machine's when CONCLAVE_JETSTREAM_KEY is set."""
    from pipeline.nats_server import KEY_VARIABLE, EmbeddedNats

    mine = membership.own_broker
    return EmbeddedNats(home / "nats", port=mine.client_port, host="0.0.0.0", tls_dir=tls_dir(home), name=own,
                        cluster_port=mine.route_port, routes=membership.routes,
                        encryption_key=os.environ.get(KEY_VARIABLE))


def ingress_server(broker: str, identity, http: tuple[str, int], api_keys: dict[str, str]):
    import uvicorn

    from ingress.app import IngressConfig, answering_hosts, create_app
    from ops.serve import SignalFreeServer

    # Its models are the cluster's (the instances bucket): it starts with none and follows the controller.
    app = create_app(IngressConfig(nats_url=broker, identity=identity, models=[], api_keys=api_keys, cluster=True,
                                   hosts=answering_hosts(http[0], api_keys)))
    return SignalFreeServer(uvicorn.Config(app, host=http[0], port=http[1], log_level="warning", lifespan="on"))
