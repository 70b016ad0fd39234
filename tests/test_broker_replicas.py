"""A broker of three, formed by joining (ops/brokers.py): `conclave serve --cluster --brokers 3` and two
`conclave join --broker`, each machine with its own home and ports on loopback. The streams are kept in three
replicas, so one nats-server killed with SIGKILL while jobs are queued loses nothing: every request is answered
and the audit log still verifies. The routes between the brokers admit only certificates of the cluster's CA,
and a user the first machine adds is admitted by the other brokers too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import nats
import openai

from ops.agent import node_id
from ops.cluster_tls import ensure_cluster_tls, tls_dir
from ops.credentials import cluster_ca, role_identity
from ops.serve import READY_LINE
from ops.join import read_membership
from ops.spawn import spawn_brokers, spawn_server, stop_all
from pipeline.access import OPERATOR, Identity
from pipeline.lease import LEASE_S
from pipeline.subjects import JOBS_STREAM
from tests.conftest import MODEL


def conclave(home, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(home), *argv], capture_output=True,
                          text=True, timeout=60)


async def stream_leader(home, url: str, stream: str) -> str:
    nc = await nats.connect(url.split(","), **Identity(OPERATOR, role_identity(home, OPERATOR).seed_file,
                                            cluster_ca(home)).connect_options())
    try:
        return (await nc.jetstream().stream_info(stream)).cluster.leader
    finally:
        await nc.close()


async def admitted(url: str, identity: Identity) -> bool:
    try:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **identity.connect_options())
    except Exception:
        return False
    await nc.close()
    return True


def route_greets(port: int, tls) -> bool:
    """Whether a route listener, which speaks TLS from its first byte, greets a server with this certificate
    (`tls`: a folder of ops/cluster_tls.py) instead of refusing the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(tls / "server.pem", tls / "server.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            with context.wrap_socket(sock) as connection:
                return connection.recv(4096).startswith(b"INFO")
        except (ssl.SSLError, ConnectionError):  # an alert (unknown CA), or closed without one
            return False


async def lease_holder(home, url: str) -> str | None:
    from pipeline.lease import read_lease

    nc = await nats.connect(url.split(","), **Identity(OPERATOR, role_identity(home, OPERATOR).seed_file,
                                                       cluster_ca(home)).connect_options())
    try:
        lease = await read_lease(nc.jetstream())
        return lease.node_id if lease else None
    finally:
        await nc.close()


def ask_while(base_url: str, processes, action) -> list:
    """Five requests through `base_url`; once the first is generated (one batch slot: the others wait in the
    queue), `action()`. Every answer must be Paris."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    questions = [[{"role": "user", "content": f"Question {i}: what is the capital of France?"}] for i in range(5)]

    def started() -> int:
        return sum("started" in line for process in processes for line in process.output)

    before = started()
    with ThreadPoolExecutor(len(questions)) as pool:
        futures = [pool.submit(client.chat.completions.create, model=MODEL, messages=q, temperature=0, max_tokens=12)
                   for q in questions]
        deadline = time.monotonic() + 120
        while started() == before:
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.05)
        action()
        answers = [future.result() for future in futures]
    assert all("Paris" in a.choices[0].message.content for a in answers)
    return answers


def test_three_brokers_formed_by_joining_lose_no_job_when_one_dies(tmp_path):
    homes = [tmp_path / name for name in ("a", "b", "c")]
    first, nodes, flags = spawn_brokers(homes[0], homes[1:], "--max-batch", "1", "--heartbeat", "0.5",
                                        "--worker-timeout", "30", "--checkpoint-interval", "1")
    processes = [first, *nodes]
    try:
        # With one broker there is no majority: nothing is served until the second broker node has joined.
        joined = [i for i, line in enumerate(first.output) if "joined the cluster as a broker" in line]
        assert len(joined) == 2 and joined[1] < next(i for i, line in enumerate(first.output) if READY_LINE in line)
        brokers = [read_membership(home).own_broker for home in homes[1:]]
        routes = [int(flags[flags.index("--route-port") + 1]), *(b.route_port for b in brokers)]
        urls = [first.nats_url, *(f"tls://127.0.0.1:{b.client_port}" for b in brokers)]

        # Each route listener greets a certificate of the cluster's CA, and refuses one of another CA.
        stranger = ensure_cluster_tls(tmp_path / "stranger")
        for port in routes:
            assert route_greets(port, tls_dir(homes[0])) and not route_greets(port, stranger)
        # A submitter issued on the first machine, while it serves, is admitted by the other brokers too.
        issued = conclave(homes[0], "credentials", "issue", "audit-robot", "--out", str(tmp_path / "robot.nk"))
        assert issued.returncode == 0, issued.stderr
        robot = Identity("audit-robot", tmp_path / "robot.nk", cluster_ca(homes[0]))
        deadline = time.monotonic() + 30
        while not asyncio.run(admitted(urls[2], robot)):
            assert time.monotonic() < deadline, "the third broker never admitted the new submitter"
            time.sleep(0.2)

        def kill_leader_of_jobs():
            leader = asyncio.run(stream_leader(homes[0], ",".join(urls), JOBS_STREAM))
            (victim,) = [home for home in homes if node_id(home) == leader]
            os.kill(int((victim / "nats" / "nats-server.pid").read_text()), signal.SIGKILL)

        # The nats-server leading the jobs stream killed (it restarts), with requests queued.
        answers = ask_while(first.base_url, processes, kill_leader_of_jobs)
        assert asyncio.run(lease_holder(homes[0], ",".join(urls))) == node_id(homes[0])
        # The first machine lost whole (serve, its nats-server, its ranks), with requests queued at a broker node's
        # ingress: a broker node takes the controller lease and places the model on the nodes left.
        answers += ask_while(nodes[0].base_url, processes, first.kill)
        # (The answers may come first, from an instance placed on a node left: the lease then moves once it runs out.)
        deadline, survivors = time.monotonic() + LEASE_S + 10, [node_id(home) for home in homes[1:]]
        while (holder := asyncio.run(lease_holder(homes[0], ",".join(urls[1:])))) not in survivors:
            assert time.monotonic() < deadline, f"the controller lease stayed with {holder}, not a node left"
            time.sleep(0.2)
        assert httpx.get(nodes[0].base_url + "/cluster", timeout=30).json()["controller"]["node_id"] == holder
        # The first machine back: it stands by (the lease stays where it is) and signs audit checkpoints again.
        processes[0] = first = spawn_server(homes[0], *flags)
        assert asyncio.run(lease_holder(homes[0], ",".join(urls[1:]))) == holder
        # Every record is there, one per request, and vouched for: a checkpoint covers them, and verify passes.
        verify = None
        deadline = time.monotonic() + 60
        while verify is None or verify.returncode != 0:
            assert time.monotonic() < deadline, verify.stdout + verify.stderr
            verify = conclave(homes[0], "audit", "verify", "--expect-seq", str(len(answers)))
    finally:
        stop_all(reversed(processes))
        for process in processes:
            sys.stdout.write("".join(process.output[-40:]))
