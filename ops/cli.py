"""The `conclave` command: serve, models, generate, bench, audit, schemas."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Coroutine, NoReturn

from ops.cli_cluster import DEFAULTS, add_cluster_commands, add_node_flags, add_placement_flags, placement_request
from ops.config import ROUTE_PORT, default_home, env_float
from workers.store import DEFAULT_MODEL, ModelStore


def group_from_args(args):
    """The worker group the flags ask for: a group file, N local ranks, or one process."""
    from ops.group import GroupSpecError, load_group_file, local_group

    if args.group:
        return load_group_file(Path(args.group))
    if args.tensor_parallel > 1 and args.pipeline_parallel > 1:
        raise GroupSpecError("choose --tensor-parallel or --pipeline-parallel, not both")
    if args.split and args.pipeline_parallel <= 1:
        raise GroupSpecError("--split needs --pipeline-parallel")
    if args.tensor_parallel > 1:
        return local_group("tensor", args.tensor_parallel)
    return local_group("pipeline", args.pipeline_parallel, args.split)


def add_group_flags(p: argparse.ArgumentParser) -> None:
    from workers.rank import parse_split

    g = p.add_argument_group("worker group (one model on several ranks)")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split every layer over N local ranks (the head counts must divide by N)")
    g.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="split the layers into N consecutive stages on N local ranks")
    g.add_argument("--split", type=parse_split, default=None, metavar="A,B,..",
                   help="pipeline: layers per rank (default: even)")
    g.add_argument("--group", default=None, metavar="FILE",
                   help="TOML group file: hosts, ranks per host, backend ring|jaccl|mpi (see README)")


class RemovedApiKeyFlag(argparse.Action):
    """`--api-key KEY` is refused by name: argparse would otherwise take it for an abbreviation of
    --api-key-file, and then name the key in its error (the key must not be on the command line at all)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--api-key was removed (any local user can read the command line): put keys in "
                     "--api-key-file or $CONCLAVE_API_KEYS (see README, API keys)")


def cmd_serve(args) -> None:
    from ingress.keys import ENV_KEYS, load_api_keys
    from ops.serve import ClusterSettings, WorkerSettings, serve

    # Before anything starts: a bad key file is a one-line error, not a server that answers 401 to everyone.
    api_keys = load_api_keys(args.api_key_file, os.environ.get(ENV_KEYS))

    # Every process of the deployment declares the jobs stream with this limit (pipeline/streams.py).
    os.environ["CONCLAVE_MAX_QUEUED"] = str(args.max_queued)
    settings = WorkerSettings(heartbeat_s=args.heartbeat, queue_ttl_s=args.queue_timeout,
                              step_timeout_s=args.step_timeout, max_batch=args.max_batch,
                              prefix_cache_gb=args.prefix_cache_gb, default_max_tokens=args.default_max_tokens)
    cluster = None
    if args.cluster:
        # The cluster's placement takes --split for the pinned nodes; the local group flags do not apply.
        cluster = ClusterSettings(listen=args.cluster_listen, address=args.advertise, mdns=not args.no_mdns,
                                  memory_limit=int(args.memory_limit * 1e9) if args.memory_limit else None,
                                  request=placement_request(args), brokers=args.brokers, route_port=args.route_port,
                                  keep_alive_s=args.keep_alive,
                                  **({"name": args.cluster_name} if args.cluster_name else {}))
        args.split = None
    elif args.pin or args.layout:
        raise SystemExit("--pin and --layout place a model on a cluster's nodes: they need --cluster")
    run_service(serve(args.home, args.model, args.host, args.port, args.nats_url, args.nats_port, api_keys,
                      args.worker_timeout, args.max_queue_wait, group_from_args(args), settings,
                      args.checkpoint_interval, cluster, args.replicas))


def cmd_generate(args) -> None:
    from ops.group import generate_on_group

    model = ModelStore(args.home / "models").resolve(args.model)
    report = generate_on_group(group_from_args(args), model.path, args.prompt, args.max_tokens, raw=args.raw)
    print(json.dumps(report, indent=2))


def cmd_models(args) -> None:
    from ops.cli_cluster import cmd_cluster_models
    from ops.deployment import read_deployment

    store = ModelStore(args.home / "models")
    running = read_deployment(args.home)
    if args.action in ("load", "unload") or (args.action == "list" and (args.nats_url or running and running.cluster)):
        cmd_cluster_models(args)  # the running deployment's models, loaded or not, wherever their files are
    elif args.action == "list":
        print("(no cluster runs in this home: its model store)", file=sys.stderr)
        for model in store.list():
            print(f"{model.id}\t{model.size_bytes / 1e6:.1f} MB\t{model.path}")
    elif args.action == "import":
        model = store.import_gguf(Path(args.source), args.id) if args.source else store.ensure_default()
        print(f"{model.id}\t{model.path}")
    elif args.action == "pull":
        model = store.pull(args.source, args.revision)
        print(f"{model.id}\t{model.path}")


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("expected seconds, 0 or more")
    return value


def parse_levels(text: str) -> list[int]:
    levels = [int(n) for n in text.split(",")]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,4,16")
    return levels


def cmd_bench(args) -> None:
    from ops.bench import run_bench, run_concurrency_bench, run_group_bench

    if args.against:
        from ops.bench_llama import run_llama_bench

        report = run_llama_bench(args)
    elif args.json_schema:
        from ops.bench_schema import run_schema_bench

        report = run_schema_bench(args)
    elif args.cluster:
        from ops.bench_cluster import run_cluster_bench

        report = run_cluster_bench(args)
    elif args.files:
        from ops.bench_files import run_files_bench

        report = run_files_bench(args)
    elif args.switch:
        from ops.bench_switch import run_switch_bench

        report = run_switch_bench(args)
    elif args.concurrency:
        report = run_concurrency_bench(args)
    elif args.tensor_parallel > 1 or args.pipeline_parallel > 1:
        report = run_group_bench(args)
    else:
        report = run_bench(args)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


def cmd_audit(args) -> None:
    from ops.audit import run_audit

    sys.exit(asyncio.run(run_audit(args)))


def cmd_credentials(args) -> None:
    from ops.credentials import (apply_authorization, issue_submitter, public_keys, revoke_submitter, role_identity,
                                 server_authorization, write_private)
    from pipeline.access import AUDITOR, INGRESS, OPERATOR, AccessError, inbox_prefix, worker_role
    from pipeline.subjects import JOBS_PREFIX, reply_prefix

    if args.action == "server-config":
        # The roles a deployment of these models connects as, made now if no `conclave serve` made them yet.
        for role in (OPERATOR, INGRESS, AUDITOR, *(worker_role(model) for model in args.model or [DEFAULT_MODEL])):
            role_identity(args.home, role)
        print(server_authorization(args.home), end="")
        return
    if args.action == "list":
        for role, key in public_keys(args.home).items():
            print(f"{role}\t{key}")
        return
    if not args.name:
        raise AccessError(f"credentials {args.action} needs a NAME")
    if args.action == "issue":
        seed = issue_submitter(args.home, args.name, args.public_key)
        if seed is not None:
            out = Path(args.out or f"{args.name}.nk")
            write_private(out, seed)
            print(f"wrote the nkey seed of submitter {args.name} to {out} (mode 0600): hand it to that system "
                  f"only; it is not kept here")
        print(f"submitter {args.name}: publish jobs on {JOBS_PREFIX}.<model>.{args.name} with reply subjects under "
              f"{reply_prefix(args.name)}.; connect with inbox_prefix {inbox_prefix(args.name)}")
    else:
        if not revoke_submitter(args.home, args.name):
            raise AccessError(f"no submitter named {args.name}")
        print(f"revoked submitter {args.name}")
    if apply_authorization(args.home):
        print("the running embedded nats-server reloaded its authorization")
    else:
        print("no embedded nats-server runs in this home: it takes effect at its next start; for your own "
              "server, install `conclave credentials server-config` and reload it")


def cmd_schemas(args) -> None:
    from ops.schemas import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conclave", description="Private LLM serving behind an OpenAI-compatible API.",
                                formatter_class=DEFAULTS)
    p.add_argument("--home", type=Path, default=default_home(), help="state directory ($CONCLAVE_HOME, else "
                   "~/.local/share/conclave)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model over HTTP", formatter_class=DEFAULTS)
    s.add_argument("--model", default=DEFAULT_MODEL, help="store id, model directory, .gguf file or HF repo id")
    s.add_argument("--host", default="127.0.0.1", help="HTTP listener address")
    s.add_argument("--port", type=int, default=8000, help="HTTP listener port")
    s.add_argument("--nats-url", default=None, help="use this NATS server/cluster instead of starting one")
    s.add_argument("--nats-port", type=int, default=4222, help="port of the embedded nats-server")
    s.add_argument("--replicas", type=int, default=1, help="copies JetStream keeps of every stream (jobs, results, "
                   "the audit log): 3 on a 3-server NATS cluster (--nats-url a,b,c), so that losing any one loses "
                   "nothing")
    s.add_argument("--api-key-file", type=Path, default=os.environ.get("CONCLAVE_API_KEY_FILE") or None,
                   metavar="PATH", help="`NAME KEY` lines ($CONCLAVE_API_KEY_FILE); with $CONCLAVE_API_KEYS "
                   "(`NAME:KEY,...`), /v1 routes need `Authorization: Bearer KEY`")
    s.add_argument("--api-key", nargs="?", action=RemovedApiKeyFlag, help=argparse.SUPPRESS)
    s.add_argument("--queue-timeout", type=float, default=env_float("CONCLAVE_QUEUE_TIMEOUT", 600.0),
                   help="seconds a request waits for a worker before 503; queued jobs older than this are dropped")
    s.add_argument("--worker-timeout", type=float, default=env_float("CONCLAVE_WORKER_TIMEOUT", 30.0),
                   help="seconds of silence from a busy worker before its request fails with 503")
    s.add_argument("--heartbeat", type=float, default=env_float("CONCLAVE_HEARTBEAT", 2.0),
                   help="seconds between worker status and progress messages")
    s.add_argument("--max-queued", type=int, default=int(os.environ.get("CONCLAVE_MAX_QUEUED") or 1000),
                   help="jobs one model may have queued or running per submitter (all HTTP requests are one); "
                        "beyond it HTTP answers 429 and NATS publishes are refused")
    s.add_argument("--step-timeout", type=float, default=env_float("CONCLAVE_STEP_TIMEOUT", 60.0),
                   help="a worker (or group) whose batch makes no step for this long is hung (or has lost a rank): "
                        "it fails its requests with 503 and restarts")
    s.add_argument("--max-batch", type=int, default=int(os.environ.get("CONCLAVE_MAX_BATCH") or 16),
                   help="requests one worker (or group) generates at once; more wait in the queue")
    s.add_argument("--prefix-cache-gb", type=float, default=float(os.environ.get("CONCLAVE_PREFIX_CACHE_GB") or 4.0),
                   help="GiB of finished requests' KV caches a worker keeps for prompts that extend them (0: off)")
    s.add_argument("--default-max-tokens", type=int, default=int(os.environ.get("CONCLAVE_DEFAULT_MAX_TOKENS") or 2048),
                   help="tokens a request may generate when it sends no max_tokens (it may ask for more, up to "
                        "the context)")
    s.add_argument("--max-queue-wait", type=float, default=env_float("CONCLAVE_MAX_QUEUE_WAIT", 60.0),
                   help="seconds a request may be expected to wait for a place in a batch; beyond it, 429 with "
                        "Retry-After")
    s.add_argument("--checkpoint-interval", type=float, default=env_float("CONCLAVE_CHECKPOINT_INTERVAL", 60.0),
                   help="seconds between signed checkpoints of the audit log's new records (docs/audit.md)")
    c = s.add_argument_group("cluster (other machines join this one; see README, Cluster)")
    c.add_argument("--cluster", action="store_true", help="open the broker to other machines: TLS from a private CA "
                   "made here, nkey authentication, joining by token; prints the `conclave join` line")
    c.add_argument("--cluster-listen", default="0.0.0.0", metavar="ADDRESS", help="the broker's listening address")
    add_node_flags(c)
    c.add_argument("--cluster-name", default=None, help="the name `conclave join` shows when it finds the cluster on "
                   "the LAN (default: this host's name)")
    c.add_argument("--no-mdns", action="store_true", help="do not advertise the cluster by mDNS (nodes then join by "
                   "address)")
    c.add_argument("--brokers", type=int, choices=(1, 3), default=1, help="3: the broker is three nats-servers, this "
                   "machine's and those of two nodes that join with --broker; streams are kept in three replicas, "
                   "and the cluster serves once the three are up. Chosen at set-up (see README, Cluster)")
    c.add_argument("--route-port", type=int, default=ROUTE_PORT, help="with --brokers 3: this broker's port for "
                   "the other brokers (mutual TLS)")
    c.add_argument("--keep-alive", type=seconds, default=env_float("CONCLAVE_KEEP_ALIVE", 300.0), metavar="SECONDS",
                   help="a model loaded on demand (a request for a model of the cluster not running) is unloaded "
                   "after this long with nothing queued or running")
    add_placement_flags(c)
    add_group_flags(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="one greedy generation on a worker group, no server; prints JSON per rank",
                       formatter_class=DEFAULTS)
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    add_group_flags(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="the model store", formatter_class=DEFAULTS)
    m.add_argument("action", choices=["list", "import", "pull", "load", "unload"])
    m.add_argument("source", nargs="?", help="import: a .gguf file (default: the bundled model); pull: a repo id; "
                   "load, unload: a model id")
    m.add_argument("--id", default=None, help="import: the id to store it under")
    m.add_argument("--revision", default=None, help="pull: branch, tag or commit")
    m.add_argument("--nats-url", default=None, help="list, load, unload: the deployment's NATS (default: the one "
                   "running in --home)")
    m.add_argument("--keep-alive", type=seconds, default=None, metavar="SECONDS", help="load: unload it after this "
                   "long with nothing queued or running (default: until `unload`, or its memory is needed)")
    m.add_argument("--no-wait", dest="wait", action="store_false", help="load: return once it is in the plan, "
                   "not once it serves")
    add_placement_flags(m)
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="raw mlx-lm vs the served path, or one process vs worker groups; "
                       "prints and writes JSON", formatter_class=DEFAULTS)
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--prompts", type=int, default=5, help="number of distinct prompts")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--repeat", type=int, default=1, help="runs of every prompt on each path")
    b.add_argument("--output", default="bench.json")
    b.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="instead: compare one process, a tensor-parallel group of N and --pipeline-parallel")
    b.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="instead: compare one process, a pipeline-parallel group of N and --tensor-parallel")
    b.add_argument("--concurrency", type=parse_levels, default=None, metavar="N,M,..",
                   help="instead: the served path with N, then M, ... requests in flight (continuous batching)")
    b.add_argument("--against", choices=["llama.cpp"], default=None, help="instead: raw mlx-lm, served Conclave and "
                   "llama.cpp (llama-cpp-python, all cores) on the same GGUF and prompt tokens, greedy, with the ratios")
    b.add_argument("--json-schema", action="store_true", help="instead: the served path's decode speed with and "
                   "without a JSON Schema (response_format, constrained decoding) on the same prompts")
    b.add_argument("--cluster", action="store_true", help="instead: placement time on a synthetic 100-node cluster, "
                   "and on three local nodes the time to detect a lost node and to serve again")
    b.add_argument("--files", action="store_true", help="instead: model files between nodes on loopback (one and "
                   "three receivers) against a plain copy of the same bytes")
    b.add_argument("--size-gb", type=float, default=2.0, help="--files: the synthetic model's size")
    b.add_argument("--switch", action="store_true", help="instead: the first token of a model that replaces "
                   "another (on one machine whose memory fits one besides the served model) against a cold load")
    b.add_argument("--memory-gb", type=float, default=4.3, help="--switch: the machine's memory limit")
    b.add_argument("--rounds", type=int, default=3, help="--switch: rounds (one cold load and two switches each)")
    b.add_argument("--link-gbit", type=float, default=None, help="--files: instead of loopback, each node in a "
                   "network namespace of its own on a bridge, its link limited to this rate both ways (root only)")
    b.set_defaults(func=cmd_bench)

    a = sub.add_parser("audit", help="read, export, verify and replay the audit log; print its signing key",
                       formatter_class=DEFAULTS, description="verify exits 0 when every entry is vouched for by "
                       "checkpoints signed with the pinned key, 1 when it finds the log altered or cut, 2 when "
                       "there is nothing to check, 3 when nothing is wrong but some entries are not vouched for "
                       "(see docs/audit.md). A log or export cut before its last checkpoints reads like an older "
                       "complete one: verify prints the last checkpoint it found, to compare with one you kept, "
                       "and --expect-seq makes it fail when the log does not reach that far")
    a.add_argument("action", choices=["list", "show", "export", "verify", "replay", "key"])
    a.add_argument("job_id", nargs="?", help="show: the job (request) id")
    a.add_argument("--nats-url", default=None, help="the deployment's NATS (default: that of the conclave serve "
                   "running in --home)")
    a.add_argument("--since", help="ISO 8601 time (UTC unless a zone is given)")
    a.add_argument("--until", help="ISO 8601 time")
    a.add_argument("--model")
    a.add_argument("--caller", help="e.g. anonymous, key:<name>:<fingerprint> or nats:<submitter>")
    a.add_argument("--submitter", help="the NATS identity that published the job: ingress, operator or a "
                   "submitter's name")
    a.add_argument("--limit", type=int, default=50, help="list, replay: the newest N matching records")
    a.add_argument("--timeout", type=float, default=600.0, help="replay: seconds to wait for each request")
    a.add_argument("--output", help="export: a JSONL file, written owner-only (mode 0600: it holds every prompt "
                   "and answer); default: standard output")
    a.add_argument("--file", help="verify: a JSONL export instead of the live stream")
    a.add_argument("--public-key", default=None, metavar="KEY", help="verify: trust only checkpoints signed by "
                   "this key (ed25519:..., from `conclave audit key`); live verify defaults to this home's key")
    a.add_argument("--expect-seq", type=int, default=None, metavar="N", help="verify: BROKEN (exit 1) unless a "
                   "trusted checkpoint reaches seq N, e.g. the last checkpoint's seq of an earlier verify or export: "
                   "without it, a log cut before its last checkpoints cannot be told from an older complete one")
    a.set_defaults(func=cmd_audit)

    c = sub.add_parser("credentials", help="NATS credentials: issue or revoke a submitter (an internal system "
                       "that publishes jobs), list roles, print the server authorization", formatter_class=DEFAULTS)
    c.add_argument("action", choices=["issue", "revoke", "list", "server-config"])
    c.add_argument("name", nargs="?", help="issue, revoke: the submitter's name (a-z, 0-9, _ and -)")
    c.add_argument("--out", default=None, help="issue: where to write its seed (default ./NAME.nk)")
    c.add_argument("--model", action="append", metavar="ID", help="server-config: a model the deployment serves "
                   "(its worker role); repeat for several (default: the bundled model)")
    c.add_argument("--public-key", default=None, help="issue: register this nkey public key (U...) that the "
                   "system made itself, instead of making a seed here")
    c.set_defaults(func=cmd_credentials)

    add_cluster_commands(sub)

    j = sub.add_parser("schemas", help="write the job and event message types as JSON Schema",
                       formatter_class=DEFAULTS)
    j.add_argument("--out", default="schemas/json")
    j.set_defaults(func=cmd_schemas)
    return p


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message of an error a command reports without a traceback (a bad flag or file, a
    broker out of reach), or None: a traceback for anything else."""
    from ingress.keys import APIKeyError
    from ops.deployment import DeploymentError
    from ops.discovery import DiscoveryError
    from ops.group import GroupSpecError
    from ops.join import JoinError
    from pipeline.access import AccessError
    from pipeline.connection import NatsUnreachable
    from workers.split import ShardError
    from workers.store import StoreError

    if isinstance(exc, (GroupSpecError, ShardError, StoreError, DeploymentError, APIKeyError, AccessError)):
        return 2, f"conclave: error: {exc}\n"
    if isinstance(exc, (NatsUnreachable, JoinError, DiscoveryError)):
        return 1, f"conclave: error: {exc}\n"
    return None


def run_service(service: Coroutine) -> NoReturn:
    """Run `conclave serve` or `conclave join` until it ends, then end the process at once (`os._exit`, as the workers
    do), without the interpreter's teardown, whichever way it ended: its message or traceback is written first, with
    the exit code `main` gives it.

    Why: a thread of asyncio's executor that touched MLX (checking a model's layouts builds it lazily: mlx-lm's
    import reads `mx.random.state`, which MLX keeps per thread) runs MLX's thread-local destructors as it exits,
    after asyncio has joined it. One that runs once the interpreter has begun finalizing must take the GIL; Python
    3.11 ends the thread there (pthread_exit inside a C++ destructor), and the process aborts: SIGABRT right after
    "Conclave stopped." (a core dump read on the dashboard's test, about one stop in four). By the time the service
    ends, what it started is stopped (ranks, nats-server) and its record removed."""
    code = 0
    try:
        asyncio.run(service)
    except SystemExit as exc:  # as the interpreter takes it: a number (or None) is the code; anything else is said
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            code = 1
            sys.stderr.write(f"{exc.code}\n")
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:
        code, message = failure(exc) or (1, "".join(traceback.format_exception(exc)))
        sys.stderr.write(message)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # (a reader that went away)
            stream.flush()
    os._exit(code)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from pipeline.connection import quiet_tls_eof_warning

    quiet_tls_eof_warning()
    p = parser()
    args = p.parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:
        if (known := failure(exc)) is None:
            raise
        p.exit(*known)


if __name__ == "__main__":
    main()
