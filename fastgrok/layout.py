"""Where everything sits: a model's parameters in its flat row, and the (token, position) rows.

Every backend keeps a population's parameters, gradients and AdamW moments as
(M, P) buffers, one row per model. ``ParamLayout`` is the only definition of
that row: the parameter names in order, their shapes and their offsets. The
reference model (``fastgrok.model``), the batched engine, the C++ engine
(which receives the offsets through its constructor), the Triton kernels
(which receive them as constexprs), the run files and the exports all read it
from here.

Every key and value of the 1-layer model is a function of (token, position)
alone, and a sequence is ``<x> <op> <y> <=>``, so the engines tabulate them
for the R = 2n + 2 *rows* of ``TokenRows`` instead of per example:

    row r < n            element r at position 0 (an example's x)
    row n                the operator at position 1
    rows n+1 .. 2n       element r - (n+1) at position 2 (an example's y)
    row 2n + 1           ``=`` at position 3, the last position, where the loss is read

The engines rely on this order (x rows first, then the operator, the y rows
and ``=`` contiguous); they take the numbers from ``TokenRows`` and check the
structure, rather than writing ``n + 1`` themselves. See docs/design.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fastgrok.config import ModelConfig

PARAM_NAMES = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "b_in", "W_out", "b_out", "W_U")

# Positions of a sequence <x> <op> <y> <=>.
POS_X, POS_OP, POS_Y, POS_EQ = 0, 1, 2, 3
N_CTX = 4


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape, in flat order (TransformerLens's layouts: W_Q is (H, D, Dh))."""
    V, T, D, H, Dh, F = cfg.d_vocab, cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    return {
        "W_E": (V, D), "W_pos": (T, D),
        "W_Q": (H, D, Dh), "W_K": (H, D, Dh), "W_V": (H, D, Dh), "W_O": (H, Dh, D),
        "W_in": (D, F), "b_in": (F,), "W_out": (F, D), "b_out": (D,),
        "W_U": (D, V),
    }


@dataclass(frozen=True)
class ParamLayout:
    """A model's flat parameter row: ``offsets[name]`` .. ``+ sizes[name]``, P in all."""

    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, int]
    sizes: dict[str, int]
    P: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ParamLayout":
        shapes = param_shapes(cfg)
        offsets, sizes, start = {}, {}, 0
        for name in PARAM_NAMES:
            offsets[name], sizes[name] = start, math.prod(shapes[name])
            start += sizes[name]
        return cls(shapes, offsets, sizes, start)

    def slices(self) -> dict[str, slice]:
        return {k: slice(self.offsets[k], self.offsets[k] + self.sizes[k]) for k in PARAM_NAMES}

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-name views (M, *shape) of flat rows (M, P): writing a view writes the row."""
        if flat.shape[-1] != self.P:
            raise ValueError(f"flat parameters have {flat.shape[-1]} entries per model; the layout has P={self.P}")
        M = flat.shape[0]
        return {k: flat[:, s].view(M, *self.shapes[k]) for k, s in self.slices().items()}

    def unflatten(self, row: Tensor | np.ndarray) -> dict:
        """One model's flat row (P,) as a {name: array of its shape} dict (copies nothing)."""
        if row.shape != (self.P,):
            raise ValueError(f"a flat parameter row has shape {tuple(row.shape)}; this model needs ({self.P},)")
        return {k: row[s].reshape(self.shapes[k]) for k, s in self.slices().items()}


@dataclass(frozen=True)
class TokenRows:
    """The R = 2n + 2 (token, position) rows of a task with n elements (module docstring)."""

    n: int

    @property
    def R(self) -> int:
        return 2 * self.n + 2

    @property
    def op_row(self) -> int:
        return self.n

    @property
    def first_y_row(self) -> int:
        return self.n + 1

    @property
    def eq_row(self) -> int:
        return 2 * self.n + 1

    @property
    def op_token(self) -> int:
        return self.n

    @property
    def eq_token(self) -> int:
        return self.n + 1

    def y_row(self, y):
        """The row of element y at position 2 (x's row is x itself)."""
        return y + self.first_y_row

    @property
    def token(self) -> np.ndarray:
        """(R,) the token of each row."""
        elems = np.arange(self.n)
        return np.concatenate([elems, [self.op_token], elems, [self.eq_token]]).astype(np.int64)

    @property
    def pos(self) -> np.ndarray:
        """(R,) the position of each row."""
        return np.concatenate([np.full(self.n, POS_X), [POS_OP], np.full(self.n, POS_Y), [POS_EQ]]).astype(np.int64)

    def constexprs(self) -> dict[str, int]:
        """The row numbers as the Triton kernels take them."""
        return dict(R=self.R, OP_ROW=self.op_row, FIRST_Y_ROW=self.first_y_row, EQ_ROW=self.eq_row,
                    EQ_TOKEN=self.eq_token, EQ_POS=POS_EQ)


__all__ = ["PARAM_NAMES", "param_shapes", "ParamLayout", "TokenRows", "N_CTX",
           "POS_X", "POS_OP", "POS_Y", "POS_EQ"]
