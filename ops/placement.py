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

A request may pin nodes (in order), the layout and a pipeline split; a pinned plan that does not fit is a
refusal with the rank that overflows, never a silent change of plan.
"""

from __future__ import annotations

import itertools

from schemas.cluster import Link, ModelFacts, NodeFacts, Plan, PlacementRequest, RankMemory, RankPlan, Refusal
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


def whole_memory(model: ModelFacts, node: NodeFacts, request: PlacementRequest) -> RankMemory:
    return RankMemory(weights=model.weight_bytes, kv_cache=kv_cache(model, model.layers, request),
                      activations=activations(model, request), reserve=int(RESERVE * budget(node)))


def tensor_memory(model: ModelFacts, node: NodeFacts, n: int, request: PlacementRequest) -> RankMemory:
    # mlx-lm's shard() splits attention and MLP weights n ways and keeps embeddings and head whole.
    return RankMemory(weights=sum(model.layer_bytes) // n + model.embedding_bytes + model.head_bytes,
                      kv_cache=kv_cache(model, model.layers, request) // n,
                      activations=activations(model, request, intermediate_share=n),
                      reserve=int(RESERVE * budget(node)))


def stage_memory(model: ModelFacts, node: NodeFacts, start: int, end: int, first: bool, last: bool,
                 request: PlacementRequest) -> RankMemory:
    # A tied head is the embedding matrix: a last stage that is not also the first holds a copy of it.
    embedding = first or (last and model.tied_embeddings)
    weights = sum(model.layer_bytes[start:end]) + (model.embedding_bytes if embedding else 0) + \
        (model.head_bytes if last else 0)
    # Rank 0 samples: the logits come back to it from the last stage.
    return RankMemory(weights=weights, kv_cache=kv_cache(model, end - start, request),
                      activations=activations(model, request, logits=first or last),
                      reserve=int(RESERVE * budget(node)))


def fits(memory: RankMemory, node: NodeFacts) -> bool:
    return memory.total <= budget(node)


def ranks_of(split: list[int]) -> list[tuple[int, int]]:
    bounds = list(itertools.accumulate(split, initial=0))
    return list(zip(bounds, bounds[1:]))


def pipeline_ranks(model: ModelFacts, chosen: list[NodeFacts], request: PlacementRequest,
                   split: list[int] | None = None) -> list[RankPlan] | RankPlan:
    """The stages over `chosen` in order, split by what each can hold (or as pinned); or the first rank that
    does not fit."""
    k = len(chosen)
    if split is None:
        per_layer = max(1, sum(model.layer_bytes) // model.layers + kv_cache(model, 1, request))
        capacity = []
        for i, node in enumerate(chosen):
            fixed = stage_memory(model, node, 0, 0, i == 0, i == k - 1, request).total
            capacity.append(max(0, (budget(node) - fixed) // per_layer))
        if min(capacity) < 1 or sum(capacity) < model.layers:
            worst = min(range(k), key=lambda i: capacity[i])
            return plan_rank(model, chosen, worst, (0, min(model.layers, capacity[worst] + 1)), request)
        split = pipeline_split(model.layers, k, [float(c) for c in capacity])
        split = settle_rounding(model, chosen, split, request)
    ranks = [plan_rank(model, chosen, i, bounds, request) for i, bounds in enumerate(ranks_of(split))]
    over = [r for r in ranks if r.memory.total > r.budget]
    return over[0] if over else ranks


def plan_rank(model: ModelFacts, chosen: list[NodeFacts], i: int, bounds: tuple[int, int],
              request: PlacementRequest) -> RankPlan:
    node = chosen[i]
    memory = stage_memory(model, node, bounds[0], bounds[1], i == 0, i == len(chosen) - 1, request)
    return RankPlan(node=node.id, layers=bounds, memory=memory, budget=budget(node))


def settle_rounding(model: ModelFacts, chosen: list[NodeFacts], split: list[int],
                    request: PlacementRequest) -> list[int]:
    """Move single layers off a stage that the rounding (or uneven layers) put over its budget, to a
    neighbour with room, while that helps."""
    split = list(split)
    for _ in range(model.layers):
        ranks = [plan_rank(model, chosen, i, b, request) for i, b in enumerate(ranks_of(split))]
        over = next((i for i, r in enumerate(ranks) if r.memory.total > r.budget), None)
        if over is None or split[over] <= 1:
            break
        slack = [r.budget - r.memory.total for r in ranks]
        neighbours = [j for j in (over - 1, over + 1) if 0 <= j < len(split)]
        j = max(neighbours, key=lambda j: slack[j])
        split[over] -= 1
        split[j] += 1
    return split


def rdma_mesh(chosen: list[NodeFacts], links: list[Link]) -> bool:
    rdma = {frozenset((link.a, link.b)) for link in links if link.kind == "rdma"}
    return all(frozenset((a.id, b.id)) in rdma for a, b in itertools.combinations(chosen, 2))


def tensor_plan(model: ModelFacts, chosen: list[NodeFacts], links: list[Link], request: PlacementRequest,
                why: str) -> Plan | None:
    k = len(chosen)
    if k not in model.tensor_sizes or not rdma_mesh(chosen, links):
        return None
    ranks = [RankPlan(node=n.id, layers=(0, model.layers), memory=tensor_memory(model, n, k, request),
                      budget=budget(n)) for n in chosen]
    return Plan(model=model.id, layout="tensor", backend="jaccl", ranks=ranks, why=why) \
        if all(r.memory.total <= r.budget for r in ranks) else None


def ordered(model: ModelFacts, nodes: list[NodeFacts]) -> list[NodeFacts]:
    """Nodes holding the model's files first, then by budget, largest first (ties: by id, for a stable plan)."""
    return sorted(nodes, key=lambda n: (model.id not in n.models, -budget(n), n.id))


def candidate_sets(model: ModelFacts, nodes: list[NodeFacts], k: int) -> list[list[NodeFacts]]:
    """The k nodes to try: those with the files first; and the k largest, if different."""
    by_files = ordered(model, nodes)[:k]
    by_size = sorted(nodes, key=lambda n: (-budget(n), n.id))[:k]
    return [by_files] if by_files == by_size else [by_files, by_size]


def place(model: ModelFacts, nodes: list[NodeFacts], links: list[Link], request: PlacementRequest) -> Plan | Refusal:
    if request.nodes or request.layout or request.split:
        return place_pinned(model, nodes, links, request)
    for node in ordered(model, nodes):
        memory = whole_memory(model, node, request)
        if fits(memory, node):
            return Plan(model=model.id, layout="whole", backend="none", why="fits on one node",
                        ranks=[RankPlan(node=node.id, layers=(0, model.layers), memory=memory, budget=budget(node))])
    mesh = rdma_clique(ordered(model, nodes), links)
    for n in sorted((n for n in model.tensor_sizes if 2 <= n <= len(mesh)), reverse=True):
        plan = tensor_plan(model, mesh[:n], links, request,
                           f"too large for one node; {n} nodes on an RDMA mesh: tensor parallel over jaccl")
        if plan is not None:
            return plan
    for k in range(2, min(len(nodes), model.layers) + 1):
        for chosen in candidate_sets(model, nodes, k):
            ranks = pipeline_ranks(model, chosen, request)
            if isinstance(ranks, list):
                return Plan(model=model.id, layout="pipeline", backend="ring", ranks=ranks,
                            why=f"too large for one node; {k} nodes, no RDMA mesh (or heads that divide): pipeline "
                                f"by memory")
    return refusal(model, nodes, request)


def rdma_clique(nodes: list[NodeFacts], links: list[Link]) -> list[NodeFacts]:
    """Nodes that are all RDMA-linked to each other, picked greedily in the given order (a largest clique is
    a hard problem; a Thunderbolt cluster is a full mesh or close to it)."""
    clique: list[NodeFacts] = []
    for node in nodes:
        if rdma_mesh([*clique, node], links):
            clique.append(node)
    return clique


def refusal(model: ModelFacts, nodes: list[NodeFacts], request: PlacementRequest) -> Refusal:
    kv = kv_cache(model, model.layers, request)
    needed = model.weight_bytes + kv + activations(model, request)
    usable = sum(int(budget(n) * (1 - RESERVE)) for n in nodes)
    context = f"{request.context // 1024}k" if request.context % 1024 == 0 else str(request.context)
    return Refusal(model=model.id, needed=needed, available=usable, reason=(
        f"{model.id} needs {gb(needed)}: {gb(model.weight_bytes)} for weights and {gb(kv)} of KV cache for a "
        f"{context} context x {request.sequences} sequences, plus activations; "
        f"{'1 node offers' if len(nodes) == 1 else f'{len(nodes)} nodes offer'} {gb(usable)} after a {RESERVE:.0%} "
        f"reserve each"
        + (" (and no split of its layers fits them)" if usable >= needed else "")))


def place_pinned(model: ModelFacts, nodes: list[NodeFacts], links: list[Link], request: PlacementRequest) -> Plan | Refusal:
    known = {n.id: n for n in nodes}
    unknown = [n for n in request.nodes if n not in known]
    if unknown:
        return Refusal(model=model.id, needed=0, available=0, reason=f"no such node: {', '.join(unknown)}")
    chosen = [known[n] for n in request.nodes] if request.nodes else ordered(model, nodes)[:max(1, len(request.split))]
    layout = request.layout or ("pipeline" if request.split else "whole" if len(chosen) == 1 else None)
    if layout is None:
        plan = tensor_plan(model, chosen, links, request, "pinned nodes; an RDMA mesh: tensor parallel")
        layout = "tensor" if plan is not None else "pipeline"
    if layout == "whole":
        if len(chosen) != 1:
            return Refusal(model=model.id, needed=0, available=0, reason="layout whole takes exactly one node")
        memory = whole_memory(model, chosen[0], request)
        rank = RankPlan(node=chosen[0].id, layers=(0, model.layers), memory=memory, budget=budget(chosen[0]))
        return Plan(model=model.id, layout="whole", backend="none", ranks=[rank], why="pinned") if fits(
            memory, chosen[0]) else over_budget(model, rank)
    if layout == "tensor":
        if len(chosen) not in model.tensor_sizes:
            return Refusal(model=model.id, needed=0, available=0, reason=(
                f"tensor parallel over {len(chosen)} nodes does not divide {model.id}'s heads and MLP; it splits "
                f"over {', '.join(map(str, model.tensor_sizes))}"))
        ranks = [RankPlan(node=n.id, layers=(0, model.layers), memory=tensor_memory(model, n, len(chosen), request),
                          budget=budget(n)) for n in chosen]
        over = [r for r in ranks if r.memory.total > r.budget]
        backend = "jaccl" if rdma_mesh(chosen, links) else "ring"
        return over_budget(model, over[0]) if over else Plan(model=model.id, layout="tensor", backend=backend,
                                                            ranks=ranks, why="pinned")
    if request.split:
        try:
            check_pipeline_split(request.split, model.layers, len(chosen))
        except ShardError as exc:
            return Refusal(model=model.id, needed=0, available=0, reason=str(exc))
    ranks = pipeline_ranks(model, chosen, request, request.split or None)
    if isinstance(ranks, RankPlan):
        return over_budget(model, ranks)
    return Plan(model=model.id, layout="pipeline", backend="ring", ranks=ranks, why="pinned")


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
