"""The running deployment of a home, as the other commands find it.

`conclave serve` writes `<home>/serve.json` (its pid, HTTP and NATS URLs) once it serves, and removes
it when it stops. `conclave audit` and the other commands that talk to a running deployment read it,
so that one started with `--nats-port 4333` is found without repeating the flag; when there is none,
they say so in one line instead of retrying a default port for minutes. It also keeps two `serve`
processes off one home (they would share the model store, the JetStream store and the ports).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import msgspec

from workers.files import replace_whole

RUN_FILE = "serve.json"


class DeploymentError(RuntimeError):
    """No usable deployment (or a second one on the same home); the message is for the operator."""


class Deployment(msgspec.Struct):
    pid: int
    http_url: str
    nats_url: str
    cluster: bool = False  # `serve --cluster`: its first machine answers for the cluster's models


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def read_deployment(home: Path) -> Deployment | None:
    """The deployment recorded in `home`, if its process still runs."""
    try:
        deployment = msgspec.json.decode((Path(home) / RUN_FILE).read_bytes(), type=Deployment)
    except (FileNotFoundError, msgspec.MsgspecError):
        return None
    return deployment if is_running(deployment.pid) else None


def claim_home(home: Path) -> None:
    """Refuse to serve from a home another running `conclave serve` uses."""
    running = read_deployment(home)
    if running is not None and running.pid != os.getpid():
        raise DeploymentError(f"another conclave serve (pid {running.pid}, {running.http_url}) is using {home}; "
                              f"stop it or give this one its own --home")


def record_deployment(home: Path, deployment: Deployment) -> None:
    # owner-only: its NATS URL may carry a password
    replace_whole(Path(home) / RUN_FILE, msgspec.json.encode(deployment), mode=0o600)


def forget_deployment(home: Path) -> None:
    path = Path(home) / RUN_FILE
    running = read_deployment(home)
    if running is None or running.pid == os.getpid():
        path.unlink(missing_ok=True)


def nats_url_of(home: Path, given: str | None) -> str:
    """The NATS URL a command should use: the one given, else the running deployment's."""
    if given:
        return given
    deployment = read_deployment(home)
    if deployment is None:
        raise DeploymentError(f"no running conclave serve found in {home} (no live {RUN_FILE}); start one, or "
                              f"pass --home of a running deployment or --nats-url")
    return deployment.nats_url


async def operator_connection(home: Path, nats_url: str | None, name: str):
    """A short-lived connection for an operator's command, as the home's operator role."""
    from ops.credentials import cluster_ca, role_identity
    from pipeline.access import OPERATOR
    from pipeline.connection import connect_once

    url = nats_url_of(home, nats_url)
    identity = role_identity(home, OPERATOR)
    if url.startswith("tls://"):  # a cluster's broker: TLS with the cluster CA made in this home (ops/cluster_tls.py)
        identity = replace(identity, ca_file=cluster_ca(home))
    return await connect_once(url, name, identity)
