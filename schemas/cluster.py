"""What placement reads and writes: the facts of nodes and models, a request, and a plan or a refusal.

Declared once, plain typed structs: node agents will publish `NodeFacts`, the controller and `conclave
place` read them, and `ops/placement.py` is a pure function from these inputs to a `Plan` or a `Refusal`,
so it is table-tested without a network. Sizes are bytes. A figure a platform cannot give is None, never 0.
"""

from __future__ import annotations

from typing import Literal, Union

from msgspec import Struct

from schemas.catalogue import FetchProgress, ModelFile

Backend = Literal["metal", "cuda", "cpu"]
LinkKind = Literal["rdma", "thunderbolt", "ethernet", "wifi"]
InterfaceKind = Literal["thunderbolt", "ethernet", "wifi", "loopback", "other"]


class NodeFacts(Struct, kw_only=True):
    id: str
    host: str = ""
    backend: Backend = "cpu"
    memory_total: int
    # What Conclave may use here: psutil's `available` plus what its ranks hold, after a memory limit if set; the
    # controller takes off what the instances placed here reserve (ops/placement.py: offers)
    memory_available: int
    # Metal's recommended working set (`mx.device_info()`): what the GPU may use, well under total RAM.
    working_set: Union[int, None] = None
    models: list[str] = []  # model ids whose files are on this node's disk
    # model id -> its weight files held here, for a model held only in part (a pipeline rank's, fetched per rank)
    shards: dict[str, list[str]] = {}
    address: str = ""  # where the ranks of other nodes reach this one (mx.distributed's ring, jaccl's coordinator)
    session: str = ""  # new at every start of its agent: two live agents with one node id are told apart


class Link(Struct, kw_only=True):
    """A link between two nodes, either direction."""

    a: str
    b: str
    kind: LinkKind


class ModelFacts(Struct, kw_only=True):
    """What placement needs to know of a model, read from its directory (ops/model_facts.py)."""

    id: str
    layers: int
    layer_bytes: list[int]  # weights of each decoder layer, as stored
    embedding_bytes: int  # weights the first pipeline stage holds besides its layers (embeddings)
    head_bytes: int  # weights the last stage holds besides its layers (final norm, output head)
    tied_embeddings: bool = False  # the head is the embedding matrix: the last stage holds it too
    kv_bytes_per_token: int  # KV cache of one token in one layer, all its KV heads (fp16)
    kv_shared_by_heads: bool = False  # a cached latent (MLA): every tensor-parallel rank holds all of it
    half_float_bytes: int = 0  # of the weights, those stored as 16-bit floats (a CPU worker runs them in float32)
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tensor_sizes: list[int]  # group sizes that split its heads and MLP evenly (workers/split.py)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes


class CatalogueEntry(Struct, kw_only=True):
    """A model of the cluster's catalogue as one node that holds it read it from its files (ops/catalogue.py): what
    the first machine and any controller need to place it, fetch it per rank and start it, with no copy of its
    files of their own. One per model and holder, under the holder's key (pipeline/catalogue.py)."""

    id: str
    node: str  # the node that holds it and wrote this
    revision: str  # workers/store.py: model_revision
    created: int  # unix seconds it entered that node's store
    context_length: Union[int, None] = None
    facts: ModelFacts
    refused_layouts: dict[str, str] = {}  # layout -> why its architecture cannot run it (workers/shard.py)
    # A model in several weight files (workers/split.py: layer_files): per decoder layer, the files holding it,
    # and those holding tensors of no layer; empty for a model in one file.
    layer_files: list[list[str]] = []
    shared_files: list[str] = []
    files: list[ModelFile]  # every file, with its size and SHA-256 (ops/model_files.py: manifest)
    time: float = 0.0  # when it was read

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class PlacementRequest(Struct, kw_only=True):
    context: int = 8192  # tokens of context each sequence may hold
    sequences: int = 4  # sequences decoded at once (the batch)
    nodes: list[str] = []  # pin: use exactly these nodes, in this order
    layout: Union[Literal["whole", "tensor", "pipeline"], None] = None  # pin a layout
    split: list[int] = []  # pin: pipeline layers per node, in `nodes` order


class RankMemory(Struct, kw_only=True):
    weights: int
    kv_cache: int
    activations: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve


class RankPlan(Struct, kw_only=True):
    node: str
    layers: tuple[int, int]  # [start, end) of the model's layers (all of them for tensor ranks)
    memory: RankMemory
    budget: int  # what the node offers: its working set, else its available memory


class Plan(Struct, kw_only=True, tag="plan"):
    model: str
    layout: Literal["whole", "tensor", "pipeline"]
    backend: Literal["none", "ring", "jaccl"]  # the mx.distributed backend between its ranks
    ranks: list[RankPlan]
    why: str  # the rule that chose it, in one line


class Refusal(Struct, kw_only=True, tag="refusal"):
    model: str
    reason: str  # with the numbers: what it needs, what the nodes have
    needed: int  # bytes for weights, KV cache, activations and reserve on one whole copy
    available: int  # bytes the considered nodes offer together


class ClusterFacts(Struct, kw_only=True):
    """Nodes and their links: what `conclave place --nodes FILE` reads (and, later, the agents' state)."""

    nodes: list[NodeFacts]
    links: list[Link] = []


class Interface(Struct, kw_only=True):
    """One of a node's network interfaces, as its agent found it (ops/telemetry.py)."""

    name: str  # the system's: "en0", "bridge0", "eth0", "thunderbolt0"
    kind: InterfaceKind = "other"
    addresses: list[str] = []  # IPv4 and IPv6, without link-local ones
    speed_mbps: Union[int, None] = None  # None where the platform does not say
    up: bool = False


class ThunderboltPort(Struct, kw_only=True):
    """One of a Mac's Thunderbolt buses (`system_profiler SPThunderboltDataType`): its domain UUID and those of the
    buses cabled to it. Two nodes naming each other's domains are linked (ops/placement.py: links_between)."""

    domain: str
    peers: list[str] = []


class RankCounters(Struct, kw_only=True):
    """A worker rank's counters, as it last wrote them to its liveness file (workers/status.py: keep_alive)."""

    pid: int
    active: int  # bytes MLX holds now (mx.get_active_memory)
    peak: int  # the most it has held (mx.get_peak_memory)
    tokens: int = 0  # tokens its batch stepped through since it started (every rank of a group alike)


class NodeStatus(Struct, kw_only=True):
    """What a node's agent publishes every second (pipeline/nodes.py), and `conclave nodes` and `/v1/cluster`
    show. A figure this platform does not measure (yet) is None, never a made-up 0."""

    facts: NodeFacts
    memory_used: int
    cpu_percent: Union[float, None] = None
    gpu_percent: Union[float, None] = None  # the GPUs' mean busy share (macmon on macOS, NVML on NVIDIA)
    temperature_c: Union[float, None] = None  # the hottest GPU's
    power_w: Union[float, None] = None  # macOS: the whole system's (else CPU + GPU + ANE); NVIDIA: its GPUs'
    disk_free: Union[int, None] = None  # bytes free where its home (models) lives
    ranks: int = 0  # worker rank processes running on it
    rank_memory: list[RankCounters] = []  # each of those ranks' counters (MLX memory, tokens)
    # Tokens per second the ranks here generated over the last report (of the busiest of its groups: the ranks of
    # one group step the same tokens); None without a rank that reported twice.
    tokens_per_s: Union[float, None] = None
    interfaces: list[Interface] = []  # refreshed every 30 s or so
    rdma_devices: list[str] = []  # what `ibv_devices` lists
    thunderbolt: list[ThunderboltPort] = []  # macOS: its Thunderbolt buses and what is cabled to them
    rdma_enabled: Union[bool, None] = None  # macOS: `rdma_ctl status` (jaccl needs it); None where unknown
    fetching: list[FetchProgress] = []  # models arriving from other nodes (ops/model_files.py)
    time: float  # unix seconds when measured
