"""Worker death and server shutdown: clean errors, no hung connections, no orphan processes."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.conftest import FRANCE, MODEL, start_server, stream_until_broken



def test_killed_worker_gives_a_clean_error_then_recovers(server, client):
    pid = server.worker_pid()
    message = stream_until_broken(client, lambda: os.kill(pid, signal.SIGKILL))
    # Either the ingress noticed the silence, or the restarted worker took the redelivered job first.
    assert "stopped responding" in message or "failed mid-generation" in message
    # The supervisor restarts the worker; the next request waits in the queue for it and succeeds.
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert any(p != pid for p in server.worker_pids())


def test_sigterm_stops_every_process(tmp_path):
    srv = start_server(tmp_path / "home")
    worker = srv.worker_pid()
    nats_port = int(srv.nats_url.rsplit(":", 1)[1])
    assert srv.stop() == 0
    assert "Conclave stopped." in "".join(srv.output)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", nats_port), timeout=2).close()
