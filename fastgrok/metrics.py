"""Measurements of a whole population at one evaluation point (docs/design.md, "Measurements").

Per model m, every value a float:

* ``train_loss``, ``train_acc``: over its n_train training pairs, scored against
  the labels it trains on (the random ones for a memorisation-only run);
  ``test_loss``, ``test_acc``: over every other pair of the task, scored
  against the true labels (NaN when the training set is the whole task).
  Loss is the last-position softmax cross-entropy over all d_vocab logits
  (the oracle's ``stable_cross_entropy_fwd_bwd``), accuracy the argmax.
* ``param_norm``: ||theta||_2 over all parameters; ``param_norm_<name>`` per
  parameter group of ``PARAM_NAMES``.
* For modular addition only, the circuit logits of the paper's Appendix B.
  The logit table Z[a, b, c] (the p x p inputs, classes restricted to the p
  elements) is projected onto the K = ceil((p-1)/2) directions
  Z_k[a, b, c] = cos(2 pi k (a + b - c) / p), k = 1..K, which are orthogonal;
  the projection is the trigonometric (C_gen) part, the rest the residual
  (C_mem) part. ``gen_logit_{train,test}`` / ``mem_logit_{train,test}`` are
  each part's mean correct-class logit over the model's training and test
  pairs, ``gen_mem_ratio_{train,test}`` their ratio (o_t / o_m of Figure
  10a), and ``gen_energy_fraction`` = ||Z_T||^2 / ||Z||^2 (the paper calls a
  network C_gen-only when this share of its logits is trigonometric).

The projection coefficients come from one 3-D real FFT of the table:
<Z, Z_k> = sum Z[a,b,c] cos(2 pi k (a+b-c)/p) = Re F[-k, -k, k], with F the
DFT over (a, b, c). Since every Z_k depends on (a, b, c) only through
s = (a + b - c) mod p, the trigonometric part is a function h(s) of p values,
gathered at each pair's correct class. The table is projected in float64:
the C_gen / C_mem ratio of Figure 10a spans six orders of magnitude, more
than float32 cancellation in Z - Z_T would keep.

Reproducibility: every model is measured on its own. Its logits come from
the backend with shapes that do not depend on the other models, and every
value above is then computed from them in float64 by numpy (pairwise sums
and pocketfft, both single-threaded, in a fixed order), so on a backend whose
training is batch-invariant (``cpu``) a model's measurements are the same
bits alone or in any population, with any thread count.

Cost: one forward pass over the n_pairs pairs (about one training step at
D ~ n_pairs / 3) plus an FFT of p^3 values per model. Memory is bounded for
any M and p: logits are fetched in blocks of pairs within the memory budget,
only per-pair values (a few floats per pair) are kept whole, and the circuit
analysis, which needs the p^3 table, is skipped with a warning where that
table does not fit the budget.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgrok.layout import PARAM_NAMES

# Tasks whose logits have the trigonometric structure of Appendix B.
CIRCUIT_OPS = ("x+y",)

LOSS_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
NORM_METRICS = ("param_norm",) + tuple(f"param_norm_{name}" for name in PARAM_NAMES)
CIRCUIT_METRICS = ("gen_logit_train", "gen_logit_test", "mem_logit_train", "mem_logit_test",
                   "gen_mem_ratio_train", "gen_mem_ratio_test", "gen_energy_fraction")

def metric_names(op: str) -> tuple[str, ...]:
    """Names of the measurements taken for a task, in storage order."""
    return LOSS_METRICS + NORM_METRICS + (CIRCUIT_METRICS if op in CIRCUIT_OPS else ())


@dataclass(frozen=True)
class Evaluation:
    """The measurements of every model at one step: ``values[name]`` is (M,)."""

    step: int
    values: dict[str, np.ndarray]


# ------------------------------------------------------------------- circuits
def n_trig_frequencies(p: int) -> int:
    """K = ceil((p - 1) / 2): cos(w_k s) = cos(w_{p-k} s), and k = 0 is the constant."""
    return p // 2


def trig_direction_norms(p: int) -> np.ndarray:
    """||Z_k||_2 for k = 1..K: p^3/2 summed cos^2, or p^3 where 2k = p (all +-1)."""
    k = np.arange(1, n_trig_frequencies(p) + 1)
    return np.sqrt(np.where(2 * k == p, p ** 3, p ** 3 / 2))


def trig_components(table: np.ndarray) -> np.ndarray:
    """Projections <Z, Z_k / ||Z_k||> (..., K) of logit tables Z (..., p, p, p) indexed [a, b, c]."""
    p = table.shape[-1]
    spectrum = np.fft.rfftn(table, axes=(-3, -2, -1))                       # (..., p, p, p//2 + 1)
    k = np.arange(1, n_trig_frequencies(p) + 1)
    minus_k = (-k) % p
    dots = spectrum[..., minus_k, minus_k, k].real                          # (..., K) = <Z, Z_k>
    return dots / trig_direction_norms(p)


def trig_part_by_offset(components: np.ndarray, p: int) -> np.ndarray:
    """The trigonometric part Z_T as a function of s = (a + b - c) mod p: (..., K) -> (..., p).

    Z_T = sum_k components_k * Z_k / ||Z_k||, and Z_k[a, b, c] = cos(2 pi k s / p).
    """
    k = np.arange(1, n_trig_frequencies(p) + 1, dtype=np.float64)
    s = np.arange(p, dtype=np.float64)
    basis = np.cos(2 * math.pi * np.outer(k, s) / p) / trig_direction_norms(p)[:, None]   # (K, p)
    return components @ basis


# ------------------------------------------------------------------ evaluator
def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cross_entropy_float64(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row softmax cross-entropy (n,) of logits (n, V) in float64, accurate for tiny losses.

    log(sum_v exp(z_v - z_max)) - (z_y - z_max), with the sum over the other
    classes kept apart so that log1p keeps a loss of 1e-30 where y is the argmax.
    """
    z = logits.astype(np.float64)
    rows = np.arange(len(z))
    shifted = z - z.max(axis=1, keepdims=True)
    zy = shifted[rows, labels]
    e = np.exp(shifted)
    e[rows, labels] = 0.0
    other = e.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(zy == 0.0, np.log1p(other), np.log(other + np.exp(zy)) - zy)


class Evaluator:
    """Measures a population; built once per population.

    memory_budget: bytes of evaluation intermediates at a time (logits of a
    block of pairs, per-pair values, the circuit table); capped at a quarter
    of the memory available when the evaluator is built.
    """

    def __init__(self, pop, memory_budget: int = 512 * 2 ** 20):
        task = pop.task
        self.op, self.p = task.cfg.op, task.cfg.n
        available = available_memory()
        self.memory_budget = memory_budget if available is None else min(memory_budget, available // 4)
        n_pairs, V = task.n_pairs, task.cfg.d_vocab
        # Per-pair values kept whole per model: loss, hit, correct logit, C_gen logit.
        per_pair_values = 4 * 8 * n_pairs
        circuit_bytes = 3 * self.p ** 3 * 8                                 # float64 table + spectrum
        self.circuits = self.op in CIRCUIT_OPS and per_pair_values + circuit_bytes <= self.memory_budget
        if self.op in CIRCUIT_OPS and not self.circuits:
            warnings.warn(f"p={self.p}: the circuit analysis needs {circuit_bytes / 2**30:.1f} GiB per model, "
                          f"more than the evaluation's budget of {self.memory_budget / 2**30:.1f} GiB; "
                          f"its metrics are NaN in this run", stacklevel=2)
        self.names = metric_names(self.op)
        # Logits (float32) and their float64 copy and exponentials per pair.
        per_pair_block = (4 + 3 * 8) * V
        self.pairs_per_block = max(1, (self.memory_budget - per_pair_values) // per_pair_block)
        self.splits = pop.splits

    @torch.no_grad()
    def __call__(self, pop) -> Evaluation:
        out = {name: np.full(pop.M, np.nan) for name in self.names}
        for m in range(pop.M):
            for name, value in self.measure(pop, m).items():
                out[name][m] = value
        return Evaluation(pop.step_count, out)

    def measure(self, pop, m: int) -> dict[str, float]:
        """Every measurement of model m, computed from its logits alone."""
        task, split = pop.task, self.splits[m]
        n_pairs = task.n_pairs
        labels = np.empty(n_pairs, dtype=np.int64)
        labels[split.train_idx], labels[split.test_idx] = split.train_labels, split.test_labels
        is_train = np.zeros(n_pairs, dtype=bool)
        is_train[split.train_idx] = True
        loss, hit, correct = (np.empty(n_pairs) for _ in range(3))
        table = np.empty((n_pairs, self.p)) if self.circuits else None
        for start in range(0, n_pairs, self.pairs_per_block):
            block = slice(start, min(n_pairs, start + self.pairs_per_block))
            logits = pop.all_logits([m], block)[0].cpu().numpy()            # (n, V) float32
            rows = np.arange(len(logits))
            loss[block] = cross_entropy_float64(logits, labels[block])
            hit[block] = logits.argmax(axis=1) == labels[block]
            correct[block] = logits[rows, labels[block]]
            if table is not None:
                table[block] = logits[:, :self.p]

        def train_mean(v: np.ndarray) -> float:
            return float(v[is_train].sum() / len(split.train_idx))

        def test_mean(v: np.ndarray) -> float:   # NaN when there is no test pair
            return float(v[~is_train].sum() / len(split.test_idx)) if len(split.test_idx) else math.nan

        out = {"train_loss": train_mean(loss), "train_acc": train_mean(hit),
               "test_loss": test_mean(loss), "test_acc": test_mean(hit)}
        if table is not None:
            p = self.p
            table = table.reshape(p, p, p)                                  # [a, b, c]
            components = trig_components(table)                             # (K,)
            offset = (task.x + task.y - labels) % p                         # where each pair's C_gen logit is read
            gen = trig_part_by_offset(components, p)[offset]                # (n_pairs,)
            mem = correct - gen
            out |= {"gen_logit_train": train_mean(gen), "gen_logit_test": test_mean(gen),
                    "mem_logit_train": train_mean(mem), "mem_logit_test": test_mean(mem),
                    "gen_energy_fraction": float(np.square(components).sum() / np.square(table).sum())}
            with np.errstate(divide="ignore", invalid="ignore"):
                out["gen_mem_ratio_train"] = out["gen_logit_train"] / out["mem_logit_train"]
                out["gen_mem_ratio_test"] = out["gen_logit_test"] / out["mem_logit_test"]
        flat = pop.flat_params[m].detach().cpu().numpy().astype(np.float64)
        total = 0.0
        for name, part in pop.layout.slices().items():
            sq = float(np.square(flat[part]).sum())
            out[f"param_norm_{name}"] = math.sqrt(sq)
            total += sq
        out["param_norm"] = math.sqrt(total)
        return out


__all__ = ["Evaluator", "Evaluation", "metric_names", "trig_components", "trig_part_by_offset",
           "trig_direction_norms", "n_trig_frequencies", "cross_entropy_float64", "CIRCUIT_OPS"]
