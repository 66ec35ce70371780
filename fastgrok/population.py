"""A population: M independent models' state, and the backend that steps it.

``PopulationState`` is plain state, the same for every backend: each model's
flat parameters, gradients and both AdamW moments as rows of (M, P) buffers
(``fastgrok.layout.ParamLayout``; the per-name tensors are views), its
training data, its own lr and weight decay, the step count and the step at
which a model was frozen. A backend (``fastgrok.backends``) is an object
that reads and writes that state: ``step``, ``loss_and_grad`` and ``logits``.
``Population`` is a state with its backend, what the runner and users hold.

Ragged training sets: example slots are padded to N = max_m n_train_m. A
padded slot repeats the model's own first training example and has loss
weight 0, so no model reads another model's data and padding never
introduces a non-finite value that a healthy model did not already have.
Weights are 1 / n_train_m on real slots, so each model gets its own mean loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fastgrok.backends import Backend, select_backend
from fastgrok.config import ModelConfig, OptimConfig, RunSpec
from fastgrok.layout import N_CTX, PARAM_NAMES, ParamLayout, TokenRows
from fastgrok.model import init_params
from fastgrok.precision import check_precision
from fastgrok.tasks import Task


class PopulationState:
    """The state of M models trained together (module docstring).

    ``runs[m]`` fixes model m's training-set size, seeds, lr and weight decay;
    the model and optimiser constants (betas, eps, warm-up) are shared.
    Training is float32; ``dtype=torch.float64`` exists to check an engine's
    algorithm against the float64 oracle free of float32 rounding.
    ``precision``: how the per-example matrix products take their operands
    (``fastgrok.precision``); every backend honours it or refuses it.
    """

    def __init__(self, task: Task, model_cfg: ModelConfig, runs: Sequence[RunSpec],
                 optim_cfg: OptimConfig = OptimConfig(), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, precision: str = "fp32"):
        if not runs:
            raise ValueError("a population needs at least one RunSpec; got an empty list")
        if model_cfg.n_ctx != N_CTX:
            raise ValueError(f"n_ctx={model_cfg.n_ctx}: the tasks' sequences <x> <op> <y> <=> have {N_CTX} tokens")
        if model_cfg.d_vocab != task.cfg.d_vocab:
            raise ValueError(f"d_vocab={model_cfg.d_vocab} does not match the task's {task.cfg.d_vocab}")
        for m, r in enumerate(runs):
            if not r.lr > 0:
                raise ValueError(f"model {m}: lr={r.lr!r} must be > 0")
            if not r.weight_decay >= 0:
                raise ValueError(f"model {m}: weight_decay={r.weight_decay!r} must be >= 0")
        self.task, self.cfg, self.runs, self.optim = task, model_cfg, list(runs), optim_cfg
        self.precision = check_precision(precision)
        self.device = torch.device(device)
        self.M = len(self.runs)
        self.layout = ParamLayout.from_config(model_cfg)
        self.rows = TokenRows(task.cfg.n)

        self.flat_params = torch.stack([
            torch.cat([init_params(model_cfg, r.init_seed)[k].reshape(-1) for k in PARAM_NAMES])
            for r in self.runs]).to(device=self.device, dtype=dtype)         # (M, P)
        self.flat_grads = torch.zeros_like(self.flat_params)
        self.exp_avg = torch.zeros_like(self.flat_params)
        self.exp_avg_sq = torch.zeros_like(self.flat_params)
        self.params = self.layout.views(self.flat_params)
        self.grads = self.layout.views(self.flat_grads)
        self.step_count = 0
        # Step at which a model went non-finite and was frozen; -1 if healthy.
        self.failed_step = np.full(self.M, -1, dtype=np.int64)
        self.lr = np.array([r.lr for r in self.runs], dtype=np.float64)
        self.weight_decay = np.array([r.weight_decay for r in self.runs], dtype=np.float64)
        self._build_data()

    @property
    def P(self) -> int:
        return self.layout.P

    def _build_data(self) -> None:
        task = self.task
        self.splits = [task.split(r.data_seed, r.train_size, r.random_labels) for r in self.runs]
        self.train_size = np.array([r.train_size for r in self.runs], dtype=np.int64)
        N = int(self.train_size.max())
        idx = np.zeros((self.M, N), dtype=np.int64)
        labels = np.zeros((self.M, N), dtype=np.int64)
        weight = np.zeros((self.M, N), dtype=np.float64)
        for m, s in enumerate(self.splits):
            n_train = len(s.train_idx)
            idx[m, :n_train], labels[m, :n_train], weight[m, :n_train] = s.train_idx, s.train_labels, 1.0 / n_train
            idx[m, n_train:], labels[m, n_train:] = s.train_idx[0], s.train_labels[0]  # padding: own data, weight 0
        dev = self.device
        self.train_x = torch.as_tensor(task.x[idx], device=dev)
        self.train_y = torch.as_tensor(task.y[idx], device=dev)
        self.train_labels = torch.as_tensor(labels, device=dev)
        self.train_weight = torch.as_tensor(weight, device=dev, dtype=self.flat_params.dtype)

    def mark_failures(self, finite: Tensor) -> None:
        """Freeze models whose ``finite`` flag (M,) is False, noting the step."""
        newly_failed = ~finite.cpu().numpy() & (self.failed_step < 0)
        self.failed_step[newly_failed] = self.step_count

    def healthy_models(self) -> np.ndarray:
        return np.flatnonzero(self.failed_step < 0)

    def model_params(self, m: int) -> dict[str, Tensor]:
        """Model m's parameters as a reference-model state dict (copies)."""
        return {k: v[m].detach().clone() for k, v in self.params.items()}


class Population(PopulationState):
    """A population state stepped by a backend (``fastgrok.backends``).

    backend: "auto", "torch", "cpu" or "triton"; a named backend that is not
    available falls back to "torch" with a warning that says why.
    backend_options: {backend name: constructor keyword arguments}, e.g.
    ``{"triton": {"precision": "tf32"}, "cpu": {"n_threads": 2}}``; only the
    chosen backend's entry is used.
    precision: the matmul precision (``fastgrok.precision``); None takes the
    backend's default (``Backend.default_precision``). "auto" passes over a
    backend that does not offer it.
    """

    def __init__(self, task: Task, model_cfg: ModelConfig, runs: Sequence[RunSpec],
                 optim_cfg: OptimConfig = OptimConfig(), device: str | torch.device = "cpu",
                 backend: str | Backend = "torch", dtype: torch.dtype = torch.float32,
                 backend_options: dict[str, dict] | None = None, precision: str | None = None):
        engine = backend if not isinstance(backend, str) else \
            select_backend(backend, device, backend_options or {}, precision)
        precision = engine.default_precision if precision is None else precision
        if precision not in engine.precisions:
            raise ValueError(f"precision={precision!r}: backend {engine.name!r} offers "
                             f"{', '.join(engine.precisions)}")
        super().__init__(task, model_cfg, runs, optim_cfg, device, dtype, precision)
        self.engine = engine

    @property
    def backend(self) -> str:
        """The name of the backend that steps this population."""
        return self.engine.name

    def step(self) -> Tensor:
        """One full-batch AdamW step of every healthy model; the mean training losses (M,)."""
        return self.engine.step(self)

    def loss_and_grad(self) -> Tensor:
        """Mean training losses (M,); gradients land in ``grads``. No update."""
        return self.engine.loss_and_grad(self)

    @torch.no_grad()
    def all_logits(self, models: slice | Sequence[int] | None = None, pairs: slice = slice(None)) -> Tensor:
        """Last-position logits (K, n, V) of the given models on the task's pairs ``pairs``.

        Each backend computes each model with shapes that do not depend on
        which or how many models are asked for (``Backend.logits``).
        """
        index = np.arange(self.M)[slice(None) if models is None else models]   # a slice, list or array
        x = torch.as_tensor(self.task.x[pairs], device=self.device)
        y = torch.as_tensor(self.task.y[pairs], device=self.device)
        return self.engine.logits(self, index, x, y)


__all__ = ["PopulationState", "Population"]
