"""Placement as a table: nodes and a model in, a plan or a refusal with its numbers out (ops/placement.py)."""

from __future__ import annotations

import itertools
import random

import msgspec

from ops.model_facts import model_facts
from ops.placement import RESERVE, budget, offers, place
from pipeline.nodes import cluster_models
from schemas.cluster import Link, ModelFacts, NodeFacts, NodeStatus, Plan, PlacementRequest, Refusal
from schemas.membership import Instance
from tests.conftest import MODEL

GB = 10**9


def model(id: str, layers: int, weight_gb: float, kv_per_token: int, heads: int, hidden: int = 8192,
          intermediate: int = 28672, vocab: int = 128256) -> ModelFacts:
    edge = int(weight_gb * GB * 0.02)  # embeddings and head: a few percent of a large model
    per_layer = (int(weight_gb * GB) - 2 * edge) // layers
    return ModelFacts(id=id, layers=layers, layer_bytes=[per_layer] * layers, embedding_bytes=edge, head_bytes=edge,
                      kv_bytes_per_token=kv_per_token, hidden_size=hidden, intermediate_size=intermediate,
                      vocab_size=vocab, tensor_sizes=[n for n in range(1, 65) if heads % n == 0])


# Kimi K2 at 4 bits: 61 layers, about 578 GB; multi-head latent attention caches (512 + 64) x 2 bytes a token.
K2 = msgspec.structs.replace(model("kimi-k2-4bit", 61, 578, (512 + 64) * 2, heads=64, hidden=7168,
                                   intermediate=18432, vocab=163840), kv_shared_by_heads=True)
# A 70B llama at 4 bits: 80 layers, about 40 GB; 8 KV heads of 128: 2 x 8 x 128 x 2 bytes a token and layer.
LLAMA70 = model("llama-70b-4bit", 80, 40, 2 * 8 * 128 * 2, heads=64)


def node(id: str, available_gb: float, working_set_gb: float | None = None, backend: str = "metal",
         models: tuple[str, ...] = ()) -> NodeFacts:
    return NodeFacts(id=id, backend=backend, memory_total=int(available_gb * 1.1 * GB),
                     memory_available=int(available_gb * GB),
                     working_set=int(working_set_gb * GB) if working_set_gb is not None else None,
                     models=list(models))


def mesh(ids, kind="rdma") -> list[Link]:
    return [Link(a=a, b=b, kind=kind) for a, b in itertools.combinations(ids, 2)]


def check(plan: Plan, model: ModelFacts) -> None:
    """What every plan must hold: no rank over its budget, every layer placed once, at least one per stage."""
    assert all(r.memory.total <= r.budget for r in plan.ranks), plan
    if plan.layout == "pipeline":
        assert plan.ranks[0].layers[0] == 0 and plan.ranks[-1].layers[1] == model.layers
        assert all(a.layers[1] == b.layers[0] for a, b in zip(plan.ranks, plan.ranks[1:]))
        assert all(r.layers[1] - r.layers[0] >= 1 for r in plan.ranks)


def test_a_1t_model_on_four_512_gb_macs_with_an_rdma_mesh_is_tensor_parallel_over_all_four():
    studios = [node(f"studio-{i}", 500, working_set_gb=400) for i in range(4)]
    plan = place(K2, studios, mesh([n.id for n in studios]), PlacementRequest(context=8192, sequences=4))
    assert isinstance(plan, Plan) and (plan.layout, plan.backend, len(plan.ranks)) == ("tensor", "jaccl", 4)
    check(plan, K2)
    # Budgeted by the working set, not the RAM: each holds a quarter of the layers and the whole embeddings.
    assert all(r.budget == 400 * GB for r in plan.ranks)
    # Over Ethernet the same machines make the fewest-node pipeline instead.
    plan = place(K2, studios, mesh([n.id for n in studios], "ethernet"), PlacementRequest())
    assert isinstance(plan, Plan) and (plan.layout, plan.backend, len(plan.ranks)) == ("pipeline", "ring", 2)
    check(plan, K2)


def test_a_70b_model_on_uneven_nodes_is_a_pipeline_split_by_memory():
    nodes = [node("big", 64), node("mid", 48), node("small", 16)]
    plan = place(LLAMA70, nodes, [], PlacementRequest(context=32768, sequences=4))  # 43 GB of KV cache
    assert isinstance(plan, Plan) and plan.layout == "pipeline" and [r.node for r in plan.ranks] == ["big", "mid"]
    check(plan, LLAMA70)
    big, mid = (r.layers[1] - r.layers[0] for r in plan.ranks)
    assert big > mid  # more layers where there is more memory
    # A longer context needs one more node, and a longer one still fits nowhere: a refusal with its numbers.
    plan = place(LLAMA70, nodes, [], PlacementRequest(context=98304, sequences=2))
    assert isinstance(plan, Plan) and len(plan.ranks) == 3
    check(plan, LLAMA70)
    refused = place(LLAMA70, nodes, [], PlacementRequest(context=131072, sequences=4))
    assert isinstance(refused, Refusal) and refused.needed > refused.available
    assert "for weights" in refused.reason and "128k context x 4 sequences" in refused.reason
    assert "3 nodes offer" in refused.reason and f"{refused.available / GB:.1f} GB" in refused.reason


def test_a_model_that_fits_nowhere_is_refused_with_the_numbers():
    refused = place(K2, [node("a", 128), node("b", 128), node("c", 64)], [], PlacementRequest())
    assert isinstance(refused, Refusal)
    assert refused.reason.startswith("kimi-k2-4bit needs ") and "578.0 GB for weights" in refused.reason
    assert refused.available == int(128 * GB * (1 - RESERVE)) * 2 + int(64 * GB * (1 - RESERVE))


def test_one_node_when_it_fits_preferring_the_node_that_holds_the_files():
    nodes = [node("large", 256), node("holder", 64, models=("llama-70b-4bit",))]
    plan = place(LLAMA70, nodes, [], PlacementRequest(context=8192, sequences=1))
    assert isinstance(plan, Plan) and (plan.layout, [r.node for r in plan.ranks]) == ("whole", ["holder"])
    # When it does not fit the holder, the largest node.
    plan = place(LLAMA70, nodes, [], PlacementRequest(context=65536, sequences=2))
    assert isinstance(plan, Plan) and [r.node for r in plan.ranks] == ["large"]


def test_the_budget_is_the_working_set_or_available_memory_never_total_ram():
    assert budget(node("m", 500, working_set_gb=400)) == 400 * GB
    assert budget(node("m", 300, working_set_gb=400)) == 300 * GB
    assert budget(node("c", 100, backend="cpu")) == 100 * GB


def test_pins_are_followed_or_refused_with_the_rank_that_overflows():
    nodes = [node("a", 64), node("b", 48), node("c", 16)]
    plan = place(LLAMA70, nodes, [], PlacementRequest(nodes=["c", "a"], split=[10, 70], context=4096, sequences=1))
    assert isinstance(plan, Plan) and [(r.node, r.layers) for r in plan.ranks] == [("c", (0, 10)), ("a", (10, 80))]
    refused = place(LLAMA70, nodes, [], PlacementRequest(nodes=["c", "a"], split=[70, 10], context=4096, sequences=1))
    assert isinstance(refused, Refusal) and refused.reason.startswith("node c would need ")
    assert "layers 0..69" in refused.reason and "offers 16.0 GB" in refused.reason
    assert "no such node: z" in place(LLAMA70, nodes, [], PlacementRequest(nodes=["a", "z"])).reason
    assert "add up to" in place(LLAMA70, nodes, [], PlacementRequest(nodes=["a", "b"], split=[1, 2])).reason
    tensor = place(LLAMA70, nodes, [], PlacementRequest(nodes=["a", "b", "c"], layout="tensor"))
    assert isinstance(tensor, Refusal) and "splits over 1, 2, 4, 8" in tensor.reason


def test_inputs_that_cannot_be_placed_are_refused_not_crashed():
    nodes = [node("a", 64), node("b", 48)]
    reasons = [place(LLAMA70, nodes, [], request).reason for request in (
        PlacementRequest(nodes=["a", "a"]), PlacementRequest(context=-1), PlacementRequest(sequences=0),
        PlacementRequest(layout="tensor", split=[40, 40]))]
    assert reasons == ["a node is pinned twice", "context and sequences must be at least 1",
                       "context and sequences must be at least 1", "a split pins a pipeline; layout tensor takes none"]
    assert place(LLAMA70, [], [], PlacementRequest()).reason == "no nodes to place it on"
    copied = place(LLAMA70, [node("a", 30), node("a", 30)], [], PlacementRequest())
    assert isinstance(copied, Refusal) and "two nodes report the id a" in copied.reason
    tiny = model("tiny", 2, 1, 1024, heads=8, hidden=64, intermediate=128, vocab=100)
    three = [node(n, 0.4) for n in "xyz"]
    assert "needs 3 layers; it has 2" in place(tiny, three, [], PlacementRequest(nodes=["x", "y", "z"],
                                                                                layout="pipeline")).reason


def test_a_layout_pinned_alone_is_searched_within_that_layout():
    nodes = [node("a", 30), node("b", 30)]
    plan = place(LLAMA70, nodes, [], PlacementRequest(layout="pipeline", context=4096, sequences=1))
    assert isinstance(plan, Plan) and plan.layout == "pipeline" and len(plan.ranks) == 2
    plan = place(LLAMA70, nodes, [], PlacementRequest(layout="tensor", context=4096, sequences=1))
    assert isinstance(plan, Plan) and (plan.layout, plan.backend, len(plan.ranks)) == ("tensor", "ring", 2)


def test_a_latent_kv_cache_is_not_divided_by_tensor_parallel():
    studios = [node(f"s{i}", 260, working_set_gb=250) for i in range(4)]
    long = PlacementRequest(context=131072, sequences=8)  # 74 GB of latent KV cache
    # Every tensor rank would hold the whole latent (578/4 GB of weights + 74 GB + reserve > 250 GB): a pipeline,
    # where each stage holds only its layers' share of the cache.
    plan = place(K2, studios, mesh([n.id for n in studios]), long)
    assert isinstance(plan, Plan) and plan.layout == "pipeline"
    check(plan, K2)
    split_heads = msgspec.structs.replace(K2, kv_shared_by_heads=False)  # were it split by heads, tensor fits
    assert place(split_heads, studios, mesh([n.id for n in studios]), long).layout == "tensor"


def test_cpu_nodes_count_16_bit_weights_and_the_kv_cache_in_float32():
    half = msgspec.structs.replace(LLAMA70, half_float_bytes=LLAMA70.weight_bytes)  # all float16, say
    metal, cpu = node("m", 200), node("c", 200, backend="cpu")
    on_metal = place(half, [metal], [], PlacementRequest(context=4096, sequences=1)).ranks[0].memory
    on_cpu = place(half, [cpu], [], PlacementRequest(context=4096, sequences=1)).ranks[0].memory
    assert on_cpu.weights == 2 * on_metal.weights and on_cpu.kv_cache == 2 * on_metal.kv_cache


def test_an_rdma_mesh_is_found_even_when_the_node_with_the_files_has_no_rdma():
    nodes = [node("holder", 64, models=("kimi-k2-4bit",))] + [node(f"s{i}", 400) for i in range(4)]
    plan = place(K2, nodes, mesh([f"s{i}" for i in range(4)]), PlacementRequest())
    assert isinstance(plan, Plan) and (plan.layout, len(plan.ranks)) == ("tensor", 4)


def test_uneven_layers_are_split_whenever_some_split_fits():
    """Against every split (brute force): placement finds one whenever one exists, never over a budget."""
    rng = random.Random(11)
    for _ in range(300):
        layers = rng.randint(2, 7)
        sizes = [rng.randint(1, 4) * GB for _ in range(layers)]
        uneven = ModelFacts(id="u", layers=layers, layer_bytes=sizes, embedding_bytes=0, head_bytes=0,
                            kv_bytes_per_token=0, hidden_size=64, intermediate_size=128, vocab_size=100,
                            tensor_sizes=[1])
        nodes = [node("n0", rng.uniform(3, 12)), node("n1", rng.uniform(3, 12))]
        request = PlacementRequest(context=1, sequences=1)
        fits_whole = any(sum(sizes) * 1.0 + 0 <= budget(n) * (1 - RESERVE) - 10**6 for n in nodes)
        if fits_whole:
            continue
        some = any(all(sum(part) <= budget(n) * (1 - RESERVE) - 10**6 for part, n in
                       zip((sizes[:cut], sizes[cut:]), (nodes[0], nodes[1]))) for cut in range(1, layers))
        some |= any(all(sum(part) <= budget(n) * (1 - RESERVE) - 10**6 for part, n in
                        zip((sizes[:cut], sizes[cut:]), (nodes[1], nodes[0]))) for cut in range(1, layers))
        plan = place(uneven, nodes, [], request)
        if isinstance(plan, Plan):
            check(plan, uneven)
        else:
            assert not some, (sizes, [budget(n) for n in nodes], plan.reason)


def test_no_pipeline_rank_is_ever_over_its_budget_after_rounding():
    rng = random.Random(7)
    placed = 0
    for _ in range(300):
        nodes = [node(f"n{i}", rng.uniform(4, 80)) for i in range(rng.randint(1, 8))]
        request = PlacementRequest(context=rng.choice([2048, 8192, 32768]), sequences=rng.randint(1, 8))
        plan = place(LLAMA70, nodes, [], request)
        if isinstance(plan, Plan):
            check(plan, LLAMA70)
            placed += 1
        else:  # refused only when the nodes together really lack the room, or no split could fit them
            assert plan.needed > 0 and plan.available > 0
    assert placed > 100


def test_a_second_model_is_placed_on_what_the_first_ones_plan_leaves_preferring_its_files():
    statuses = [NodeStatus(facts=node(n, 80, models=("llama-70b-4bit",) if n != "c" else ()), memory_used=0, time=0.0)
                for n in ("a", "b", "c")]
    # A 70B served over a and b, reserving 50 and 20 GB there; whether its ranks have loaded yet or not, an agent
    # reports what they hold as available (ops/agent.py), so the plan alone counts.
    served = Instance(model="k2", created=0, state="serving", nodes=["a", "b"], memory=[50 * GB, 20 * GB])
    offered = {n.id: n.memory_available for n in offers(LLAMA70.id, statuses, [served])}
    assert offered == {"a": 30 * GB, "b": 60 * GB, "c": 80 * GB}  # c would fetch its files from a or b
    plan = place(LLAMA70, offers(LLAMA70.id, statuses, [served]), [], PlacementRequest(context=4096, sequences=1))
    assert isinstance(plan, Plan) and [r.node for r in plan.ranks] == ["b"], plan  # where the files are, if it fits
    assert offers("nowhere-model", statuses, [served]) == []  # no node to fetch it from
    # Its own instance (re-placed after a node was lost) reserves nothing against itself; the bundled model may go
    # anywhere (every node makes it from its package).
    own = msgspec.structs.replace(served, model=LLAMA70.id)
    assert {n.id: n.memory_available for n in offers(LLAMA70.id, statuses, [own])} == {"a": 80 * GB, "b": 80 * GB,
                                                                                         "c": 80 * GB}
    assert [n.id for n in offers(MODEL, statuses, [served], everywhere=True)] == ["a", "b", "c"]


def test_the_catalogue_is_every_model_on_a_live_nodes_disk_or_running_with_its_status():
    import time

    now = time.time()
    statuses = [NodeStatus(facts=node("a", 80, models=("k2", "llama-70b-4bit")), memory_used=0, time=now),
                NodeStatus(facts=node("b", 80, models=("llama-70b-4bit", "qwen")), memory_used=0, time=now),
                NodeStatus(facts=node("gone", 80, models=("only-on-a-lost-node",)), memory_used=0, time=now - 60)]
    instances = [Instance(model="k2", created=7, state="serving", nodes=["a", "b"], context_length=8192),
                 Instance(model="qwen", created=0, state="stopping", nodes=["b"]),
                 Instance(model="llama-70b-4bit", created=0, state="placing")]
    listed = {m.id: m for m in cluster_models(statuses, instances)}
    assert set(listed) == {"k2", "llama-70b-4bit", "qwen"}  # a lost node's disk is not the cluster's
    assert (listed["k2"].status, listed["k2"].nodes, listed["k2"].created, listed["k2"].context_length) == \
        ("loaded", ["a", "b"], 7, 8192)
    assert (listed["llama-70b-4bit"].status, listed["llama-70b-4bit"].files_on) == ("loading", ["a", "b"])
    assert listed["qwen"].status == "unloading"
    assert cluster_models(statuses, [])[0].status == "idle"


def test_the_bundled_models_facts_come_from_its_files(server):
    directory = server.home / "models" / MODEL
    facts = model_facts(MODEL, directory)
    stored = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert facts.layers == 30 and len(set(facts.layer_bytes)) == 1  # 30 identical llama layers
    assert 0.99 * stored < facts.weight_bytes <= stored  # the files hold the tensors and a small header
    assert facts.kv_bytes_per_token == 2 * 3 * 64 * 2  # 3 KV heads of 64, keys and values, float16
    assert facts.tied_embeddings and facts.tensor_sizes == [1, 3]
    # Split over three small nodes, the tied head costs the last stage a copy of the embeddings.
    nodes = [node(f"n{i}", 0.08) for i in range(3)]
    plan = place(facts, nodes, [], PlacementRequest(context=2048, sequences=1))
    assert isinstance(plan, Plan) and plan.layout == "pipeline"
    check(plan, facts)
    assert plan.ranks[-1].memory.weights > facts.embedding_bytes


def test_conclave_place_previews_a_plan_or_says_why_not(server, tmp_path):
    import subprocess
    import sys

    from schemas.cluster import ClusterFacts

    def place_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.cli", "--home", str(server.home), "place", *args],
                              capture_output=True, text=True, timeout=120)

    nodes = tmp_path / "nodes.json"
    nodes.write_bytes(msgspec.json.encode(ClusterFacts(nodes=[node("a", 0.09), node("b", 0.09), node("c", 0.06)])))
    shown = place_cli("--nodes", str(nodes), "--context", "2048", "--sequences", "1")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{MODEL}: pipeline over 3 nodes") and shown.stdout.count("\tlayers ") == 3
    plan = msgspec.json.decode(place_cli("--nodes", str(nodes), "--context", "2048", "--sequences", "1",
                                         "--json").stdout, type=Plan)
    assert sum(r.layers[1] - r.layers[0] for r in plan.ranks) == 30
    refused = place_cli("--nodes", str(nodes), "--pin", "c,a", "--split", "20,10", "--context", "2048")
    assert refused.returncode == 1 and refused.stdout.startswith(f"cannot place {MODEL}: node c would need ")


def test_thunderbolt_cables_found_by_the_agents_become_links_and_an_rdma_mesh_becomes_tensor_over_jaccl():
    from pipeline.nodes import links_between
    from schemas.cluster import NodeStatus, ThunderboltPort

    # Four Mac Studios cabled each to each (three buses each), as their agents report them (ops/telemetry.py).
    ids = [f"studio-{i}" for i in range(4)]
    buses = {(a, b): f"{a}-bus-{b}" for a in ids for b in ids if a != b}  # a's bus cabled to b

    def status(i: str, rdma: bool | None) -> NodeStatus:
        ports = [ThunderboltPort(domain=buses[i, j], peers=[buses[j, i]]) for j in ids if j != i]
        return NodeStatus(facts=node(i, 500, working_set_gb=400), memory_used=0, time=0.0, thunderbolt=ports,
                          rdma_enabled=rdma)

    statuses = [status(i, True) for i in ids]
    links = links_between(statuses)
    assert links == mesh(ids) and len(links) == 6  # each pair once, and RDMA: enabled on both ends
    plan = place(K2, [s.facts for s in statuses], links, PlacementRequest(context=8192, sequences=4))
    assert isinstance(plan, Plan) and (plan.layout, plan.backend) == ("tensor", "jaccl")
    # One node without `rdma_ctl enable`: its cables are Thunderbolt only, so no RDMA mesh spans all four.
    statuses[3] = status(ids[3], False)
    kinds = {frozenset((link.a, link.b)): link.kind for link in links_between(statuses)}
    assert kinds[frozenset(ids[:2])] == "rdma" and kinds[frozenset((ids[0], ids[3]))] == "thunderbolt"
    plan = place(K2, [s.facts for s in statuses], links_between(statuses), PlacementRequest(context=8192, sequences=4))
    assert not (isinstance(plan, Plan) and plan.backend == "jaccl" and len(plan.ranks) == 4)
    # A cable to a machine that is not a node (a dock, a display) is no link; nor is a node without facts.
    lone = NodeStatus(facts=node("linux-box", 500), memory_used=0, time=0.0)
    stray = NodeStatus(facts=node("studio-x", 500), memory_used=0, time=0.0,
                       thunderbolt=[ThunderboltPort(domain="x-bus", peers=["some-dock"])])
    assert links_between([lone, stray]) == []
