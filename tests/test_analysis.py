"""Convergence and the three D_crit estimates on histories whose answers are known by hand."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fastgrok.analysis import converged, crossing, dcrit_efficiency, dcrit_sweep, dcrit_ungrok, movement
from fastgrok.config import RunSpec

STEPS = np.arange(0, 3001, 100)       # evaluation points 0..3000; the last third starts at 2000


def curve(fn):
    return np.array([fn(s) for s in STEPS], dtype=np.float64)


def test_a_flat_tail_has_converged_and_a_climb_has_not():
    flat = curve(lambda s: min(s / 1000, 1.0) * 0.6)             # reaches 0.6 at 1000, then holds
    climbing = curve(lambda s: 0.2 + 0.6 * s / 3000)             # +0.2 over the last third
    # Within the tolerance at the window's edge (0.04 below the end at step 2000).
    slow = curve(lambda s: 0.5 + 0.04 * (s - 2000) / 1000 if s >= 2000 else 0.5)
    assert converged(STEPS, np.stack([flat, climbing, slow])).tolist() == [True, False, True]
    assert movement(STEPS, np.stack([climbing]))[0] == pytest.approx(0.2, abs=1e-12)


def test_a_late_drop_is_caught_and_nan_tails_use_the_last_evaluation():
    drop = curve(lambda s: 0.9 if s < 2900 else 0.8)
    frozen = curve(lambda s: 0.5)
    frozen[STEPS > 1500] = np.nan                 # a model frozen at 1500: its window is 1000..1500
    assert converged(STEPS, np.stack([drop, frozen])).tolist() == [False, True]


def test_too_few_evaluations_in_the_window_is_not_convergence():
    steps = np.array([0, 10, 3000])
    assert not converged(steps, np.array([[0.5, 0.5, 0.5]]))[0]


def test_crossing_is_log_linear_between_neighbours():
    assert crossing(np.array([100, 200, 400]), np.array([0.2, 0.8, 1.0])) == pytest.approx(100 * math.sqrt(2))
    assert math.isnan(crossing(np.array([100, 200]), np.array([0.6, 0.9])))    # all above
    assert crossing(np.array([400, 100, 200]), np.array([1.0, 0.0, 0.5])) == pytest.approx(200)


def fake_file(experiment, runs, metrics):
    return SimpleNamespace(header=SimpleNamespace(experiment=experiment, runs=runs), steps=STEPS,
                           metrics={k: np.asarray(v, dtype=np.float64) for k, v in metrics.items()})


def flat_history(values):
    return np.repeat(np.asarray(values, dtype=np.float64)[:, None], len(STEPS), axis=1)


def test_ungrokking_estimate_per_weight_decay_with_the_seeds_range():
    runs, acc = [], []
    # Seed s crosses 0.5 exactly at D' = 200 * (1 + s / 10): acc = 0.5 + log(D' / c_s).
    for wd in (1.0, 3.0):
        for s in range(3):
            c = 200 * (1 + s / 10)
            for D in (100, 150, 200, 300, 450):
                runs.append(RunSpec(D, data_seed=s, init_seed=s, lr=1e-3, weight_decay=wd))
                acc.append(float(np.clip(0.5 + math.log(D / c), 0, 1)))
    est = dcrit_ungrok(fake_file("ungrok", runs, {"test_acc": flat_history(acc)}))
    assert [e.group for e in est] == ["wd 1", "wd 3"]
    for e in est:
        assert e.value == pytest.approx(220) and e.low == pytest.approx(200) and e.high == pytest.approx(240)
        assert e.n_runs == 15 and e.n_converged == 15


def test_efficiency_estimate_where_the_memorisation_norm_meets_the_generalisation_norm():
    """Memorisation norm 10 + 5 ln(D / 100) + 0.1 (logit - 40); generalisation 20 + 0.1 (logit - 40):
    at the generalising runs' median logit 40 they meet at D = 100 e^2 = 738.9."""
    runs, metrics = [], {k: [] for k in ("gen_logit_train", "mem_logit_train", "param_norm", "train_acc",
                                         "gen_energy_fraction", "test_acc")}
    rng = np.random.default_rng(0)

    def add(D, seed, mem, logit, norm):
        runs.append(RunSpec(D, data_seed=seed, init_seed=seed, lr=1e-3, weight_decay=1.0, random_labels=mem))
        for k, v in (("gen_logit_train", 0.0 if mem else logit), ("mem_logit_train", logit if mem else 0.0),
                     ("param_norm", norm), ("train_acc", 1.0), ("gen_energy_fraction", 0.1 if mem else 0.99),
                     ("test_acc", 0.0 if mem else 1.0)):
            metrics[k].append(v)

    for seed in range(3):
        for D in (100, 200, 400):
            for logit in rng.uniform(30, 50, 3):
                add(D, seed, True, logit, 10 + 5 * math.log(D / 100) + 0.1 * (logit - 40))
        for D in (1100, 1400):
            for logit in (38.0, 40.0, 42.0):
                add(D, seed, False, logit, 20 + 0.1 * (logit - 40))
    (est,) = dcrit_efficiency(fake_file("efficiency", runs, {k: flat_history(v) for k, v in metrics.items()}))
    assert est.value == pytest.approx(100 * math.e ** 2, rel=1e-9)
    assert "extrapolated" in est.note               # 739 lies beyond the largest memorisation D, 400
    assert est.low == pytest.approx(est.value, rel=1e-6) and est.high == pytest.approx(est.value, rel=1e-6)


def test_sweep_estimate_is_an_upper_bound_unless_its_runs_converged():
    runs, histories = [], []
    for s in range(2):
        for D, final in ((600, 0.3), (800, 0.6), (1000, 0.9)):
            runs.append(RunSpec(D, data_seed=s, init_seed=s, lr=1e-3, weight_decay=1.0))
            histories.append(curve(lambda step: final * step / 3000))      # still climbing
    (est,) = dcrit_sweep(fake_file("sweep", runs, {"test_acc": np.stack(histories)}))
    assert est.value == pytest.approx(math.exp(math.log(600) + (2 / 3) * math.log(800 / 600)))
    assert est.n_converged == 0 and "upper bound" in est.note


def test_figures_say_at_convergence_only_when_every_run_converged():
    from fastgrok.experiments import when_measured

    flat, climbing = curve(lambda s: 0.5), curve(lambda s: s / 3000)
    assert when_measured(fake_file("ungrok", [], {"test_acc": np.stack([flat, flat])})) == "at convergence"
    assert when_measured(fake_file("ungrok", [], {"test_acc": np.stack([flat, climbing])})) == \
        "at the end of training (1/2 runs converged)"
