"""The run file: one self-describing HDF5 file per experiment, complete at every instant.

Crash safety and concurrent readers come from one rule: the file is never
modified in place. Every write builds a complete new file next to it
(``<name>.partial``), fsyncs it, and ``os.replace``-s it over the old one,
then fsyncs the directory. A reader opens either the old or the new file,
never a half-written one; a process killed at any instant leaves the last
complete file (and at most a stale ``.partial``, removed by the next write).
Metrics and the checkpoint travel together in each write, so the file's
evaluation points are exactly those up to its checkpoint step: a resumed run
recomputes the later ones, none is lost or stored twice.

Why not HDF5 SWMR: a SWMR writer killed by SIGKILL leaves the superblock
marked "open for write", and the file cannot be reopened for writing without
the external ``h5clear`` tool (h5py has no equivalent; checked with h5py
3.16 / HDF5 2.0); SWMR forbids new datasets while writing (snapshots at
arbitrary steps) and overwriting a checkpoint in place is not atomic; and it
needs POSIX write ordering that network file systems do not give. The price
of rewriting is a copy of the file per write; the runner bounds it by writing
at most every ``checkpoint_seconds`` and never more than a small fraction of
run time (see ``fastgrok.runner``).

Layout (schema 1; every array is plain HDF5, readable without fastgrok):

    /                  attrs: schema_version, fastgrok_version, numpy_version,
                       torch_version, experiment, task, model, optim, schedule,
                       init_from, shard (JSON), param_layout (JSON: names, shapes in
                       flat order), steps (target), backend, complete,
                       seconds_train / seconds_eval / seconds_write (cumulative)
    /runs/<field>      (M,) one column per RunSpec field
    /runs/train_idx    (M, max D) int32: model m's training pairs (row-major
                       pair index into the task's full dataset) in split
                       order, -1 padded; its test set is every other pair
    /runs/train_labels (M, max D) int32: the labels trained on, -1 padded
    /metrics/step      (E,) int64 evaluation steps
    /metrics/wall_seconds (E,) float64 run time (all sessions) at each point
    /metrics/<name>    (M, E) float64, names from ``fastgrok.metrics``
    /state/params, /state/exp_avg, /state/exp_avg_sq  (M, P) float32
    /state/failed_step (M,) int64;  attrs: step
    /snapshots/step_<10 digits>  (M, P) float32 parameters; attrs: step
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

import fastgrok
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.metrics import Evaluation
from fastgrok.model import PARAM_NAMES, param_shapes
from fastgrok.schedule import EvalSchedule
from fastgrok.tasks import Task

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))
STATE_ARRAYS = ("params", "exp_avg", "exp_avg_sq")
TIMINGS = ("seconds_train", "seconds_eval", "seconds_write")


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _snapshot_name(step: int) -> str:
    return f"step_{step:010d}"


# -------------------------------------------------------------------- header
@dataclass(frozen=True)
class RunHeader:
    """What a run is; a file resumes only under an equal header.

    init_from: provenance of non-default initial parameters (JSON-able dict,
    see ``fastgrok.runner.InitFrom``), or None for seeded initialisation.
    shard: for one shard of a larger experiment (``fastgrok.shard``),
    ``{"index": K, "count": N, "models": [experiment model index of each
    model here], "total": M}``; None for a whole experiment.
    """

    experiment: str
    task: TaskConfig
    model: ModelConfig
    optim: OptimConfig
    runs: tuple[RunSpec, ...]
    schedule: EvalSchedule
    init_from: dict | None = None
    shard: dict | None = None

    def config_json(self) -> dict[str, str]:
        return {
            "task": json.dumps(dataclasses.asdict(self.task)),
            "model": json.dumps(dataclasses.asdict(self.model)),
            "optim": json.dumps(dataclasses.asdict(self.optim)),
            "schedule": json.dumps(dataclasses.asdict(self.schedule)),
            "init_from": json.dumps(self.init_from, sort_keys=True),
            "shard": json.dumps(self.shard, sort_keys=True),
        }

    def check_same_run(self, stored: "RunHeader", path) -> None:
        """Raise ValueError naming the first field where ``stored`` (the file's) differs."""
        if stored.experiment != self.experiment:
            raise ValueError(f"{path} holds experiment {stored.experiment!r}, not {self.experiment!r}; "
                             f"resume it under its own name or write to a new file")
        for name in ("task", "model", "optim", "schedule", "init_from", "shard"):
            ours, theirs = getattr(self, name), getattr(stored, name)
            if name == "init_from":
                # The parameters themselves are the identity; the source path may have moved.
                ours, theirs = (None if d is None else {k: d[k] for k in ("models", "sha256")}
                                for d in (ours, theirs))
            if ours != theirs:
                raise ValueError(f"{path} was written with {name} {theirs}, this run has {ours}; "
                                 f"resume with the file's configuration or write to a new file")
        if len(stored.runs) != len(self.runs):
            raise ValueError(f"{path} holds {len(stored.runs)} models, this run has {len(self.runs)}")
        for m, (ours, theirs) in enumerate(zip(self.runs, stored.runs)):
            if ours != theirs:
                raise ValueError(f"{path} model {m} was written as {theirs}, this run has {ours}")


def _header_from_file(f: h5py.File) -> RunHeader:
    a = f.attrs
    optim = json.loads(a["optim"])
    optim["betas"] = tuple(optim["betas"])
    runs_group = f["runs"]
    columns = {name: runs_group[name][()] for name in RUN_FIELDS}
    runs = tuple(RunSpec(**{name: columns[name][m].item() for name in RUN_FIELDS})
                 for m in range(len(columns["train_size"])))
    return RunHeader(
        experiment=str(a["experiment"]),
        task=TaskConfig(**json.loads(a["task"])),
        model=ModelConfig(**json.loads(a["model"])),
        optim=OptimConfig(**optim),
        runs=runs,
        schedule=EvalSchedule(**json.loads(a["schedule"])),
        init_from=json.loads(a["init_from"]),
        shard=json.loads(a.get("shard", "null")),
    )


def _check_schema(f: h5py.File, path) -> None:
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path} has run-file schema version {version}; this fastgrok "
                         f"({fastgrok.__version__}) reads version {SCHEMA_VERSION}")


# ---------------------------------------------------------------- run state
@dataclass
class TrainingState:
    """Everything a population needs to continue bit for bit.

    Full-batch training draws no random numbers after initialisation (the
    splits and initial weights are pure functions of the seeds), so there is
    no RNG state to keep.
    """

    step: int
    params: np.ndarray       # (M, P) float32
    exp_avg: np.ndarray      # (M, P) float32
    exp_avg_sq: np.ndarray   # (M, P) float32
    failed_step: np.ndarray  # (M,) int64, -1 while healthy

    @classmethod
    def of(cls, pop) -> "TrainingState":
        """The population's current state (views of its buffers on the CPU)."""
        return cls(pop.step_count, *(t.detach().cpu().numpy() for t in
                                     (pop.flat_params, pop.exp_avg, pop.exp_avg_sq)),
                   pop.failed_step.copy())

    def load_into(self, pop) -> None:
        for name, buf in zip(STATE_ARRAYS, (pop.flat_params, pop.exp_avg, pop.exp_avg_sq)):
            value = getattr(self, name)
            if value.shape != tuple(buf.shape):
                raise ValueError(f"checkpoint {name} has shape {value.shape}, the population needs "
                                 f"{tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(value))
        pop.step_count = int(self.step)
        pop.failed_step = self.failed_step.astype(np.int64).copy()


@dataclass
class MetricHistory:
    """Evaluation points so far: ``values[name][e]`` is the (M,) array of point e."""

    names: tuple[str, ...]
    steps: list[int] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def append(self, evaluation: Evaluation, wall_seconds: float) -> None:
        if self.steps and evaluation.step <= self.steps[-1]:
            raise ValueError(f"evaluation at step {evaluation.step} does not follow the last "
                             f"stored one ({self.steps[-1]})")
        self.steps.append(int(evaluation.step))
        self.wall_seconds.append(float(wall_seconds))
        for name in self.names:
            self.values.setdefault(name, []).append(np.asarray(evaluation.values[name], np.float64))

    def arrays(self, n_models: int) -> dict[str, np.ndarray]:
        """name -> (M, E) float64."""
        return {name: (np.stack(self.values[name], axis=1) if self.steps
                       else np.empty((n_models, 0))) for name in self.names}

    def latest(self) -> Evaluation | None:
        if not self.steps:
            return None
        return Evaluation(self.steps[-1], {name: self.values[name][-1] for name in self.names})


# -------------------------------------------------------------------- writer
class RunWriter:
    """Writes one run's file atomically; see the module docstring."""

    def __init__(self, path: str | os.PathLike, header: RunHeader, target_steps: int, backend: str):
        self.path = Path(path)
        self.header, self.target_steps, self.backend = header, int(target_steps), backend
        task = Task(header.task)
        splits = [task.split(r.data_seed, r.train_size, r.random_labels) for r in header.runs]
        width = max(len(s.train_idx) for s in splits)
        self.train_idx = np.full((len(splits), width), -1, dtype=np.int32)
        self.train_labels = np.full((len(splits), width), -1, dtype=np.int32)
        for m, s in enumerate(splits):
            self.train_idx[m, :len(s.train_idx)] = s.train_idx
            self.train_labels[m, :len(s.train_idx)] = s.train_labels
        shapes = param_shapes(header.model)
        self.param_layout = json.dumps({"names": list(PARAM_NAMES),
                                        "shapes": [list(shapes[k]) for k in PARAM_NAMES]})

    def write(self, state: TrainingState, history: MetricHistory, *, complete: bool,
              timings: dict[str, float], new_snapshots: dict[int, np.ndarray] | None = None) -> None:
        """Replace the file with one holding this state, these metrics and all snapshots."""
        tmp = partial_path(self.path)
        with h5py.File(tmp, "w") as f:
            self._write_header(f, complete, timings)
            self._write_metrics(f, history, len(self.header.runs))
            g = f.create_group("state")
            g.attrs["step"] = int(state.step)
            for name in STATE_ARRAYS:
                g.create_dataset(name, data=getattr(state, name))
            g.create_dataset("failed_step", data=state.failed_step.astype(np.int64))
            self._write_snapshots(f, new_snapshots or {})
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_path(self.path.parent)

    def _write_header(self, f: h5py.File, complete: bool, timings: dict[str, float]) -> None:
        a = f.attrs
        a["schema_version"] = SCHEMA_VERSION
        a["fastgrok_version"] = fastgrok.__version__
        a["numpy_version"] = np.__version__
        a["torch_version"] = str(torch.__version__)
        a["experiment"] = self.header.experiment
        for name, text in self.header.config_json().items():
            a[name] = text
        a["param_layout"] = self.param_layout
        a["steps"] = self.target_steps
        a["backend"] = self.backend
        a["complete"] = bool(complete)
        for name in TIMINGS:
            a[name] = float(timings.get(name, 0.0))
        runs = f.create_group("runs")
        for name in RUN_FIELDS:
            runs.create_dataset(name, data=np.array([getattr(r, name) for r in self.header.runs]))
        runs.create_dataset("train_idx", data=self.train_idx)
        runs.create_dataset("train_labels", data=self.train_labels)

    @staticmethod
    def _write_metrics(f: h5py.File, history: MetricHistory, n_models: int) -> None:
        g = f.create_group("metrics")
        g.attrs["names"] = json.dumps(list(history.names))
        g.create_dataset("step", data=np.asarray(history.steps, dtype=np.int64))
        g.create_dataset("wall_seconds", data=np.asarray(history.wall_seconds, dtype=np.float64))
        for name, values in history.arrays(n_models).items():
            g.create_dataset(name, data=values)

    def _write_snapshots(self, f: h5py.File, new_snapshots: dict[int, np.ndarray]) -> None:
        g = f.create_group("snapshots")
        if self.path.exists():
            with h5py.File(self.path, "r") as old:
                for name in old.get("snapshots", {}):
                    old.copy(old["snapshots"][name], g, name)
        for step, params in sorted(new_snapshots.items()):
            if _snapshot_name(step) not in g:
                g.create_dataset(_snapshot_name(step), data=params).attrs["step"] = int(step)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------- reader
@dataclass
class RunData:
    """A run file's description and metrics as numpy arrays (parameters stay on disk)."""

    path: Path
    header: RunHeader
    target_steps: int
    complete: bool
    backend: str
    fastgrok_version: str
    state_step: int
    failed_step: np.ndarray         # (M,)
    steps: np.ndarray               # (E,) evaluation steps
    wall_seconds: np.ndarray        # (E,)
    metrics: dict[str, np.ndarray]  # name -> (M, E)
    snapshot_steps: list[int]
    timings: dict[str, float]

    @property
    def n_models(self) -> int:
        return len(self.header.runs)

    def runs_frame(self) -> "pd.DataFrame":
        """One row per model: its RunSpec fields and failed_step."""
        import pandas as pd   # here, not at the top: it adds ~1 s to every training process's start

        frame = pd.DataFrame([dataclasses.asdict(r) for r in self.header.runs])
        frame.insert(0, "model", np.arange(self.n_models))
        frame["failed_step"] = self.failed_step
        return frame

    def to_dataframe(self, metrics: list[str] | None = None) -> "pd.DataFrame":
        """Long format: one row per (model, evaluation, metric), with the model's RunSpec fields."""
        import pandas as pd

        names = list(self.metrics) if metrics is None else list(metrics)
        unknown = sorted(set(names) - set(self.metrics))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; this file has {sorted(self.metrics)}")
        M, E, K = self.n_models, len(self.steps), len(names)
        stacked = np.stack([self.metrics[n] for n in names], axis=2) if K else np.empty((M, E, 0))
        frame = pd.DataFrame({
            "model": np.repeat(np.arange(M), E * K),
            "step": np.tile(np.repeat(self.steps, K), M),
            "metric": pd.Categorical(np.tile(names, M * E), categories=names),
            "value": stacked.reshape(-1),
        })
        return frame.merge(self.runs_frame(), on="model", how="left")


def read_run(path: str | os.PathLike) -> RunData:
    """Read a run file's configuration and metrics (safe while the run writes it)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        return _run_data(f, path)


def _run_data(f: h5py.File, path: Path) -> RunData:
    _check_schema(f, path)
    a, g = f.attrs, f["metrics"]
    names = json.loads(g.attrs["names"])
    return RunData(
        path=path, header=_header_from_file(f), target_steps=int(a["steps"]),
        complete=bool(a["complete"]), backend=str(a["backend"]),
        fastgrok_version=str(a["fastgrok_version"]),
        state_step=int(f["state"].attrs["step"]), failed_step=f["state/failed_step"][()],
        steps=g["step"][()], wall_seconds=g["wall_seconds"][()],
        metrics={name: g[name][()] for name in names},
        snapshot_steps=sorted(int(d.attrs["step"]) for d in f["snapshots"].values()),
        timings={name: float(a[name]) for name in TIMINGS},
    )


def read_resume_point(path: str | os.PathLike) -> tuple[RunData, TrainingState, MetricHistory]:
    """A run file's description, checkpoint and metric history, to continue it."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        data = _run_data(f, path)
        s = f["state"]
        state = TrainingState(int(s.attrs["step"]), *(s[name][()] for name in STATE_ARRAYS),
                              s["failed_step"][()])
    history = MetricHistory(tuple(data.metrics), [int(v) for v in data.steps],
                            [float(v) for v in data.wall_seconds],
                            {name: list(values.T) for name, values in data.metrics.items()})
    return data, state, history


def read_params(path: str | os.PathLike, step: int | None = None,
                models: list[int] | slice | None = None) -> tuple[int, np.ndarray]:
    """(step, flat parameters (M', P) float32): the latest state, or the snapshot at ``step``."""
    path = Path(path)
    rows = slice(None) if models is None else models
    with h5py.File(path, "r") as f:
        _check_schema(f, path)
        if step is None:
            d = f["state/params"]
            return int(f["state"].attrs["step"]), _read_rows(d, rows)
        name = _snapshot_name(int(step))
        if name not in f["snapshots"]:
            available = sorted(int(d.attrs["step"]) for d in f["snapshots"].values())
            raise ValueError(f"{path} has no parameter snapshot at step {step}; "
                             f"snapshots: {available or 'none'} (step=None reads the latest state)")
        return int(step), _read_rows(f["snapshots"][name], rows)


def _read_rows(dataset: h5py.Dataset, rows) -> np.ndarray:
    M = dataset.shape[0]
    if isinstance(rows, slice):
        return dataset[rows]
    index = np.asarray(rows, dtype=np.int64)
    bad = index[(index < 0) | (index >= M)]
    if bad.size:
        raise ValueError(f"model index {int(bad[0])} is outside 0..{M - 1}")
    # Row by row: h5py's fancy indexing wants increasing, distinct indices.
    return np.stack([dataset[int(i)] for i in index]) if index.size else dataset[:0]


__all__ = ["RunHeader", "TrainingState", "MetricHistory", "RunWriter", "RunData", "read_run",
           "read_resume_point", "read_params", "partial_path", "SCHEMA_VERSION"]
