"""A model's results never depend on its batch-mates or the thread count (README, "Reproducibility").

On the ``cpu`` backend this is bitwise, in every matmul precision:
parameters, both AdamW moments, the failed step and every stored measurement
of a model are the same bits when it trains alone, in the whole population
or in any sub-population, with one thread or two. On the ``torch`` backend BLAS blocks batched products by shape,
so the promise is bitwise for one population (same runs, same order, same
thread count) and, across populations, agreement within float32 rounding of
one step's gradients; both are tested here exactly as stated.
"""
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fastgrok.backends.cpu_engine import CpuBackend
from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.metrics import Evaluator
from fastgrok.tasks import Task

TASK = Task(TaskConfig("x+y", 11))
# d_mlp = 24 and d_vocab = 13 are not multiples of any vector width.
CFG = ModelConfig.for_task(TASK.cfg, d_model=16, n_heads=2, d_head=8, d_mlp=24)
STATE = ("flat_params", "exp_avg", "exp_avg_sq")

pytestmark = pytest.mark.skipif(not CpuBackend.available(torch.device("cpu"))[0],
                                reason="the C++ engine is not built (tests/test_cpu_engine.py says why)")


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(runs, steps, threads, backend="cpu", precision="fp32"):
    """(population after `steps` steps, its measurements) with `threads` threads."""
    with torch_threads(threads):
        pop = Population(TASK, CFG, runs, backend=backend, precision=precision)
        assert pop.backend == backend
        for _ in range(steps):
            pop.step()
        return pop, Evaluator(pop)(pop).values


def assert_model_identical(got, got_values, i, want, want_values, j, what):
    for name in STATE:
        a, b = getattr(got, name)[i], getattr(want, name)[j]
        diff = (a != b).nonzero().flatten()
        assert len(diff) == 0, f"{what}: model {j}, {name} differs at {len(diff)} coordinates, first {diff[0].item()}"
    assert got.failed_step[i] == want.failed_step[j], f"{what}: model {j}, failed step"
    for name, values in want_values.items():
        np.testing.assert_array_equal(got_values[name][i], values[j], err_msg=f"{what}: model {j}, {name}")


runs_strategy = st.lists(
    st.builds(RunSpec,
              train_size=st.sampled_from([1, 2, 7, 24, 25, 60, 121]),   # 1 example, one tile +- 1, all pairs
              data_seed=st.integers(0, 5), init_seed=st.integers(0, 5),
              lr=st.sampled_from([1e-3, 3e-3, 1e-2]), weight_decay=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
              random_labels=st.booleans()),
    min_size=1, max_size=8)


def check_cpu_batch_invariance(runs, subset_seed, precision="fp32"):
    steps = 4
    whole, whole_values = train(runs, steps, threads=1, precision=precision)
    for threads in (1, 2):
        other, values = train(runs, steps, threads=threads, precision=precision)
        for m in range(len(runs)):
            assert_model_identical(other, values, m, whole, whole_values, m, f"{precision}, whole, {threads} threads")
        subset = sorted(np.random.default_rng(subset_seed).choice(
            len(runs), size=np.random.default_rng(subset_seed + 1).integers(1, len(runs) + 1), replace=False))
        sub, sub_values = train([runs[m] for m in subset], steps, threads=threads, precision=precision)
        for i, m in enumerate(subset):
            assert_model_identical(sub, sub_values, i, whole, whole_values, m,
                                   f"{precision}, sub-population {subset}, {threads} threads")
    for m in range(len(runs)):
        alone, alone_values = train([runs[m]], steps, threads=2, precision=precision)
        assert_model_identical(alone, alone_values, 0, whole, whole_values, m, f"{precision}, alone, 2 threads")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=runs_strategy, subset_seed=st.integers(0, 2 ** 32 - 1))
def test_cpu_backend_is_bitwise_independent_of_batch_mates_and_threads(runs, subset_seed):
    check_cpu_batch_invariance(runs, subset_seed)


# The precision modes run the C++ engine's direct path (csrc/engine.cpp): the
# same promise, checked on fewer draws.
@pytest.mark.parametrize("precision", ["tf32", "bf16", "bf16x3"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=runs_strategy, subset_seed=st.integers(0, 2 ** 32 - 1))
def test_cpu_backend_is_bitwise_independent_of_batch_mates_and_threads_in_the_precision_modes(
        precision, runs, subset_seed):
    check_cpu_batch_invariance(runs, subset_seed, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16x3"])
def test_cpu_backend_a_single_model_is_the_same_with_one_to_four_threads(precision):
    """A population smaller than the thread count: the same bits on 1 to 4 threads."""
    runs = [RunSpec(train_size=121, init_seed=5, weight_decay=0.3)]
    pop1, values1 = train(runs, 10, threads=1, precision=precision)
    for threads in (2, 3, 4):
        pop, values = train(runs, 10, threads=threads, precision=precision)
        assert_model_identical(pop, values, 0, pop1, values1, 0, f"{precision}, {threads} threads")


def test_torch_backend_is_bitwise_for_one_population_and_close_across_populations():
    runs = [RunSpec(train_size=20 + 13 * m, data_seed=m, init_seed=m, lr=2e-3) for m in range(4)]
    a, a_values = train(runs, 5, threads=1, backend="torch")
    b, b_values = train(runs, 5, threads=1, backend="torch")
    for m in range(len(runs)):
        assert_model_identical(b, b_values, m, a, a_values, m, "same population")
    # Across populations: one step's gradients within float32 rounding (1e-5
    # of each model's gradient scale); longer trajectories are chaotic.
    with torch_threads(1):
        whole = Population(TASK, CFG, runs)
        whole.loss_and_grad()
        for m, run in enumerate(runs):
            alone = Population(TASK, CFG, [run])
            alone.loss_and_grad()
            scale = whole.flat_grads[m].abs().max().item()
            err = (alone.flat_grads[0] - whole.flat_grads[m]).abs().max().item()
            assert err <= 1e-5 * scale, f"model {m}: gradient alone vs in the population differs by {err:.3g} (scale {scale:.3g})"
