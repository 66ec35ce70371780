"""The cpu backend: the fused C++ engine (``fastgrok._cpu_engine``, sources in ``csrc/``).

One native call per population step computes every model's loss and
gradients and applies AdamW, model by model, so that a model's weights,
gradients and activations stay in the core's caches; the algorithm is in
``csrc/engine.cpp``. This module checks arguments and moves the state's
buffers across as zero-copy numpy views. Float32 states train; float64 ones
run the same algorithm in double precision, to check it against the float64
oracle.

Matmul precision (``state.precision``, ``fastgrok.precision``): fp32 runs the
engine's algebraic rewrite; tf32, bf16 and bf16x3 run its direct path, the
batched engine's per-example products with both operands rounded on the bit
pattern (csrc/engine.cpp, "The direct path"), slower than fp32's rewrite. A
float64 state rounds to the same mantissa bit counts on the float64 pattern,
as ``fastgrok.precision.round_mantissa`` does, so it checks the direct path
against the float64 oracle at the same precision.

The engine derives neither the parameter layout nor the token rows: it
receives the state's ``fastgrok.layout.ParamLayout`` offsets and
``TokenRows`` and checks them against the structure it relies on.

Reproducibility: a model's bits depend neither on its batch-mates nor on the
thread count, in every precision (csrc/engine.cpp, "Threads and
reproducibility").

The extension is built by ``pip install`` (setup.py); if the build failed,
``CpuBackend.available`` says why and ``select_backend`` falls back to torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastgrok.config import ModelConfig
from fastgrok.layout import PARAM_NAMES, TokenRows
from fastgrok.precision import PRECISIONS, check_precision

_BUILD_ERROR_FILE = Path(__file__).parent.parent / "_cpu_engine_build_error.txt"
_STATE = ("flat_params", "flat_grads", "exp_avg", "exp_avg_sq")
_DATA = ("train_x", "train_y", "train_labels")


def _extension():
    from fastgrok import _cpu_engine

    return _cpu_engine


class CpuBackend:
    """The fused C++ engine as a backend (``fastgrok.backends.Backend``).

    n_threads: OpenMP threads per call; None means ``torch.get_num_threads()``
    at each call. Results are the same bits for any thread count.

    The object owns the native engine of the state it steps (built on first
    use; it holds the examples sorted for cache locality and the scratch
    buffers) and rebuilds it when the state's training data or precision changed.
    """

    name = "cpu"
    precisions = PRECISIONS
    default_precision = "fp32"

    def __init__(self, n_threads: int | None = None):
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or n_threads < 1):
            raise ValueError(f"n_threads={n_threads!r}: must be a positive integer or None")
        self.n_threads = n_threads
        self._engine = None
        self._data = None  # what the engine was built from: (tensors, their versions, train_size)

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        """(True, "") if the extension is built and ``device`` is the CPU, else (False, why not)."""
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the C++ engine runs on the CPU only; the population is on {device}"
        try:
            _extension()
        except ImportError as exc:
            detail = _BUILD_ERROR_FILE.read_text().strip() if _BUILD_ERROR_FILE.exists() else (
                "no build error was recorded; reinstall with a C++17 compiler: pip install -e .")
            return False, f"fastgrok._cpu_engine is not importable ({exc}). {detail}"
        return True, ""

    @staticmethod
    def build_info() -> dict:
        """Compiler flags, vector width, GEMM tile and OpenMP version the extension was built with."""
        return dict(_extension().build_info())

    @staticmethod
    def flops_per_model_step(cfg: ModelConfig, n_train: int, precision: str = "fp32") -> int:
        """Floating-point operations of one model's step in this engine (2 per multiply-add).

        In tf32, bf16 and bf16x3 (the direct path): per example the batched
        engine's 3 * (H*Dh*D + 2*D*F + D*V) multiply-adds, three times that in
        bf16x3 (three GEMMs per product), plus 12*H*Dh for z, da and dV_tab;
        per step the key/value/query tables and their backward. The rest of
        this docstring is fp32's count.

        Counts the matrix arithmetic of csrc/engine.cpp without its padding of
        F and V to the vector width: per example 3*F*V (logits, dW_OU,
        dhidden) + 12*H*(F + V) (4H table rows gathered, dotted and
        scattered); per step the key/value/query tables and the products that
        build U, UU, W_OU and carry their gradients back. At the paper config:
        0.41 MFLOP per example (``torch_engine.flops_per_example``: 0.97) plus
        0.26 GFLOP per model and step for the tables, 1.09 GFLOP per
        model-step at n_train = 2000 (batched: 1.99).
        """
        D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
        R, HDh = TokenRows(V - 2).R, H * Dh
        attention = (2 * R * D * HDh + D * HDh + R * HDh          # keys, values, query, scores
                     + 2 * R * HDh + 2 * D * R * HDh + D * HDh    # dK, dq; dW_K, dW_V, dW_Q
                     + 2 * R * HDh * D + HDh * D)                 # d rows
        if check_precision(precision) != "fp32":
            products = 3 * (HDh * D + 2 * D * F + D * V) * (3 if precision == "bf16x3" else 1)
            return 2 * (n_train * (products + 12 * HDh) + attention)
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
        return 2 * (n_train * per_example + tables_forward + tables_backward)

    def threads(self) -> int:
        return self.n_threads or torch.get_num_threads()

    def engine(self, state):
        """The native engine of ``state``, rebuilt when its training data or its precision changed."""
        tensors = tuple(getattr(state, name) for name in _DATA)
        precision = check_precision(state.precision)
        data = (tensors, tuple(t._version for t in tensors), tuple(int(n) for n in state.train_size), precision)
        if self._engine is not None and all(a is b for a, b in zip(self._data[0], tensors)) \
                and self._data[1:] == data[1:]:
            return self._engine
        for name in _STATE + _DATA:
            t = getattr(state, name)
            if t.device.type != "cpu":
                raise ValueError(f"state.{name} is on {t.device}; the C++ engine needs CPU tensors")
        cfg, layout, rows = state.cfg, state.layout, state.rows
        self._engine = None  # free the old engine's scratch before the new one allocates its own
        self._engine = _extension().Engine(
            n=rows.n, d_vocab=cfg.d_vocab, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
            d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx,
            param_offsets=np.array([layout.offsets[k] for k in PARAM_NAMES] + [layout.P], dtype=np.int64),
            row_token=rows.token, row_pos=rows.pos, op_row=rows.op_row, first_y_row=rows.first_y_row,
            eq_row=rows.eq_row,
            x=_array(state.train_x, torch.int64, "train_x"), y=_array(state.train_y, torch.int64, "train_y"),
            labels=_array(state.train_labels, torch.int64, "train_labels"),
            train_size=np.ascontiguousarray(state.train_size, dtype=np.int64), precision=precision)
        self._data = data
        return self._engine

    def step(self, state) -> Tensor:
        """One full-batch AdamW step of every healthy model of ``state``; the mean losses (M,).

        Loss and gradients of all models (frozen ones too), ``step_count += 1``,
        models whose loss or gradients are not finite are frozen, then AdamW
        with each model's lr (times the warm-up factor) and weight decay on the
        healthy ones.
        """
        engine = self.engine(state)
        next_step = state.step_count + 1
        warm = state.optim.lr_at(next_step, 1.0)
        b1, b2 = state.optim.betas
        loss, finite = engine.step(
            *_state(state), lr=np.ascontiguousarray(state.lr * warm, dtype=np.float64),
            weight_decay=np.ascontiguousarray(state.weight_decay, dtype=np.float64),
            frozen=np.ascontiguousarray(state.failed_step >= 0), step=next_step, beta1=b1, beta2=b2,
            eps=state.optim.eps, n_threads=self.threads())
        state.step_count = next_step
        state.mark_failures(torch.from_numpy(finite))
        return torch.from_numpy(loss).to(state.flat_params.dtype)

    def loss_and_grad(self, state) -> Tensor:
        """Mean training loss per model (M,); gradients land in ``state.flat_grads``. No update."""
        loss, _ = self.engine(state).step(
            *_state(state), lr=None, weight_decay=None, frozen=None, step=0, beta1=0.0, beta2=0.0, eps=0.0,
            n_threads=self.threads())
        return torch.from_numpy(loss).to(state.flat_params.dtype)

    def logits(self, state, models: np.ndarray, x: Tensor, y: Tensor) -> Tensor:
        """Last-position logits (K, N, V) of ``state``'s models ``models`` (K,) on the examples (x, y) (N,).

        The engine's own forward pass; a model's logits are the same bits
        whatever the thread count and whichever other models are listed.
        """
        out = self.engine(state).logits(
            _state(state)[0], np.ascontiguousarray(models, dtype=np.int64),
            _array(x.contiguous(), torch.int64, "x"), _array(y.contiguous(), torch.int64, "y"),
            n_threads=self.threads())
        return torch.from_numpy(out).to(state.flat_params.dtype)


def _array(t: Tensor, dtype: torch.dtype, name: str) -> np.ndarray:
    if t.dtype != dtype:
        raise TypeError(f"state.{name} has dtype {t.dtype}; the C++ engine needs {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"state.{name} is not contiguous; the C++ engine writes through zero-copy views")
    return t.detach().numpy()


def _state(state) -> list[np.ndarray]:
    """Zero-copy views of the (M, P) buffers; float32 trains, float64 checks the algorithm."""
    dtype = state.flat_params.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state.flat_params has dtype {dtype}; the C++ engine supports float32 and float64")
    return [_array(getattr(state, name), dtype, name) for name in _STATE]


__all__ = ["CpuBackend"]
