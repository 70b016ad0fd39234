"""Configuration shared by the commands. Flags override environment variables, which override defaults."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROUTE_PORT = 6222  # NATS's usual cluster port: where a cluster's brokers reach each other (ops/brokers.py)


def default_home() -> Path:
    """State directory: the model store and the embedded nats-server's JetStream data live under it."""
    return Path(os.environ.get("CONCLAVE_HOME") or Path.home() / ".local" / "share" / "conclave")


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# Ports this process handed out: one handed out earlier may be free again now (its server was killed, to be restarted
# on it), and the OS may offer it again; a restarted broker then found its route port taken by its own client port.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just had free on `host`, never one this process handed out before (for test and bench servers
    that must not collide)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
