"""The deployment's NATS credentials, kept in `<home>/credentials/` with owner-only permissions.

    credentials/            0700
      roles/<role>.nk       0600  the nkey seed of a role a Conclave process connects as (operator,
                                  ingress, worker-<model>), made at first need
      nodes/<id>.json             the public keys of a node that joined this cluster (schemas/membership.py)
      cluster/                    the cluster's CA and the broker's certificate (ops/cluster_tls.py)
      submitters/<name>.pub       the public key of an internal system's submitter; its seed was handed
                                  over once by `conclave credentials issue` (or never existed here, when
                                  the system made its own key pair and gave only the public key)
      audit-signing.key     0600  the operator's key for the audit log's checkpoints (pipeline/checkpoints.py)

The nats-server's `authorization` block is made from these files (pipeline/access.py) whenever it
starts, and again, with a reload signal, when a submitter is issued or revoked while it runs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import nkeys

from pipeline.access import (CA_READER, CA_READER_SEED, JOINER, NODE_ID, AccessError, Identity, authorization_block,
                             check_submitter_name, node_role)
from schemas.membership import JoinRequest

log = logging.getLogger("conclave.credentials")

AUTHORIZATION_FILE = "authorization.conf"  # next to nats-server.conf, which includes it


def credentials_dir(home: Path) -> Path:
    folder = Path(home) / "credentials"
    for path in (folder, folder / "roles", folder / "submitters", folder / "nodes"):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
    return folder


def cluster_ca(home: Path) -> Path:
    """The cluster CA's certificate in `home` (ops/cluster_tls.py makes it on the first machine; a node keeps the
    copy it joined with)."""
    return Path(home) / "credentials" / "cluster" / "ca.pem"


def apply_authorization(home: Path) -> bool:
    """Write the embedded nats-server's authorization from the credentials now in `home` and have a running one
    re-read it; False when none runs (it takes effect at its next start)."""
    write_authorization(Path(home) / "nats", public_keys(home))
    return reload_embedded(Path(home) / "nats")


def open_private(path: Path):
    """A file to write a secret to, owner-only before a byte is written: created with mode 0600, or an existing
    one truncated and made 0600 first; never through a symbolic link (one planted there could redirect it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "wb")


def write_private(path: Path, data: bytes) -> None:
    with open_private(path) as file:
        file.write(data)


def new_seed() -> bytes:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key_of_seed(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed.strip())).public_key.decode()


def role_identity(home: Path, role: str) -> Identity:
    """The identity a Conclave process connects as; the role's seed is made on first use."""
    path = credentials_dir(home) / "roles" / f"{role}.nk"
    if not path.exists():
        write_private(path, new_seed())
    return Identity(role, path)


def issue_submitter(home: Path, name: str, public_key: str | None = None) -> bytes | None:
    """Register submitter `name`. With `public_key` (a system that made its own key pair: best, the secret
    never leaves it) only that is kept; otherwise a new seed is made and returned, for the caller to hand
    over once. Reissuing a name replaces its key (the old one stops working at the reload)."""
    check_submitter_name(name)
    seed = None
    if public_key is None:
        seed = new_seed()
        public_key = public_key_of_seed(seed)
    elif not re.fullmatch(r"U[A-Z2-7]{55}", public_key):
        raise AccessError(f"{public_key!r} is not an nkey user public key (U...)")
    (credentials_dir(home) / "submitters" / f"{name}.pub").write_text(public_key + "\n")
    return seed


def revoke_submitter(home: Path, name: str) -> bool:
    path = credentials_dir(home) / "submitters" / f"{check_submitter_name(name)}.pub"
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def public_keys(home: Path) -> dict[str, str]:
    """Every role and submitter of this home -> its public key."""
    folder = credentials_dir(home)
    keys = {path.stem: public_key_of_seed(path.read_bytes()) for path in sorted((folder / "roles").glob("*.nk"))}
    for path in sorted((folder / "submitters").glob("*.pub")):
        if path.stem in keys:  # a name that became a role's (`auditor`, issued before it was reserved): not admitted
            log.warning("the submitter %r is not admitted: that name is now a Conclave role's; issue its key again "
                        "under another name", path.stem)
            continue
        keys[path.stem] = path.read_text().strip()
    if JOINER in keys:  # a cluster: joining nodes first fetch the CA as the public ca-reader (pipeline/access.py)
        keys[CA_READER] = public_key_of_seed(CA_READER_SEED.encode())
    for node in joined_nodes(home):
        keys.update(node_users(node))
    return keys


def node_users(node: JoinRequest) -> dict[str, str]:
    """A joined node's users (role -> public key): its agent, its ingress, its worker ranks and, a broker node's,
    its controller (pipeline/access.py: permissions_of)."""
    role = node_role(node.node_id)
    users = {role: node.agent_key, f"{role}-ingress": node.ingress_key, f"{role}-worker": node.worker_key}
    if node.broker is not None:
        users[f"{role}-controller"] = node.broker.controller_key
    return users


def joined_nodes(home: Path) -> list[JoinRequest]:
    import msgspec

    return [msgspec.json.decode(path.read_bytes(), type=JoinRequest)
            for path in sorted((credentials_dir(home) / "nodes").glob("*.json"))]


def admit_node(home: Path, request: JoinRequest, own_node_id: str) -> str | None:
    """Register a joining node's keys; the reason it is refused, else None. A node id is one machine: the same
    id with other keys is a copied home (a cloned disk or VM image), which EXO's users met as two machines
    fighting over one identity (EXO #1599); it is refused, with the way out."""
    import msgspec

    keys = tuple(node_users(request).values())
    if not NODE_ID.fullmatch(request.node_id):
        return f"{request.node_id!r} is not a node id (8 to 32 hex digits)"
    if not all(re.fullmatch(r"U[A-Z2-7]{55}", key) for key in keys) or len(set(keys)) != len(keys):
        return "the request must carry different nkey user public keys (U...)"
    mine = node_role(request.node_id)  # its users are it and `<it>-...` (node ids have no '-')
    if any(key in keys for name, key in public_keys(home).items() if name != mine and not name.startswith(f"{mine}-")):
        return "a key of the request already belongs to another user of this cluster: make new keys (remove " \
               "<home>/credentials/node on the joining machine) and join again"
    fix = ("a copy of another machine's Conclave home (a cloned disk or VM image)? On the joining machine remove "
           "<home>/node-id and <home>/credentials, then join again; or, if this machine replaces the old one, "
           f"`conclave nodes remove {request.node_id}` on the first machine first")
    if request.node_id == own_node_id:
        return f"node id {request.node_id} is the first machine's own: {fix}"
    path = credentials_dir(home) / "nodes" / f"{request.node_id}.json"
    if path.exists():
        known = msgspec.json.decode(path.read_bytes(), type=JoinRequest)
        if (known.agent_key, known.ingress_key, known.worker_key) != keys[:3]:
            return f"node id {request.node_id} already belongs to a member ({known.host}) with other keys: {fix}"
        # Public keys prove nothing (every broker is told them): a broker is certified once, at its first join,
        # and a member cannot become one, or stop being one, by joining again.
        if request.broker is not None or known.broker is not None:
            return (f"node {request.node_id} is a member already: it rejoins with what its home kept (`conclave "
                    f"join` without a token); a broker is certified only when it first joins")
    path.write_bytes(msgspec.json.encode(request))
    return None


def remove_node(home: Path, node_id: str) -> bool:
    if not NODE_ID.fullmatch(node_id):
        raise AccessError(f"{node_id!r} is not a node id")
    path = credentials_dir(home) / "nodes" / f"{node_id}.json"
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def server_authorization(home: Path) -> str:
    return authorization_block(public_keys(home))


def write_authorization(nats_dir: Path, keys: dict[str, str]) -> Path:
    """An embedded nats-server's authorization file for these users (role -> public key): a home's
    (`public_keys`), or those a broker node was told of (ops/brokers.py)."""
    nats_dir = Path(nats_dir)
    nats_dir.mkdir(parents=True, exist_ok=True)
    path = nats_dir / AUTHORIZATION_FILE
    write_private(path.with_suffix(".tmp"), authorization_block(keys).encode())
    path.with_suffix(".tmp").replace(path)
    return path


def reload_embedded(nats_dir: Path) -> bool:
    """Ask a running embedded nats-server to re-read its configuration (SIGHUP); False if none runs. The pid
    file of a server that was killed may name another process by now (for which SIGHUP could be fatal):
    only a nats-server is signalled."""
    try:
        pid = int((nats_dir / "nats-server.pid").read_text().strip())
        command = subprocess.run(["ps", "-p", str(pid), "-o", "comm="], capture_output=True, text=True).stdout
        if "nats-server" not in command:
            return False
        os.kill(pid, signal.SIGHUP)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
