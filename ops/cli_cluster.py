"""The `conclave` commands of a cluster: place, nodes, models list|load|unload, join, join-token, service (ops/cli.py
has the rest)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ops.config import ROUTE_PORT
from workers.store import DEFAULT_MODEL, ModelStore, StoreError

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def add_node_flags(g) -> None:
    g.add_argument("--advertise", default=None, metavar="ADDRESS", help="the address other machines reach this one "
                   "on (default: serve: its first non-loopback IPv4; join: its address on the way to the broker)")
    g.add_argument("--memory-limit", type=float, default=None, metavar="GB", help="offer placement at most this "
                   "much memory on this machine (keep the rest for other work; tests use it to force a split)")


def placement_request(args):
    from schemas.cluster import PlacementRequest

    return PlacementRequest(context=args.context, sequences=args.sequences, nodes=args.pin or [], layout=args.layout,
                            split=args.split or [])


def add_placement_flags(p) -> None:
    p.add_argument("--context", type=int, default=8192, help="placement: tokens of context per sequence")
    p.add_argument("--sequences", type=int, default=4, help="placement: sequences decoded at once")
    p.add_argument("--pin", type=lambda text: text.split(","), default=None, metavar="A,B,..",
                   help="placement: use exactly these nodes, in this order (with --split: layers per node)")
    p.add_argument("--layout", choices=["whole", "tensor", "pipeline"], default=None, help="placement: this layout")


def cmd_place(args) -> None:
    """Preview a placement: on this machine's facts, or on the nodes of a file (planning hardware)."""
    import msgspec

    from ops.deployment import DeploymentError
    from ops.agent import Offer, local_node
    from ops.model_facts import model_facts
    from ops.placement import describe, place
    from schemas.cluster import ClusterFacts

    store = ModelStore(args.home / "models")
    # A preview reads only config.json and the weights' headers: it never pulls or imports (a 600 GB download).
    local = args.model == DEFAULT_MODEL or Path(args.model).expanduser().is_dir() or store.get(args.model)
    if not local:
        raise StoreError(f"{args.model} is neither in the store nor a model directory: `conclave models pull` or "
                         f"`import` it first (place only previews)")
    model = store.resolve(args.model)
    if args.nodes:
        try:
            cluster = msgspec.json.decode(Path(args.nodes).read_bytes(), type=ClusterFacts)
        except (OSError, msgspec.MsgspecError) as exc:
            raise DeploymentError(f"{args.nodes}: not a file of nodes and links (schemas/cluster.py): {exc}") from None
    else:
        limit = int(args.memory_limit * 1e9) if args.memory_limit else None
        cluster = ClusterFacts(nodes=[local_node(args.home, Offer(memory_limit=limit))])
    request = placement_request(args)
    result = place(model_facts(model.id, model.path), cluster.nodes, cluster.links, request)
    print(msgspec.json.encode(result).decode() if args.json else describe(result))
    if not hasattr(result, "ranks"):
        sys.exit(1)


def cmd_nodes(args) -> None:
    from ops.agent import nodes_table
    from ops.credentials import apply_authorization, remove_node
    from ops.deployment import operator_connection
    from pipeline.nodes import read_nodes

    if args.action == "remove":
        if not args.node or not remove_node(args.home, args.node):
            raise SystemExit(f"no joined node {args.node!r} in {args.home} (see `conclave nodes`)")
        reloaded = apply_authorization(args.home)
        print(f"removed node {args.node}: its keys are revoked{' now' if reloaded else ' at the next start'}; it "
              f"can join again only with a join token")
        return

    async def show() -> None:
        from pipeline.lease import read_lease

        nc = await operator_connection(args.home, args.nats_url, "conclave-nodes")
        try:
            print(nodes_table(await read_nodes(nc.jetstream())))
            if (lease := await read_lease(nc.jetstream())) is not None:
                print(f"controller: {lease.host} (node {lease.node_id})")
        finally:
            await nc.close()

    asyncio.run(show())


def models_table(models) -> str:
    """`conclave models list` on a running deployment: the cluster's catalogue (pipeline/nodes.py: cluster_models)."""
    rows = [["MODEL", "STATUS", "FILES ON", "RUNS ON"]]
    rows += [[m.id, m.status, ",".join(m.files_on) or "-", ",".join(m.nodes) or "-"] for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def cmd_cluster_models(args) -> None:
    """`conclave models list|load|unload` against the deployment running in this home, as its operator (on a
    cluster: the first machine; from any other node, the HTTP endpoints do the same)."""
    import json

    import msgspec
    import nats.errors

    from ops.deployment import operator_connection
    from pipeline.access import INSTANCES_SUBJECT
    from pipeline.nodes import cluster_models, read_instances, read_nodes
    from schemas.membership import InstanceChange, ModelPlacement

    async def run() -> None:
        nc = await operator_connection(args.home, args.nats_url, "conclave-models")
        try:
            js = nc.jetstream()
            if args.action == "list":
                print(models_table(cluster_models(await read_nodes(js), await read_instances(js))))
                return
            if not args.source:
                raise SystemExit(f"conclave models {args.action}: which model?")
            change = (InstanceChange(remove=args.source) if args.action == "unload" else InstanceChange(
                add=ModelPlacement(model=args.source, context=args.context, sequences=args.sequences,
                                   nodes=args.pin or [], layout=args.layout, keep_alive=args.keep_alive)))
            try:
                reply = await nc.request(INSTANCES_SUBJECT, msgspec.json.encode(change), timeout=60)
            except nats.errors.NoRespondersError:
                raise SystemExit(f"conclave: the deployment in {args.home} is not a cluster's first machine "
                                 f"(`conclave serve --cluster`): models are loaded and unloaded there") from None
            answer = json.loads(reply.data)
            if answer.get("type") == "error":
                raise SystemExit(f"conclave: {answer['message']}")
            if args.action == "unload":
                print(f"unloading {args.source}: its queued requests are answered, then its ranks stop")
            elif args.wait:
                for model in answer.get("unloaded", []):
                    print(f"unloading {model} (idle, least recently used) to make room")
                await watch_load(js, args.source)
            else:
                print(f"loading {args.source}" + ("" if answer.get("changed") else " (it was loaded already)"))
        finally:
            await nc.close()

    asyncio.run(run())


async def watch_load(js, model: str) -> None:
    """Until `model` serves: its state as it changes, and a progress bar while nodes fetch its files."""
    from tqdm import tqdm

    from pipeline.nodes import read_instances, read_nodes

    said, bar = "", None
    try:
        while True:
            instance = next((i for i in await read_instances(js) if i.model == model), None)
            fetches = [p for s in await read_nodes(js) for p in s.fetching if p.model == model and not p.error]
            if fetches and bar is None:
                bar = tqdm(total=sum(p.total for p in fetches), unit="B", unit_scale=True, desc=f"fetching {model}")
            if bar is not None:
                bar.update(sum(p.done for p in fetches) - bar.n if fetches else bar.total - bar.n)
            state = f"{instance.state}: {instance.why}" if instance is not None else "waiting for the controller"
            if state != said and bar is None:
                print(f"{model}: {state}", flush=True)
                said = state
            if instance is not None and instance.state == "serving":
                return
            if instance is not None and instance.state == "stopping":
                raise SystemExit(f"conclave: {model} is being unloaded")
            await asyncio.sleep(0.5)
    finally:
        if bar is not None:
            bar.close()


def cmd_join(args) -> None:
    from ingress.keys import ENV_KEYS, load_api_keys
    from ops.cli import run_service
    from ops.node import run_node

    api_keys = load_api_keys(args.api_key_file, os.environ.get(ENV_KEYS))
    limit = int(args.memory_limit * 1e9) if args.memory_limit else None
    run_service(run_node(args.home, args.address, args.token, limit, args.advertise,
                         (args.host, args.port) if args.port else None, api_keys,
                         (args.nats_port, args.route_port) if args.broker else None))


def cmd_join_token(args) -> None:
    from ops.cluster_tls import fingerprint
    from ops.credentials import apply_authorization, cluster_ca, new_seed, role_identity, write_private
    from ops.join import make_token
    from pipeline.access import JOINER

    ca = cluster_ca(args.home)
    if not ca.exists():
        raise SystemExit(f"{args.home} has no cluster: start it with `conclave serve --cluster` first")
    if args.rotate:
        write_private(role_identity(args.home, JOINER).seed_file, new_seed())
        apply_authorization(args.home)
    print(make_token(args.home, fingerprint(ca.read_bytes())))


def cmd_service(args) -> None:
    import shlex

    from ops.service import install

    platform = args.platform if args.platform != "auto" else "launchd" if sys.platform == "darwin" else "systemd"
    if args.join_flags is not None and args.serve_flags:
        raise SystemExit("give --serve-flags (the first machine) or --join-flags (a node), not both")
    command, flags = ("join", args.join_flags) if args.join_flags is not None else ("serve", args.serve_flags)
    if command == "join" and "--token" in flags:
        raise SystemExit("leave --token out of --join-flags: a joined node rejoins with what it kept in its home, "
                         "and the unit file would show the token to every local user")
    path, enable = install(args.home, shlex.split(flags), platform, Path(args.dir) if args.dir else None, command)
    print(f"wrote {path}\nenable it with: {enable}")


def add_cluster_commands(sub) -> None:
    pl = sub.add_parser("place", help="preview where a model would run, with the memory of each rank",
                        formatter_class=DEFAULTS)
    pl.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="store id, model directory, .gguf or repo id")
    pl.add_argument("--nodes", default=None, metavar="FILE", help="JSON {nodes: [NodeFacts], links: [Link]} "
                    "(schemas/cluster.py) instead of this machine")
    pl.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                    help="this machine: offer at most this much memory")
    add_placement_flags(pl)
    pl.add_argument("--split", type=lambda text: [int(n) for n in text.split(",")], default=None, metavar="A,B,..",
                    help="pipeline: layers per pinned node")
    pl.add_argument("--json", action="store_true", help="the plan or refusal as JSON")
    pl.set_defaults(func=cmd_place)

    n = sub.add_parser("nodes", help="the cluster's nodes: memory, CPU, disk, models, ranks, last seen",
                       formatter_class=DEFAULTS)
    n.add_argument("action", nargs="?", choices=["list", "remove"], default="list",
                   help="list: the table; remove NODE: revoke a joined node's credentials")
    n.add_argument("node", nargs="?", help="the node id to remove")
    n.add_argument("--nats-url", default=None, help="the deployment's NATS (default: that of the conclave serve "
                   "running in --home)")
    n.set_defaults(func=cmd_nodes)

    jn = sub.add_parser("join", help="run this machine as a node of a cluster (`conclave serve --cluster` printed "
                        "the line)", formatter_class=DEFAULTS)
    jn.add_argument("address", nargs="?", default=None, help="the first machine's address[:port] (default: find "
                    "the cluster on the LAN by mDNS)")
    jn.add_argument("--token", default=os.environ.get("CONCLAVE_JOIN_TOKEN"), help="the join token "
                    "($CONCLAVE_JOIN_TOKEN); not needed again once joined")
    jn.add_argument("--port", type=int, default=None, help="also serve the OpenAI API on this HTTP port")
    jn.add_argument("--host", default="127.0.0.1", help="HTTP listener address (with --port)")
    jn.add_argument("--api-key-file", type=Path, default=os.environ.get("CONCLAVE_API_KEY_FILE") or None,
                    metavar="PATH", help="API keys of the HTTP port, as for serve")
    add_node_flags(jn)
    jn.add_argument("--broker", action="store_true", help="also run one of the cluster's three brokers (a cluster "
                    "set up with `serve --cluster --brokers 3`); chosen when joining")
    jn.add_argument("--nats-port", type=int, default=4222, help="with --broker: its port for clients (TLS)")
    jn.add_argument("--route-port", type=int, default=ROUTE_PORT, help="with --broker: its port for the other "
                    "brokers (mutual TLS)")
    jn.set_defaults(func=cmd_join)

    jt = sub.add_parser("join-token", help="print the token other machines join this cluster with", formatter_class=DEFAULTS)
    jt.add_argument("--rotate", action="store_true", help="replace it: the old one stops working; joined nodes "
                    "are not affected")
    jt.set_defaults(func=cmd_join_token)

    sv = sub.add_parser("service", help="write a systemd unit (Linux) or launchd agent (macOS) that runs "
                        "`conclave serve` (or `join`) at boot and restarts it", formatter_class=DEFAULTS)
    sv.add_argument("action", choices=["install"])
    sv.add_argument("--platform", choices=["auto", "systemd", "launchd"], default="auto")
    sv.add_argument("--dir", default=None, help="where to write it (default: the user's systemd or LaunchAgents "
                    "folder)")
    sv.add_argument("--serve-flags", default="", metavar="'FLAGS'",
                    help="the flags for `conclave serve`, as one quoted string, e.g. '--port 8100'")
    sv.add_argument("--join-flags", default=None, metavar="'FLAGS'",
                    help="a node instead: the flags for `conclave join` (after it joined once), e.g. '10.0.0.1 "
                    "--port 8000'")
    sv.set_defaults(func=cmd_service)
