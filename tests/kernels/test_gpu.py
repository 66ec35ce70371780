"""The triton backend on a CUDA GPU, every precision (skipped without one; bench/gpu_check.sh runs it).

What the interpreter cannot show: the compiled kernels, their tensor-core
products and fast exp/division, against the torch backend at the same
precision on the same GPU; a NaN weight freezing only its model; two runs
bitwise equal and a model alone bitwise equal to the same model among others
(no floating-point atomics). Paper-sized tiles on a small config, a few steps.
"""
import numpy as np
import pytest
import torch

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.tasks import Task
from population_checks import assert_repeatable_and_alone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TASK = Task(TaskConfig(p=23))
CFG = ModelConfig(d_vocab=TASK.cfg.d_vocab, d_model=48, n_heads=4, d_head=12, d_mlp=160)
OPTIM = OptimConfig(warmup_steps=2)
RUNS = [RunSpec(train_size=d, data_seed=m, init_seed=m, lr=1e-3 * (m + 1), weight_decay=0.5 * m)
        for m, d in enumerate((1, 130, 300, 529))]
# The interpreter's bound (tests/kernels/test_triton_engine.py) times 5: on the GPU
# the products also accumulate in the tensor cores' order.
RTOL = 1e-4
PRECISIONS = ["fp32", "tf32", "bf16", "bf16x3"]


def triton_population(runs, precision, **options):
    from fastgrok.backends.triton_engine import TritonBackend

    return Population(TASK, CFG, runs, OPTIM, device="cuda", backend=TritonBackend(**options), precision=precision)


def torch_population(runs, precision):
    torch.backends.cuda.matmul.allow_tf32 = False
    return Population(TASK, CFG, runs, OPTIM, device="cuda", backend="torch", precision=precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_matches_the_torch_backend_at_the_same_precision(precision):
    fused, batched = triton_population(RUNS, precision), torch_population(RUNS, precision)
    for step in range(1, 4):
        loss_fused, loss_batched = fused.step(), batched.step()
        torch.testing.assert_close(loss_fused, loss_batched, rtol=RTOL, atol=0, msg=lambda m: f"step {step}: {m}")
        err = ((fused.flat_grads - batched.flat_grads).abs().amax(1) / batched.flat_grads.abs().amax(1)).max()
        assert err.item() < RTOL, f"{precision}, step {step}: gradients differ by {err.item():.3g} of their scale"
    assert fused.backend == "triton"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bitwise_repeatable_and_batch_invariant(precision):
    assert_repeatable_and_alone(triton_population(RUNS, precision), triton_population(RUNS, precision),
                                triton_population(RUNS[2:3], precision, programs=7), 2, 3, f"{precision} ")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_nan_weight_freezes_only_its_model(precision):
    pops = [triton_population(RUNS, precision), triton_population(RUNS, precision)]
    with torch.no_grad():
        pops[1].params["b_in"][1, 5] = float("nan")
    losses = [pop.step() for pop in pops]
    assert torch.isnan(losses[1][1]) and np.array_equal(pops[1].failed_step, [-1, 1, -1, -1])
    for m in (0, 2, 3):
        assert torch.equal(pops[0].flat_params[m], pops[1].flat_params[m]), f"model {m} changed"
