"""Starting `conclave serve` (or `conclave join`) as a child process on free loopback ports: the test suite's
and `conclave bench`'s way to get a real deployment."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ops.config import free_port
from ops.serve import READY_LINE


@dataclass
class ChildProcess:
    process: subprocess.Popen

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as an operator would, and its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL it and every process it started (nats-server, ranks), as a power cut would. One that has ended
        already (killed by an earlier test) is left as it is."""
        import psutil

        if self.process.poll() is not None:  # (reaped: its pid may be another process's now)
            return
        try:
            parent = psutil.Process(self.process.pid)
            family = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:  # ended between the two looks
            family = []
        for process in family:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(30)


def stop_all(processes) -> None:
    """Stop each that still runs, in order, as an operator would; one that does not exit within a minute is killed
    (with what it started): a test's or bench's end never leaves processes behind."""
    for child in processes:
        if child.process.poll() is None:
            try:
                child.stop()
            except subprocess.TimeoutExpired:
                child.kill()


@dataclass
class ServerProcess(ChildProcess):
    """A `conclave serve` started as a child process on free loopback ports."""

    base_url: str  # ends in /v1
    nats_url: str
    home: Path
    output: list[str]  # its stdout and stderr, line by line


def wait_for_line(output: list[str], text: str, timeout_s: float) -> str:
    """The first line of a child's output holding `text`, once it is there (its reader thread appends lines)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(output):
            if text in line:
                return line
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r} within {timeout_s}s:\n" + "".join(output[-50:]))


def spawn(argv: list[str], ready: str, timeout_s: float, prefix: list[str] | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start `conclave ARGV...` (under `prefix`, e.g. `ip netns exec NS`) and return once a line holds `ready`;
    its output is kept line by line."""
    process = subprocess.Popen([*(prefix or []), sys.executable, "-m", "ops.cli", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # One thread reads every line (a full pipe would block the server) and keeps them for failure reports.
    # Waiting on the pipe with select() instead would miss lines already read into the file's buffer: two
    # ranks logging in the same millisecond arrive in one read.
    output: list[str] = []
    seen = threading.Event()

    def read_lines():
        for line in process.stdout:
            output.append(line)
            if ready in line:
                seen.set()
        seen.set()  # end of output: it exited

    threading.Thread(target=read_lines, daemon=True).start()
    if not seen.wait(timeout_s):
        process.kill()
        raise TimeoutError(f"no {ready!r} within {timeout_s}s:\n" + "".join(output))
    if not any(ready in line for line in output):
        raise RuntimeError(f"it exited before {ready!r}:\n" + "".join(output))
    return process, output


def spawn_server(home: Path, *flags: str, timeout_s: float = 180.0, ready: str = READY_LINE,
                 prefix: list[str] | None = None) -> ServerProcess:
    """Start `conclave serve` and return once it printed `ready` (by default: it serves)."""
    port, nats_port = free_port(), free_port()
    process, output = spawn(["--home", str(home), "serve", "--port", str(port), "--nats-port", str(nats_port), *flags],
                            ready, timeout_s, prefix)
    scheme = "tls" if "--cluster" in flags else "nats"
    return ServerProcess(process, f"http://127.0.0.1:{port}/v1", f"{scheme}://127.0.0.1:{nats_port}", home, output)


@dataclass
class NodeProcess(ChildProcess):
    """A `conclave join` started as a child process; with an HTTP port when `http` was asked."""

    home: Path
    output: list[str]
    base_url: str | None


def spawn_node(home: Path, *flags: str, http: bool = False, timeout_s: float = 120.0,
               prefix: list[str] | None = None) -> NodeProcess:
    """Start `conclave join FLAGS...` and return once its agent reports (ops/node.py: READY_LINE)."""
    from ops.node import READY_LINE as NODE_READY

    port = free_port() if http else None
    process, output = spawn(["--home", str(home), "join", *flags, *(["--port", str(port)] if port else [])],
                            NODE_READY, timeout_s, prefix)
    return NodeProcess(process, home, output, f"http://127.0.0.1:{port}/v1" if port else None)


def spawn_cluster(first_home: Path, node_homes: list[Path], memory_limit_gb: str, *first_flags: str,
                  timeout_s: float = 240.0) -> tuple[ServerProcess, list[NodeProcess], str]:
    """A cluster on loopback: `serve --cluster FIRST_FLAGS...` and a `join` per home (each with an HTTP port), every
    machine offering `memory_limit_gb`; returns once the model is served, with the join token. The tests' and
    `conclave bench --cluster`'s."""
    limit = ("--memory-limit", memory_limit_gb)
    return _spawn_joined(first_home, (*limit, "--heartbeat", "0.5", "--worker-timeout", "5", *first_flags),
                         {home: limit for home in node_homes}, timeout_s)


def spawn_brokers(first_home: Path, node_homes: list[Path], *flags: str,
                  timeout_s: float = 240.0) -> tuple[ServerProcess, list[NodeProcess], tuple[str, ...]]:
    """A cluster with a broker of three on loopback (ops/brokers.py): `serve --cluster --brokers 3 FLAGS...` and a
    `join --broker` per home (two; each with an HTTP port); returns once the model is served, with the flags that
    start the first machine again (`--cluster` and the rest). The tests' and `conclave bench --cluster`'s."""
    routes = [free_port() for _ in range(1 + len(node_homes))]
    first_flags = ("--brokers", "3", "--route-port", str(routes[0]), *flags)
    first, nodes, _ = _spawn_joined(first_home, first_flags, {
        home: ("--broker", "--nats-port", str(free_port()), "--route-port", str(route))
        for home, route in zip(node_homes, routes[1:])}, timeout_s)
    return first, nodes, (*CLUSTER_FLAGS, *first_flags)


CLUSTER_FLAGS = ("--cluster", "--advertise", "127.0.0.1", "--no-mdns")


def _spawn_joined(first_home: Path, first_flags: tuple[str, ...], node_flags: dict[Path, tuple[str, ...]],
                  timeout_s: float) -> tuple[ServerProcess, list[NodeProcess], str]:
    """`serve --cluster FIRST_FLAGS` on loopback, then `join` with each home's flags (and an HTTP port), until the
    first machine serves."""
    import re

    first = spawn_server(first_home, *CLUSTER_FLAGS, *first_flags, ready="--token")
    token = re.search(r"cj1\.\S+", "".join(first.output)).group(0)
    nodes: list[NodeProcess] = []
    try:
        for home, flags in node_flags.items():
            nodes.append(spawn_node(home, first.nats_url.removeprefix("tls://"), "--token", token, *flags, http=True))
        wait_for_line(first.output, READY_LINE, timeout_s)
    except BaseException:
        for process in (*nodes, first):
            process.process.kill()
        raise
    return first, nodes, token
