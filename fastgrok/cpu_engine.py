"""The fused C++ CPU engine as a ``Population`` backend (``backend="cpu"``).

The work happens in ``fastgrok._cpu_engine`` (sources in ``csrc/``, algorithm
in ``csrc/engine.cpp``): one native call per population step computes every
model's loss and gradients and applies AdamW, model by model, so that a
model's weights, gradients and activations stay in the core's caches. This
module only checks arguments and moves the population's buffers across as
zero-copy numpy views. Float32 populations train; float64 ones run the same
algorithm in double precision, to check it against the float64 oracle.

The engine is built by ``pip install`` (see setup.py); if the build failed,
``available()`` says why and the population falls back to the batched
PyTorch engine.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_BUILD_ERROR_FILE = Path(__file__).with_name("_cpu_engine_build_error.txt")


def _extension():
    from fastgrok import _cpu_engine

    return _cpu_engine


def available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether the C++ engine can step a population on ``device``, and why (not)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the C++ engine runs on the CPU only; the population is on {device}"
    try:
        ext = _extension()
    except ImportError as exc:
        detail = _BUILD_ERROR_FILE.read_text().strip() if _BUILD_ERROR_FILE.exists() else (
            "no build error was recorded; reinstall with a C++17 compiler: pip install -e .")
        return False, f"fastgrok._cpu_engine is not importable ({exc}). {detail}"
    info = ext.build_info()
    return True, f"built with {info['flags']} ({info['vector_bits']}-bit vectors, OpenMP {info['openmp']})"


def build_info() -> dict:
    """Compiler flags, vector width and OpenMP version the extension was built with."""
    return dict(_extension().build_info())


def flops_per_model_step(cfg, n_examples: int) -> int:
    """Floating-point operations of one model's step in this engine (2 per multiply-add).

    Counts the matrix arithmetic of csrc/engine.cpp without its padding of F
    and V to the vector width: per example 3*F*V (logits, dW_OU, dhidden) +
    12*H*(F + V) (4H table rows gathered, dotted and scattered); per step the
    key/value/query tables and the products that build U, UU, W_OU and carry
    their gradients back. At the paper config: 0.41 MFLOP per example
    (``fastgrok.engine.flops_per_example``: 0.97) plus 0.26 GFLOP per model and
    step for the tables, 1.09 GFLOP per model-step at D = 2000 (batched: 1.99).
    """
    D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    R, HDh = 2 * (V - 2) + 2, H * Dh
    per_example = 3 * F * V + 12 * H * (F + V)
    tables_forward = (2 * R * D * HDh + D * HDh + R * HDh     # keys, values, query, scores
                      + HDh * D * (F + V)                     # W_OI, W_OUh
                      + R * HDh * (F + V)                     # U, UU
                      + F * D * V + D * (F + V))              # W_OU, the bases
    tables_backward = (2 * R * HDh * (F + V)                  # dV_tab; dW_OI, dW_OUh
                       + HDh * (F + V) * D                    # dW_O
                       + D * HDh * (F + V) + 2 * F * D * V    # dW_in, dW_U, dW_out
                       + 2 * D * (F + V) + 2 * R * HDh        # biases, c; dK, dq
                       + 2 * D * R * HDh + D * HDh            # dW_K, dW_V, dW_Q
                       + 2 * R * HDh * D + HDh * D)           # d rows
    return 2 * (n_examples * per_example + tables_forward + tables_backward)


# One native Engine per population: it holds the examples sorted for cache
# locality and the scratch buffers, so neither is redone every step.
_engines: "weakref.WeakKeyDictionary[object, tuple[tuple, object]]" = weakref.WeakKeyDictionary()


def _data_key(pop) -> tuple:
    tensors = (pop.train_x, pop.train_y, pop.train_labels)
    return tuple((id(t), t._version) for t in tensors) + (tuple(int(d) for d in pop.train_size),)


def engine_for(pop):
    """The native engine of ``pop``, rebuilt when its training data changed."""
    key = _data_key(pop)
    cached = _engines.get(pop)
    if cached is not None and cached[0] == key:
        return cached[1]
    for name in ("flat_params", "flat_grads", "exp_avg", "exp_avg_sq", "train_x", "train_y", "train_labels"):
        t = getattr(pop, name)
        if t.device.type != "cpu":
            raise ValueError(f"pop.{name} is on {t.device}; the C++ engine needs CPU tensors")
    cfg = pop.cfg
    engine = _extension().Engine(
        n=pop.task.cfg.n, d_vocab=cfg.d_vocab, d_model=cfg.d_model, n_heads=cfg.n_heads,
        d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        x=_array(pop.train_x, torch.int64, "train_x"), y=_array(pop.train_y, torch.int64, "train_y"),
        labels=_array(pop.train_labels, torch.int64, "train_labels"),
        train_size=np.ascontiguousarray(pop.train_size, dtype=np.int64))
    if engine.n_params != pop.P:
        raise ValueError(f"the engine's parameter count {engine.n_params} != the population's P={pop.P}")
    _engines[pop] = (key, engine)
    return engine


def _array(t: Tensor, dtype: torch.dtype, name: str) -> np.ndarray:
    if t.dtype != dtype:
        raise TypeError(f"pop.{name} has dtype {t.dtype}; the C++ engine needs {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"pop.{name} is not contiguous; the C++ engine writes through zero-copy views")
    return t.detach().numpy()


def _state(pop) -> list[np.ndarray]:
    """Zero-copy views of the (M, P) state; float32 trains, float64 checks the algorithm."""
    dtype = pop.flat_params.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"pop.flat_params has dtype {dtype}; the C++ engine supports float32 and float64")
    return [_array(getattr(pop, name), dtype, name)
            for name in ("flat_params", "flat_grads", "exp_avg", "exp_avg_sq")]


def step(pop, n_threads: int | None = None) -> Tensor:
    """One full-batch AdamW step of every healthy model of ``pop``; the losses (M,).

    Mirrors ``Population.step``: loss and gradients of all models (frozen
    ones too), ``step_count += 1``, models whose loss or gradients are not
    finite are frozen, then AdamW with each model's lr (times the warm-up
    factor) and weight decay on the healthy ones.
    """
    engine = engine_for(pop)
    next_step = pop.step_count + 1
    warm = pop.optim.lr_at(next_step, 1.0)
    b1, b2 = pop.optim.betas
    loss, finite = engine.step(
        *_state(pop), lr=np.ascontiguousarray(pop.lr * warm, dtype=np.float64),
        weight_decay=np.ascontiguousarray(pop.weight_decay, dtype=np.float64),
        frozen=np.ascontiguousarray(pop.failed_step >= 0), step=next_step, beta1=b1, beta2=b2,
        eps=pop.optim.eps, n_threads=n_threads or torch.get_num_threads())
    pop.step_count = next_step
    pop.mark_failures(torch.from_numpy(finite))
    return torch.from_numpy(loss).to(pop.flat_params.dtype)


def logits(pop, models: np.ndarray, x: Tensor, y: Tensor, n_threads: int | None = None) -> Tensor:
    """Last-position logits (K, N, V) of ``pop``'s models ``models`` on the examples (x, y) (N,).

    The engine's own forward pass; a model's logits are the same bits
    whatever the thread count and whichever other models are listed.
    """
    dtype = pop.flat_params.dtype
    params = _state(pop)[0]
    out = engine_for(pop).logits(params, np.ascontiguousarray(models, dtype=np.int64),
                                 _array(x.contiguous(), torch.int64, "x"), _array(y.contiguous(), torch.int64, "y"),
                                 n_threads=n_threads or torch.get_num_threads())
    return torch.from_numpy(out).to(dtype)


def loss_and_grad(pop, n_threads: int | None = None) -> Tensor:
    """Mean training loss per model (M,); gradients land in ``pop.grads``. No update."""
    loss, _ = engine_for(pop).step(
        *_state(pop), lr=None, weight_decay=None, frozen=None, step=0, beta1=0.0, beta2=0.0, eps=0.0,
        n_threads=n_threads or torch.get_num_threads())
    return torch.from_numpy(loss).to(pop.flat_params.dtype)
