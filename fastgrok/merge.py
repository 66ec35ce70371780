"""Joining the shard files of an experiment into the file an unsharded run writes.

Each shard file records, in its header, which of the experiment's models it
trained (``shard = {"index", "count", "models", "total", "experiment_sha256"}``). ``merge`` checks
that the shards belong to one experiment (same name, task, model, optimiser,
schedule, target steps), that together they hold every model exactly once
and that each is complete, then writes the models back in the experiment's
order: the configuration, metrics, final state and snapshots of the merged
file are those of the unsharded run; only the timings (summed over shards)
and the per-point wall-clock seconds (the slowest shard's) differ.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fastgrok.store import MetricHistory, RunWriter, TrainingState, read_resume_point, read_snapshots


def merge(out: str | os.PathLike, shard_paths: Sequence[str | os.PathLike]) -> Path:
    """Write ``out`` from the shard files; ValueError (one line) on any mismatch."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; merge writes a new file (remove it or choose another OUT)")
    if not shard_paths:
        raise ValueError("merge needs at least one shard file")
    loaded = []
    for p in map(Path, shard_paths):
        if not p.exists():
            raise ValueError(f"{p}: no such shard file")
        try:
            data, state, history = read_resume_point(p)
        except (OSError, KeyError) as exc:
            raise ValueError(f"{p}: not a readable fastgrok run file ({exc})") from None
        shard = data.header.shard
        if shard is None:
            raise ValueError(f"{p}: not a shard (it was written without --shard); nothing to merge")
        loaded.append((p, data, state, history, shard))

    p0, d0, _, h0, s0 = loaded[0]
    h = d0.header
    for p, data, state, history, shard in loaded[1:]:
        for name in ("experiment", "task", "model", "optim", "schedule"):
            if getattr(data.header, name) != getattr(h, name):
                raise ValueError(f"{p}: its {name} {getattr(data.header, name)} differs from "
                                 f"{p0}'s {getattr(h, name)}; these shards are not one experiment")
        if shard["experiment_sha256"] != s0["experiment_sha256"]:
            raise ValueError(f"{p}: shard of a different run list than {p0} (other sizes, seeds, lr or wd); "
                             f"these shards are not one experiment")
        if (shard["count"], shard["total"]) != (s0["count"], s0["total"]) or data.target_steps != d0.target_steps:
            raise ValueError(f"{p}: shard {shard['index']}/{shard['count']} of {shard['total']} models, "
                             f"{data.target_steps} steps; {p0} is of {s0['count']} shards, {s0['total']} models, "
                             f"{d0.target_steps} steps")
        if history.steps != h0.steps:
            raise ValueError(f"{p}: evaluation steps differ from {p0}'s; the shards did not run the same schedule")
    for p, data, state, _, shard in loaded:
        if not data.complete:
            raise ValueError(f"{p}: shard {shard['index']}/{shard['count']} is at step {state.step} of "
                             f"{data.target_steps}; finish it (rerun it with --resume) before merging")

    total = s0["total"]
    owner = np.full(total, -1)
    for i, (p, _, _, _, shard) in enumerate(loaded):
        for m in shard["models"]:
            if owner[m] >= 0:
                raise ValueError(f"model {m} is in both {loaded[owner[m]][0]} and {p}; "
                                 f"a shard was given twice or the shards come from different partitions")
            owner[m] = i
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        raise ValueError(f"models {missing.tolist()[:8]}{'...' if missing.size > 8 else ''} are in no shard "
                         f"({missing.size} of {total} missing); give every shard file of the experiment")

    runs = [None] * total
    P = loaded[0][2].params.shape[1]
    state_arrays = {k: np.empty((total, P), np.float32) for k in ("params", "exp_avg", "exp_avg_sq")}
    failed = np.empty(total, np.int64)
    values = {name: np.empty((total, len(h0.steps))) for name in h0.names}
    snapshots: dict[int, np.ndarray] = {}
    for p, data, state, history, shard in loaded:
        rows = np.asarray(shard["models"])
        for local, m in enumerate(rows):
            runs[m] = data.header.runs[local]
        for k in state_arrays:
            state_arrays[k][rows] = getattr(state, k)
        failed[rows] = state.failed_step
        for name, arr in history.arrays(len(rows)).items():
            values[name][rows] = arr
        for step, params in read_snapshots(p).items():
            snapshots.setdefault(step, np.full((total, P), np.nan, np.float32))[rows] = params

    init_from = None if h.init_from is None else _merged_init_from(out, loaded, total, P)
    header = dataclasses.replace(h, runs=tuple(runs), init_from=init_from, shard=None)
    history = MetricHistory(h0.names, list(h0.steps),
                            list(np.max([hist.wall_seconds for _, _, _, hist, _ in loaded], axis=0)),
                            {name: list(values[name].T) for name in h0.names})
    timings = {k: sum(d.timings.get(k, 0.0) for _, d, _, _, _ in loaded) for k in d0.timings}
    backends = sorted({d.backend for _, d, _, _, _ in loaded})
    state = TrainingState(d0.state_step, state_arrays["params"], state_arrays["exp_avg"],
                          state_arrays["exp_avg_sq"], failed)
    out.parent.mkdir(parents=True, exist_ok=True)
    RunWriter(out, header, d0.target_steps, "+".join(backends)).write(
        state, history, complete=True, timings=timings, new_snapshots=snapshots)
    return out


def _merged_init_from(out: Path, loaded, total: int, P: int) -> dict:
    """The provenance an unsharded run would record: global source models and
    the hash of the initial parameters in the experiment's order (ungrokking:
    each shard continued the models of its own pre-training shard)."""
    import hashlib

    from fastgrok.experiments import pretrain_path
    from fastgrok.store import read_params, read_run

    models = np.empty(total, np.int64)
    initial = np.empty((total, P), np.float32)
    for p, data, _, _, shard in loaded:
        prov = data.header.init_from
        source = Path(prov["source"])
        if not source.exists():
            raise ValueError(f"{p}: its initial parameters came from {source}, which is gone; "
                             f"merge needs it to record where the merged models start")
        source_data = read_run(source)
        source_shard = source_data.header.shard
        local = np.asarray(prov["models"])
        rows = np.asarray(shard["models"])
        models[rows] = np.asarray(source_shard["models"])[local] if source_shard else local
        # The provenance names the step read: the source's final state, or a snapshot.
        step = None if prov.get("step") in (None, source_data.state_step) else prov["step"]
        initial[rows] = read_params(source, step, local.tolist())[1]
    return {"source": str(pretrain_path(out)), "step": loaded[0][1].header.init_from.get("step"),
            "models": models.tolist(), "sha256": hashlib.sha256(initial.tobytes()).hexdigest()}


__all__ = ["merge"]
