"""The run file: one HDF5 run per experiment, complete at every instant, written at the cost of what is new.

A run is the file a user opens, ``X.h5``, and the directory beside it,
``X.h5.d/``, which holds the large arrays, one HDF5 file each:

    X.h5                          header, metrics, timings, complete flag; links to the rest
    X.h5.d/checkpoint-<step>.h5   the latest state: parameters, both AdamW moments, failed steps
    X.h5.d/snapshot-<step>.h5     parameters at a chosen step, written once, never rewritten

Copy, move or delete the two together (``cp -r X.h5 X.h5.d DEST/``); a run
may be renamed (``Y.h5`` with ``Y.h5.d``): fastgrok finds the arrays in the
directory named after the file it opens. ``X.h5`` alone still reads its
configuration and metrics (``read_run``, ``plot``, ``info``); parameters need
the directory.

One write (``RunWriter.write``), in this order:
1. each new snapshot: ``snapshot-<step>.h5.partial`` written, fsynced, renamed
   to ``snapshot-<step>.h5``;
2. the checkpoint: ``checkpoint-<step>.h5.partial`` written, fsynced, renamed
   to ``checkpoint-<step>.h5``; then the directory is fsynced;
3. ``X.h5.partial`` (header, all metrics, links to the checkpoint and every
   snapshot) written, fsynced, ``os.replace``-d over ``X.h5``; the parent
   directory is fsynced;
4. only then are the previous checkpoint and any file the new ``X.h5`` does
   not refer to (left by a kill) deleted.
So a write costs the new state, the new snapshots and the small file of
metrics (bounded by the evaluation schedule: 549 points for 3*10^7 steps),
however many snapshots the run holds: nothing already written is copied.

A reader opens ``X.h5`` and sees the old or the new version, never a
half-written one; every file that version names was durable before it was.
Metrics and the checkpoint step live in ``X.h5``, so ``read_run`` opens one
file. The one race is step 4: a reader that opened the previous ``X.h5`` and
then opens its checkpoint after the writer deleted it finds it gone; the
readers here open the checkpoint right after ``X.h5`` (an open file survives
its deletion) and, if it is gone, start over from the new ``X.h5``.
Snapshots are never deleted while referred to.

A ``kill -9`` between any two steps leaves the last ``X.h5`` and every file it
names intact: killed in 1-3 it is the previous write (the resumed run
recomputes the lost steps, bit for bit, and rewrites their snapshots); the
files left over (``*.partial``, a checkpoint or snapshot ``X.h5`` does not
name) are removed by the resumed run's first write. ``X.h5`` holds the
metrics up to its checkpoint's step exactly, so none is lost or stored twice.

Why not HDF5 SWMR or appending in place: a SWMR writer killed by SIGKILL
leaves the superblock marked "open for write" (reopening needs the external
``h5clear`` tool; checked with h5py 3.16 / HDF5 2.0), SWMR forbids new
datasets while writing, an in-place overwrite of a checkpoint is not atomic,
and both need POSIX write ordering that network file systems do not give.

Layout (schema 2; every array is plain HDF5, readable without fastgrok):

    X.h5 /             attrs: schema_version, fastgrok_version, numpy_version,
                       torch_version, experiment, task, model, optim, schedule,
                       init_from, shard (JSON), param_layout (JSON: names, shapes in
                       flat order), steps (target), backend, complete,
                       seconds_train / seconds_eval / seconds_write (cumulative),
                       state_step (the checkpoint's step)
    /runs/<field>      (M,) one column per RunSpec field
    /runs/train_idx    (M, max D) int32: model m's training pairs (row-major
                       pair index into the task's full dataset) in split
                       order, -1 padded; its test set is every other pair
    /runs/train_labels (M, max D) int32: the labels trained on, -1 padded
    /metrics/step      (E,) int64 evaluation steps
    /metrics/wall_seconds (E,) float64 run time (all sessions) at each point
    /metrics/<name>    (M, E) float64, names from ``fastgrok.metrics``
    /failed_step       (M,) int64, the checkpoint's (a copy, so readers of
                       metrics need not open the checkpoint)
    /state             external link to X.h5.d/checkpoint-<step>.h5:/state
    /snapshots/step_<10 digits>  external link to X.h5.d/snapshot-<step>.h5:/params
    checkpoint /state  attrs: step; params, exp_avg, exp_avg_sq (M, P) float32,
                       failed_step (M,) int64
    snapshot /params   (M, P) float32; attrs: step

``h5py.File("X.h5")["state/params"]`` follows the links (HDF5 resolves them
against the directory of the file; if the target is missing it also tries
the current directory, so a renamed run is read through fastgrok, which
resolves them by the file's own name). Schema 1 (one file holding the state
and snapshots inline) is still read, and resuming one moves its snapshots
into files of their own on the first write.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import h5py
import numpy as np
import torch

import fastgrok
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.metrics import Evaluation
from fastgrok.layout import PARAM_NAMES, param_shapes
from fastgrok.schedule import EvalSchedule
from fastgrok.tasks import Task

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)   # 1: state and snapshots inside the run file
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))
STATE_ARRAYS = ("params", "exp_avg", "exp_avg_sq")
TIMINGS = ("seconds_train", "seconds_eval", "seconds_write")
# A reader that loses the race of step 4 (module docstring) starts over; each
# loss needs a whole write to complete meanwhile, so a few tries are plenty.
READ_TRIES = 10
_ARRAY_FILE = re.compile(r"(checkpoint|snapshot)-\d{10}\.h5(\.partial)?")


def partial_path(path: str | os.PathLike) -> Path:
    """Where a file is written before it replaces ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def run_dir(path: str | os.PathLike) -> Path:
    """The directory of a run's checkpoint and snapshot files: ``X.h5`` -> ``X.h5.d``."""
    path = Path(path)
    return path.with_name(path.name + ".d")


def run_files(path: str | os.PathLike) -> list[Path]:
    """Every file of the run at ``path`` that exists (the file, then its arrays'), to copy or delete."""
    path = Path(path)
    d = run_dir(path)
    return [p for p in [path] if p.exists()] + (sorted(d.iterdir()) if d.is_dir() else [])


def _snapshot_name(step: int) -> str:
    return f"step_{step:010d}"


def _snapshot_file(step: int) -> str:
    return f"snapshot-{step:010d}.h5"


def _checkpoint_file(step: int) -> str:
    return f"checkpoint-{step:010d}.h5"


# -------------------------------------------------------------------- header
@dataclass(frozen=True)
class RunHeader:
    """What a run is; a file resumes only under an equal header.

    init_from: provenance of non-default initial parameters (JSON-able dict,
    see ``fastgrok.runner.InitFrom``), or None for seeded initialisation.
    shard: for one shard of a larger experiment (``fastgrok.shard``),
    ``{"index": K, "count": N, "models": [experiment model index of each
    model here], "total": M}``; None for a whole experiment.
    precision: the matmul precision it trains with (``fastgrok.precision``).
    """

    experiment: str
    task: TaskConfig
    model: ModelConfig
    optim: OptimConfig
    runs: tuple[RunSpec, ...]
    schedule: EvalSchedule
    init_from: dict | None = None
    shard: dict | None = None
    precision: str = "fp32"

    def config_json(self) -> dict[str, str]:
        return {
            "task": json.dumps(dataclasses.asdict(self.task)),
            "model": json.dumps(dataclasses.asdict(self.model)),
            "optim": json.dumps(dataclasses.asdict(self.optim)),
            "schedule": json.dumps(dataclasses.asdict(self.schedule)),
            "init_from": json.dumps(self.init_from, sort_keys=True),
            "shard": json.dumps(self.shard, sort_keys=True),
            "precision": json.dumps(self.precision),
        }

    def check_same_run(self, stored: "RunHeader", path) -> None:
        """Raise ValueError naming the first field where ``stored`` (the file's) differs."""
        if stored.experiment != self.experiment:
            raise ValueError(f"{path} holds experiment {stored.experiment!r}, not {self.experiment!r}; "
                             f"resume it under its own name or write to a new file")
        for name in ("task", "model", "optim", "schedule", "init_from", "shard", "precision"):
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
        # Files from before the precision modes were trained with fp32 products
        # on the CPU backends (the triton backend's tf32x3 is not recorded).
        precision=json.loads(a.get("precision", '"fp32"')),
    )


def _check_schema(f: h5py.File, path) -> int:
    version = int(f.attrs.get("schema_version", -1))
    if version not in READABLE_SCHEMAS:
        raise ValueError(f"{path} has run-file schema version {version}; this fastgrok "
                         f"({fastgrok.__version__}) reads version {SCHEMA_VERSION} and the older "
                         f"{', '.join(map(str, READABLE_SCHEMAS[:-1]))}")
    return version


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
    """Writes one run: each write adds what is new and switches ``X.h5`` to it; see the module docstring.

    One writer per run at a time (the runner of a session, or ``merge``).
    """

    def __init__(self, path: str | os.PathLike, header: RunHeader, target_steps: int, backend: str):
        self.path = Path(path)
        self.dir = run_dir(self.path)
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
        self.snapshot_steps: set[int] | None = None   # those X.h5 refers to; read at the first write

    def write(self, state: TrainingState, history: MetricHistory, *, complete: bool,
              timings: dict[str, float], new_snapshots: dict[int, np.ndarray] | None = None) -> None:
        """Make the run hold this state, these metrics, its snapshots so far and ``new_snapshots``."""
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            _fsync_path(self.dir.parent)     # the directory's entry is durable before X.h5 names it
        if self.snapshot_steps is None:
            self.snapshot_steps = self._adopt_stored_snapshots()
        snapshots = set(self.snapshot_steps)
        for step, params in sorted((new_snapshots or {}).items()):
            if int(step) not in snapshots:   # written once: a stored snapshot is never rewritten
                _write_atomically(self.dir / _snapshot_file(int(step)),
                                  lambda f, s=int(step), p=params: _fill_snapshot(f, s, p))
                snapshots.add(int(step))
        checkpoint = self.dir / _checkpoint_file(int(state.step))
        _write_atomically(checkpoint, lambda f: _fill_checkpoint(f, state))
        _fsync_path(self.dir)                # the renames above are durable before X.h5 names them

        tmp = partial_path(self.path)
        with h5py.File(tmp, "w") as f:
            self._write_header(f, complete, timings)
            f.attrs["state_step"] = int(state.step)
            self._write_metrics(f, history, len(self.header.runs))
            f.create_dataset("failed_step", data=state.failed_step.astype(np.int64))
            f["state"] = h5py.ExternalLink(self._link_target(checkpoint.name), "/state")
            g = f.create_group("snapshots")
            for step in sorted(snapshots):
                g[_snapshot_name(step)] = h5py.ExternalLink(self._link_target(_snapshot_file(step)),
                                                            "/params")
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_path(self.path.parent)
        self.snapshot_steps = snapshots
        self._remove_unreferenced(keep={checkpoint.name} | {_snapshot_file(s) for s in snapshots})

    def _link_target(self, name: str) -> str:
        # Relative to X.h5's directory, where HDF5 looks first.
        return f"{self.dir.name}/{name}"

    def _adopt_stored_snapshots(self) -> set[int]:
        """The snapshot steps of the run at ``path`` (none for a new run); a schema-1 file's
        inline snapshots are written out into files of their own, once."""
        if not self.path.exists():
            return set()
        steps = set()
        with h5py.File(self.path, "r") as f:
            _check_schema(f, self.path)
            for name in f.get("snapshots", {}):
                step = int(name.removeprefix("step_"))
                if not isinstance(f["snapshots"].get(name, getlink=True), h5py.ExternalLink):
                    params = f["snapshots"][name][()]
                    _write_atomically(self.dir / _snapshot_file(step),
                                      lambda out, s=step, p=params: _fill_snapshot(out, s, p))
                steps.add(step)
        return steps

    def _remove_unreferenced(self, keep: set[str]) -> None:
        """Delete the previous checkpoint and what kills left; only names this store writes."""
        for p in self.dir.iterdir():
            if p.name not in keep and _ARRAY_FILE.fullmatch(p.name):
                p.unlink(missing_ok=True)

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


def _fill_checkpoint(f: h5py.File, state: TrainingState) -> None:
    g = f.create_group("state")
    g.attrs["step"] = int(state.step)
    for name in STATE_ARRAYS:
        g.create_dataset(name, data=getattr(state, name))
    g.create_dataset("failed_step", data=state.failed_step.astype(np.int64))


def _fill_snapshot(f: h5py.File, step: int, params: np.ndarray) -> None:
    f.create_dataset("params", data=params).attrs["step"] = int(step)


def _write_atomically(path: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write ``path`` in full under another name, fsync it, rename it in place (the caller
    fsyncs the directory once for all its renames)."""
    tmp = partial_path(path)
    with h5py.File(tmp, "w") as f:
        fill(f)
    _fsync_path(tmp)
    os.replace(tmp, path)


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
    """Read a run's configuration and metrics (safe while the run writes it; needs only ``X.h5``)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        return _run_data(f, path, _check_schema(f, path))


def _run_data(f: h5py.File, path: Path, version: int) -> RunData:
    a, g = f.attrs, f["metrics"]
    names = json.loads(g.attrs["names"])
    if version >= 2:
        state_step, failed_step = int(a["state_step"]), f["failed_step"][()]
    else:
        state_step, failed_step = int(f["state"].attrs["step"]), f["state/failed_step"][()]
    return RunData(
        path=path, header=_header_from_file(f), target_steps=int(a["steps"]),
        complete=bool(a["complete"]), backend=str(a["backend"]),
        fastgrok_version=str(a["fastgrok_version"]),
        state_step=state_step, failed_step=failed_step,
        steps=g["step"][()], wall_seconds=g["wall_seconds"][()],
        metrics={name: g[name][()] for name in names},
        # From the names alone: listing the snapshots opens none of their files.
        snapshot_steps=sorted(int(name.removeprefix("step_")) for name in f["snapshots"]),
        timings={name: float(a[name]) for name in TIMINGS},
    )


def _linked(f: h5py.File, path: Path, name: str) -> Path | None:
    """The file an external link of X.h5 names, found in X.h5.d by X.h5's current name
    (so a renamed run still reads its own arrays); None where the object is inline (schema 1)."""
    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        return None
    return run_dir(path) / Path(link.filename).name


def _missing(path: Path, target: Path) -> ValueError:
    return ValueError(f"{path} refers to {target}, which does not exist: a run is its file and "
                      f"the directory {run_dir(path).name} beside it; copy or move them together")


@contextmanager
def _open_with_state(path: Path) -> Iterator[tuple[h5py.File, int, h5py.Group]]:
    """(X.h5, its schema version, its checkpoint's /state group), consistent with each other."""
    for _ in range(READ_TRIES):
        with h5py.File(path, "r") as f:
            version = _check_schema(f, path)
            target = _linked(f, path, "state")
            if target is None:
                yield f, version, f["state"]
                return
            try:
                checkpoint = h5py.File(target, "r")
            except OSError:   # FileNotFoundError, or HDF5's own error if it vanished mid-open
                if _linked_now(path) != target:
                    continue   # the writer replaced X.h5 and removed this checkpoint meanwhile
                if not target.exists():
                    raise _missing(path, target) from None
                raise
            with checkpoint:
                yield f, version, checkpoint["state"]
                return
    raise OSError(f"{path}: its checkpoint was replaced {READ_TRIES} times while being opened")


def _linked_now(path: Path) -> Path | None:
    with h5py.File(path, "r") as f:
        return _linked(f, path, "state")


def read_resume_point(path: str | os.PathLike) -> tuple[RunData, TrainingState, MetricHistory]:
    """A run's description, checkpoint and metric history, to continue it."""
    path = Path(path)
    with _open_with_state(path) as (f, version, s):
        data = _run_data(f, path, version)
        state = TrainingState(int(s.attrs["step"]), *(s[name][()] for name in STATE_ARRAYS),
                              s["failed_step"][()])
    if state.step != data.state_step:
        raise ValueError(f"{path} is at step {data.state_step} but its checkpoint holds step {state.step}")
    history = MetricHistory(tuple(data.metrics), [int(v) for v in data.steps],
                            [float(v) for v in data.wall_seconds],
                            {name: list(values.T) for name, values in data.metrics.items()})
    return data, state, history


def read_params(path: str | os.PathLike, step: int | None = None,
                models: list[int] | slice | None = None) -> tuple[int, np.ndarray]:
    """(step, flat parameters (M', P) float32): the latest state, or the snapshot at ``step``."""
    path = Path(path)
    rows = slice(None) if models is None else models
    if step is None:
        with _open_with_state(path) as (_, _, s):
            return int(s.attrs["step"]), _read_rows(s["params"], rows)
    with h5py.File(path, "r") as f:
        _check_schema(f, path)
        name, stored = _snapshot_name(int(step)), list(f["snapshots"])
        if name not in stored:   # by name: a membership test would open the linked file
            available = sorted(int(n.removeprefix("step_")) for n in stored)
            raise ValueError(f"{path} has no parameter snapshot at step {step}; "
                             f"snapshots: {available or 'none'} (step=None reads the latest state)")
        target = _linked(f, path, f"snapshots/{name}")
        if target is None:
            return int(step), _read_rows(f["snapshots"][name], rows)
    # Snapshots are never removed while X.h5 names them: no race to handle.
    if not target.exists():
        raise _missing(path, target)
    with h5py.File(target, "r") as s:
        return int(step), _read_rows(s["params"], rows)


def read_snapshots(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """step -> flat parameters (M, P) of every snapshot of a run (for ``fastgrok.merge``)."""
    return {step: read_params(path, step)[1] for step in read_run(path).snapshot_steps}


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
           "read_resume_point", "read_params", "read_snapshots", "partial_path", "run_dir",
           "run_files", "SCHEMA_VERSION"]
