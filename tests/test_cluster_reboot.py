"""The node running a group's leader (rank 0) dies with requests in flight, and comes back: two nodes on loopback,
the model pinned to them leader-first on the joined node (`--pin B,A`), one batch slot so that one request runs
while the others wait. The joined node's agent and ranks are killed with SIGKILL; its pinned share waits for it
(a pin is kept); it starts again without its token, as after a reboot, and every request is answered once.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from ops.agent import node_id
from ops.serve import READY_LINE
from ops.spawn import spawn_node, spawn_server, stop_all, wait_for_line
from pipeline.access import OPERATOR
from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM, JOBS_STREAM, name_of_token
from tests.conftest import MODEL, connect_as


def instance(base_url: str) -> dict:
    (placed,) = httpx.get(base_url + "/cluster", timeout=30).json()["instances"]
    return placed


async def accepted(home, url: str, at_least: int) -> None:
    nc = await connect_as(home, url, OPERATOR)
    try:
        deadline = time.monotonic() + 60
        while (await nc.jetstream().stream_info(JOBS_STREAM)).state.last_seq < at_least:
            assert time.monotonic() < deadline, "the requests never reached the queue"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def records_per_job(home, url: str) -> dict[str, int]:
    nc = await connect_as(home, url, OPERATOR)
    try:
        info = await nc.jetstream().stream_info(AUDIT_STREAM, subjects_filter=f"{AUDIT_PREFIX}.>")
    finally:
        await nc.close()
    counts: dict[str, int] = {}
    for subject in info.state.subjects or {}:
        job = name_of_token(subject.split(".")[-2])
        counts[job] = counts.get(job, 0) + 1
    return counts


def test_a_lost_leader_node_comes_back_and_every_request_is_answered_once(tmp_path):
    first_home, second_home = tmp_path / "a", tmp_path / "b"
    first_id, second_id = node_id(first_home), node_id(second_home)  # made now, so that they can be pinned
    first = spawn_server(first_home, "--cluster", "--advertise", "127.0.0.1", "--no-mdns", "--memory-limit", "1.5",
                         "--heartbeat", "0.5", "--worker-timeout", "5", "--max-batch", "1", "--pin",
                         f"{second_id},{first_id}", ready="--token")
    nodes = []
    try:
        token = re.search(r"cj1\.\S+", "".join(first.output)).group(0)
        address = first.nats_url.removeprefix("tls://")
        nodes.append(spawn_node(second_home, address, "--token", token, "--memory-limit", "1.5"))
        wait_for_line(first.output, READY_LINE, 180)
        assert instance(first.base_url)["nodes"] == [second_id, first_id]
        client = openai.OpenAI(base_url=first.base_url, api_key="none", max_retries=0, timeout=300)
        questions = [[{"role": "user", "content": f"Question {i}: what is the capital of France?"}] for i in range(3)]
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(client.chat.completions.create, model=MODEL, messages=q, temperature=0,
                                   max_tokens=16) for q in questions]
            asyncio.run(accepted(first_home, first.nats_url, len(questions)))
            nodes[0].kill()  # the leader's node, mid-answer
            deadline = time.monotonic() + 60
            while instance(first.base_url)["state"] != "placing":  # seen lost; its pinned share waits for it
                assert time.monotonic() < deadline, "the lost leader's node was never noticed"
                time.sleep(0.1)
            assert not any(f.done() for f in futures), "a request was answered while its pinned node was away"
            back = spawn_node(second_home, "--memory-limit", "1.5")  # no token, no address: its home kept them
            nodes.append(back)
            answers = [future.result() for future in futures]
        assert all("Paris" in a.choices[0].message.content for a in answers), [a.choices[0].message.content
                                                                                for a in answers]
        assert any("Conclave node" in line and second_id in line for line in back.output)
        counts = asyncio.run(records_per_job(first_home, first.nats_url))
        assert all(counts.get(a.id) == 1 for a in answers), {a.id: counts.get(a.id) for a in answers}
    finally:
        stop_all((*nodes, first))
