"""Worker groups: where the ranks of one model run, and how they are started.

A `GroupSpec` says which hosts run how many ranks, the MLX distributed backend and the layout
(tensor or pipeline). `rank_environments` turns it into what MLX reads at `mx.distributed.init`
(hostfile / device matrix / coordinator, and MLX_RANK); a `Launcher` starts one rank's command on its
host with that environment. Local ranks are subprocesses; remote ranks go through ssh, as
`mlx.launch` does. A later node agent is one more `Launcher`.

Group file (TOML), for several machines:

    layout = "pipeline"          # or "tensor"
    backend = "jaccl"            # ring | jaccl | mpi
    port = 32323                 # first TCP port (ring: one per rank; jaccl: the coordinator's)
    split = [30, 31]             # pipeline only: layers per rank (default: by `memory_gb`, else even)

    [[hosts]]
    ssh = "studio-1.local"       # ssh target ("localhost" runs the ranks as local subprocesses)
    ip = "10.0.0.1"              # address the other ranks reach this host on
    ranks = 1
    memory_gb = 256
    rdma = ["", "rdma_en3"]      # jaccl: the RDMA device towards each rank ("" towards itself)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import msgspec

from ops.config import free_port
from pipeline.nats_server import child_preexec, stop_process
from workers.cpu_path import RANKS_HERE, rank_command
from workers.rank import BACKENDS, format_split
from workers.split import (LAYOUTS, ShardError, check_pipeline_split, check_tensor_parallel, pipeline_split,
                           tensor_parallel_sizes)

LOCAL = ("localhost", "127.0.0.1", "")


class GroupSpecError(ValueError):
    pass


class HostSpec(msgspec.Struct, forbid_unknown_fields=True):
    ssh: str = "localhost"
    ip: str = "127.0.0.1"
    ranks: int = 1
    memory_gb: float | None = None
    rdma: list[str] | None = None  # "" at its own position (TOML has no null)
    node: str | None = None  # a cluster node whose agent starts this host's ranks (ops/controller.py), not ssh

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL and self.node is None


class GroupSpec(msgspec.Struct, forbid_unknown_fields=True):
    layout: str = "whole"  # whole | tensor | pipeline
    backend: str = "ring"
    port: int = 32323
    split: list[int] | None = None
    hosts: list[HostSpec] = msgspec.field(default_factory=lambda: [HostSpec()])

    @property
    def size(self) -> int:
        return sum(h.ranks for h in self.hosts)

    def placements(self) -> list[HostSpec]:
        """The host of every rank, rank 0 first."""
        return [h for h in self.hosts for _ in range(h.ranks)]

    def memory_weights(self) -> list[float] | None:
        hosts = self.placements()
        if all(h.memory_gb for h in hosts):
            return [h.memory_gb / h.ranks for h in hosts]
        return None

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise GroupSpecError(f"layout must be tensor or pipeline, not {self.layout!r}")
        if self.backend not in BACKENDS:
            raise GroupSpecError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.size < 1 or any(h.ranks < 1 for h in self.hosts):
            raise GroupSpecError("every host needs ranks >= 1")
        if self.layout == "whole" and self.size != 1:
            raise GroupSpecError("a group of several ranks needs layout = tensor or pipeline")
        if self.split is not None and self.layout != "pipeline":
            raise GroupSpecError("split applies to layout = pipeline only")
        if self.backend == "jaccl":
            if len(self.hosts) != self.size:
                raise GroupSpecError("jaccl runs one rank per host (RDMA devices are per machine)")
            for i, host in enumerate(self.hosts):
                if (host.rdma is None or len(host.rdma) != self.size or host.rdma[i]
                        or not all(name for j, name in enumerate(host.rdma) if j != i)):
                    raise GroupSpecError(f"host {host.ssh}: rdma must name the device towards every other rank "
                                         f"(a full Thunderbolt mesh), with \"\" at its own position {i}")


def local_group(layout: str, ranks: int, split: list[int] | None = None) -> GroupSpec:
    """N ranks on this machine over loopback TCP (ring): one machine's cores or GPUs, or a test."""
    spec = GroupSpec(layout=layout if ranks > 1 else "whole", split=split, hosts=[HostSpec(ranks=ranks)])
    spec.check()
    return spec


def load_group_file(path: Path) -> GroupSpec:
    try:
        spec = msgspec.convert(tomllib.loads(Path(path).read_text()), GroupSpec)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError, OSError) as exc:
        raise GroupSpecError(f"{path}: {exc}") from None
    spec.check()
    if spec.size == 1:  # one rank is one process, whatever the layout says
        spec = msgspec.structs.replace(spec, layout="whole", split=None)
    return spec


@dataclass
class RankLaunch:
    rank: int
    host: HostSpec
    env: dict[str, str]  # MLX_* variables
    files: dict[str, str] = field(default_factory=dict)  # variable -> file content; the launcher writes it


def rank_launches(spec: GroupSpec, launchers: Callable[[HostSpec], "Launcher"] = None) -> list[RankLaunch]:
    """What every rank needs in its environment for `mx.distributed.init(backend=spec.backend)`."""
    launchers = launchers or launcher_for
    hosts = spec.placements()
    if spec.size == 1:
        return [RankLaunch(0, hosts[0], {})]
    if spec.backend == "ring":
        # Each host's launcher says the port: local ranks and node agents find a free one (a restarted group
        # never waits on a port in TIME_WAIT); over ssh, consecutive ports from spec.port, as mlx.launch does.
        ports = [launchers(h).ring_port(h, spec.port + r) for r, h in enumerate(hosts)]
        hostfile = json.dumps([[f"{h.ip}:{port}"] for h, port in zip(hosts, ports)])
        return [RankLaunch(r, h, {"MLX_RANK": str(r)}, {"MLX_HOSTFILE": hostfile}) for r, h in enumerate(hosts)]
    if spec.backend == "jaccl":
        # Rank 0 coordinates the RDMA queue-pair exchange over TCP; the device matrix says which
        # Thunderbolt port (rdma_enX) links each pair of machines.
        devices = json.dumps([[name or None for name in h.rdma] for h in hosts])
        env = {"MLX_JACCL_COORDINATOR": f"{hosts[0].ip}:{spec.port}"}
        return [RankLaunch(r, h, {**env, "MLX_RANK": str(r)}, {"MLX_IBV_DEVICES": devices})
                for r, h in enumerate(hosts)]
    # mpi: mpirun assigns the ranks; see MpiLauncher.
    return [RankLaunch(r, h, {}) for r, h in enumerate(hosts)]


class Launcher(Protocol):
    def ring_port(self, host: HostSpec, suggested: int) -> int: ...

    def start(self, launch: RankLaunch, argv: list[str], workdir: Path) -> subprocess.Popen: ...


class LocalLauncher:
    """Ranks on this machine: plain subprocesses in their own process group (see child_preexec)."""

    def ring_port(self, host: HostSpec, suggested: int) -> int:
        return free_port(host.ip)

    def start(self, launch: RankLaunch, argv: list[str], workdir: Path) -> subprocess.Popen:
        env = {**os.environ, **launch.env, RANKS_HERE: str(launch.host.ranks)}  # read by workers/cpu_path.py
        for name, content in launch.files.items():
            path = workdir / f"{name.lower()}-rank{launch.rank}.json"
            path.write_text(content)
            env[name] = str(path)
        return subprocess.Popen(argv, env=env, preexec_fn=child_preexec)


class SshLauncher:
    """Remote ranks through ssh: the same Python path and model directory must exist on the host.

    The command runs under `exec` in the remote shell, so closing the ssh session (the supervisor
    stopping the local ssh process) hangs up the rank.
    """

    def ring_port(self, host: HostSpec, suggested: int) -> int:
        return suggested  # consecutive from the group file's `port`, as mlx.launch does

    def start(self, launch: RankLaunch, argv: list[str], workdir: Path) -> subprocess.Popen:
        script = "set -e; "
        for name, content in launch.files.items():
            script += f"f=$(mktemp); printf '%s' {shlex.quote(content)} > $f; export {name}=$f; "
        env = {**launch.env, RANKS_HERE: str(launch.host.ranks)}
        script += "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
        script += "exec " + shlex.join(argv)
        return subprocess.Popen(["ssh", "-tt", "-o", "BatchMode=yes", launch.host.ssh, script],
                                stdin=subprocess.DEVNULL, preexec_fn=child_preexec)


def launcher_for(host: HostSpec) -> Launcher:
    return LocalLauncher() if host.is_local else SshLauncher()


def mpirun_command(spec: GroupSpec, argv: list[str]) -> list[str]:
    """The mpi backend: one `mpirun` starts every rank (MLX finds its rank in Open MPI's environment)."""
    hosts = ",".join(f"{h.ip}:{h.ranks}" for h in spec.hosts)
    # As mlx.launch: forward what finds Python and the MPI library on the other hosts.
    forwarded = [arg for name in ("PATH", "DYLD_LIBRARY_PATH", "MLX_MPI_LIBNAME") if name in os.environ
                 for arg in ("-x", name)]
    return ["mpirun", "-np", str(spec.size), "--host", hosts, *forwarded, *argv]


def start_group(spec: GroupSpec, argv: list[str], workdir: Path,
                launchers: Callable[[HostSpec], Launcher] = None) -> list[subprocess.Popen]:
    """Start every rank of `spec` running `argv` (rank 0 first) through each host's launcher (default: local
    or ssh); returns their processes (a node agent's rank is a stand-in with the same methods)."""
    launchers = launchers or launcher_for
    workdir.mkdir(parents=True, exist_ok=True)
    if spec.backend == "mpi" and spec.size > 1:
        return [subprocess.Popen(mpirun_command(spec, argv), preexec_fn=child_preexec)]
    started: list[subprocess.Popen] = []
    try:
        for launch in rank_launches(spec, launchers):
            started.append(launchers(launch.host).start(launch, argv, workdir))
    except BaseException:
        for process in started:  # no half-started group left behind
            process.kill()
            process.wait()
        raise
    return started


def rank_arguments(spec: GroupSpec) -> list[str]:
    """What every rank of `spec` is told about its group (read by workers/rank.py: add_rank_arguments)."""
    return ["--layout", spec.layout, "--backend", spec.backend,
            *(["--split", format_split(spec.split)] if spec.split else [])]


def plan_group(spec: GroupSpec, model_dir: Path) -> GroupSpec:
    """Check that the model in `model_dir` splits the way `spec` asks, and fix the pipeline split, before any rank
    starts. Refusing here gives the operator one clear message instead of N ranks failing the same way."""
    config = json.loads((model_dir / "config.json").read_text())
    if spec.layout == "whole":  # nothing to check, and serve's start need not wait for mlx-lm's import (seconds)
        return spec
    from workers.shard import refused_layouts

    if spec.layout == "tensor":
        check_tensor_parallel(config, spec.size)  # the detailed message: heads, key/value heads, MLP
    return fit_group(spec, config["num_hidden_layers"], tensor_parallel_sizes(config),
                     refused_layouts(model_dir, (spec.layout,)))


def fit_group(spec: GroupSpec, layers: int, tensor_sizes: list[int], refused: dict[str, str]) -> GroupSpec:
    """`plan_group` on a model's facts alone (a controller's, from the cluster's catalogue: ops/catalogue.py):
    its layer count, the tensor-parallel sizes that divide it and the layouts its architecture refuses."""
    if spec.layout in refused:
        raise ShardError(refused[spec.layout])
    if spec.layout == "tensor" and spec.size not in tensor_sizes:
        raise ShardError(f"tensor parallel over {spec.size} ranks does not divide this model; it splits over "
                         f"{', '.join(map(str, tensor_sizes))}")
    if spec.layout == "pipeline":
        if spec.split is None:
            spec = msgspec.structs.replace(spec, split=pipeline_split(layers, spec.size, spec.memory_weights()))
        check_pipeline_split(spec.split, layers, spec.size)
    return spec


def generate_on_group(spec: GroupSpec, model_dir: Path, prompt: str | list[str], max_tokens: int, raw: bool = False,
                      timeout_s: float = 600.0) -> dict:
    """Greedy generation on every rank of `spec` (workers/generate.py): the leader's report (its first
    prompt's run at the top level, all of them under `runs`) and every rank's under `per_rank`."""
    spec = plan_group(spec, model_dir)
    if not all(h.is_local for h in spec.hosts):
        raise GroupSpecError("conclave generate runs local ranks only (each rank writes its report to a local "
                             "folder); on several machines, use conclave serve --group")
    with tempfile.TemporaryDirectory(prefix="conclave-generate-") as tmp:
        workdir = Path(tmp)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        argv = rank_command("workers.generate", "--model-dir", str(model_dir),
                            *[arg for text in prompts for arg in ("--prompt", text)], "--max-tokens", str(max_tokens),
                            "--report-dir", str(workdir), *rank_arguments(spec))
        if raw:
            argv.append("--raw")
        processes = start_group(spec, argv, workdir)
        deadline = time.monotonic() + timeout_s
        try:
            # Poll every rank each time (a dead rank behind a live one must be seen now, not at the deadline).
            while None in (codes := [p.poll() for p in processes]):
                failed = [(r, code) for r, code in enumerate(codes) if code not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"worker group failed: rank/exit code {failed or 'timeout'}")
                time.sleep(0.1)
            if any(codes):
                raise RuntimeError(f"worker group failed: exit codes {codes}")
        finally:
            for process in processes:
                stop_process(process, 5.0)
        ranks = [json.loads(path.read_text()) for path in sorted(workdir.glob("rank-*.json"))]
    ranks.sort(key=lambda r: r["rank"])
    return {**ranks[0], "split": spec.split, "per_rank": ranks}
