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


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just had free on `host` (for test and bench servers that must not collide)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
