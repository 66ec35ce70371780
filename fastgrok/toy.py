"""The minimal two-circuit example of the paper (Section 3, Appendix C, Table 1, Figure 2).

Two hard-coded circuits give one-hot logits: C_gen is right on train and test
inputs, C_mem is right on train inputs and confidently wrong (a label
different from the test label) on test inputs. Each circuit c is scaled by a
weight w_c = w_c1 * w_c2, the product of two learned *subweights*; a small
initial w_c2 makes the circuit slow to learn (w_c1 starts at 0, so its
gradient is proportional to w_c2). With q labels the losses are

    L_train = log(1 + (q - 1) exp(-(w_G + w_M)))                  + alpha * L_wd
    L_test  = log((q - 2) + exp(w_G) + exp(w_M)) - w_G            + alpha * L_wd
    L_wd    = P'_G**2 + P'_M**2,     P'_c = |w_c|**(1/kappa) * P_c,

and plain gradient descent with learning rate lambda runs on L_train.

Choices the paper leaves open, and why:

* alpha is the weight-decay coefficient. Table 1 lists alpha = 0.005 but
  Appendix C's formulas never use it; Section 2 (Eq. 2) and Appendix D
  (Eq. 6) define the loss as L_x-ent + alpha * (weight-decay term), so alpha
  belongs in front of L_wd. Appendix C's L_wd has no factor 1/2 (Eq. 6 with
  q = 2 has alpha/2); we keep Appendix C's form, because with alpha/2 C_gen
  only starts to grow after ~5000 steps, while the caption of Figure 2a says
  "C_gen only starts to grow significantly by step 2500", which is what
  alpha * (P'_G**2 + P'_M**2) gives (w_G: 0.05 at step 2500, 1.1 at 4000).
* The test loss includes alpha * L_wd, exactly as Appendix C writes it, so
  Figure 2's train and test curves differ only in their cross-entropy parts.
  The cross-entropy parts alone are returned too.
* |w_c| in P'_c: a parameter norm is non-negative, and w_c may pass through 0
  or below. d|w|**e/dw = e |w|**(e-1) sign(w) with e = 2/kappa is continuous
  and 0 at w = 0 for kappa < 2 (Table 1: kappa = 1.2, so e = 5/3); for
  kappa >= 2 it has no derivative at 0, and we take the subgradient 0 there.
* Column (c)'s caption says "We set w_G1 = w_M1", but both are 0 in every
  column; Table 1 sets w_G2(0) = w_M2(0) = 1, which is what makes the two
  circuits equally fast. We follow Table 1.

At a stationary point both circuits see the same cross-entropy gradient, so
P_G**2 |w_G|**(2/kappa - 1) = P_M**2 |w_M|**(2/kappa - 1), i.e.
w_G / w_M = (P_M / P_G)**(2 kappa / (2 - kappa)) = (P_M / P_G)**3 for
kappa = 1.2 (Theorem D.4, case 2): 8 in columns (a) and (c), 1/8 in (b).

Everything is float64 numpy with hand-written gradients (checked against
finite differences in tests/test_toy.py); the three columns run at once as
the rows of (C, 2 circuits, 2 subweights) arrays, C = number of columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GEN, MEM = 0, 1  # circuit axis of the (C, 2, 2) subweight array


@dataclass(frozen=True)
class ToyColumn:
    """One column of Table 1: the hyperparameters of one simulation."""

    title: str
    P_gen: float
    P_mem: float
    w_gen2: float
    w_mem2: float
    w_gen1: float = 0.0
    w_mem1: float = 0.0
    kappa: float = 1.2
    alpha: float = 0.005
    q: int = 113
    lr: float = 0.01

    def __post_init__(self):
        for name in ("P_gen", "P_mem", "kappa", "lr"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"ToyColumn.{name}={value!r}: must be a finite number > 0")
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"ToyColumn.alpha={self.alpha!r}: must be a finite number >= 0")
        if not (isinstance(self.q, (int, np.integer)) and self.q >= 3):
            raise ValueError(f"ToyColumn.q={self.q!r}: must be an integer >= 3 "
                             "(a test input needs its label, C_mem's wrong label and another)")
        for name in ("w_gen1", "w_gen2", "w_mem1", "w_mem2"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"ToyColumn.{name}={getattr(self, name)!r}: must be finite")


# Table 1 of the paper, keyed by the panel letter of Figure 2.
TABLE_1: dict[str, ToyColumn] = {
    "a": ToyColumn("(a) C_gen learned slower but more efficient: grokking",
                   P_gen=1.0, P_mem=2.0, w_gen2=0.005, w_mem2=1.0),
    "b": ToyColumn("(b) C_gen less efficient than C_mem: no grokking",
                   P_gen=4.0, P_mem=2.0, w_gen2=0.005, w_mem2=1.0),
    "c": ToyColumn("(c) C_gen and C_mem learned at equal speeds: no delay",
                   P_gen=1.0, P_mem=2.0, w_gen2=1.0, w_mem2=1.0),
}

# Column (a) generalises between steps ~3000 and ~7000; by 10^4 its w_G / w_M
# is 6.8 of the stationary 8 and its test loss has flattened, the span
# Figure 2 shows.
DEFAULT_STEPS = 10_000


class _Columns:
    """Table-1 hyperparameters of C columns as (C,) / (C, 2) float64 arrays."""

    def __init__(self, columns: list[ToyColumn]):
        if not columns:
            raise ValueError("no toy columns given; pass at least one ToyColumn (e.g. TABLE_1['a'])")
        self.P = np.array([[c.P_gen, c.P_mem] for c in columns], dtype=np.float64)  # (C, 2)
        self.kappa = np.array([c.kappa for c in columns], dtype=np.float64)[:, None]  # (C, 1)
        self.alpha = np.array([c.alpha for c in columns], dtype=np.float64)[:, None]  # (C, 1)
        self.q = np.array([c.q for c in columns], dtype=np.float64)  # (C,)
        self.lr = np.array([c.lr for c in columns], dtype=np.float64)[:, None, None]  # (C, 1, 1)


def initial_subweights(columns: list[ToyColumn]) -> np.ndarray:
    """(C, 2, 2) array: [column, circuit (GEN, MEM), subweight (1, 2)]."""
    return np.array([[[c.w_gen1, c.w_gen2], [c.w_mem1, c.w_mem2]] for c in columns], dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp(z - log(1 + e^z)) never overflows, unlike 1 / (1 + e^-z) for z << 0.
    return np.exp(z - np.logaddexp(0.0, z))


def _losses_and_grad(subweights: np.ndarray, cols: _Columns):
    """Losses of every column and the gradient of the train loss.

    subweights: (C, 2, 2). Returns a dict of (C,) arrays and d L_train /
    d subweights, (C, 2, 2).
    """
    w = subweights[:, :, 0] * subweights[:, :, 1]  # (C, 2): w_G, w_M
    w_gen, w_mem = w[:, GEN], w[:, MEM]
    log_wrong_train = np.log(cols.q - 1)  # q - 1 labels with logit 0 on a train input
    log_wrong_test = np.log(cols.q - 2)  # on a test input C_mem's label has logit w_M
    train_xent = np.logaddexp(0.0, log_wrong_train - (w_gen + w_mem))
    test_xent = np.logaddexp(np.logaddexp(log_wrong_test, w_gen), w_mem) - w_gen

    exponent = 2.0 / cols.kappa  # (C, 1)
    abs_w = np.abs(w)
    norm_sq = cols.P**2 * abs_w**exponent  # (C, 2): P'_c^2
    wd = cols.alpha[:, 0] * norm_sq.sum(axis=1)

    dxent_dw = -_sigmoid(log_wrong_train - (w_gen + w_mem))  # (C,), same for both circuits
    with np.errstate(divide="ignore", invalid="ignore"):
        # e |w|^(e-1) is infinite at w = 0 when e < 1; the subgradient 0 is used there.
        dnorm_dw = np.where(abs_w > 0, exponent * abs_w ** (exponent - 1) * np.sign(w), 0.0)
    dw = dxent_dw[:, None] + cols.alpha * cols.P**2 * dnorm_dw  # (C, 2)
    dsub = dw[:, :, None] * subweights[:, :, ::-1]  # d(w1 w2)/dw1 = w2 and vice versa
    losses = dict(train_loss=train_xent + wd, test_loss=test_xent + wd,
                  train_xent=train_xent, test_xent=test_xent, weight_decay_loss=wd,
                  w_gen=w_gen, w_mem=w_mem,
                  norm_gen=np.sqrt(norm_sq[:, GEN]), norm_mem=np.sqrt(norm_sq[:, MEM]),
                  norm_total=np.sqrt(norm_sq.sum(axis=1)))
    return losses, dsub


def toy_losses(subweights: np.ndarray, columns: list[ToyColumn]) -> dict[str, np.ndarray]:
    """Losses, weights and parameter norms at the given (C, 2, 2) subweights."""
    return _losses_and_grad(np.asarray(subweights, dtype=np.float64), _Columns(columns))[0]


def toy_train_grad(subweights: np.ndarray, columns: list[ToyColumn]) -> np.ndarray:
    """d L_train / d subweights at the given (C, 2, 2) subweights (L_train includes alpha * L_wd)."""
    return _losses_and_grad(np.asarray(subweights, dtype=np.float64), _Columns(columns))[1]


def simulate(columns: list[ToyColumn], steps: int) -> list[dict[str, np.ndarray]]:
    """Gradient descent on L_train for every column at once, recording every step.

    Returns one dict per column of (steps + 1,) float64 arrays: "step",
    train/test loss (with alpha * L_wd, as Figure 2 plots them), their
    cross-entropy parts, "weight_decay_loss", the weights "w_gen"/"w_mem", the
    parameter norms "norm_gen"/"norm_mem"/"norm_total" (P'_G, P'_M and
    sqrt(P'_G^2 + P'_M^2)), and "subweights" (steps + 1, 2, 2).
    """
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    cols = _Columns(columns)
    subweights = initial_subweights(columns)  # (C, 2, 2)
    trajectory = np.empty((steps + 1,) + subweights.shape)
    records: dict[str, np.ndarray] = {}
    for t in range(steps + 1):
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below instead
            losses, dsub = _losses_and_grad(subweights, cols)
        diverged = ~np.isfinite(losses["train_loss"]) | ~np.all(np.isfinite(dsub), axis=(1, 2))
        if diverged.any():
            bad = np.nonzero(diverged)[0].tolist()
            raise FloatingPointError(f"toy simulation diverged at step {t} in column(s) {bad} "
                                     f"(lr {[columns[i].lr for i in bad]}); use a smaller lr")
        trajectory[t] = subweights
        for name, value in losses.items():
            records.setdefault(name, np.empty((steps + 1, len(columns))))[t] = value
        subweights = subweights - cols.lr * dsub
    out = []
    for i in range(len(columns)):
        column = {"step": np.arange(steps + 1, dtype=np.float64)}
        column.update({name: values[:, i].copy() for name, values in records.items()})
        column["subweights"] = trajectory[:, i].copy()
        out.append(column)
    return out


def run_toy(steps: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Figure 2: the three Table-1 columns, keyed "a", "b", "c" (see ``simulate``)."""
    steps = DEFAULT_STEPS if steps is None else steps
    names = list(TABLE_1)
    return dict(zip(names, simulate([TABLE_1[n] for n in names], steps)))


def _fall_step(loss: np.ndarray) -> int:
    """First step at which ``loss`` is below half its initial value, or -1 if never."""
    below = np.nonzero(loss < loss[0] / 2)[0]
    return int(below[0]) if below.size else -1


def summarize(result: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per column, the numbers that tell grokking from its absence.

    At step 0 every logit is 0, so both losses start at log q; a loss has
    "fallen" at the first step where it is below half of that (-1: never).
    Grokking is a test fall step far later than the train fall step.
    """
    summary = {}
    for name, col in result.items():
        summary[name] = dict(
            train_fall_step=_fall_step(col["train_loss"]), test_fall_step=_fall_step(col["test_loss"]),
            initial_loss=float(col["train_loss"][0]), peak_test_loss=float(col["test_loss"].max()),
            final_train_loss=float(col["train_loss"][-1]), final_test_loss=float(col["test_loss"][-1]),
            final_w_gen=float(col["w_gen"][-1]), final_w_mem=float(col["w_mem"][-1]))
    return summary


__all__ = ["ToyColumn", "TABLE_1", "DEFAULT_STEPS", "initial_subweights", "toy_losses",
           "toy_train_grad", "simulate", "run_toy", "summarize"]
