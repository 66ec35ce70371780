"""The two-circuit toy model (paper Appendix C) against hand-derived values,
finite differences and the behaviour Figure 2 shows."""
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastgrok.toy import (DEFAULT_STEPS, TABLE_1, ToyColumn, initial_subweights, run_toy, simulate,
                          summarize, toy_losses, toy_train_grad)

Q = 113
LOG_Q = math.log(Q)
COLUMNS = [TABLE_1[name] for name in "abc"]


@pytest.fixture(scope="module")
def figure2():
    return run_toy()


def paper_losses(w_gen, w_mem, col: ToyColumn):
    """Appendix C's equations written literally, with alpha in front of L_wd."""
    wd = col.alpha * ((abs(w_gen) ** (1 / col.kappa) * col.P_gen) ** 2
                      + (abs(w_mem) ** (1 / col.kappa) * col.P_mem) ** 2)
    train = -math.log(math.exp(w_gen + w_mem) / ((col.q - 1) + math.exp(w_gen + w_mem))) + wd
    test = -math.log(math.exp(w_gen) / ((col.q - 2) + math.exp(w_gen) + math.exp(w_mem))) + wd
    return train, test


def test_loss_at_initialisation_is_log_q():
    # w_G1 = w_M1 = 0: all logits are 0, so both losses are log q and L_wd = 0.
    losses = toy_losses(initial_subweights(COLUMNS), COLUMNS)
    for key in ("train_loss", "test_loss", "train_xent", "test_xent"):
        np.testing.assert_allclose(losses[key], LOG_Q, rtol=0, atol=1e-14, err_msg=key)
    np.testing.assert_array_equal(losses["weight_decay_loss"], 0.0)


@pytest.mark.parametrize("w_gen_sub, w_mem_sub", [((1.0, 1.5), (-0.5, 2.0)), ((0.3, -4.0), (2.0, 1.25)),
                                                   ((0.0, 0.005), (2.0, 3.0))])
@pytest.mark.parametrize("column", "abc")
def test_losses_match_the_paper_equations(w_gen_sub, w_mem_sub, column):
    col = TABLE_1[column]
    sub = np.array([[w_gen_sub, w_mem_sub]])
    losses = toy_losses(sub, [col])
    w_gen, w_mem = w_gen_sub[0] * w_gen_sub[1], w_mem_sub[0] * w_mem_sub[1]
    train, test = paper_losses(w_gen, w_mem, col)
    assert losses["train_loss"][0] == pytest.approx(train, rel=1e-13)
    assert losses["test_loss"][0] == pytest.approx(test, rel=1e-13)
    assert losses["norm_gen"][0] == pytest.approx(abs(w_gen) ** (1 / col.kappa) * col.P_gen, rel=1e-13)
    assert losses["norm_mem"][0] == pytest.approx(abs(w_mem) ** (1 / col.kappa) * col.P_mem, rel=1e-13)


def test_first_step_by_hand():
    # At step 0, w = 0 so dL/dw = -(q-1)/q (softmax mass off the label; L_wd has zero slope
    # at w = 0 for kappa < 2): w_c1 moves by lr (q-1)/q w_c2, and w_c2 (gradient
    # dL/dw * w_c1 = 0) stays.
    after = simulate(COLUMNS, 1)
    for col, result in zip(COLUMNS, after):
        expected = np.array([[col.lr * (Q - 1) / Q * col.w_gen2, col.w_gen2],
                             [col.lr * (Q - 1) / Q * col.w_mem2, col.w_mem2]])
        np.testing.assert_allclose(result["subweights"][1], expected, rtol=1e-14, atol=0)


def _finite_difference_grad(sub: np.ndarray, col: ToyColumn, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(sub)
    for index in np.ndindex(sub.shape):
        plus, minus = sub.copy(), sub.copy()
        plus[index] += h
        minus[index] -= h
        grad[index] = (toy_losses(plus[None], [col])["train_loss"][0]
                       - toy_losses(minus[None], [col])["train_loss"][0]) / (2 * h)
    return grad


subweight = st.floats(-3.0, 3.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(subweight, min_size=4, max_size=4), kappa=st.sampled_from([0.7, 1.2, 2.0, 2.5]),
       alpha=st.sampled_from([0.005, 0.5]))
def test_gradient_matches_float64_finite_differences(values, kappa, alpha):
    sub = np.array(values, dtype=np.float64).reshape(2, 2)
    # |w|^(2/kappa) is not smooth at w = 0: a kink (or infinite slope) for kappa >= 2,
    # an unbounded second derivative for kappa < 2. A central difference of step
    # 1e-6 that straddles w = 0 measures neither side, so a weight is either exactly
    # zero (symmetric, so the difference is exact for kappa < 2) or well away from it.
    w = np.abs(sub[:, 0] * sub[:, 1])
    assume(np.all(w > 1e-2) or (kappa < 2 and np.all((w == 0) | (w > 1e-2))))
    col = replace(TABLE_1["a"], kappa=kappa, alpha=alpha)
    analytic = toy_train_grad(sub[None], [col])[0]
    numeric = _finite_difference_grad(sub, col)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7,
                               err_msg=f"subweights {sub.tolist()}, kappa {kappa}, alpha {alpha}")


def test_gradient_at_zero_weight_with_kappa_above_two_is_the_zero_subgradient():
    # kappa = 2.5: d|w|^0.8/dw is infinite at w = 0; the weight-decay part contributes 0 there,
    # leaving the cross-entropy slope -(q-1)/q times the other subweight.
    col = replace(TABLE_1["c"], kappa=2.5)
    sub = np.array([[[0.0, 1.0], [0.0, 2.0]]])
    grad = toy_train_grad(sub, [col])[0]
    np.testing.assert_allclose(grad, [[-(Q - 1) / Q * 1.0, 0.0], [-(Q - 1) / Q * 2.0, 0.0]], rtol=1e-14)


def test_result_layout(figure2):
    assert list(figure2) == ["a", "b", "c"]
    for column in figure2.values():
        for key in ("step", "train_loss", "test_loss", "train_xent", "test_xent", "weight_decay_loss",
                    "w_gen", "w_mem", "norm_gen", "norm_mem", "norm_total"):
            assert column[key].shape == (DEFAULT_STEPS + 1,), key
            assert np.all(np.isfinite(column[key])), key
        assert column["subweights"].shape == (DEFAULT_STEPS + 1, 2, 2)
        np.testing.assert_array_equal(column["step"], np.arange(DEFAULT_STEPS + 1))


def test_fall_steps_are_the_first_steps_below_half_the_initial_loss(figure2):
    summary = summarize(figure2)
    for name, column in figure2.items():
        for key in ("train", "test"):
            loss = column[f"{key}_loss"]
            below = [t for t, value in enumerate(loss) if value < LOG_Q / 2]
            assert summary[name][f"{key}_fall_step"] == (below[0] if below else -1), (name, key)


# Thresholds for Figure 2. A loss has "fallen" when it is below log(q)/2 (half its initial value).
# * Train: log(1 + (q-1) e^{-s}) < log(q)/2 needs s = w_G + w_M > ln((q-1)/(sqrt(q)-1)) = 2.454.
#   Early on dL/dw ~ -1 and a circuit with subweights (0, c) grows as w ~ c^2 sinh(2 lr t) / 2,
#   so C_mem (c = 1) gets there at ~115 steps (discrete steps and the shrinking gradient only
#   slow this down a little); we allow 250.
# * Test: log((q-2) e^{-w_G} + 1 + e^{w_M - w_G}) < log(q)/2 needs w_G > ln((q-2)/(sqrt(q)-1)) = 2.445.
#   |dL/dw| <= 1 and weight decay only shrinks positive weights, so w_G1 + w_G2 grows at most by
#   (1 + lr) per step and w_G <= (w_G1 + w_G2)^2 / 4 <= c^2 (1 + lr)^(2t) / 4: with c = 0.005 the
#   test loss cannot fall before t = ln(4 * 2.445 / c^2) / (2 ln(1 + lr)) = 648 steps. Once C_mem
#   has fitted the train set the gradient is far smaller, hence also the factor 10 below.
# * Column (c): equal subweights keep w_G = w_M = w early; the train loss falls at w = 1.23, the
#   test loss at w > ln((q-2)/(sqrt(q)-2)) = 2.55: ~81 vs ~117 steps by the sinh law, a ratio of
#   ~1.4; we allow 2.

def test_column_a_groks(figure2):
    col, s = figure2["a"], summarize(figure2)["a"]
    assert 0 < s["train_fall_step"] <= 250
    assert s["test_fall_step"] >= max(648, 10 * s["train_fall_step"]), s
    # Memorisation first makes the test loss worse (C_mem's wrong label gains logit).
    assert s["peak_test_loss"] > LOG_Q + 1
    # Generalised by the end: the correct test label has probability > 0.8.
    assert col["test_xent"][-1] < math.log(1 / 0.8)


def test_column_b_test_loss_never_falls(figure2):
    s = summarize(figure2)["b"]
    assert 0 < s["train_fall_step"] <= 250
    assert s["test_fall_step"] == -1
    assert figure2["b"]["test_loss"].min() >= LOG_Q - 1e-12
    # C_mem keeps w_M = 8 w_G (Theorem D.4): its wrong label outscores the right one on test inputs.
    assert s["final_test_loss"] > LOG_Q + 1


def test_column_c_test_loss_falls_with_train_loss(figure2):
    s = summarize(figure2)["c"]
    assert 0 < s["train_fall_step"] <= 250
    assert 0 < s["test_fall_step"] <= 2 * s["train_fall_step"], s
    # d(test loss)/dw at w_G = w_M = 0 is 2/q - 1 < 0: it falls from the first step.
    assert s["peak_test_loss"] == pytest.approx(LOG_Q, abs=1e-12)
    assert figure2["c"]["test_loss"][1] < LOG_Q


def test_converges_to_theorem_d4_weight_ratio():
    # At a stationary point both circuits share the cross-entropy slope, so
    # P_G^2 |w_G|^(2/kappa - 1) = P_M^2 |w_M|^(2/kappa - 1): w_G / w_M = (P_M / P_G)^(2 kappa / (2 - kappa)),
    # i.e. (P_M / P_G)^3 for kappa = 1.2: 8 in (a) and (c), 1/8 in (b).
    results = simulate(COLUMNS, 30_000)
    for col, result in zip(COLUMNS, results):
        expected = (col.P_mem / col.P_gen) ** (2 * col.kappa / (2 - col.kappa))
        assert result["w_gen"][-1] / result["w_mem"][-1] == pytest.approx(expected, rel=1e-3), col.title


@pytest.mark.parametrize("field, value", [("q", 2), ("kappa", 0.0), ("P_gen", -1.0), ("lr", float("nan")),
                                          ("alpha", -0.1), ("w_gen2", float("inf"))])
def test_invalid_column_is_rejected_with_its_value(field, value):
    with pytest.raises(ValueError, match=field):
        replace(TABLE_1["a"], **{field: value})


@pytest.mark.parametrize("steps", [0, -5, 2.5])
def test_invalid_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        simulate(COLUMNS, steps)


def test_divergence_is_reported():
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+ in column\(s\) \[0\]"):
        simulate([replace(TABLE_1["c"], lr=1e3)], 200)
