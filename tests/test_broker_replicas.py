"""A 3-server broker: three nats-servers with routes between them (a NATS cluster, as an operator runs one for
Conclave with `--nats-url`), every stream kept in three replicas (`serve --replicas 3`). One server killed with
SIGKILL while jobs are queued loses nothing: every request is answered, and the audit log still verifies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import openai

from ops.config import free_port
from ops.credentials import role_identity, write_authorization
from ops.spawn import spawn_server
from pipeline.access import INGRESS, OPERATOR, worker_role
from pipeline.nats_server import EmbeddedNats
from pipeline.subjects import JOBS_STREAM
from tests.conftest import MODEL


async def stream_leader(home, url: str, stream: str) -> str:
    nc = await nats.connect(url.split(","), **role_identity(home, OPERATOR).connect_options())
    try:
        return (await nc.jetstream().stream_info(stream)).cluster.leader
    finally:
        await nc.close()


def test_a_broker_of_three_loses_no_job_and_no_record_when_one_server_dies(tmp_path):
    home = tmp_path / "home"
    for role in (OPERATOR, INGRESS, worker_role(MODEL)):
        role_identity(home, role)
    ports, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    servers = [EmbeddedNats(tmp_path / f"nats-{i}", port=ports[i], name=f"broker-{i}", cluster_port=routes[i],
                            routes=[f"127.0.0.1:{p}" for p in routes]) for i in range(3)]
    for server in servers:
        write_authorization(home, server.store_dir)
    for server in servers:  # from this thread: a server dies with the thread that started it (PR_SET_PDEATHSIG)
        server.start()
    url = ",".join(server.url for server in servers)
    srv = None
    try:
        srv = spawn_server(home, "--nats-url", url, "--replicas", "3", "--max-batch", "1", "--heartbeat", "0.5",
                           "--worker-timeout", "30", "--checkpoint-interval", "1")
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)
        questions = [[{"role": "user", "content": f"Question {i}: what is the capital of France?"}] for i in range(5)]
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(client.chat.completions.create, model=MODEL, messages=q, temperature=0,
                                   max_tokens=12) for q in questions]
            # One batch slot: while the first is generated the others are queued. The server killed is the one
            # leading the jobs stream (with one replica, the only one holding the queue).
            deadline = time.monotonic() + 120
            while not any("started" in line for line in srv.output):
                assert time.monotonic() < deadline, "no job started"
                time.sleep(0.05)
            leader = asyncio.run(stream_leader(home, url, JOBS_STREAM))
            (victim,) = [s for s in servers if s.name == leader]
            os.kill(victim.process.pid, signal.SIGKILL)
            answers = [future.result() for future in futures]
        assert all("Paris" in a.choices[0].message.content for a in answers)
        # Every record is there and vouched for: a checkpoint covers them, and verify passes.
        verify = None
        deadline = time.monotonic() + 60
        while verify is None or verify.returncode != 0:
            assert time.monotonic() < deadline, verify.stdout + verify.stderr
            verify = subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(home), "audit", "verify",
                                     "--expect-seq", str(len(answers))], capture_output=True, text=True, timeout=60)
    finally:
        if srv is not None:
            srv.stop()
        for server in servers:
            server.stop()
