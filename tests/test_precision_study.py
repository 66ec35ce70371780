"""The precision study's statistics against hand-derived and exhaustively enumerated values."""
import itertools
import math

import numpy as np
import pytest

from fastgrok.precision_study import compare, first_step, rank_sum_test


def exact_rank_sum_p(a, b):
    """Two-sided p by enumerating every split of the pooled ranks (ties averaged)."""
    pooled = np.concatenate([a, b])
    ranks = np.array([np.mean([j + 1 for j, w in enumerate(sorted(pooled)) if w == v]) for v in pooled])
    expected = len(a) * (len(pooled) + 1) / 2
    observed = abs(ranks[:len(a)].sum() - expected)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    extreme = sum(abs(ranks[list(s)].sum() - expected) >= observed - 1e-9 for s in splits)
    return extreme / len(splits)


@pytest.mark.parametrize("a, b", [([1, 2, 3, 4], [5, 6, 7, 8]), ([1, 5, 2, 8], [3, 4, 6, 7]),
                                  ([1, 2, math.inf, math.inf], [3, math.inf, 4, 5]), ([2, 2, 3, 1], [2, 3, 3, 9])])
def test_rank_sum_permutation_p_matches_the_exhaustive_one(a, b):
    a, b = np.array(a, dtype=float), np.array(b, dtype=float)
    want = exact_rank_sum_p(a, b)
    got = rank_sum_test(a, b, n_permutations=40_000)
    assert got == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / 40_000) + 1e-4)


def test_separated_samples_are_significant_and_identical_ones_are_not():
    a, b = np.arange(16.0), np.arange(16.0) + 100
    assert rank_sum_test(a, b) <= 1e-4
    assert rank_sum_test(a, a.copy()) == 1.0


def test_first_step_and_never_reached():
    steps = np.array([0, 10, 20, 30])
    values = np.array([[0.1, 0.96, 0.5, 0.99], [0.1, 0.2, np.nan, 0.3]])
    assert first_step(steps, values, 0.95).tolist() == [10, math.inf]


def test_compare_reports_the_shift_in_units_of_the_fp32_spread():
    fp32 = {"grokking step": np.array([100.0, 200, 300, 400, 500])}          # IQR 200, median 300
    bf16 = {"grokking step": np.array([500.0, 600, 700, 800, 900])}          # median 700
    rows = {r.precision: r for r in compare({"fp32": fp32, "bf16": bf16})}
    assert rows["bf16"].shift_in_fp32_iqr == pytest.approx(2.0) and rows["fp32"].p_value == 1.0
    assert rows["bf16"].p_value == pytest.approx(exact_rank_sum_p(bf16["grokking step"], fp32["grokking step"]),
                                                 abs=0.01)
