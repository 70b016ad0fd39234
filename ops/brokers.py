"""A broker of three: the cluster's NATS as three embedded nats-servers, so that losing any one machine loses no
queued job and no audit record, and the cluster keeps its queue.

JetStream keeps a stream's replicas with RAFT, which needs a majority: three servers survive the loss of one,
two do not (losing either stops both), so a cluster has one broker or three. It forms like this:

- `conclave serve --cluster --brokers 3` starts the first machine's server as a member of a NATS cluster at
  once. nats-server cannot turn a standalone server into one later: restarted in cluster mode, it deletes the
  streams it held as orphans. So the number of brokers is chosen when the cluster is set up (README, Cluster).
- `conclave join ADDRESS --token T --broker` on two more machines: each sends the public half of a key made
  there (`BrokerOffer`); the first machine certifies it with the cluster CA and answers with the routes of the
  brokers it knows and the users every broker admits (`BrokerGrant`). The node then runs its own nats-server.
- RAFT elects a leader once two servers see each other; the streams, in three replicas, are made once the third
  is there (`make_streams`). Until then `serve` says what it waits for.

Routes are mutual TLS from their first byte: each server shows its CA-signed certificate and checks the other's
against the CA, so a machine without one cannot become a broker (tests/test_broker_replicas.py).

Every server must admit the same users. The first machine keeps them (ops/credentials.py) and announces them on
USERS_SUBJECT every ANNOUNCE_S (only the operator may publish there, only broker nodes' controllers hear it);
each broker node writes them into its server's authorization and reloads it when they changed (`follow_users`). A broker node that restarts
uses the last ones it wrote, so admitting, removing a node or issuing a submitter needs the first machine, and
the other two keep serving whoever they knew.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ops.cluster_tls import machine_names, new_broker_key, tls_dir
from ops.credentials import joined_nodes, public_keys, reload_embedded, write_authorization
from pipeline.access import USERS_SUBJECT
from pipeline.connection import sleep_unless
from pipeline.streams import ensure_streams
from pipeline.limits import UNDECODABLE
from schemas.membership import BrokerGrant, BrokerOffer, JoinRequest

log = logging.getLogger("conclave.brokers")
BROKERS = 3
ANNOUNCE_S = 5.0  # a broker node that missed a change (restarting then) has it within this


@dataclass(frozen=True)
class FirstBroker:
    """The first machine's broker, as joining nodes are told of it."""

    url: str  # tls://address:port
    route: str | None = None  # address:port of its route listener: the cluster has BROKERS brokers


def broker_nodes(home: Path) -> list[JoinRequest]:
    return [node for node in joined_nodes(home) if node.broker is not None]


def broker_urls(home: Path, first: FirstBroker) -> list[str]:
    return [first.url, *(node.broker.client_url() for node in broker_nodes(home))]


def broker_routes(home: Path, first: FirstBroker) -> list[str]:
    return [first.route, *(node.broker.route() for node in broker_nodes(home))]


def check_offer(home: Path, request: JoinRequest, first: FirstBroker) -> str | None:
    """Why a node's offer to run a broker is refused, else None."""
    if first.route is None:
        return ("this cluster runs one broker, on its first machine (it was set up without --brokers 3; nats-server "
                "cannot add brokers to it later): join without --broker")
    others = [node for node in broker_nodes(home) if node.node_id != request.node_id]
    if len(others) >= BROKERS - 1:
        return f"this cluster has its {BROKERS} brokers already: join without --broker"
    return None


def offer(home: Path, address: str, client_port: int, route_port: int, controller_key: str) -> BrokerOffer:
    """A joining node's offer to run a broker, with a new key for its certificate."""
    names = list(dict.fromkeys([*machine_names(), address]))
    return BrokerOffer(public_key=new_broker_key(home), names=names, address=address, client_port=client_port,
                       route_port=route_port, controller_key=controller_key)


def install_grant(home: Path, granted: BrokerGrant) -> None:
    (tls_dir(home) / "server.pem").write_text(granted.certificate)
    write_authorization(Path(home) / "nats", granted.users)


async def make_streams(link, replicas: int) -> None:
    """The streams, once enough brokers are there to hold their replicas; said once while it waits."""
    said = False
    while True:
        try:
            await asyncio.wait_for(ensure_streams(link.nc.jetstream(), replicas), 10.0)
            if said:
                log.info("the %d brokers are up; the streams are kept in %d replicas", BROKERS, replicas)
            return
        except Exception as exc:
            if not said:
                log.warning("waiting for %d brokers (the streams keep %d replicas): on two more machines run the "
                            "join line with --broker (now: %s)", BROKERS, replicas, exc or type(exc).__name__)
                said = True
            await asyncio.sleep(1.0)


async def keep_announcing_users(link, home: Path, stopping: asyncio.Event) -> None:
    """The first machine's side: every ANNOUNCE_S, the users of this home, to every broker node. Read from the
    credentials files each time: `conclave nodes remove`, `credentials issue` and `join-token --rotate` change
    them from other processes."""
    while not stopping.is_set():
        try:
            await announce_users(link.nc, home)
        except Exception as exc:  # reconnecting: the next round says it again
            log.debug("could not announce the users: %s", exc)
        await sleep_unless(stopping, ANNOUNCE_S)


async def announce_users(nc, home: Path) -> None:
    """Once, now: a change that new processes need at once (a model's worker role, ops/instances.py)."""
    await nc.publish(USERS_SUBJECT, msgspec.json.encode(await asyncio.to_thread(public_keys, home)))


async def follow_users(nc, nats_dir: Path) -> list:
    """A broker node's side: the users its server admits, as the first machine announces them; written and
    reloaded only when they changed."""
    current: dict[str, str] = {}

    async def apply(msg):
        nonlocal current
        try:
            users = msgspec.json.decode(msg.data, type=dict[str, str])
        except UNDECODABLE as exc:
            log.warning("ignored an announcement of the users that is not one: %s", exc)
            return
        if users == current:
            return
        await asyncio.to_thread(write_authorization, nats_dir, users)
        await asyncio.to_thread(reload_embedded, nats_dir)
        current = users
        log.info("this broker admits the cluster's %d users as announced", len(users))

    return [await nc.subscribe(USERS_SUBJECT, cb=apply)]

