"""`conclave bench --files`: how fast model files travel between nodes, against a plain copy of the same bytes.

On this machine, in one run, with a synthetic model of `--size-gb` GB (random bytes in four safetensors-sized
files and a config.json, in a temporary folder on the home's disk):

1. plain copy: `shutil.copyfile` of every file to another folder on the same disk (the operating system's own copy,
   no hashing): the ceiling a transfer on this disk can reach;
2. one receiver: two processes, as two nodes are, each with the agents' own file port (ops/model_files.py:
   `NodeFiles`) on loopback; the receiver fetches into its store, hashing and checking every byte as nodes do. The source's manifest is hashed before the clock
   starts (a serving node hashes a model once);
3. three receivers at once, in a chain as the controller orders them (ops/model_relay.py): the first from the
   source, each next one from the one before it, as the bytes arrive there.

The goals (issue 12): fetch at least 0.8x the plain copy; three receivers in at most 1.5x the time of one. On one
machine the source's reads, the receivers' writes and the copy share a disk and the CPUs, so these are a floor
for a LAN of several machines, not a LAN figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from ops.model_files import NodeFiles, manifest
from ops.netns import Network
from schemas.catalogue import Ticket
from workers.store import ModelStore

MODEL_ID = "bench-files-model"


def make_model(store: ModelStore, size_bytes: int) -> Path:
    path = store.path(MODEL_ID)
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    for i in range(4):
        with open(path / f"model-0000{i + 1}-of-00004.safetensors", "wb") as out:
            left = size_bytes // 4
            while left:
                chunk = os.urandom(min(left, 16 << 20))
                out.write(chunk)
                left -= len(chunk)
    return path


def plain_copy(source: Path, target: Path) -> float:
    target.mkdir(parents=True)
    started = time.perf_counter()
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, target / path.name)
    os.sync()
    return time.perf_counter() - started


def node_process(root: Path, address: str, receiver: bool) -> None:
    """`python -m ops.bench_files ROOT ADDRESS source|receiver`: one node of the bench in a process of its own, as
    nodes are: its file port (`NodeFiles`, the agents' own) on ADDRESS over the store at ROOT. It prints a ticket
    for it (JSON), then reads its source's (an empty line: it only serves), fetches the model from it and prints
    when it is done, and stops when its standard input closes."""
    async def run() -> None:
        tls = root.parent / f"{root.name}-tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        node = NodeFiles(ModelStore(root), root.name, address, tls)
        if receiver:  # as an ordered fetch is from its order on: the next in the chain may ask before it starts
            node.receiving.add(MODEL_ID)
        await node.start()
        print(msgspec.json.encode(Ticket(url=node.url, certificate=node.certificate,
                                         token=node.tickets.issue(MODEL_ID))).decode(), flush=True)
        if asked := (await asyncio.to_thread(sys.stdin.readline)).strip():
            await node.receive(msgspec.json.decode(asked, type=Ticket), MODEL_ID)
            await asyncio.to_thread(os.sync)
            print(json.dumps({"done": True}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        await node.stop()

    asyncio.run(run())


def fetch_chain(source: Path, folders: list[Path], chain: bool = True, network: Network | None = None) -> float:
    """Seconds until the model is in each of `folders`, each receiver a process fetching from the one before it as
    the controller orders a fan-out (ops/model_relay.py), the first from the node serving `source`; without
    `chain`, each from the source. On `network`'s nodes (one each, the source first), else on loopback."""
    def start(i: int, folder: Path) -> subprocess.Popen:
        address = network.nodes[i].address if network else "127.0.0.1"
        argv = [sys.executable, "-m", "ops.bench_files", str(folder), address, "receiver" if i else "source"]
        return (network.popen(network.nodes[i], *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                if network else subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    nodes = [start(i, folder) for i, folder in enumerate((source, *folders))]
    try:
        tickets = [node.stdout.readline().strip() for node in nodes]
        started = time.perf_counter()
        for i, receiver in enumerate(nodes[1:]):
            receiver.stdin.write((tickets[i] if chain else tickets[0]) + "\n")
            receiver.stdin.flush()
        for receiver in nodes[1:]:
            if not json.loads(receiver.stdout.readline() or "{}").get("done"):
                raise RuntimeError("a receiver of the files bench failed (its error is above)")
        return time.perf_counter() - started
    finally:
        for node in nodes:
            node.stdin.close()
            node.wait(timeout=30)


def run_files_bench(args, rounds: int = 3) -> dict:
    """On loopback: the plain copy, one receiver and three in a chain, `rounds` times interleaved (this VM's disk
    writes at 250 MB/s one minute and 1.6 GB/s the next, `dd` measured: one round of each would compare the disk's
    moods), and their medians. With `args.link_gbit`: one receiver, three in a chain and three from the source, once
    each, on links of that rate (ops/netns.py), where the link and not the disk is the limit, as on a LAN."""
    size = int(args.size_gb * 1e9)
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-files-", dir=home) as tmp:
        root = Path(tmp)
        source = ModelStore(root / "source")
        path = make_model(source, size)
        total = sum(f.stat().st_size for f in path.iterdir())
        manifest(source.get(MODEL_ID))  # hashed once, as a serving node has
        if args.link_gbit:
            return {"bench": "files", "bytes": total, **on_links(source.root, root, args.link_gbit, total)}
        copies, ones, threes = [], [], []
        for _ in range(rounds):
            copies.append(plain_copy(path, root / "copy"))
            shutil.rmtree(root / "copy")
            ones.append(fetch_chain(source.root, [root / "one"]))
            shutil.rmtree(root / "one")
            threes.append(fetch_chain(source.root, [root / f"r{i}" for i in range(3)]))
            for i in range(3):
                shutil.rmtree(root / f"r{i}")
    copy_s, one_s, three_s = (statistics.median(x) for x in (copies, ones, threes))
    return {"bench": "files", "bytes": total, "rounds": rounds,
            "plain_copy_s": [round(x, 3) for x in copies], "fetch_one_s": [round(x, 3) for x in ones],
            "fetch_three_s": [round(x, 3) for x in threes],
            "plain_copy_mb_s": mb_s(total, copy_s), "fetch_one_mb_s": mb_s(total, one_s),
            "fetch_vs_copy": round(copy_s / one_s, 2), "three_vs_one": round(three_s / one_s, 2),
            "note": "medians of the rounds; one machine: source, receivers and copy share one disk and the CPUs "
                    "(three receivers write, hash and pass on three copies at once); on a LAN each node's link "
                    "carries one copy in and one out"}


def on_links(source: Path, root: Path, gbit: float, total: int) -> dict:
    link_mb_s = gbit * 1e9 / 8 / 1e6
    with Network(4, rate=f"{gbit}gbit") as network:
        one = fetch_chain(source, [root / "one"], network=network)
        chained = fetch_chain(source, [root / f"c{i}" for i in range(3)], network=network)
        star = fetch_chain(source, [root / f"s{i}" for i in range(3)], chain=False, network=network)
    return {"link_gbit": gbit, "link_mb_s": round(link_mb_s, 1), "fetch_one_s": round(one, 3),
            "fetch_one_mb_s": mb_s(total, one), "fetch_vs_link": round(total / one / 1e6 / link_mb_s, 2),
            "fetch_three_chained_s": round(chained, 3), "three_chained_vs_one": round(chained / one, 2),
            "fetch_three_from_source_s": round(star, 3), "three_from_source_vs_one": round(star / one, 2),
            "note": "each node a process in a network namespace of its own, on a bridge, its link limited both ways "
                    "by tc's token bucket; one machine's disk and CPUs under all of them"}


def mb_s(total: int, seconds: float) -> float:
    return round(total / seconds / 1e6, 1)

if __name__ == "__main__":
    node_process(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "receiver")
