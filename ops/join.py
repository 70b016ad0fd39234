"""Joining a cluster: the token, the first machine's answer, and what a member keeps.

`conclave serve --cluster` prints `conclave join ADDRESS --token TOKEN`. The token is `cj1.<CA>.<seed>`:

- `<CA>` is the SHA-256 of the cluster CA's certificate (ops/cluster_tls.py). A joining node fetches the
  certificate over a first, unverified TLS connection, as the public `ca-reader` user (pipeline/access.py), and
  keeps it only if it hashes to this; every later connection verifies the broker against it, and only those
  use the token's key. Someone in the middle, or a rogue mDNS advert, gets nothing: the node stops before it
  sends anything of its own.
- `<seed>` is the nkey seed of the `joiner` role, which may do two things: fetch the CA certificate and ask to
  join (pipeline/access.py). `conclave join-token --rotate` replaces it; nodes already joined keep working.

A node asks with its own public keys (schemas/membership.py); the first machine checks them (a node id already
used by other keys is refused with the way out), adds the node's three users to the broker's authorization and
reloads it. The node keeps `<home>/cluster.json` and the CA, so after a reboot it reconnects without the token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from pathlib import Path
from typing import Callable

import msgspec
import nats

from ops.brokers import FirstBroker, broker_routes, broker_urls, check_offer, install_grant
from ops.cluster_tls import certify_broker, fingerprint, tls_dir
from ops.credentials import (admit_node, apply_authorization, cluster_ca, credentials_dir, new_seed,
                             public_key_of_seed, public_keys, role_identity, write_private)
from pipeline.access import (CA_READER, CA_READER_SEED, CA_SUBJECT, INGRESS, JOIN_SUBJECT, JOINER, Identity,
                             inbox_prefix, node_role, tls_context)
from pipeline.connection import answer
from pipeline.limits import UNDECODABLE
from schemas.membership import BrokerGrant, BrokerOffer, JoinReply, JoinRequest, Membership

log = logging.getLogger("conclave.join")
MEMBERSHIP_FILE = "cluster.json"
DEFAULT_BROKER_PORT = 4222
_TOKEN = re.compile(r"cj1\.([0-9a-f]{64})\.(SU[A-Z2-7]{56})")


class JoinError(RuntimeError):
    """Joining failed; the message says why and what to do."""


def make_token(home: Path, ca_fingerprint: str) -> str:
    seed = role_identity(home, JOINER).seed_file.read_text().strip()
    return f"cj1.{ca_fingerprint}.{seed}"


def parse_token(token: str) -> tuple[str, str]:
    """(CA fingerprint, joiner seed) of a join token."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise JoinError("that is not a Conclave join token (cj1.<64 hex>.<seed>): copy the whole line `conclave serve "
                        "--cluster` printed, or run `conclave join-token` on the first machine")
    return match.group(1), match.group(2)


def broker_url(address: str) -> str:
    """`10.0.0.1`, `10.0.0.1:4333`, `[fe80::1]:4333` or a host name -> tls://host:port."""
    address = address.removeprefix("tls://").removeprefix("nats://")
    host, _, port = address.rpartition(":") if re.search(r":\d+$", address) else (address, "", "")
    return f"tls://{host or address}:{port or DEFAULT_BROKER_PORT}"


def read_membership(home: Path) -> Membership | None:
    try:
        return msgspec.json.decode((Path(home) / MEMBERSHIP_FILE).read_bytes(), type=Membership)
    except FileNotFoundError:
        return None


def node_identities(home: Path, node_id: str) -> dict[str, Identity]:
    """This node's identities (made on first use): its agent, its ingress, its worker ranks and, on a broker node,
    its controller (ops/brokers.py). The worker identity's role is a placeholder: a rank connects with its model's
    worker role name (its inbox) and this key."""
    folder = credentials_dir(home) / "node"
    folder.mkdir(mode=0o700, exist_ok=True)
    seeds = {}
    for name in ("agent", "ingress", "worker", "controller"):
        seeds[name] = folder / f"{name}.nk"
        if not seeds[name].exists():
            write_private(seeds[name], new_seed())
    ca = cluster_ca(home)
    return {"agent": Identity(node_role(node_id), seeds["agent"], ca), "ingress": Identity(INGRESS, seeds["ingress"], ca),
            "worker": Identity("worker", seeds["worker"], ca),
            "controller": Identity(f"{node_role(node_id)}-controller", seeds["controller"], ca)}


async def _joiner_connection(url: str, role: str, seed: str, ca: Path | None):
    async def quiet(exc):
        pass

    try:
        return await asyncio.wait_for(nats.connect(url, name="conclave-join", connect_timeout=3, allow_reconnect=False,
                                                   error_cb=quiet, nkeys_seed_str=seed, inbox_prefix=inbox_prefix(role),
                                                   tls=tls_context(ca), tls_handshake_first=True), 10.0)
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
        text = str(exc) or type(exc).__name__
        if "authorization" in text.lower():
            raise JoinError(f"the cluster at {url} refused the token (rotated, or from another cluster): ask its "
                            f"operator for a current one (`conclave join-token` on the first machine)") from None
        raise JoinError(f"cannot reach a Conclave broker at {url}: {text}") from None


async def join(home: Path, address: str, token: str, node_id: str,
               broker: Callable[[str], BrokerOffer] | None = None) -> Membership:
    """Join the cluster whose broker is at `address`, as `node_id`; returns (and keeps) the membership. With
    `broker`, this node offers to run one of the cluster's brokers (ops/brokers.py)."""
    fingerprint_wanted, seed = parse_token(token)
    url = broker_url(address)
    # 1. The CA certificate, over TLS that verifies nothing yet, as the public ca-reader (the token's key is not
    # shown to a broker that is not verified): kept only if it is the token's.
    nc = await _joiner_connection(url, CA_READER, CA_READER_SEED, None)
    try:
        pem = (await nc.request(CA_SUBJECT, b"", timeout=5)).data
    except nats.errors.Error as exc:
        raise JoinError(f"{url} did not hand over its CA certificate ({exc or type(exc).__name__}): is it a Conclave "
                        f"cluster started with --cluster?") from None
    finally:
        await nc.close()
    try:
        got = fingerprint(pem)
    except ValueError:
        got = "not a certificate"
    if got != fingerprint_wanted:
        raise JoinError(f"the broker at {url} presented a CA ({got[:16]}...) that is not the token's "
                        f"({fingerprint_wanted[:16]}...): a wrong address, or someone between; nothing was sent")
    tls_dir(home)  # made owner-only
    cluster_ca(home).write_bytes(pem)
    # 2. The request, over TLS verified against that CA.
    identities = node_identities(home, node_id)
    keys = {name: public_key_of_seed(identity.seed_file.read_bytes()) for name, identity in identities.items()}
    offer = broker(keys["controller"]) if broker else None
    request = JoinRequest(node_id=node_id, host=socket.gethostname(), agent_key=keys["agent"],
                          ingress_key=keys["ingress"], worker_key=keys["worker"], broker=offer)
    nc = await _joiner_connection(url, JOINER, seed, cluster_ca(home))
    try:
        reply = msgspec.json.decode((await nc.request(JOIN_SUBJECT, msgspec.json.encode(request), timeout=10)).data,
                                    type=JoinReply)
    except (nats.errors.Error, msgspec.MsgspecError) as exc:
        raise JoinError(f"{url} did not answer the join request ({exc or type(exc).__name__})") from None
    finally:
        await nc.close()
    if not reply.accepted:
        raise JoinError(f"the cluster refused this node: {reply.reason}")
    membership = Membership(broker=url, node_id=node_id, ca_fingerprint=fingerprint_wanted, cluster=reply.cluster,
                            brokers=reply.brokers)
    if offer is not None:
        if reply.grant is None:
            raise JoinError("the cluster admitted this node but gave it no broker certificate: is the first machine "
                            "older than this one?")
        install_grant(home, reply.grant)
        membership = msgspec.structs.replace(membership, routes=reply.grant.routes, own_broker=offer)
    (Path(home) / MEMBERSHIP_FILE).write_bytes(msgspec.json.encode(membership))
    return membership


async def answer_joins(nc, home: Path, own_node_id: str, cluster: str, first: FirstBroker) -> list:
    """The first machine's side: hand out the CA certificate and admit nodes (and brokers, ops/brokers.py).
    Returns the subscriptions."""
    async def certificate(msg):
        await answer(msg, cluster_ca(home).read_bytes())

    async def admit(msg):
        granted = None
        try:
            request = msgspec.json.decode(msg.data, type=JoinRequest)
            reason = check_offer(home, request, first) if request.broker else None
            # Certified before it is admitted: a key or name that cannot be certified leaves no member behind.
            certified = (certify_broker(home, request.broker.public_key, request.host, request.broker.names)
                         if request.broker and reason is None else None)
            reason = reason or admit_node(home, request, own_node_id)
        except UNDECODABLE as exc:
            reason = f"not a join request: {exc}"
        except ValueError as exc:
            reason = f"cannot certify the broker's key: {exc}"
        if reason is None:
            apply_authorization(home)
            if request.broker:
                granted = BrokerGrant(certificate=certified, routes=broker_routes(home, first),
                                      users=public_keys(home))
            log.info("node %s (%s) joined the cluster%s", request.node_id, request.host,
                     " as a broker" if granted else "")
        else:
            log.warning("refused a join request: %s", reason)
        await answer(msg, msgspec.json.encode(JoinReply(accepted=reason is None, reason=reason, cluster=cluster,
                                                        brokers=broker_urls(home, first), grant=granted)))

    return [await nc.subscribe(CA_SUBJECT, cb=certificate), await nc.subscribe(JOIN_SUBJECT, cb=admit)]
