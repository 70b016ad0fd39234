"""Cluster membership on the wire: a node's request to join, the answer, and what a member keeps.

A joining node makes its own three nkey pairs (agent, ingress, worker ranks) and sends only their public keys,
so no secret crosses the network even once; the join token it holds is itself an nkey seed that lets it ask
nothing but this (pipeline/access.py: joiner_permissions).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta, Struct, field

from schemas.catalogue import FileName
from schemas.cluster import PlacementRequest

NKEY_USER = r"^U[A-Z2-7]{55}$"


# A host name or an IP address, nothing else: these end up in nats-server's configuration and in URLs.
HOST = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,252}|[0-9A-Fa-f:.]{2,45})$"
Host = Annotated[str, Meta(pattern=HOST)]
Port = Annotated[int, Meta(ge=1, le=65535)]


class BrokerOffer(Struct, kw_only=True, forbid_unknown_fields=True):
    """A joining node that will also run one of the cluster's brokers (`conclave join --broker`, ops/brokers.py)."""

    public_key: Annotated[str, Meta(max_length=1024)]  # PEM: the key its certificate is to certify (made there)
    names: Annotated[list[Host], Meta(min_length=1, max_length=64)]  # the names and addresses it certifies
    address: Host  # what the other machines dial it on
    client_port: Port
    route_port: Port
    controller_key: Annotated[str, Meta(pattern=NKEY_USER)]  # of the controller it runs when the first is gone

    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    def client_url(self) -> str:
        return f"tls://{self._host()}:{self.client_port}"

    def route(self) -> str:
        return f"{self._host()}:{self.route_port}"


class JoinRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: str
    host: str
    agent_key: str  # nkey public keys (U...)
    ingress_key: str
    worker_key: str
    broker: Union[BrokerOffer, None] = None


class BrokerGrant(Struct, kw_only=True):
    """What a joining broker gets: its certificate, where the other brokers are, and the users every broker
    admits (role -> nkey public key), until the first machine announces a change (ops/brokers.py)."""

    certificate: str  # PEM, signed by the cluster CA
    routes: list[str]  # host:port of the route listener of every broker known, its own included
    users: dict[str, str]


class JoinReply(Struct, kw_only=True):
    accepted: bool
    reason: Union[str, None] = None  # why not, for the operator of the joining machine
    cluster: str = ""  # the cluster's name (the first machine's host name unless set)
    brokers: list[str] = []  # tls://address:port of every broker known; a node dials any of them
    grant: Union[BrokerGrant, None] = None  # to a node that offered a broker


class Membership(Struct, kw_only=True):
    """`<home>/cluster.json` on a joined node: where its brokers are and which CA it trusts."""

    broker: str  # tls://address:port it joined through
    node_id: str
    ca_fingerprint: str
    cluster: str = ""
    brokers: list[str] = []  # every broker known when it joined (the servers tell it of later ones while it runs)
    routes: list[str] = []  # a broker node's: the route listeners its own server dials
    own_broker: Union[BrokerOffer, None] = None  # a broker node's: the broker it runs

    def urls(self) -> str:
        """Every broker, comma-separated, as a connection dials them (pipeline/connection.py)."""
        return ",".join(dict.fromkeys([self.broker, *self.brokers]))


class WorkerSettings(Struct, kw_only=True):
    """What every worker process (every rank of a group alike) is started with; see workers/worker.py. It travels
    in a rank order, so a node's ranks run with the controller's settings."""

    heartbeat_s: float = 2.0
    queue_ttl_s: float = 600.0
    step_timeout_s: float = 60.0
    max_batch: int = 16
    prefix_cache_gb: float = 4.0
    default_max_tokens: int = 2048

    def arguments(self) -> list[str]:
        return ["--heartbeat", str(self.heartbeat_s), "--queue-ttl", str(self.queue_ttl_s), "--step-timeout",
                str(self.step_timeout_s), "--max-batch", str(self.max_batch), "--prefix-cache-gb",
                str(self.prefix_cache_gb), "--default-max-tokens", str(self.default_max_tokens)]


# What a rank order may set in the rank's environment (ops/group.py: rank_launches), and nothing else: an order
# is data, never a command line, so whoever can order an agent cannot make it run anything but a worker rank.
ORDER_ENV = frozenset({"MLX_RANK", "MLX_JACCL_COORDINATOR"})
ORDER_FILES = frozenset({"MLX_HOSTFILE", "MLX_IBV_DEVICES"})


class PortOrder(Struct, kw_only=True, forbid_unknown_fields=True):
    """Ask an agent for a free TCP port on its address, for a ring rank to listen on."""

    controller: str


class StartOrder(Struct, kw_only=True, forbid_unknown_fields=True):
    controller: str  # the controller's session: an agent stops ranks an earlier controller started
    group_id: str
    rank: int
    model_id: str
    layout: Literal["whole", "tensor", "pipeline"] = "whole"
    backend: Literal["ring", "jaccl"] = "ring"
    split: list[int] = []
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    settings: WorkerSettings = field(default_factory=WorkerSettings)


class StopOrder(Struct, kw_only=True, forbid_unknown_fields=True):
    controller: str
    group_id: str
    rank: int
    signal: Literal["TERM", "KILL"] = "TERM"


class FetchOrder(Struct, kw_only=True, forbid_unknown_fields=True):
    """Fetch a model's files from one of `sources` (node ids that hold it) into this node's store (ops/model_files.py);
    answered at once, the fetch runs on and its progress is in the node's status."""

    controller: str
    order: str  # said back in the node's fetch progress, so that the controller judges this order's outcome only
    model_id: str
    sources: list[str]
    # Only these weight files (a pipeline rank's, workers/split.py: stage_files) and the model's other files, into
    # the node's part of it; empty: the whole model
    files: list[FileName] = []


class OrderReply(Struct, kw_only=True):
    ok: bool
    pid: Union[int, None] = None
    port: Union[int, None] = None
    error: Union[str, None] = None


class RankExit(Struct, kw_only=True):
    """An agent's report that a rank it started has ended (on `conclave.agents.<id>.events`)."""

    node_id: str
    group_id: str
    rank: int
    code: int  # the exit code, or minus the signal
    why: str


class Instance(Struct, kw_only=True):
    """A model the cluster serves, and where (the instances bucket; `/v1/cluster`, and every ingress's model list)."""

    model: str
    created: int
    context_length: Union[int, None] = None
    # "stopping": removed from the plan (DELETE /v1/cluster/instances/<model>), finishing the jobs it took
    state: Literal["placing", "starting", "serving", "stopping"] = "placing"
    nodes: list[str] = []  # where its ranks run, rank 0 first
    memory: list[int] = []  # bytes its plan reserves on each of those nodes (ops/placement.py: offers)
    layers: list[list[int]] = []  # [start, end) of the model's layers each of those nodes holds
    layout: str = ""
    why: str = ""  # the placement's reason, or why it is not placed (a refusal's numbers)
    time: float = 0.0


class ModelPlacement(Struct, kw_only=True, forbid_unknown_fields=True):
    """A model and how to place it: the body of `POST /v1/cluster/placement` (where it would run on the nodes up now,
    answered with a Plan or a Refusal, schemas/cluster.py; nothing started) and of `POST /v1/cluster/instances` (run
    it: ops/instances.py)."""

    model: str
    context: int = 8192
    sequences: int = 4
    nodes: list[str] = []
    layout: Union[Literal["whole", "tensor", "pipeline"], None] = None
    split: list[int] = []
    # Seconds it may stay idle (nothing queued or running) before it is unloaded; None: until it is unloaded, or
    # its memory is needed for another model (ops/instances.py). Ignored by a preview.
    keep_alive: Union[Annotated[float, Meta(ge=0)], None] = None

    def request(self) -> PlacementRequest:
        return PlacementRequest(context=self.context, sequences=self.sequences, nodes=self.nodes, layout=self.layout,
                                split=self.split)


class InstancePlan(Struct, kw_only=True):
    """One model the cluster serves, and how: the settings of its workers and what to place it for."""

    model: str
    settings: WorkerSettings
    request: PlacementRequest


class ControllerPlan(Struct, kw_only=True):
    """What the cluster serves: the model the first machine's `serve` was told to, and those added since through
    `POST /v1/cluster/instances` (ops/instances.py); kept in the control bucket so that whichever controller holds
    the lease (pipeline/lease.py) places them the same way."""

    served: InstancePlan
    added: list[InstancePlan] = []
    # model -> seconds an added instance may stay idle before the first machine unloads it (ops/instances.py:
    # expire_idle); apart from the entries, so that a new keep-alive never restarts a loaded model.
    keep_alive: dict[str, float] = {}

    def instances(self) -> list[InstancePlan]:
        return [self.served, *(i for i in self.added if i.model != self.served.model)]


class InstanceChange(Struct, kw_only=True, forbid_unknown_fields=True):
    """Asked of the first machine on `conclave.cluster.instances` (ops/instances.py) by an ingress or the operator:
    run `add`'s model as it says, `load` a model a request asked for (as the first machine's defaults say, unless
    it runs already), or stop running `remove`."""

    add: Union[ModelPlacement, None] = None
    load: Union[str, None] = None
    remove: Union[str, None] = None


class Lease(Struct, kw_only=True):
    """The controller lease's value: who holds it (pipeline/lease.py)."""

    node_id: str
    session: str  # one per process: a holder that restarted holds it no more
    host: str
