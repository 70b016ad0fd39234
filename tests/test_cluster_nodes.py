"""Three nodes on one machine: a `conclave serve --cluster` and two `conclave join`, each with its own home and
ports on loopback, each offering 1.5 GB (--memory-limit) so that the default model (on CPU: float32 weights and
an 8k x 4 KV cache, about 1.7 GB with its reserve) must be split over two of them.

What is checked is what an operator relies on: placement splits the model by itself and any node's ingress
answers; a node lost while requests are queued is seen within seconds, its share is placed again, and every
accepted request is answered once; a wrong token, a wrong cluster, a copied node id and a copied home are each
refused with the way out; a node's credentials can do a node's work and nothing else; a removed node is locked
out.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import nats
import openai
import pytest

from ops.agent import node_id, nodes_table
from ops.credentials import cluster_ca, new_seed
from ops.join import node_identities
from ops.spawn import NodeProcess, ServerProcess, spawn_cluster, stop_all
from pipeline.access import OPERATOR, node_role, worker_role
from pipeline.nodes import read_nodes, state_of
from pipeline.streams import jobs_in_hand
from pipeline.subjects import AUDIT_PREFIX, AUDIT_STREAM, JOBS_STREAM, NODES_PREFIX, job_subject, name_of_token
from schemas.jobs import ChatMessage, Done, Job, SamplingParams
from tests.conftest import FRANCE, MODEL, connect_as, wait_for_audit_record
from pipeline.catalogue import entry_subject, read_entries
from tests.sharded import sharded_copy
from tests.test_durability import final_event
from tests.test_trust import PERMISSION, Watched
from workers.split import layer_files, stage_files
from workers.store import ModelStore, bundled_gguf

LIMIT_GB = "1.5"


@dataclass
class Cluster:
    first: ServerProcess
    nodes: list[NodeProcess]
    token: str

    @property
    def address(self) -> str:
        return self.first.nats_url.removeprefix("tls://")

    def instance(self, model: str = MODEL) -> dict:
        (instance,) = [i for i in httpx.get(self.first.base_url + "/cluster", timeout=30).json()["instances"]
                       if i["model"] == model]
        return instance

    async def operator(self):
        return await connect_as(self.first.home, self.first.nats_url, OPERATOR)

    async def connect(self, role: str):
        return await connect_as(self.first.home, self.first.nats_url, role)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    first, nodes, token = spawn_cluster(tmp_path_factory.mktemp("node-a"), [tmp_path_factory.mktemp("node-b"),
                                                                           tmp_path_factory.mktemp("node-c")], LIMIT_GB)
    failed = request.session.testsfailed
    try:
        yield Cluster(first, nodes, token)
    finally:
        stop_all((*nodes, first))
        if request.session.testsfailed > failed:  # past pytest's capture: the machines' side of a failure
            for process in (first, *nodes):
                sys.__stderr__.write(f"--- {process.home}\n" + "".join(process.output[-150:]))


def test_placement_splits_the_model_over_two_nodes_and_the_third_node_answers(cluster):
    instance = cluster.instance()
    assert instance["state"] == "serving" and instance["layout"] == "pipeline", instance
    assert len(instance["nodes"]) == 2 and node_id(cluster.first.home) in instance["nodes"], instance
    (outside,) = [n for n in cluster.nodes if node_id(n.home) not in instance["nodes"]]
    client = openai.OpenAI(base_url=outside.base_url, api_key="none", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in answer.choices[0].message.content
    cluster_view = httpx.get(outside.base_url + "/cluster", timeout=30).json()
    assert cluster_view["controller"]["node_id"] == node_id(cluster.first.home)  # it holds the controller lease
    assert {n["facts"]["id"] for n in cluster_view["nodes"]} == {node_id(h) for h in
                                                                 (cluster.first.home, *(n.home for n in cluster.nodes))}
    # Each node of the plan runs one rank and reports its MLX memory; the third runs none.
    for node in cluster_view["nodes"]:
        placed = node["facts"]["id"] in instance["nodes"]
        assert node["ranks"] == (1 if placed else 0), node
        assert len(node["rank_memory"]) == node["ranks"] and all(r["active"] > 0 for r in node["rank_memory"])


def test_a_placement_preview_from_any_node_starts_nothing(cluster, server):
    outside = cluster.nodes[-1].base_url
    ids = [node_id(h) for h in (cluster.first.home, *(n.home for n in cluster.nodes))]
    plan = httpx.post(outside + "/cluster/placement", json={"model": MODEL}, timeout=60).json()
    assert plan["type"] == "plan" and plan["layout"] == "pipeline" and len(plan["ranks"]) == 2, plan
    assert all(r["memory"]["weights"] > 0 and r["memory"]["kv_cache"] > 0 for r in plan["ranks"])
    pinned = httpx.post(outside + "/cluster/placement", json={"model": MODEL, "nodes": ids, "split": [10, 10, 10]},
                        timeout=60).json()
    assert pinned["type"] == "plan" and [r["node"] for r in pinned["ranks"]] == ids, pinned
    assert [r["layers"] for r in pinned["ranks"]] == [[0, 10], [10, 20], [20, 30]]
    refused = httpx.post(outside + "/cluster/placement", json={"model": MODEL, "context": 10**7}, timeout=60).json()
    assert refused["type"] == "refusal" and "needs" in refused["reason"], refused
    unknown = httpx.post(outside + "/cluster/placement", json={"model": "no-such-model"}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    malformed = httpx.post(outside + "/cluster/placement", json={"model": MODEL, "context": "long"}, timeout=60)
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    assert cluster.instance()["nodes"] != ids  # nothing moved
    alone = httpx.post(server.base_url + "/cluster/placement", json={"model": MODEL}, timeout=60)
    assert alone.status_code == 404 and alone.json()["error"]["code"] == "not_a_cluster"


SECOND = "SmolLM2-second"  # the bundled model again, under another id: a second model of its own


def listing(url: str) -> list[dict]:
    answer = httpx.get(url + "/cluster/instances", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


async def test_a_model_added_at_runtime_takes_the_room_left_and_is_drained_when_removed(cluster):
    """POST /v1/cluster/instances on any node: a second model, on the first machine's disk only, is placed where the
    first one's plan leaves room for it (the node that model does not use: on the others, 0.5 of the 1.5 GB are left),
    that node fetches its files from the first machine, and it answers; it moves where it is pinned (the first
    machine), and is removed again without dropping the requests it had."""
    stored = ModelStore(cluster.first.home / "models").import_gguf(bundled_gguf(), SECOND)
    first_instance = cluster.instance()
    (free,) = [n for n in cluster.nodes if node_id(n.home) not in first_instance["nodes"]]
    url = cluster.nodes[0].base_url
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    nc = await cluster.operator()
    try:
        deadline = time.monotonic() + 30
        while not any(SECOND in s.facts.models for s in await read_nodes(nc.jetstream())):  # the source says so
            assert time.monotonic() < deadline, "the first machine never reported the model's files"
            await asyncio.sleep(0.2)
        body = {"model": SECOND, "context": 8192, "sequences": 3}  # about 0.8 GB with its reserve
        added = httpx.post(url + "/cluster/instances", json=body, timeout=60)
        assert added.status_code == 202 and added.json()["model"] == SECOND, added.text
        again = httpx.post(url + "/cluster/instances", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["changed"] is False, again.text
        deadline = time.monotonic() + 30
        while SECOND not in [m.id for m in client.models.list()]:  # listed by every ingress within seconds
            assert time.monotonic() < deadline, "the added model was never listed"
            await asyncio.sleep(0.2)
        # Asked at once, while it is placed and loading: queued, and answered once it serves.
        answer = client.chat.completions.create(model=SECOND, messages=FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in answer.choices[0].message.content
        second = cluster.instance(SECOND)
        assert second["state"] == "serving" and second["nodes"] == [node_id(free.home)], second
        assert second["memory"][0] > 0 and cluster.instance()["nodes"] == first_instance["nodes"]
        fetched = ModelStore(free.home / "models").get(SECOND)  # byte for byte, and only there
        assert fetched is not None and all((fetched.path / f.name).read_bytes() == f.read_bytes()
                                           for f in stored.path.iterdir() if f.is_file() and f.name[0] != ".")
        assert ModelStore(cluster.nodes[0 if cluster.nodes[1] is free else 1].home / "models").get(SECOND) is None
        assert {i["model"] for i in listing(url)} == {MODEL, SECOND}

        # Another body replaces its plan: pinned to the first machine, where its ranks use that model's own role.
        first_id = node_id(cluster.first.home)
        moved = httpx.post(url + "/cluster/instances", json={"model": SECOND, "context": 2048, "sequences": 1,
                                                             "nodes": [first_id]}, timeout=60)
        assert moved.status_code == 202, moved.text
        deadline = time.monotonic() + 60
        while cluster.instance(SECOND)["nodes"] != [first_id]:
            assert time.monotonic() < deadline, "the instance never moved where it was pinned"
            await asyncio.sleep(0.2)
        answer = client.chat.completions.create(model=SECOND, messages=FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in answer.choices[0].message.content

        # The model serve was started with stays; an unknown one is not found; a malformed body is refused.
        kept = httpx.delete(url + f"/cluster/instances/{MODEL}", timeout=30)
        assert kept.status_code == 409 and kept.json()["error"]["code"] == "instance_in_use", kept.text
        unknown = httpx.post(url + "/cluster/instances", json={"model": "no-such-model"}, timeout=30)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found", unknown.text
        malformed = httpx.post(url + "/cluster/instances", json={"model": SECOND, "sequences": "many"}, timeout=30)
        assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"

        questions = [[{"role": "user", "content": f"Question {i}: what is the capital of France?"}] for i in range(3)]
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(client.chat.completions.create, model=SECOND, messages=q, temperature=0,
                                   max_tokens=16) for q in questions]
            deadline = time.monotonic() + 60
            while (await jobs_in_hand(nc.jetstream(), SECOND) or 0) < len(questions):  # all in its queue
                assert time.monotonic() < deadline, "the requests never reached the queue"
                await asyncio.sleep(0.05)
            removed = httpx.delete(url + f"/cluster/instances/{SECOND}", timeout=30)
            assert removed.status_code == 200 and removed.json()["deleted"] is True, removed.text
            deadline = time.monotonic() + 30
            while cluster.instance(SECOND)["state"] != "stopping":
                assert time.monotonic() < deadline, "the removed instance never said it was stopping"
                await asyncio.sleep(0.1)
            back = httpx.post(url + "/cluster/instances", json=body, timeout=30)  # not while it drains
            assert back.status_code == 409 and back.json()["error"]["code"] == "instance_stopping", back.text
            answers = [future.result() for future in futures]  # drained: answered, not dropped
        assert all("Paris" in a.choices[0].message.content for a in answers)
        deadline = time.monotonic() + 60
        while any(i["model"] == SECOND for i in listing(url)):
            assert time.monotonic() < deadline, "the removed instance never went"
            await asyncio.sleep(0.2)
        assert await jobs_in_hand(nc.jetstream(), SECOND) is None  # its consumer is gone
        deadline = time.monotonic() + 30
        ranks = {first_id: 1, node_id(free.home): 0}  # the first model's rank only
        while {s.facts.id: s.ranks for s in await read_nodes(nc.jetstream()) if s.facts.id in ranks} != ranks:
            assert time.monotonic() < deadline, "the removed instance's rank kept running"
            await asyncio.sleep(0.2)
        gone = httpx.delete(url + f"/cluster/instances/{SECOND}", timeout=30)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    finally:
        await nc.close()


THIRD = "SmolLM2-third"


def statuses(url: str) -> dict[str, str]:
    answer = httpx.get(url + "/models", timeout=30)
    assert answer.status_code == 200, answer.text
    return {m["id"]: m["status"] for m in answer.json()["data"]}


async def test_models_of_the_catalogue_load_on_demand_and_switch_when_memory_fits_one_at_a_time(cluster):
    """Two models, neither running, one on the first machine's disk and one on a joined node's only: `GET /v1/models`
    lists them idle, and a request for either is answered (loaded on demand, 8k x 4 as serve's model: about 1.7 GB,
    which only the free node and one other together have room for beside the served model, so one at a time). Each
    switch unloads the idle one first; a keep-alive unloads a model left idle; the audit record says its job waited
    for a load. The first machine and the controller place the joined node's model by its catalogue entry."""
    store = ModelStore(cluster.first.home / "models")
    if store.get(SECOND) is None:  # (the test before leaves it there)
        store.import_gguf(bundled_gguf(), SECOND)
    # The third in six weight files (the tensors of no layer, then 6 layers a file), as large checkpoints come: a
    # pipeline rank's node fetches only its stage's. Written beside the store, then moved in at once (as an import).
    holder = cluster.nodes[1].home / "models"
    weights = sharded_copy(store.path(SECOND), holder / ".incoming-test", layers_per_file=6)
    (holder / ".incoming-test").rename(ModelStore(holder).path(THIRD))
    url = cluster.nodes[0].base_url
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 30
    while {statuses(url).get(SECOND), statuses(url).get(THIRD)} != {"idle"}:
        assert time.monotonic() < deadline, f"the catalogue never listed both idle: {statuses(url)}"
        await asyncio.sleep(0.2)
    assert statuses(url)[MODEL] == "loaded"

    def ask(model: str) -> str:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=FRANCE, temperature=0,
                                                                max_tokens=12)
        assert "Paris" in raw.parse().choices[0].message.content
        return raw.headers["x-request-id"]

    job = ask(SECOND)
    record = await wait_for_audit_record(cluster, lambda r: r.job_id == job)
    assert record.outcome == "done" and record.load_wait_ms > 0, record
    assert statuses(url)[SECOND] == "loaded" and statuses(url)[THIRD] == "idle"
    for model, other in ((THIRD, SECOND), (SECOND, THIRD)):
        ask(model)  # answered once the other, idle, was unloaded to make room
        placed = {i["model"]: i for i in listing(url)}
        assert placed[model]["state"] == "serving" and other not in placed, placed
        assert len(placed[model]["nodes"]) == 2, placed[model]
        if model == THIRD:  # each node without it fetched its stage's weight files, no more
            homes = {node_id(n.home): n.home for n in (cluster.first, *cluster.nodes) if n.home != holder.parent}
            fetched = [(homes[n], layers) for n, layers in zip(placed[THIRD]["nodes"], placed[THIRD]["layers"])
                       if n in homes]
            assert fetched, placed[THIRD]
            for home, (start, end) in fetched:
                held = ModelStore(home / "models")
                assert held.get(THIRD) is None and held.shards()[THIRD] == sorted(
                    stage_files(*layer_files(weights), start, end))
                assert len(held.shards()[THIRD]) < len(set(weights.values()))
    unknown = httpx.post(url + "/chat/completions", json={"model": "no-such-model", "messages": FRANCE}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    listed = conclave(cluster.first.home, "models", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows[SECOND][0] == "loaded" and rows[THIRD][0] == "idle", listed.stdout
    assert rows[THIRD][1] == node_id(holder.parent), listed.stdout  # where its files are
    # A keep-alive given to a loaded model does not reload it, and unloads it once idle that long.
    kept = conclave(cluster.first.home, "models", "load", SECOND, "--keep-alive", "1")
    assert kept.returncode == 0, kept.stderr
    deadline = time.monotonic() + 60
    while any(i["model"] == SECOND for i in listing(url)):
        assert time.monotonic() < deadline, "the idle model outlived its keep-alive"
        await asyncio.sleep(0.2)
    gone = conclave(cluster.first.home, "models", "unload", SECOND)
    assert gone.returncode == 1 and "no instance" in gone.stderr, gone.stderr
    # A job published on NATS for a model nothing runs (an internal system's) loads it too, and is answered.
    nc = await cluster.operator()
    try:
        (entry,) = await read_entries(nc.jetstream(), THIRD)  # the holder's, with every file's size and SHA-256
        assert entry.node == node_id(holder.parent) and entry.layer_files, entry
        assert {f.name: f.size for f in entry.files} == {p.name: p.stat().st_size for p in ModelStore(holder).path(
            THIRD).iterdir() if not p.name.startswith(".")}
        replies = await nc.subscribe("conclave.replies.operator.on-demand")
        job = Job(id="job-on-demand", model=THIRD, reply_subject="conclave.replies.operator.on-demand", kind="chat",
                  stream=False, messages=[ChatMessage(**m) for m in FRANCE], params=SamplingParams(temperature=0),
                  created=time.time())
        await nc.jetstream().publish(job_subject(THIRD, OPERATOR), msgspec.json.encode(job),
                                     headers={"Nats-Msg-Id": job.id})
        done = await final_event(replies)
        assert isinstance(done, Done) and "Paris" in done.text, done
    finally:
        await nc.close()
    unloaded = conclave(cluster.first.home, "models", "unload", THIRD)
    assert unloaded.returncode == 0 and "unloading" in unloaded.stdout, unloaded.stderr
    deadline = time.monotonic() + 60
    while any(i["model"] == THIRD for i in listing(url)):
        assert time.monotonic() < deadline, "the unloaded model never went"
        await asyncio.sleep(0.2)
    # Deleted from its only holder's store, it leaves the catalogue.
    shutil.rmtree(ModelStore(holder).path(THIRD))
    nc = await cluster.operator()
    try:
        deadline = time.monotonic() + 30
        while await read_entries(nc.jetstream(), THIRD):
            assert time.monotonic() < deadline, "the deleted model stayed in the catalogue"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def conclave(home: Path, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout_s)


def test_a_wrong_token_or_cluster_is_refused_and_nothing_joins(cluster, tmp_path):
    _, fingerprint, seed = cluster.token.split(".")
    stranger = f"cj1.{fingerprint}.{new_seed().decode()}"
    refused = conclave(tmp_path / "stranger", "join", cluster.address, "--token", stranger)
    assert refused.returncode == 1 and "refused the token" in refused.stderr, refused.stderr
    elsewhere = f"cj1.{'0' * 64}.{seed}"
    refused = conclave(tmp_path / "elsewhere", "join", cluster.address, "--token", elsewhere)
    assert refused.returncode == 1 and "is not the token's" in refused.stderr and "nothing was sent" in refused.stderr
    assert not (tmp_path / "elsewhere" / "cluster.json").exists()
    garbled = conclave(tmp_path / "garbled", "join", cluster.address, "--token", "hunter2")
    assert garbled.returncode == 1 and "not a Conclave join token" in garbled.stderr


def test_a_copied_node_id_is_refused_with_the_way_out(cluster, tmp_path):
    member = cluster.nodes[0].home
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(member / "node-id", copy / "node-id")  # the id, not its keys: a half-copied home
    refused = conclave(copy, "join", cluster.address, "--token", cluster.token)
    assert refused.returncode == 1, refused.stderr
    assert f"node id {node_id(member)} already belongs to a member" in refused.stderr
    assert "remove <home>/node-id" in refused.stderr
    # A whole copy (a cloned disk: same id, same keys) gets in, but its agent stops while the original reports.
    twin = tmp_path / "twin"
    shutil.copytree(member, twin, ignore=shutil.ignore_patterns("models", "groups"))
    refused = conclave(twin, "join")
    assert refused.returncode == 2 and f"node id {node_id(member)} is reporting from" in refused.stderr, refused.stderr


def test_a_cluster_connection_trusts_the_cluster_ca_alone(cluster):
    from pipeline.access import tls_context

    context = tls_context(cluster_ca(cluster.first.home))
    assert context.cert_store_stats()["x509_ca"] == 1  # not the system's public CAs besides


async def test_a_nodes_credentials_do_a_nodes_work_and_nothing_else(cluster):
    member = cluster.nodes[0].home
    own, other = node_id(member), node_id(cluster.first.home)
    identities = node_identities(member, own)
    agent = Watched()

    async def keep(exc):
        agent.errors.append(str(exc).lower())

    agent.nc = await nats.connect(cluster.first.nats_url, error_cb=keep, allow_reconnect=False,
                                  **identities["agent"].connect_options())
    worker_identity = identities["worker"].__class__(worker_role(MODEL), identities["worker"].seed_file,
                                                     identities["worker"].ca_file)
    worker = Watched()

    async def keep_worker(exc):
        worker.errors.append(str(exc).lower())

    worker.nc = await nats.connect(cluster.first.nats_url, error_cb=keep_worker, allow_reconnect=False,
                                   **worker_identity.connect_options())
    try:
        for role in (agent, worker):
            js = role.nc.jetstream()
            await role.refused(lambda: js.delete_stream(JOBS_STREAM), f"$JS.API.STREAM.DELETE.{JOBS_STREAM}")
            await role.refused(lambda: js.purge_stream(AUDIT_STREAM), f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}")
            await role.refused(lambda: role.nc.subscribe("conclave.replies.tests.>"), "sub conclave.replies.tests.>")
            await role.refused(lambda: role.nc.subscribe("conclave.replies.ingress.>"),
                               "sub conclave.replies.ingress.>")
        # An agent speaks for its own node only, and hears only its own orders.
        await agent.refused(lambda: agent.nc.publish(f"{NODES_PREFIX}.{other}", b"{}"), f"{NODES_PREFIX}.{other}")
        await agent.refused(lambda: agent.nc.subscribe(f"conclave.agents.{other}.orders.>"),
                            f"sub conclave.agents.{other}.orders.>")
        await agent.refused(lambda: agent.nc.publish(f"conclave.agents.{other}.events", b"{}"),
                            f"conclave.agents.{other}.events")
        # It describes its own copies of models in the catalogue, never another node's.
        forged = entry_subject(MODEL, other)
        await agent.refused(lambda: agent.nc.publish(forged, b"{}"), forged)
        # Nor can it wipe the others' statuses from its own key with a rollup.
        with pytest.raises(nats.js.errors.APIError):
            await agent.nc.jetstream().publish(f"{NODES_PREFIX}.{own}", b"{}", headers={"Nats-Rollup": "all"})
        operator = await cluster.operator()
        try:
            assert other in {s.facts.id for s in await read_nodes(operator.jetstream())}
        finally:
            await operator.close()
        assert not [e for e in agent.errors if PERMISSION not in e], agent.errors
    finally:
        await agent.nc.close()
        await worker.nc.close()


async def test_a_lost_node_is_seen_its_share_placed_again_and_every_request_answered_once(cluster):
    instance = cluster.instance()
    (lost,) = [n for n in cluster.nodes if node_id(n.home) in instance["nodes"]]
    (spare,) = [n for n in cluster.nodes if n is not lost]
    client = openai.OpenAI(base_url=spare.base_url, api_key="none", max_retries=0, timeout=300)
    nc = await cluster.operator()
    js = nc.jetstream()
    try:
        before = (await js.stream_info(JOBS_STREAM)).state.last_seq
        questions = [[{"role": "user", "content": f"Question {i}: what is the capital of France?"}] for i in range(6)]
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(client.chat.completions.create, model=MODEL, messages=q, temperature=0,
                                   max_tokens=16) for q in questions]
            deadline = time.monotonic() + 60
            while (await js.stream_info(JOBS_STREAM)).state.last_seq < before + len(questions):  # all accepted
                assert time.monotonic() < deadline, "the requests never reached the queue"
                await asyncio.sleep(0.05)
            lost.kill()
            killed = time.monotonic()
            gone = node_id(lost.home)
            while not any(s.facts.id == gone and state_of(s) == "lost" for s in await read_nodes(js)):
                assert time.monotonic() - killed < 60, "the killed node was never shown as lost"
                await asyncio.sleep(0.1)
            seen_after = time.monotonic() - killed
            assert "(LOST)" in nodes_table(await read_nodes(js))
            answers = [future.result() for future in futures]
        assert seen_after < 5.0, f"the lost node was shown as lost only after {seen_after:.1f}s"
        assert all("Paris" in a.choices[0].message.content for a in answers), [a.choices[0].message.content
                                                                                for a in answers]
        replaced = cluster.instance()
        assert replaced["state"] == "serving" and gone not in replaced["nodes"], replaced
        assert node_id(spare.home) in replaced["nodes"]
        # One audit record per job: the records' subjects end in <job id>.<jobs stream sequence>.
        info = await js.stream_info(AUDIT_STREAM, subjects_filter=f"{AUDIT_PREFIX}.>")
        per_job: dict[str, int] = {}
        for subject in info.state.subjects or {}:
            job = name_of_token(subject.split(".")[-2])
            per_job[job] = per_job.get(job, 0) + 1
        assert all(per_job.get(a.id) == 1 for a in answers), {a.id: per_job.get(a.id) for a in answers}
    finally:
        await nc.close()


def test_a_removed_node_is_locked_out(cluster):
    member = next(n for n in reversed(cluster.nodes) if n.process.poll() is None)  # (the lost-node test killed one)
    own = node_id(member.home)
    removed = conclave(cluster.first.home, "nodes", "remove", own)
    assert removed.returncode == 0 and "revoked now" in removed.stdout, removed.stderr

    async def connect():
        identity = node_identities(member.home, own)["agent"]
        assert identity.role == node_role(own)
        return await nats.connect(cluster.first.nats_url, allow_reconnect=False, connect_timeout=5,
                                  **identity.connect_options())

    deadline = time.monotonic() + 30
    while True:  # the reload takes effect within moments; until then the old key still opens a connection
        try:
            nc = asyncio.run(connect())
        except nats.errors.Error as exc:
            assert "authorization" in str(exc).lower()
            break
        asyncio.run(nc.close())
        assert time.monotonic() < deadline, "the removed node's key still works"
    # Locked out, it cannot say goodbye (its stop would wait on NATS for half a minute): stopped the hard way.
    member.kill()
