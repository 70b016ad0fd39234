"""Placement: which nodes serve a model, in which layout and split. A pure function, table-tested.

`place(model, nodes, links, request)` returns a `Plan` or a `Refusal` that gives its numbers. The rules,
in order (README, "Placement"):

1. Memory per rank is counted, never guessed from weights alone (EXO's users ran out of memory under long
   contexts because only weights were counted): its layers' weights as stored, plus the embeddings on the
   first pipeline stage and the head on the last, plus the KV cache of its layers for the requested context
   and sequences (2 x KV heads x head dim x 2 bytes per token and layer; the latent for MLA models), plus
   activations (a prefill chunk and the batch through the widest layer, and the logits), plus a reserve of
   RESERVE of the node's budget. The budget is the node's available memory, and on Metal no more than its
   recommended working set: never its total RAM.
2. One node when one fits (the one that holds the model's files if any does, then the most headroom).
3. Else, where nodes form an RDMA mesh (every pair linked by RDMA), tensor parallel over jaccl on as many
   of them as the model's heads divide by: on such links every added node adds memory bandwidth to each
   token (the reference system runs a 1T model over all 4 of its nodes), where a pipeline adds none.
4. Else pipeline over the fewest nodes, layers proportional to what each node can hold after its fixed
   costs, each rank at least one layer, and no rank over its budget after rounding (checked with the
   real per-layer sizes: EXO once rounded a node over its memory).
5. Among equally many nodes, those holding the model's files first, then the largest budgets.

With several models served (`POST /v1/cluster/instances`), a model is placed on what the other instances' plans
leave on each node (`offers`), on any node as long as one holds its files (the others fetch them).

A request may pin nodes (in order), the layout and a pipeline split; a pinned plan that does not fit is a
refusal with the rank that overflows, never a silent change of plan.
"""

from __future__ import annotations

import itertools

import msgspec

from schemas.cluster import (Link, ModelFacts, NodeFacts, NodeStatus, Plan, PlacementRequest, RankMemory, RankPlan,
                             Refusal)
from schemas.membership import Instance
from workers.split import ShardError, check_pipeline_split, pipeline_split

RESERVE = 0.10  # of each node's budget: the OS, the runtime, fragmentation
PREFILL_CHUNK = 512  # tokens a joining request is prefilled in at once (workers/lockstep.py)
ACTIVATION_BYTES = 4  # float32 intermediates


def budget(node: NodeFacts) -> int:
    return min(node.memory_available, node.working_set) if node.working_set is not None else node.memory_available


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def activations(model: ModelFacts, request: PlacementRequest, intermediate_share: int = 1, logits: bool = True) -> int:
    rows = PREFILL_CHUNK + request.sequences
    width = model.hidden_size + model.intermediate_size // intermediate_share
    return 2 * rows * width * ACTIVATION_BYTES + (request.sequences * model.vocab_size * ACTIVATION_BYTES if logits else 0)


def kv_cache(model: ModelFacts, layers: int, request: PlacementRequest) -> int:
    return layers * model.kv_bytes_per_token * request.context * request.sequences


def rank_memory(model: ModelFacts, node: NodeFacts, weights: int, kv: int, act: int) -> RankMemory:
    """A rank's memory on `node`. A CPU worker runs 16-bit float weights and the KV cache in float32
    (workers/shard.py): there they take twice their stored size."""
    if node.backend == "cpu":
        weights += weights * model.half_float_bytes // max(1, model.weight_bytes)
        kv *= 2
    return RankMemory(weights=weights, kv_cache=kv, activations=act, reserve=int(RESERVE * budget(node)))


def whole_rank(model: ModelFacts, node: NodeFacts, request: PlacementRequest) -> RankPlan:
    memory = rank_memory(model, node, model.weight_bytes, kv_cache(model, model.layers, request),
                         activations(model, request))
    return RankPlan(node=node.id, layers=(0, model.layers), memory=memory, budget=budget(node))


def tensor_ranks(model: ModelFacts, chosen: list[NodeFacts], request: PlacementRequest) -> list[RankPlan]:
    # mlx-lm's shard() splits attention and MLP weights n ways and keeps embeddings and head whole; the KV
    # heads split too, unless the cache is one latent all heads share (multi-head latent attention).
    n = len(chosen)
    kv = kv_cache(model, model.layers, request)
    kv = kv if model.kv_shared_by_heads else kv // n
    return [RankPlan(node=node.id, layers=(0, model.layers), budget=budget(node), memory=rank_memory(
                model, node, sum(model.layer_bytes) // n + model.embedding_bytes + model.head_bytes, kv,
                activations(model, request, intermediate_share=n)))
            for node in chosen]


def stage_rank(model: ModelFacts, chosen: list[NodeFacts], i: int, bounds: tuple[int, int],
               request: PlacementRequest) -> RankPlan:
    node, first, last = chosen[i], i == 0, i == len(chosen) - 1
    # A tied head is the embedding matrix: a last stage that is not also the first holds a copy of it.
    embedding = first or (last and model.tied_embeddings)
    weights = sum(model.layer_bytes[bounds[0]:bounds[1]]) + (model.embedding_bytes if embedding else 0) + \
        (model.head_bytes if last else 0)
    # Rank 0 samples: the logits come back to it from the last stage.
    memory = rank_memory(model, node, weights, kv_cache(model, bounds[1] - bounds[0], request),
                         activations(model, request, logits=first or last))
    return RankPlan(node=node.id, layers=bounds, memory=memory, budget=budget(node))


def over(rank: RankPlan) -> bool:
    return rank.memory.total > rank.budget


def ranks_of(split: list[int]) -> list[tuple[int, int]]:
    bounds = list(itertools.accumulate(split, initial=0))
    return list(zip(bounds, bounds[1:]))


def stages(model: ModelFacts, chosen: list[NodeFacts], split: list[int], request: PlacementRequest) -> list[RankPlan]:
    return [stage_rank(model, chosen, i, bounds, request) for i, bounds in enumerate(ranks_of(split))]


def pipeline_split_for(model: ModelFacts, chosen: list[NodeFacts], request: PlacementRequest) -> list[int] | None:
    """Layers per node in order, none over its budget, at least one each; None if no split fits.

    First in proportion to what each node can hold after its fixed costs (an even share of the load),
    with rounding settled against the real layer sizes; when that fails (uneven layers), a greedy fill in
    layer order, each node taking what fits while leaving a layer for each node after it."""
    k = len(chosen)
    if k > model.layers:
        return None
    per_layer = max(1, sum(model.layer_bytes) // model.layers + kv_cache(model, 1, request))
    capacity = [max(0, (budget(node) - stage_rank(model, chosen, i, (0, 0), request).memory.total) // per_layer)
                for i, node in enumerate(chosen)]
    if min(capacity) >= 1 and sum(capacity) >= model.layers:
        split = settle_rounding(model, chosen, pipeline_split(model.layers, k, [float(c) for c in capacity]), request)
        if not any(over(r) for r in stages(model, chosen, split, request)):
            return split
    split, start = [], 0
    for i in range(k):  # in a fixed order, taking all that fits leaves the least to the nodes after
        end = start + 1
        while end < model.layers - (k - 1 - i) and not over(stage_rank(model, chosen, i, (start, end + 1), request)):
            end += 1
        if i == k - 1:
            end = model.layers
        split.append(end - start)
        start = end
    return split if not any(over(r) for r in stages(model, chosen, split, request)) else None


def pipeline_for(model: ModelFacts, chosen: list[NodeFacts], request: PlacementRequest) -> list[RankPlan] | None:
    """The stages over these nodes, in their order or the reverse (a small node may fit only the lighter
    end of uneven layers); None if neither fits."""
    for order in (chosen, chosen[::-1]):
        if (split := pipeline_split_for(model, order, request)) is not None:
            return stages(model, order, split, request)
    return None


def settle_rounding(model: ModelFacts, chosen: list[NodeFacts], split: list[int],
                    request: PlacementRequest) -> list[int]:
    """Move single layers off a stage that the rounding (or uneven layers) put over its budget, to a
    neighbour with room, while that helps."""
    split = list(split)
    for _ in range(model.layers):
        ranks = stages(model, chosen, split, request)
        worst = next((i for i, r in enumerate(ranks) if over(r)), None)
        if worst is None or split[worst] <= 1:
            break
        slack = [r.budget - r.memory.total for r in ranks]
        neighbours = [j for j in (worst - 1, worst + 1) if 0 <= j < len(split)]
        j = max(neighbours, key=lambda j: slack[j])
        split[worst] -= 1
        split[j] += 1
    return split


def rdma_mesh(chosen: list[NodeFacts], links: list[Link]) -> bool:
    rdma = {frozenset((link.a, link.b)) for link in links if link.kind == "rdma"}
    return all(frozenset((a.id, b.id)) in rdma for a, b in itertools.combinations(chosen, 2))


def rdma_clique(nodes: list[NodeFacts], links: list[Link]) -> list[NodeFacts]:
    """The largest set of nodes all RDMA-linked to each other that a greedy pass finds from each node with an
    RDMA link (a largest clique is a hard problem; a Thunderbolt cluster is a full mesh or close to it)."""
    neighbours: dict[str, set[str]] = {}
    for link in links:
        if link.kind == "rdma" and link.a != link.b:
            neighbours.setdefault(link.a, set()).add(link.b)
            neighbours.setdefault(link.b, set()).add(link.a)
    best: list[NodeFacts] = []
    for seed in (n for n in nodes if n.id in neighbours):
        clique, common = [seed], set(neighbours[seed.id])  # linked to every member so far
        for node in nodes:
            if node.id in common:
                clique.append(node)
                common &= neighbours[node.id]
        best = clique if len(clique) > len(best) else best
    return best


def ordered(model: ModelFacts, nodes: list[NodeFacts]) -> list[NodeFacts]:
    """Nodes holding the model's files first, then by budget, largest first (ties: by id, for a stable plan)."""
    return sorted(nodes, key=lambda n: (model.id not in n.models, -budget(n), n.id))


def candidate_sets(model: ModelFacts, nodes: list[NodeFacts], k: int) -> list[list[NodeFacts]]:
    """The k nodes to try: those with the files first; and the k largest, if different."""
    by_files = ordered(model, nodes)[:k]
    by_size = sorted(nodes, key=lambda n: (-budget(n), n.id))[:k]
    return [by_files] if by_files == by_size else [by_files, by_size]


def place(model: ModelFacts, nodes: list[NodeFacts], links: list[Link], request: PlacementRequest) -> Plan | Refusal:
    if (problem := input_problem(nodes, request)) is not None:
        return Refusal(model=model.id, needed=0, available=0, reason=problem)
    if request.nodes or request.split or request.layout == "whole" and len(nodes) == 1:
        return place_pinned(model, nodes, links, request)
    layouts = (request.layout,) if request.layout else ("whole", "tensor", "pipeline")
    if "whole" in layouts:
        for node in ordered(model, nodes):
            if not over(rank := whole_rank(model, node, request)):
                return Plan(model=model.id, layout="whole", backend="none", ranks=[rank], why="fits on one node")
    if "tensor" in layouts:
        mesh = rdma_clique(ordered(model, nodes), links)
        for n in sorted((n for n in model.tensor_sizes if 2 <= n <= len(mesh)), reverse=True):
            ranks = tensor_ranks(model, mesh[:n], request)
            if not any(over(r) for r in ranks):
                return Plan(model=model.id, layout="tensor", backend="jaccl", ranks=ranks,
                            why=f"too large for one node; {n} nodes on an RDMA mesh: tensor parallel over jaccl")
        if request.layout == "tensor":  # asked for: over the fewest nodes its heads divide by, on any links
            for n in (n for n in model.tensor_sizes if 2 <= n <= len(nodes)):
                for chosen in candidate_sets(model, nodes, n):
                    ranks = tensor_ranks(model, chosen, request)
                    if not any(over(r) for r in ranks):
                        return Plan(model=model.id, layout="tensor", ranks=ranks, why="layout pinned",
                                    backend="jaccl" if rdma_mesh(chosen, links) else "ring")
    if "pipeline" in layouts:
        for k in range(2, min(len(nodes), model.layers) + 1):
            for chosen in candidate_sets(model, nodes, k):
                if (ranks := pipeline_for(model, chosen, request)) is not None:
                    return Plan(model=model.id, layout="pipeline", backend="ring", ranks=ranks,
                                why=f"too large for one node; {k} nodes, no RDMA mesh (or heads that divide): "
                                    f"pipeline by memory")
    return refusal(model, nodes, request)


def input_problem(nodes: list[NodeFacts], request: PlacementRequest) -> str | None:
    ids = [n.id for n in nodes]
    if not nodes:
        return "no nodes to place it on"
    if (twice := sorted({i for i in ids if ids.count(i) > 1})):
        return (f"two nodes report the id {', '.join(twice)}: a copied home (its node-id file); remove "
                f"<home>/node-id on one of them and restart it")
    if len(set(request.nodes)) != len(request.nodes):
        return "a node is pinned twice"
    if request.context < 1 or request.sequences < 1:
        return "context and sequences must be at least 1"
    if request.split and request.layout not in (None, "pipeline"):
        return f"a split pins a pipeline; layout {request.layout} takes none"
    return None


def refusal(model: ModelFacts, nodes: list[NodeFacts], request: PlacementRequest) -> Refusal:
    kv = kv_cache(model, model.layers, request)
    needed = model.weight_bytes + kv + activations(model, request)
    usable = sum(int(budget(n) * (1 - RESERVE)) for n in nodes)
    context = f"{request.context // 1024}k" if request.context % 1024 == 0 else str(request.context)
    layout = f" as {request.layout}" if request.layout else ""
    return Refusal(model=model.id, needed=needed, available=usable, reason=(
        f"{model.id} needs {gb(needed)}: {gb(model.weight_bytes)} for weights and {gb(kv)} of KV cache for a "
        f"{context} context x {request.sequences} sequences, plus activations; "
        f"{'1 node offers' if len(nodes) == 1 else f'{len(nodes)} nodes offer'} {gb(usable)} after a {RESERVE:.0%} "
        f"reserve each" + (" (as stored; more on CPU nodes, which run 16-bit weights in float32)"
                           if any(n.backend == "cpu" for n in nodes) else "")
        + (f", and no placement{layout} of its layers fits them" if usable >= needed else "")))


def place_pinned(model: ModelFacts, nodes: list[NodeFacts], links: list[Link], request: PlacementRequest) -> Plan | Refusal:
    known = {n.id: n for n in nodes}
    unknown = [n for n in request.nodes if n not in known]
    if unknown:
        return Refusal(model=model.id, needed=0, available=0, reason=f"no such node: {', '.join(unknown)}")
    chosen = [known[n] for n in request.nodes] if request.nodes else ordered(model, nodes)[:max(1, len(request.split))]
    layout = request.layout or ("pipeline" if request.split else "whole" if len(chosen) == 1 else None)
    if layout is None:
        layout = "tensor" if len(chosen) in model.tensor_sizes and rdma_mesh(chosen, links) else "pipeline"
    if layout == "whole":
        if len(chosen) != 1:
            return Refusal(model=model.id, needed=0, available=0, reason="layout whole takes exactly one node")
        rank = whole_rank(model, chosen[0], request)
        return over_budget(model, rank) if over(rank) else Plan(model=model.id, layout="whole", backend="none",
                                                                ranks=[rank], why="pinned")
    if layout == "tensor":
        if len(chosen) not in model.tensor_sizes:
            return Refusal(model=model.id, needed=0, available=0, reason=(
                f"tensor parallel over {len(chosen)} nodes does not divide {model.id}'s heads and MLP; it splits "
                f"over {', '.join(map(str, model.tensor_sizes))}"))
        ranks = tensor_ranks(model, chosen, request)
        overflowing = [r for r in ranks if over(r)]
        return over_budget(model, overflowing[0]) if overflowing else Plan(
            model=model.id, layout="tensor", backend="jaccl" if rdma_mesh(chosen, links) else "ring", ranks=ranks,
            why="pinned")
    if len(chosen) > model.layers:
        return Refusal(model=model.id, needed=0, available=0,
                       reason=f"a pipeline over {len(chosen)} nodes needs {len(chosen)} layers; it has {model.layers}")
    if request.split:
        try:
            check_pipeline_split(request.split, model.layers, len(chosen))
        except ShardError as exc:
            return Refusal(model=model.id, needed=0, available=0, reason=str(exc))
    split = request.split or pipeline_split_for(model, chosen, request)
    if split is None:
        return refusal(model, chosen, request)
    ranks = stages(model, chosen, split, request)
    overflowing = [r for r in ranks if over(r)]
    return over_budget(model, overflowing[0]) if overflowing else Plan(model=model.id, layout="pipeline",
                                                                       backend="ring", ranks=ranks, why="pinned")


def over_budget(model: ModelFacts, rank: RankPlan) -> Refusal:
    m = rank.memory
    return Refusal(model=model.id, needed=m.total, available=rank.budget, reason=(
        f"node {rank.node} would need {gb(m.total)} for layers {rank.layers[0]}..{rank.layers[1] - 1} "
        f"({gb(m.weights)} weights, {gb(m.kv_cache)} KV cache, {gb(m.activations)} activations, {gb(m.reserve)} "
        f"reserve) and offers {gb(rank.budget)}"))


def describe(result: Plan | Refusal) -> str:
    """A plan as an operator reads it: one line per rank with its memory, and the rule that chose it."""
    if isinstance(result, Refusal):
        return f"cannot place {result.model}: {result.reason}"
    lines = [f"{result.model}: {result.layout} over {len(result.ranks)} node{'s' if len(result.ranks) > 1 else ''}"
             f" (backend {result.backend}): {result.why}"]
    for rank in result.ranks:
        m = rank.memory
        lines.append(f"  {rank.node}\tlayers {rank.layers[0]}..{rank.layers[1] - 1}\t{gb(m.total)} of {gb(rank.budget)}"
                     f"\t(weights {gb(m.weights)}, KV cache {gb(m.kv_cache)}, activations {gb(m.activations)}, "
                     f"reserve {gb(m.reserve)})")
    return "\n".join(lines)


def offers(model: str, statuses: list[NodeStatus], instances: list[Instance],
           everywhere: bool = False) -> list[NodeFacts]:
    """What each node up offers `model`, with the memory that the other instances placed on it reserve taken off:
    every node, as long as one of them holds its files (the others fetch them from it, ops/model_files.py; any
    node makes the bundled model from its package: `everywhere`), else none. An agent counts what its ranks hold
    as available (ops/agent.py: local_node), so an instance is counted once, by its plan, whether its ranks have
    loaded yet or not; and several instances share a node without one being placed into the memory another is
    still loading into."""
    reserved: dict[str, int] = {}
    for instance in instances:
        if instance.model != model:
            for node, size in zip(instance.nodes, instance.memory):
                reserved[node] = reserved.get(node, 0) + size
    def left(size: int | None, node: str) -> int | None:
        return None if size is None else max(0, size - reserved.get(node, 0))

    if not everywhere and not any(model in s.facts.models for s in statuses):
        return []  # no node up to fetch its files from (ops/model_files.py)
    # Metal's working set is the GPU's for all processes together: the other instances' share comes off it too.
    return [msgspec.structs.replace(s.facts, memory_available=left(s.facts.memory_available, s.facts.id),
                                    working_set=left(s.facts.working_set, s.facts.id)) for s in statuses]
