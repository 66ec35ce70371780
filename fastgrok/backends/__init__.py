"""Backends: objects that step a population state (``fastgrok.population.PopulationState``).

Every backend computes the same function (docs/design.md): last-position
loss, the stable cross-entropy, torch.optim.AdamW with each model's lr
(times the optimiser's warm-up factor) and weight decay, and the freezing of
a model whose loss or gradients turn non-finite. They differ in how:

    torch   fastgrok.backends.torch_engine   batched PyTorch, any device: the oracle's next rung
    cpu     fastgrok.backends.cpu_engine     the fused C++ engine (csrc/), batch- and thread-invariant
    triton  fastgrok.backends.triton_engine  fused Triton kernels (fastgrok/kernels/) on a CUDA GPU

A backend object belongs to one population: it owns whatever native state it
builds for it (the C++ engine, device workspaces, a CUDA graph) and takes its
options through its constructor.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "cpu", "triton")
# Module and class of each backend, imported only when chosen: the triton
# backend needs triton, the cpu backend the compiled extension.
_IMPLEMENTATIONS = {"torch": ("fastgrok.backends.torch_engine", "TorchBackend"),
                    "cpu": ("fastgrok.backends.cpu_engine", "CpuBackend"),
                    "triton": ("fastgrok.backends.triton_engine", "TritonBackend")}
# What "auto" tries, fastest first; torch always works.
_AUTO_ORDER = ("triton", "cpu")


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]      # matmul precisions it computes (fastgrok.precision)
    default_precision: str

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        """(True, "") if this backend can step a population on ``device``, else (False, why not)."""

    def step(self, state) -> Tensor:
        """One full-batch AdamW step of every healthy model: the mean losses (M,).

        ``state.step_count`` grows by one; models whose loss or gradients are
        not finite are frozen (``state.mark_failures``) and not updated.
        """

    def loss_and_grad(self, state) -> Tensor:
        """Mean training losses (M,); the gradients land in ``state.flat_grads``. No update."""

    def logits(self, state, models: np.ndarray, x: Tensor, y: Tensor) -> Tensor:
        """Last-position logits (K, N, V) of ``models`` (K,) on the examples (x, y) (N,).

        A model's logits are computed with shapes that do not depend on the
        other models listed, so evaluation is as batch-invariant as training.
        """


def _backend_class(name: str):
    module, cls = _IMPLEMENTATIONS[name]
    return getattr(importlib.import_module(module), cls)


def select_backend(name: str, device: torch.device, options: dict[str, dict] | None = None,
                   precision: str | None = None) -> Backend:
    """The backend object for ``name`` on ``device``.

    ``auto`` takes the fastest available one (triton on a CUDA GPU, else the
    C++ engine, else torch) that offers ``precision`` (None: any). A named
    backend that is unavailable falls back to torch with a warning that says
    why. ``options[name]`` are the chosen backend's constructor arguments.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    options = options or {}
    unknown = set(options) - set(_IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"backend options for {sorted(unknown)}; valid: {', '.join(_IMPLEMENTATIONS)}")
    device = torch.device(device)
    for candidate in (_AUTO_ORDER if name == "auto" else () if name == "torch" else (name,)):
        try:
            cls = _backend_class(candidate)
            ok, reason = cls.available(device)
        except ImportError as exc:
            ok, reason = False, f"{_IMPLEMENTATIONS[candidate][0]} cannot be imported ({exc})"
        if ok and name == "auto" and precision is not None and precision not in cls.precisions:
            continue
        if ok:
            return cls(**options.get(candidate, {}))
        if name != "auto":
            warnings.warn(f"backend {candidate!r} unavailable: {reason}; using the batched PyTorch engine",
                          stacklevel=3)
    return _backend_class("torch")(**options.get("torch", {}))


__all__ = ["Backend", "BACKENDS", "select_backend"]
