"""`conclave bench --files`: how fast model files travel between nodes, against a plain copy of the same bytes.

On this machine, in one run, with a synthetic model of `--size-gb` GB (random bytes in four safetensors-sized
files and a config.json, in a temporary folder on the home's disk):

1. plain copy: `shutil.copyfile` of every file to another folder on the same disk (the operating system's own copy,
   no hashing): the ceiling a transfer on this disk can reach;
2. one receiver: a file port (ops/model_files.py: `NodeFiles`, the agents' own) on loopback, and `fetch_model` into
   another store, hashing and checking every byte as nodes do. The source's manifest is hashed before the clock
   starts (a serving node hashes a model once);
3. three receivers at once from the same source (fan-out: a receiver does not yet pass on what it received, so
   the source serves all three).

The goals (issue 12): fetch at least 0.8x the plain copy; three receivers in at most 1.5x the time of one. On one
machine the source's reads, the receivers' writes and the copy share a disk and the CPUs, so these are a floor
for a LAN of several machines, not a LAN figure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from ops.model_fetch import fetch_model
from ops.model_files import NodeFiles, Tickets, manifest
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


async def fetch_into(url: str, tickets: Tickets, folders: list[Path]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(fetch_model(url, tickets.issue(MODEL_ID), MODEL_ID, ModelStore(folder))
                           for folder in folders))
    os.sync()
    return time.perf_counter() - started


def run_files_bench(args) -> dict:
    size = int(args.size_gb * 1e9)
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-files-", dir=home) as tmp:
        root = Path(tmp)
        source = ModelStore(root / "source")
        path = make_model(source, size)
        total = sum(f.stat().st_size for f in path.iterdir())
        manifest(source.get(MODEL_ID))  # hashed once, as a serving node has
        copy_s = plain_copy(path, root / "copy")
        shutil.rmtree(root / "copy")

        async def fetches() -> tuple[float, float]:
            port = NodeFiles(source, "bench", "127.0.0.1")  # the file port every agent runs
            await port.start()
            try:
                one = await fetch_into(port.url, port.tickets, [root / "one"])
                shutil.rmtree(root / "one")
                three = await fetch_into(port.url, port.tickets, [root / f"r{i}" for i in range(3)])
            finally:
                await port.stop()
            return one, three

        one_s, three_s = asyncio.run(fetches())

    def mb_s(seconds: float) -> float:
        return round(total / seconds / 1e6, 1)

    return {"bench": "files", "bytes": total, "plain_copy_s": round(copy_s, 3), "plain_copy_mb_s": mb_s(copy_s),
            "fetch_one_s": round(one_s, 3), "fetch_one_mb_s": mb_s(one_s),
            "fetch_vs_copy": round(copy_s / one_s, 2), "fetch_three_s": round(three_s, 3),
            "three_vs_one": round(three_s / one_s, 2),
            "note": "one machine: source, receivers and copy share one disk and the CPUs; "
                    "three receivers all read from the source (no fan-out between receivers yet)"}
