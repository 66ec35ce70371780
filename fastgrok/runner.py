"""The training loop every experiment calls: train, evaluate on schedule, store, resume.

``run_experiment`` builds the population, evaluates it at the schedule's
steps (``fastgrok.schedule``), and writes the run file (``fastgrok.store``):
at the start, whenever a checkpoint is due, and at the end. A checkpoint
is due every ``checkpoint_every`` steps if given, and otherwise once
``checkpoint_seconds`` of run time have passed since the last write, but
never sooner than ``1 / max_write_fraction`` times the duration of the last
write, so writing stays under 2 % of run time whatever the run's size. A
write costs the new state, new snapshots and the metrics, the same however
many snapshots the run holds (fastgrok.store; 2,000 paper-size models: 5.7 GB,
about 14 s on a shared 2-core machine, so a checkpoint every ~12 min). A kill loses at
most the steps since the last write; a reader sees the metrics of the last
write.

With ``resume=True`` an existing file is continued from its checkpoint:
the configuration must be the file's (the run's ``steps`` may grow), and on
the same backend, device and thread count the continuation is bit-for-bit
the uninterrupted run: the state is the parameters, both AdamW moments, the
step and the failed-model steps, and training draws no random numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.metrics import Evaluation, Evaluator
from fastgrok.schedule import EvalSchedule
from fastgrok.store import (MetricHistory, RunHeader, RunWriter, TrainingState, read_params,
                            read_resume_point, read_run)
from fastgrok.tasks import Task

# progress(step, population, latest evaluation or None), called after every step.
ProgressFn = Callable[[int, Population, Evaluation | None], None]


@dataclass(frozen=True)
class InitFrom:
    """Start a new population from another's parameters (AdamW moments reset, step 0).

    source: a run file (its latest state, or its snapshot at ``step``) or an
            array / tensor of flat parameters (M_source, P).
    models: for each model of the new population, the source model it copies.
    Ungrokking continues grokked models on prefixes D' of their own splits:
    ``InitFrom("grok.h5", models=[0, 0, 1, 1])`` with RunSpecs of the same
    data seeds and smaller train_size.
    """

    source: str | os.PathLike | np.ndarray | torch.Tensor
    models: Sequence[int]
    step: int | None = None

    def resolve(self, model_cfg: ModelConfig, n_params: int) -> tuple[np.ndarray, dict]:
        """(initial flat parameters (M, P) float32, JSON-able provenance)."""
        models = [int(m) for m in self.models]
        if isinstance(self.source, (str, os.PathLike)):
            source_model = read_run(self.source).header.model
            if source_model != model_cfg:
                raise ValueError(f"init_from {self.source}: its models are {source_model}, "
                                 f"this run's are {model_cfg}")
            step, params = read_params(self.source, self.step, models)
            source = str(self.source)
        else:
            if self.step is not None:
                raise ValueError(f"init_from step={self.step}: a step selects a snapshot of a run "
                                 f"file, but the source is an array")
            array = self.source.detach().cpu().numpy() if isinstance(self.source, torch.Tensor) \
                else np.asarray(self.source)
            if array.ndim != 2 or array.shape[1] != n_params:
                raise ValueError(f"init_from array has shape {array.shape}; it must be "
                                 f"(models, {n_params}) flat parameters")
            bad = [m for m in models if not 0 <= m < array.shape[0]]
            if bad:
                raise ValueError(f"init_from model index {bad[0]} is outside 0..{array.shape[0] - 1}")
            step, params, source = None, array[models], "array"
        params = np.ascontiguousarray(params, dtype=np.float32)
        provenance = {"source": source, "step": step, "models": models,
                      "sha256": hashlib.sha256(params.tobytes()).hexdigest()}
        return params, provenance


def run_experiment(
    path: str | os.PathLike,
    experiment: str,
    task_cfg: TaskConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    runs: Sequence[RunSpec],
    steps: int,
    *,
    schedule: EvalSchedule = EvalSchedule(),
    backend: str = "torch",
    backend_options: dict[str, dict] | None = None,
    precision: str | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: ProgressFn | None = None,
    init_from: InitFrom | None = None,
    snapshot_steps: Sequence[int] = (),
    checkpoint_seconds: float = 60.0,
    checkpoint_every: int | None = None,
    max_write_fraction: float = 0.02,
    shard: dict | None = None,
) -> Population:
    """Train ``runs`` for ``steps`` steps into the run file at ``path``; returns the population.

    backend, backend_options: which backend steps the population and its
            options ({backend name: keyword arguments}, see ``Population``).
    precision: matmul precision (``fastgrok.precision``); None: the backend's
            default. Recorded in the file; a resume must use the same.
    resume: continue the file at ``path`` if it exists (start it otherwise);
            without it an existing file is an error.
    snapshot_steps: steps whose parameters are kept in the file (for export).
    init_from: initial parameters from another run (see ``InitFrom``).
    shard: which models of a larger experiment these runs are (recorded in
           the file's header for ``fastgrok.merge``; see ``RunHeader``).
    """
    path = Path(path)
    if not isinstance(experiment, str) or not experiment:
        raise ValueError(f"experiment={experiment!r}: give the experiment a non-empty name")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps={steps!r}: must be an integer >= 0")
    snapshot_steps = sorted({int(s) for s in snapshot_steps})
    if snapshot_steps and not 0 <= snapshot_steps[0] <= snapshot_steps[-1] <= steps:
        raise ValueError(f"snapshot_steps {snapshot_steps}: each must be in 0..{steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every!r}: must be >= 1 (or None)")
    if not 0 < max_write_fraction <= 1:
        raise ValueError(f"max_write_fraction={max_write_fraction!r}: must be in (0, 1]")
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists; pass resume=True to continue it, or choose a new path")

    pop = Population(Task(task_cfg), model_cfg, list(runs), optim_cfg, device=device, backend=backend,
                     backend_options=backend_options, precision=precision)
    initial, provenance = (init_from.resolve(model_cfg, pop.P) if init_from is not None
                           else (None, None))
    if initial is not None and len(initial) != pop.M:
        raise ValueError(f"init_from lists {len(initial)} source models; the population has {pop.M}")
    header = RunHeader(experiment, task_cfg, model_cfg, optim_cfg, tuple(runs), schedule,
                       json.loads(json.dumps(provenance)), shard, pop.precision)
    evaluator = Evaluator(pop)
    return _Loop(path, header, pop, evaluator, steps, initial, progress, snapshot_steps,
                 checkpoint_seconds, checkpoint_every, max_write_fraction).run()


class _Loop:
    """One session of a run: resume or start, then step, evaluate and write."""

    def __init__(self, path, header, pop, evaluator, steps, initial, progress, snapshot_steps,
                 checkpoint_seconds, checkpoint_every, max_write_fraction):
        self.path, self.header, self.pop, self.evaluator = path, header, pop, evaluator
        self.steps, self.initial, self.progress = int(steps), initial, progress
        self.snapshot_steps = set(snapshot_steps)
        self.checkpoint_seconds, self.checkpoint_every = checkpoint_seconds, checkpoint_every
        self.max_write_fraction = max_write_fraction
        self.writer = RunWriter(path, header, steps, pop.backend)
        self.pending_snapshots: dict[int, np.ndarray] = {}
        self.session_start = time.perf_counter()
        self.session_eval = self.session_write = 0.0
        self.before = {"seconds_train": 0.0, "seconds_eval": 0.0, "seconds_write": 0.0}

    def run(self) -> Population:
        pop = self.pop
        fresh = not self.path.exists()
        if fresh:
            if self.initial is not None:
                pop.flat_params.copy_(torch.from_numpy(self.initial))
            self.history = MetricHistory(self.evaluator.names)
            self._maybe_snapshot()
            self._evaluate()
            self._write()
        else:
            self._resume()
        points = self.header.schedule.points(self.steps)
        next_i = int(np.searchsorted(points, pop.step_count, side="right"))
        while pop.step_count < self.steps:
            pop.step()
            step = pop.step_count
            self._maybe_snapshot()
            if next_i < len(points) and step == points[next_i]:
                self._evaluate()
                next_i += 1
            if step == self.steps or self._write_due(step):
                self._write()
            if self.progress is not None:
                self.progress(step, pop, self.history.latest())
        return pop

    def _resume(self) -> None:
        stored, state, history = read_resume_point(self.path)
        self.header.check_same_run(stored.header, self.path)
        if history.names != self.evaluator.names:
            raise ValueError(f"{self.path} stores metrics {list(history.names)}; this fastgrok "
                             f"measures {list(self.evaluator.names)}")
        if state.step > self.steps:
            raise ValueError(f"{self.path} is at step {state.step}, beyond steps={self.steps}; "
                             f"pass steps >= {state.step}")
        if stored.backend != self.pop.backend:
            warnings.warn(f"{self.path} was trained on backend {stored.backend!r} and continues "
                          f"on {self.pop.backend!r}: the continuation is not bit-identical",
                          stacklevel=4)
        missed = [s for s in sorted(self.snapshot_steps)
                  if s <= state.step and s not in stored.snapshot_steps]
        if missed:
            warnings.warn(f"{self.path} is at step {state.step}, past the requested snapshot "
                          f"step(s) {missed} that it does not hold", stacklevel=4)
        state.load_into(self.pop)
        self.history = history
        self.before = dict(stored.timings)
        self.last_write_step, self.last_write_time, self.last_write_cost = state.step, time.perf_counter(), 0.0
        if state.step == self.steps and not stored.complete:
            self._write()

    def _maybe_snapshot(self) -> None:
        if self.pop.step_count in self.snapshot_steps:
            self.pending_snapshots[self.pop.step_count] = self.pop.flat_params.detach().cpu().numpy().copy()

    def _evaluate(self) -> None:
        start = time.perf_counter()
        evaluation = self.evaluator(self.pop)
        self.session_eval += time.perf_counter() - start
        self.history.append(evaluation, self._run_seconds())

    def _run_seconds(self) -> float:
        return sum(self.before.values()) + time.perf_counter() - self.session_start

    def _timings(self) -> dict[str, float]:
        session = time.perf_counter() - self.session_start
        return {"seconds_train": self.before["seconds_train"] + session - self.session_eval - self.session_write,
                "seconds_eval": self.before["seconds_eval"] + self.session_eval,
                "seconds_write": self.before["seconds_write"] + self.session_write}

    def _write_due(self, step: int) -> bool:
        if self.checkpoint_every is not None:
            return step - self.last_write_step >= self.checkpoint_every
        waited = time.perf_counter() - self.last_write_time
        return waited >= max(self.checkpoint_seconds, self.last_write_cost / self.max_write_fraction)

    def _write(self) -> None:
        start = time.perf_counter()
        self.writer.write(TrainingState.of(self.pop), self.history,
                          complete=self.pop.step_count == self.steps, timings=self._timings(),
                          new_snapshots=self.pending_snapshots)
        self.pending_snapshots = {}
        end = time.perf_counter()
        self.session_write += end - start
        self.last_write_step, self.last_write_time, self.last_write_cost = self.pop.step_count, end, end - start


__all__ = ["run_experiment", "InitFrom", "ProgressFn"]
