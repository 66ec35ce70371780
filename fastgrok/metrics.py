"""Measurements of a whole population at one evaluation point (SPEC "Measurements").

Per model m, every value a float:

* ``train_loss``, ``train_acc``: over its D_m training pairs, scored against
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

Cost: one forward pass over the n_pairs pairs (about one training step at
D ~ n_pairs / 3) plus an FFT of p^3 values per model; the population is
processed in chunks of models so memory stays bounded for any M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastgrok.model import PARAM_NAMES, stable_cross_entropy_fwd_bwd

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


def trig_components(table: Tensor) -> Tensor:
    """Projections <Z, Z_k / ||Z_k||> (M, K) of logit tables Z (M, p, p, p) indexed [a, b, c]."""
    p = table.shape[1]
    spectrum = torch.fft.rfftn(table, dim=(1, 2, 3))                        # (M, p, p, p//2 + 1)
    k = torch.arange(1, n_trig_frequencies(p) + 1, device=table.device)
    minus_k = (-k) % p
    dots = spectrum[:, minus_k, minus_k, k].real                            # (M, K) = <Z, Z_k>
    return dots / torch.as_tensor(trig_direction_norms(p), dtype=dots.dtype, device=dots.device)


def trig_part_by_offset(components: Tensor, p: int) -> Tensor:
    """The trigonometric part Z_T as a function of s = (a + b - c) mod p: (M, K) -> (M, p).

    Z_T = sum_k components_k * Z_k / ||Z_k||, and Z_k[a, b, c] = cos(2 pi k s / p).
    """
    k = torch.arange(1, n_trig_frequencies(p) + 1, dtype=torch.float64)
    s = torch.arange(p, dtype=torch.float64)
    basis = torch.cos(2 * math.pi * torch.outer(k, s) / p)                 # (K, p)
    basis /= torch.as_tensor(trig_direction_norms(p)).unsqueeze(1)
    return components @ basis.to(components.device, components.dtype)


# ------------------------------------------------------------------ evaluator
class Evaluator:
    """Measures a population; built once per population (its label tables are cached).

    memory_budget: bytes of evaluation intermediates per chunk of models.
    """

    def __init__(self, pop, memory_budget: int = 512 * 2 ** 20):
        task, M = pop.task, pop.M
        self.op, self.p = task.cfg.op, task.cfg.n
        self.names = metric_names(self.op)
        n_pairs = task.n_pairs
        labels = np.empty((M, n_pairs), dtype=np.int64)
        is_train = np.zeros((M, n_pairs), dtype=bool)
        for m, split in enumerate(pop.splits):
            labels[m, split.train_idx] = split.train_labels
            labels[m, split.test_idx] = split.test_labels
            is_train[m, split.train_idx] = True
        dev = pop.device
        self.labels = torch.as_tensor(labels, device=dev)                   # (M, n_pairs)
        self.is_train = torch.as_tensor(is_train, device=dev)               # (M, n_pairs)
        self.n_train = torch.as_tensor(is_train.sum(1), dtype=torch.float64, device=dev)
        self.n_test = torch.as_tensor((~is_train).sum(1), dtype=torch.float64, device=dev)
        self.circuits = self.op in CIRCUIT_OPS
        per_model = 3 * n_pairs * task.cfg.d_vocab * 4                      # logits + CE buffers
        if self.circuits:
            # Each pair's s = (a + b - label) mod p, where its C_gen logit is read.
            self.offset = (torch.as_tensor(task.x + task.y, device=dev) - self.labels) % self.p
            per_model += 3 * self.p ** 3 * 8                                # float64 table + spectrum
        self.models_per_chunk = max(1, memory_budget // per_model)

    @torch.no_grad()
    def __call__(self, pop) -> Evaluation:
        M = pop.M
        out = {name: np.empty(M, dtype=np.float64) for name in self.names}
        for start in range(0, M, self.models_per_chunk):
            sl = slice(start, min(M, start + self.models_per_chunk))
            for name, value in self._chunk(pop, sl).items():
                out[name][sl] = value.cpu().numpy()
        self._norms(pop, out)
        return Evaluation(pop.step_count, out)

    def _chunk(self, pop, sl: slice) -> dict[str, Tensor]:
        logits = pop.all_logits(sl)                                         # (Mc, n_pairs, V)
        labels, is_train = self.labels[sl], self.is_train[sl]
        n_train, n_test = self.n_train[sl], self.n_test[sl]
        correct_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double()
        hit = (logits.argmax(-1) == labels).double()
        loss = stable_cross_entropy_fwd_bwd(logits, labels)[0].double()     # (Mc, n_pairs)

        def train_mean(v: Tensor) -> Tensor:
            return torch.where(is_train, v, 0).sum(1) / n_train

        def test_mean(v: Tensor) -> Tensor:   # 0 / 0 = NaN when there is no test pair
            return torch.where(is_train, 0, v).sum(1) / n_test

        out = {"train_loss": train_mean(loss), "train_acc": train_mean(hit),
               "test_loss": test_mean(loss), "test_acc": test_mean(hit)}
        if self.circuits:
            p, Mc = self.p, logits.shape[0]
            table = logits[..., :p].double().reshape(Mc, p, p, p)           # [m, a, b, c]
            components = trig_components(table)                             # (Mc, K)
            gen = trig_part_by_offset(components, p).gather(1, self.offset[sl])  # (Mc, n_pairs)
            mem = correct_logit - gen
            out |= {"gen_logit_train": train_mean(gen), "gen_logit_test": test_mean(gen),
                    "mem_logit_train": train_mean(mem), "mem_logit_test": test_mean(mem),
                    "gen_energy_fraction": components.pow(2).sum(1) / table.pow(2).sum((1, 2, 3))}
            out["gen_mem_ratio_train"] = out["gen_logit_train"] / out["mem_logit_train"]
            out["gen_mem_ratio_test"] = out["gen_logit_test"] / out["mem_logit_test"]
        return out

    @staticmethod
    def _norms(pop, out: dict[str, np.ndarray]) -> None:
        total = 0.0
        for name in PARAM_NAMES:
            sq = pop.params[name].reshape(pop.M, -1).double().pow(2).sum(1).cpu().numpy()
            out[f"param_norm_{name}"][:] = np.sqrt(sq)
            total = total + sq
        out["param_norm"][:] = np.sqrt(total)


__all__ = ["Evaluator", "Evaluation", "metric_names", "trig_components", "trig_part_by_offset",
           "trig_direction_norms", "n_trig_frequencies", "CIRCUIT_OPS"]
