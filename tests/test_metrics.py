"""Measurements: the FFT circuit projection against a brute-force one, and the whole
Evaluator against the reference model, float64 formulas and the task's own splits."""
import math

import numpy as np
import pytest
import torch

from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.metrics import (CIRCUIT_METRICS, Evaluator, cross_entropy_float64, metric_names,
                              trig_components, trig_part_by_offset)
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.tasks import Task


def normalised_directions(p: int) -> np.ndarray:
    """(K, p, p, p) unit vectors cos(2 pi k (a + b - c) / p), k = 1..ceil((p-1)/2), built by hand."""
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    K = math.ceil((p - 1) / 2)
    dirs = np.stack([np.cos(2 * np.pi * k * (a + b - c) / p) for k in range(1, K + 1)])
    return dirs / np.linalg.norm(dirs.reshape(len(dirs), -1), axis=1)[:, None, None, None]


def brute_force_projection(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(components (M, K), trigonometric part (M, p, p, p)) by explicit dot products."""
    dirs = normalised_directions(table.shape[1])
    components = np.einsum("mabc,kabc->mk", table, dirs)
    return components, np.einsum("mk,kabc->mabc", components, dirs)


def trig_part_table(components: torch.Tensor, p: int) -> np.ndarray:
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    return trig_part_by_offset(components, p)[:, (a + b - c) % p]


@pytest.mark.parametrize("p", [7, 8, 11, 13])
def test_fft_projection_equals_brute_force(p):
    # p = 8 has the Nyquist direction cos(pi (a+b-c)), whose norm is twice the others'.
    table = np.random.default_rng(p).normal(size=(3, p, p, p))
    want_components, want_part = brute_force_projection(table)
    got = trig_components(table)
    np.testing.assert_allclose(got, want_components, rtol=0, atol=1e-12)
    np.testing.assert_allclose(trig_part_table(got, p), want_part, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [7, 11, 13])
def test_pure_trig_table_is_all_gen_and_random_table_almost_all_mem(p):
    rng = np.random.default_rng(100 + p)
    dirs = normalised_directions(p)
    weights = rng.normal(size=(2, len(dirs)))
    pure = np.einsum("mk,kabc->mabc", weights, dirs)
    components = trig_components(pure)
    np.testing.assert_allclose(components, weights, atol=1e-12)
    residual = pure - trig_part_table(components, p)
    assert np.abs(residual).max() < 1e-12, "a table made of trig directions has a C_mem part"

    noise = rng.normal(size=(2, p, p, p))
    trig = trig_part_table(trig_components(noise), p)
    share = (trig ** 2).sum((1, 2, 3)) / (noise ** 2).sum((1, 2, 3))
    # K of p^3 orthogonal directions: a random table puts ~K/p^3 of its energy there.
    assert (share < 10 * len(dirs) / p ** 3).all(), f"trig share of random tables {share}"


def tiny_population(task_cfg, runs, steps=0, backend="torch"):
    task = Task(task_cfg)
    cfg = ModelConfig.for_task(task_cfg, d_model=12, n_heads=2, d_head=6, d_mlp=24)
    pop = Population(task, cfg, runs, backend=backend)
    assert pop.backend == backend
    for _ in range(steps):
        pop.step()
    return task, cfg, pop


def expected_measurements(task, cfg, pop, m):
    """Model m's measurements from the oracle, in float64, with nothing from fastgrok.metrics."""
    run = pop.runs[m]
    split = task.split(run.data_seed, run.train_size, run.random_labels)
    net = Transformer(cfg)
    net.load_state_dict(pop.model_params(m))
    with torch.no_grad():
        logits = net(torch.as_tensor(task.tokens))[:, -1].double()        # (n_pairs, V)
    out = {}
    for part, idx, labels in (("train", split.train_idx, split.train_labels),
                              ("test", split.test_idx, split.test_labels)):
        if len(idx) == 0:
            out[f"{part}_loss"] = out[f"{part}_acc"] = np.nan
            continue
        z, y = logits[idx], torch.as_tensor(labels)
        out[f"{part}_loss"] = torch.nn.functional.cross_entropy(z, y).item()
        out[f"{part}_acc"] = (z.argmax(-1) == y).double().mean().item()
    norms = {k: torch.linalg.vector_norm(v.double()).item() for k, v in net.state_dict().items()}
    out |= {f"param_norm_{k}": norms[k] for k in PARAM_NAMES}
    out["param_norm"] = float(np.sqrt(sum(v ** 2 for v in norms.values())))
    if task.cfg.op == "x+y":
        p = task.cfg.p
        table = logits[:, :p].numpy().reshape(1, p, p, p)
        components, trig = brute_force_projection(table)
        mem = table - trig
        for part, idx, labels in (("train", split.train_idx, split.train_labels),
                                  ("test", split.test_idx, split.test_labels)):
            if len(idx) == 0:
                out[f"gen_logit_{part}"] = out[f"mem_logit_{part}"] = np.nan
                out[f"gen_mem_ratio_{part}"] = np.nan
                continue
            a, b = task.x[idx], task.y[idx]
            out[f"gen_logit_{part}"] = trig[0, a, b, labels].mean()
            out[f"mem_logit_{part}"] = mem[0, a, b, labels].mean()
            out[f"gen_mem_ratio_{part}"] = out[f"gen_logit_{part}"] / out[f"mem_logit_{part}"]
        out["gen_energy_fraction"] = (trig ** 2).sum() / (table ** 2).sum()
    return out


def assert_matches_oracle(task, cfg, pop, evaluation):
    for m in range(pop.M):
        want = expected_measurements(task, cfg, pop, m)
        assert set(want) == set(evaluation.values), sorted(set(want) ^ set(evaluation.values))
        for name, value in want.items():
            got = evaluation.values[name][m]
            if np.isnan(value):
                assert np.isnan(got), f"model {m} {name}: {got}, want NaN (no test pairs)"
            else:
                # Engine logits differ from the oracle's in float32 rounding only.
                assert got == pytest.approx(value, rel=2e-4, abs=2e-5), f"model {m} {name}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_evaluator_matches_oracle_on_addition_with_random_labels_and_full_training_set(backend):
    task_cfg = TaskConfig("x+y", 11)
    runs = [RunSpec(train_size=40, data_seed=1, init_seed=2),
            RunSpec(train_size=90, data_seed=3, init_seed=4, random_labels=True),
            RunSpec(train_size=121, data_seed=5, init_seed=6)]                  # no test pairs
    task, cfg, pop = tiny_population(task_cfg, runs, steps=30, backend=backend)
    evaluation = Evaluator(pop)(pop)
    assert evaluation.step == 30
    assert_matches_oracle(task, cfg, pop, evaluation)


def test_evaluator_without_circuits_on_other_tasks():
    task_cfg = TaskConfig("x/y", 7)
    task, cfg, pop = tiny_population(task_cfg, [RunSpec(train_size=20, data_seed=1, init_seed=1)], 5)
    evaluation = Evaluator(pop)(pop)
    assert not set(CIRCUIT_METRICS) & set(evaluation.values)
    assert tuple(evaluation.values) == metric_names("x/y")
    assert_matches_oracle(task, cfg, pop, evaluation)


@pytest.mark.parametrize("margin", [20.0, 60.0])
def test_float64_cross_entropy_keeps_tiny_losses(margin):
    """The evaluator's loss against a hand formula: correct logit ahead by margin of V - 1
    equal others gives log1p((V - 1) e^-margin), down to 1e-24 relative."""
    V = 9
    logits = np.zeros((2, V), dtype=np.float32)
    logits[0, 3] = margin                               # label 3 is the argmax
    logits[1, 3] = -margin                              # label 3 is far behind
    got = cross_entropy_float64(logits, np.array([3, 3]))
    want_small = math.log1p((V - 1) * math.exp(-margin))
    want_large = math.log((V - 1) + math.exp(-margin)) + margin
    assert got[0] == pytest.approx(want_small, rel=1e-12)
    assert got[1] == pytest.approx(want_large, rel=1e-12)


def test_circuits_beyond_the_memory_budget_are_skipped_with_a_warning():
    # The C++ engine's logits of a pair do not depend on the block it comes in.
    _, _, pop = tiny_population(TaskConfig("x+y", 7), [RunSpec(train_size=20)], steps=1, backend="cpu")
    with pytest.warns(UserWarning, match="circuit analysis needs"):
        evaluator = Evaluator(pop, memory_budget=3 * 7 ** 3 * 8)
    values = evaluator(pop).values
    assert all(np.isnan(values[name]).all() for name in CIRCUIT_METRICS)
    whole = Evaluator(pop)(pop).values
    for name in set(whole) - set(CIRCUIT_METRICS):   # pairs now come in many small blocks
        np.testing.assert_array_equal(values[name], whole[name], err_msg=name)
