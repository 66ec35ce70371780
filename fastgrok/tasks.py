"""Algorithmic tasks of Power et al. (2021) and their seeded splits.

An example is the token sequence ``<x> <op> <y> <=>`` with label ``<x o y>``.
Token ids: elements ``0..n-1``, then ``op = n`` and ``= n+1`` (d_vocab = n+2).

The full dataset lists every pair (x, y) in row-major order (pairs with
y = 0 are left out for division). A data seed fixes one permutation of the
full dataset; a run with training-set size D trains on the first D pairs of
that permutation and tests on the rest, so for one seed a smaller D is a
prefix of a larger one (ungrokking relies on this).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fastgrok.config import MODULAR_OP_NAMES, OPS, TaskConfig


def _mod_inverse(y: np.ndarray, p: int) -> np.ndarray:
    return np.array([pow(int(v), p - 2, p) for v in y.ravel()], dtype=np.int64).reshape(y.shape)


# Modular operations on int64 arrays; every intermediate stays far below 2**63
# for any p that fits in a model (p**3 + p**2 < 2**63 for p < 2e6).
MODULAR_OPS = {
    "x+y": lambda x, y, p: (x + y) % p,
    "x-y": lambda x, y, p: (x - y) % p,
    "x*y": lambda x, y, p: (x * y) % p,
    "x/y": lambda x, y, p: (x * _mod_inverse(y, p)) % p,
    "x^2+y^2": lambda x, y, p: (x * x + y * y) % p,
    "x^2+xy+y^2": lambda x, y, p: (x * x + x * y + y * y) % p,
    "x^2+xy+y^2+x": lambda x, y, p: (x * x + x * y + y * y + x) % p,
    "x^3+xy": lambda x, y, p: (x * x % p * x + x * y) % p,
    "x^3+xy^2+y": lambda x, y, p: (x * x % p * x + x * (y * y % p) + y) % p,
}

assert tuple(MODULAR_OPS) == MODULAR_OP_NAMES, "every modular task named in fastgrok.config has a definition here"


@dataclass(frozen=True)
class _S5:
    """The 120 permutations of 5 points in lexicographic order, with tables."""

    @cached_property
    def elements(self) -> np.ndarray:  # (120, 5)
        return np.array(list(itertools.permutations(range(5))), dtype=np.int64)

    @cached_property
    def compose(self) -> np.ndarray:  # (120, 120): compose[a, b] = a . b, (a . b)(i) = a(b(i))
        index = {tuple(e): i for i, e in enumerate(self.elements)}
        table = np.empty((120, 120), dtype=np.int64)
        for a, pa in enumerate(self.elements):
            for b, pb in enumerate(self.elements):
                table[a, b] = index[tuple(pa[pb])]
        return table

    @cached_property
    def inverse(self) -> np.ndarray:  # (120,)
        identity = 0  # (0, 1, 2, 3, 4) comes first lexicographically
        return np.argmax(self.compose == identity, axis=1)


S5 = _S5()


def apply_op(op: str, x: np.ndarray, y: np.ndarray, p: int) -> np.ndarray:
    """``x o y`` element-wise on integer arrays."""
    if op in MODULAR_OPS:
        return MODULAR_OPS[op](x.astype(np.int64), y.astype(np.int64), p)
    c = S5.compose
    if op == "S5:x*y":
        return c[x, y]
    if op == "S5:x*y*x^-1":
        return c[c[x, y], S5.inverse[x]]
    if op == "S5:x*y*x":
        return c[c[x, y], x]
    raise ValueError(f"unknown task {op!r}; valid tasks: {', '.join(OPS)}")


class Task:
    """The full dataset of a task, as token and label arrays."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        n = cfg.n
        x, y = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        x, y = x.ravel(), y.ravel()
        if cfg.op == "x/y":
            keep = y != 0
            x, y = x[keep], y[keep]
        self.x, self.y = x.astype(np.int64), y.astype(np.int64)
        self.labels = apply_op(cfg.op, self.x, self.y, cfg.p)
        self.op_token, self.eq_token = n, n + 1
        # (n_pairs, 4): <x> <op> <y> <=>
        self.tokens = np.stack(
            [self.x, np.full_like(self.x, n), self.y, np.full_like(self.x, n + 1)], axis=1
        )

    @property
    def n_pairs(self) -> int:
        return len(self.labels)

    def check_train_size(self, train_size: int) -> None:
        if not isinstance(train_size, (int, np.integer)) or not 1 <= train_size <= self.n_pairs:
            raise ValueError(
                f"training-set size {train_size!r} is outside 1..{self.n_pairs} "
                f"(the task {self.cfg.op!r} with n={self.cfg.n} has {self.n_pairs} pairs)"
            )

    def permutation(self, data_seed: int) -> np.ndarray:
        """The fixed order of all pairs for ``data_seed``: train = first D, test = rest."""
        return np.random.default_rng([data_seed, 0x5EED]).permutation(self.n_pairs)

    def random_labels(self, data_seed: int) -> np.ndarray:
        """Uniform random labels in permutation order (index i belongs to pair perm[i]).

        Drawn for every position so that the labels of a smaller training set
        are a prefix of those of a larger one, like the split itself.
        """
        return np.random.default_rng([data_seed, 0x1ABE1]).integers(0, self.cfg.n, self.n_pairs)

    def split(self, data_seed: int, train_size: int, random_labels: bool = False) -> "Split":
        self.check_train_size(train_size)
        perm = self.permutation(data_seed)
        labels = self.labels[perm].copy()
        if random_labels:
            labels[:train_size] = self.random_labels(data_seed)[:train_size]
        return Split(
            train_idx=perm[:train_size], test_idx=perm[train_size:],
            train_labels=labels[:train_size], test_labels=labels[train_size:],
        )


@dataclass(frozen=True)
class Split:
    """Indices into the task's full dataset, with the labels trained and tested on."""

    train_idx: np.ndarray
    test_idx: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
