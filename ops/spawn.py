"""Starting `conclave serve` as a child process on free loopback ports: the test suite's and `conclave
bench`'s way to get a real deployment."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ops.config import free_port
from ops.serve import READY_LINE


@dataclass
class ServerProcess:
    """A `conclave serve` started as a child process on free loopback ports."""

    process: subprocess.Popen
    base_url: str  # ends in /v1
    nats_url: str
    home: Path
    output: list[str]  # its stdout and stderr, line by line

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as an operator would, and its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def spawn_server(home: Path, *flags: str, timeout_s: float = 180.0) -> ServerProcess:
    """Start `conclave serve` and return once it printed READY_LINE."""
    port, nats_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "--home", str(home), "serve", "--port", str(port),
         "--nats-port", str(nats_port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # One thread reads every line (a full pipe would block the server) and keeps them for failure reports.
    # Waiting on the pipe with select() instead would miss lines already read into the file's buffer: two
    # ranks logging in the same millisecond arrive in one read.
    output: list[str] = []
    ready = threading.Event()

    def read_lines():
        for line in process.stdout:
            output.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()  # end of output: the server exited

    threading.Thread(target=read_lines, daemon=True).start()
    if not ready.wait(timeout_s):
        process.kill()
        raise TimeoutError(f"no {READY_LINE!r} within {timeout_s}s:\n" + "".join(output))
    if not any(READY_LINE in line for line in output):
        raise RuntimeError("the server exited before it was ready:\n" + "".join(output))
    return ServerProcess(process, f"http://127.0.0.1:{port}/v1", f"nats://127.0.0.1:{nats_port}", home, output)
