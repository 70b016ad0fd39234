"""How a process takes part in its model's worker group: the arguments every rank gets, joining the group.

`ops/group.py: rank_arguments` writes these arguments for `workers.worker` and `workers.generate`;
`add_rank_arguments` reads them back, so the two sides cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import mlx.core as mx

from workers.split import LAYOUTS

BACKENDS = ("ring", "jaccl", "mpi")


def parse_split(text: str) -> list[int]:
    """`10,20` -> [10, 20]: layers per pipeline rank."""
    return [int(x) for x in text.split(",")]


def format_split(split: list[int]) -> str:
    return ",".join(map(str, split))


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=LAYOUTS, default="whole")
    parser.add_argument("--backend", choices=BACKENDS, default="ring")
    parser.add_argument("--split", type=parse_split, default=None, help="pipeline: layers per rank, e.g. 10,20")


@dataclass
class RankArgs:
    layout: str = "whole"
    backend: str = "ring"
    split: list[int] | None = None
    group_id: str = ""
    step_timeout_s: float = 60.0


def join_group(rank: RankArgs) -> mx.distributed.Group | None:
    # Blocks until every rank of the group has connected (MLX reads MLX_RANK, MLX_HOSTFILE, ...).
    if rank.layout == "whole":
        return None
    return mx.distributed.init(strict=True, backend=rank.backend)


def barrier(group: mx.distributed.Group | None) -> None:
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))
