"""Does matmul precision change grokking? The statistics of runs that differ only in precision.

The same seeds of one grokking configuration are trained once per precision
(``fastgrok.precision``), and optionally an ungrokking configuration too.
Float32 runs of these models are chaotic (two float32 orders of summation
drift apart within hundreds of steps), so precisions are compared as
distributions over seeds, never trajectory by trajectory:

* per seed: the memorisation step (first evaluation with train accuracy >=
  0.99), the grokking step (first with test accuracy >= 0.95; a seed that
  never groks counts as later than every seed that did), the final test
  accuracy; per ungrokking file the D' where final test accuracy crosses 0.5
  (``fastgrok.analysis.dcrit_ungrok``);
* per precision against fp32: the shift of the median in units of fp32's own
  seed-to-seed spread (its interquartile range), and a two-sided
  permutation test of the rank-sum (Mann-Whitney) statistic, exact in
  distribution up to its Monte Carlo error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MEMORISED = 0.99
GROKKED = 0.95
N_PERMUTATIONS = 20_000


def first_step(steps: np.ndarray, values: np.ndarray, level: float) -> np.ndarray:
    """(M,) the first evaluation step with value >= level; inf where none."""
    out = np.full(values.shape[0], np.inf)
    for m, row in enumerate(values):
        hit = np.flatnonzero(np.nan_to_num(row, nan=-np.inf) >= level)
        if hit.size:
            out[m] = steps[hit[0]]
    return out


def study_statistics(grok_data, ungrok_data=None) -> dict[str, np.ndarray]:
    """The per-seed statistics of one precision: its grok file's, and its ungrokking threshold."""
    from fastgrok.analysis import dcrit_ungrok

    stats = grokking_statistics(grok_data)
    if ungrok_data is not None:
        for estimate in dcrit_ungrok(ungrok_data):
            # A seed that never crosses within the sizes run has no threshold: NaN, not inf.
            values = np.array(estimate.samples, dtype=np.float64)
            stats[f"ungrokking D' ({estimate.group})"] = values
    return stats


def grokking_statistics(data) -> dict[str, np.ndarray]:
    """Per seed of a grok file: memorisation step, grokking step, final test accuracy."""
    from fastgrok.analysis import final_values

    m = data.metrics
    return {"memorisation step": first_step(data.steps, m["train_acc"], MEMORISED),
            "grokking step": first_step(data.steps, m["test_acc"], GROKKED),
            "final test accuracy": final_values(m["test_acc"])}


def rank_sum_test(a: np.ndarray, b: np.ndarray, n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided permutation p-value of the Mann-Whitney rank-sum of ``a`` against ``b``.

    Ranks with ties averaged, so infinities (never reached) are one tied group
    beyond every finite value.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = np.concatenate([a, b])
    ranks = _average_ranks(pooled)
    expected = len(a) * (len(pooled) + 1) / 2
    observed = abs(ranks[:len(a)].sum() - expected)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, len(pooled))), axis=1)[:, :len(a)]
    stats = np.abs(ranks[perms].sum(axis=1) - expected)
    return float((1 + np.count_nonzero(stats >= observed - 1e-9)) / (1 + n_permutations))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _known(x: np.ndarray) -> np.ndarray:
    """Drop NaN (no value: e.g. a seed whose accuracy never crosses 0.5 within the sizes run)."""
    return x[~np.isnan(x)]


def _median(x: np.ndarray) -> float:
    """Median with inf counted as beyond every finite value (inf if more than half never got there)."""
    return float(np.median(x))


def _spread(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    if len(finite) < 4:
        return float("nan")
    q1, q3 = np.percentile(finite, [25, 75])
    return float(q3 - q1)


@dataclass
class Comparison:
    statistic: str
    precision: str
    n: int
    median: float
    reached: int                # seeds with a finite value
    shift_in_fp32_iqr: float    # (median - fp32 median) / fp32 IQR; 0 for fp32 itself
    p_value: float              # rank-sum permutation test against fp32; 1 for fp32 itself


def compare(by_precision: dict[str, dict[str, np.ndarray]], reference: str = "fp32") -> list[Comparison]:
    """Every statistic of every precision against the reference precision's seeds."""
    if reference not in by_precision:
        raise ValueError(f"the study needs a {reference} run to compare against; got {sorted(by_precision)}")
    out = []
    base = by_precision[reference]
    for statistic in base:
        ref = _known(base[statistic])
        spread = _spread(ref)
        for precision, stats in by_precision.items():
            x = _known(stats[statistic])
            delta = _median(x) - _median(ref)
            # No spread among the fp32 seeds (e.g. every seed memorised by the same
            # evaluation): equal medians are no shift, unequal ones an unbounded one.
            if math.isnan(spread):          # fewer than 4 fp32 seeds with a value: no spread to measure by
                shift = math.nan
            else:
                shift = delta / spread if spread > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
            p = 1.0 if precision == reference else rank_sum_test(x, ref)
            out.append(Comparison(statistic, precision, len(x), _median(x), int(np.isfinite(x).sum()),
                                  0.0 if precision == reference else shift, p))
    return out


def format_table(rows: list[Comparison]) -> list[str]:
    lines = [f"{'statistic':<22} {'precision':<9} {'seeds':>5} {'reached':>7} {'median':>9} "
             f"{'shift/IQR':>9} {'p (vs fp32)':>11}"]
    for r in rows:
        lines.append(f"{r.statistic:<22} {r.precision:<9} {r.n:>5} {r.reached:>7} {r.median:>9.4g} "
                     f"{r.shift_in_fp32_iqr:>9.2f} {r.p_value:>11.3f}")
    return lines


__all__ = ["grokking_statistics", "first_step", "rank_sum_test", "compare", "Comparison", "format_table",
           "study_statistics"]
