"""Splitting an experiment's models across processes, GPUs and nodes.

fastgrok does not schedule jobs: launchers do. ``torchrun`` sets RANK,
WORLD_SIZE and LOCAL_RANK; a Slurm job array sets SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT (and SLURM_ARRAY_TASK_MIN, where ids may start at 1).
Each process then trains one shard of the experiment's model list into its
own run file, and ``fastgrok merge`` joins the shard files into the file an
unsharded run would have written.

The partition is a pure function of the model list and N: models (or groups
of models that must stay together, such as an ungrokking seed's pre-training
model and its continuations) go, most expensive first, to the shard with the
least estimated cost so far (cost = D x steps), ties to the lower shard.
This is the LPT rule: the most loaded shard is within 4/3 of the optimum.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based, like RANK) of ``count``."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"--shard {self.index}/{self.count}: N={self.count} must be >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: K={self.index} must be in 0..{self.count - 1}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            k, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4") from None
        return cls(k, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def file_path(self, out):
        """Shard K of N writes OUT.shardK-of-N.h5 beside OUT."""
        from pathlib import Path

        out = Path(out)
        return out.with_name(f"{out.stem}.shard{self.index}-of-{self.count}{out.suffix}")


def shard_from_env(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard a launcher assigned this process, or None outside a launcher."""
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Shard(int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"]))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Shard(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
    return None


def local_device(device: str, environ: Mapping[str, str] = os.environ) -> str:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (LOCAL_RANK)."""
    if device == "cuda" and "LOCAL_RANK" in environ:
        return f"cuda:{int(environ['LOCAL_RANK'])}"
    return device


def partition(costs: Sequence[float], count: int, groups: Sequence[int] | None = None) -> list[list[int]]:
    """Model indices of each of ``count`` shards, each list ascending.

    costs[m]: estimated cost of model m; groups[m]: models with equal group
    ids always land in the same shard (default: every model alone).
    """
    if count < 1:
        raise ValueError(f"shard count {count} must be >= 1")
    groups = list(range(len(costs))) if groups is None else list(groups)
    if len(groups) != len(costs):
        raise ValueError(f"{len(groups)} group ids for {len(costs)} models")
    members: dict[int, list[int]] = {}
    for m, g in enumerate(groups):
        members.setdefault(g, []).append(m)
    group_cost = {g: sum(costs[m] for m in ms) for g, ms in members.items()}
    load = [0.0] * count
    shards: list[list[int]] = [[] for _ in range(count)]
    # Most expensive group first; ties in order of first appearance.
    for g in sorted(members, key=lambda g: (-group_cost[g], members[g][0])):
        target = min(range(count), key=lambda s: (load[s], s))
        load[target] += group_cost[g]
        shards[target].extend(members[g])
    return [sorted(s) for s in shards]
