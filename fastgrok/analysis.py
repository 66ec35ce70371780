"""What a run file says at the end of training: convergence, and the critical dataset size.

Convergence (``converged``): a model has converged when its test accuracy
held within ``CONVERGENCE_TOLERANCE`` of its final value at every evaluation
in the last third of training (``CONVERGENCE_WINDOW``), with at least
``MIN_WINDOW_POINTS`` evaluations there. A run that is still climbing or
falling fails it; figures call such runs "at the end of training", not "at
convergence".

D_crit, the dataset size at which memorisation and generalisation are
equally efficient (paper, Section 4), three ways (``dcrit_*``):

(a) ungrokking: the D' at which the final test accuracy of grokked models
    retrained on D' < D_crit pairs crosses 0.5, per weight decay, one
    estimate per seed (log-linear interpolation between the neighbouring
    sizes); the interval is the seeds' range.
(b) efficiency: the D at which memorisation needs as much parameter norm as
    generalisation for the same correct logit. At a reference logit (the
    generalising runs' median), each family's norm is read off a straight
    line fitted to (logit, norm) of its runs (per D for memorisation, pooled
    over D for generalisation, whose norm does not depend on D); D_crit is
    where the memorisation norm, interpolated in log D, meets the
    generalisation norm. Interval: 2.5-97.5% of a bootstrap over seeds.
    Converged here means the parameter norm held within 5% of its final value
    over the last third of training.
(c) sweep: the D at which final test accuracy (median over seeds) crosses
    0.5. From scratch, runs near D_crit take longer than any CPU run to
    grok, so this is an upper bound unless every run used converged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONVERGENCE_WINDOW = 1 / 3
CONVERGENCE_TOLERANCE = 0.05
MIN_WINDOW_POINTS = 3
CROSSING_LEVEL = 0.5


def final_values(values: np.ndarray) -> np.ndarray:
    """(M,) each model's last finite value of a (M, S) metric; NaN where it has none."""
    out = np.full(values.shape[0], np.nan)
    for m, row in enumerate(values):
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size:
            out[m] = row[finite[-1]]
    return out


def _tail(steps: np.ndarray, values: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the largest |value - final| over the last ``window`` of training (NaN for a
    model never evaluated) and how many evaluations that window holds."""
    if not 0 < window <= 1:
        raise ValueError(f"window={window!r}: must be a fraction of training in (0, 1]")
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    moved, points = np.full(values.shape[0], np.nan), np.zeros(values.shape[0], dtype=np.int64)
    for m, row in enumerate(values):
        finite = np.isfinite(row)
        if finite.any():
            last = steps[finite].max()
            # The relative slack keeps the window's first step inside despite 1 - 1/3 rounding.
            inside = finite & (steps >= last - window * last * (1 + 1e-12))
            moved[m], points[m] = np.abs(row[inside] - row[finite][-1]).max(), inside.sum()
    return moved, points


def converged(steps: np.ndarray, test_acc: np.ndarray, window: float = CONVERGENCE_WINDOW,
              tolerance: float = CONVERGENCE_TOLERANCE) -> np.ndarray:
    """(M,) bool: test accuracy within ``tolerance`` of its final value over the last ``window``
    of training (module docstring). steps (S,) shared; test_acc (M, S), NaN where not evaluated."""
    moved, points = _tail(steps, test_acc, window)
    return (points >= MIN_WINDOW_POINTS) & (moved <= tolerance)


def movement(steps: np.ndarray, test_acc: np.ndarray, window: float = CONVERGENCE_WINDOW) -> np.ndarray:
    """(M,) the largest |test accuracy - final| over the last ``window`` of training."""
    return _tail(steps, test_acc, window)[0]


def crossing(sizes: np.ndarray, acc: np.ndarray, level: float = CROSSING_LEVEL) -> float:
    """The size where accuracy first rises through ``level``, log-linear between neighbours.

    NaN when it never crosses within the sizes given (all above or all below).
    """
    order = np.argsort(sizes)
    x, y = np.log(np.asarray(sizes, dtype=np.float64)[order]), np.asarray(acc, dtype=np.float64)[order]
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    for i in range(len(x) - 1):
        if y[i] < level <= y[i + 1]:
            return float(np.exp(x[i] + (level - y[i]) / (y[i + 1] - y[i]) * (x[i + 1] - x[i])))
    return float("nan")


@dataclass
class Estimate:
    """One D_crit estimate: a value, an interval, and what it rests on."""

    method: str
    group: str              # e.g. "wd 2" or "all"
    value: float
    low: float
    high: float
    n_runs: int
    n_converged: int
    note: str = ""
    samples: list = field(default_factory=list)

    def line(self) -> str:
        interval = f"[{self.low:.0f}, {self.high:.0f}]" if np.isfinite(self.low) else "[-]"
        conv = f"{self.n_converged}/{self.n_runs} runs converged"
        return (f"{self.method:<11} {self.group:<10} D_crit = {self.value:7.1f}  {interval:<14} {conv}"
                + (f"; {self.note}" if self.note else ""))


def _runs(data, name: str) -> np.ndarray:
    return np.array([getattr(r, name) for r in data.header.runs])


def dcrit_ungrok(data) -> list[Estimate]:
    """(a): per weight decay, the D' where each seed's final test accuracy crosses 0.5."""
    acc, conv = final_values(data.metrics["test_acc"]), converged(data.steps, data.metrics["test_acc"])
    D, wd, seed = _runs(data, "train_size"), _runs(data, "weight_decay"), _runs(data, "data_seed")
    out = []
    for w in np.unique(wd):
        mine = wd == w
        per_seed = [crossing(D[mine & (seed == s)], acc[mine & (seed == s)]) for s in np.unique(seed[mine])]
        found = [v for v in per_seed if np.isfinite(v)]
        note = "" if len(found) == len(per_seed) else \
            f"{len(per_seed) - len(found)} seed(s) do not cross 0.5 within D' = {D[mine].min()}..{D[mine].max()}"
        value = float(np.median(found)) if found else float("nan")
        out.append(Estimate("ungrokking", f"wd {w:g}", value, min(found, default=np.nan),
                            max(found, default=np.nan), int(mine.sum()), int(conv[mine].sum()), note, found))
    return out


def _norm_at(logit: np.ndarray, norm: np.ndarray, at: float) -> float:
    """Parameter norm at correct logit ``at`` from a least-squares line through (logit, norm)."""
    if len(logit) < 2 or np.ptp(logit) == 0:
        return float(np.mean(norm)) if len(norm) else float("nan")
    slope, intercept = np.polyfit(logit, norm, 1)
    return float(intercept + slope * at)


def _efficiency_crossing(logit, norm, D, mem, gen, at):
    gen_norm = _norm_at(logit[gen], norm[gen], at)
    sizes = np.unique(D[mem])
    mem_norm = np.array([_norm_at(logit[mem & (D == d)], norm[mem & (D == d)], at) for d in sizes])
    return gen_norm, sizes, mem_norm, _meeting_point(sizes, mem_norm, gen_norm)


def _meeting_point(sizes, mem_norm, gen_norm) -> tuple[float, bool]:
    """Where mem_norm(log D) meets gen_norm: interpolated, else extrapolated from the end pair."""
    x = np.log(sizes.astype(np.float64))
    for i in range(len(x) - 1):
        lo, hi = sorted((mem_norm[i], mem_norm[i + 1]))
        if lo <= gen_norm <= hi and mem_norm[i] != mem_norm[i + 1]:
            t = (gen_norm - mem_norm[i]) / (mem_norm[i + 1] - mem_norm[i])
            return float(np.exp(x[i] + t * (x[i + 1] - x[i]))), False
    if len(x) < 2:
        return float("nan"), True
    i = 0 if gen_norm < mem_norm.min() else len(x) - 2
    slope = (mem_norm[i + 1] - mem_norm[i]) / (x[i + 1] - x[i])
    if slope <= 0:
        return float("nan"), True
    return float(np.exp(x[i] + (gen_norm - mem_norm[i]) / slope)), True


def efficiency_runs(data):
    """(logit, norm, D, mem, gen, seed) of an efficiency file's runs at their end (Section 5.1)."""
    m = data.metrics
    if "gen_logit_train" not in m:
        raise ValueError("the efficiency analysis needs the circuit metrics, which exist for x+y only")
    logit = final_values(m["gen_logit_train"]) + final_values(m["mem_logit_train"])
    norm = final_values(m["param_norm"])
    mem = _runs(data, "random_labels").astype(bool) & (final_values(m["train_acc"]) >= 0.99)
    # C_gen-only: > 95% of the logit table's energy in the trigonometric subspace.
    gen = ~_runs(data, "random_labels").astype(bool) & (final_values(m["gen_energy_fraction"]) > 0.95)
    return logit, norm, _runs(data, "train_size"), mem, gen, _runs(data, "data_seed")


def dcrit_efficiency(data, n_boot: int = 400, rng_seed: int = 0) -> list[Estimate]:
    """(b): where the memorisation isologit norm meets the generalisation one."""
    logit, norm, D, mem, gen, seed = efficiency_runs(data)
    # What must have settled here is the parameter norm: within 5% of its final value.
    norms = data.metrics["param_norm"]
    conv = converged(data.steps, norms / final_values(norms)[:, None])
    if not mem.any() or not gen.any():
        return [Estimate("efficiency", "all", float("nan"), np.nan, np.nan, int(len(D)), int(conv.sum()),
                         f"needs memorising runs ({int(mem.sum())}) and > 95% trigonometric runs "
                         f"({int(gen.sum())})")]
    at = float(np.median(logit[gen]))
    gen_norm, sizes, mem_norm, (value, extrapolated) = _efficiency_crossing(logit, norm, D, mem, gen, at)
    rng = np.random.default_rng(rng_seed)
    seeds = np.unique(seed)
    boot = []
    for _ in range(n_boot):
        pick = rng.choice(seeds, size=len(seeds))
        index = np.concatenate([np.flatnonzero(seed == s) for s in pick])
        b = _efficiency_crossing(logit[index], norm[index], D[index], mem[index], gen[index], at)[3][0]
        if np.isfinite(b):
            boot.append(b)
    low, high = (np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan))
    used = mem | gen
    note = (f"isologit at correct logit {at:.1f}: generalisation norm {gen_norm:.2f}, memorisation "
            + ", ".join(f"{n:.2f} (D={d})" for d, n in zip(sizes, mem_norm))
            + ("; extrapolated beyond the sizes run" if extrapolated else ""))
    return [Estimate("efficiency", "all", value, float(low), float(high), int(used.sum()),
                     int(conv[used].sum()), note)]


def dcrit_sweep(data) -> list[Estimate]:
    """(c): where the seeds' median final test accuracy crosses 0.5 over D."""
    acc, conv = final_values(data.metrics["test_acc"]), converged(data.steps, data.metrics["test_acc"])
    D = _runs(data, "train_size")
    sizes = np.unique(D)
    median = np.array([np.median(acc[D == d]) for d in sizes])
    value = crossing(sizes, median)
    per_seed = [crossing(D[_runs(data, "data_seed") == s], acc[_runs(data, "data_seed") == s])
                for s in np.unique(_runs(data, "data_seed"))]
    found = [v for v in per_seed if np.isfinite(v)]
    all_converged = bool(conv.all())
    note = "at convergence" if all_converged else \
        f"an upper bound: {int((~conv).sum())} runs still moving at the end of training"
    return [Estimate("sweep", "all", value, min(found, default=np.nan), max(found, default=np.nan),
                     int(len(D)), int(conv.sum()), note, found)]


def dcrit(data) -> list[Estimate]:
    """The D_crit estimate(s) a run file supports, by its experiment."""
    experiment = data.header.experiment.split(".")[0]
    if experiment == "ungrok":
        return dcrit_ungrok(data)
    if experiment == "efficiency":
        return dcrit_efficiency(data)
    if experiment == "sweep":
        return dcrit_sweep(data)
    raise ValueError(f"experiment {experiment!r}: D_crit comes from ungrok, efficiency or sweep files")


__all__ = ["converged", "movement", "crossing", "final_values", "Estimate", "dcrit", "dcrit_ungrok",
           "dcrit_efficiency", "dcrit_sweep", "efficiency_runs", "CONVERGENCE_WINDOW", "CONVERGENCE_TOLERANCE"]
