"""Every backend against the oracle: one module, parametrised over torch, cpu and triton.

What a backend must do (fastgrok.backends.Backend), checked the same way for
each: float64 training equal to the float64 reference trainer to rounding
(torch and cpu; Triton has no float64), float32 training within a small
multiple of the float32 oracle's own error, ragged training sets down to one
example, per-model lr and weight decay, warm-up, random labels, a NaN model
frozen while the others carry on bit for bit, logits equal to the reference
model's, a model's results alone and among others (bitwise where the backend
promises it), and resume from a saved state bit for bit.

The triton backend runs in the Triton interpreter (TRITON_INTERPRET=1, in a
child process: tests/conftest.py) with small tiles, for a few steps only.
Backend-specific checks stay in tests/test_torch_engine.py,
tests/test_cpu_engine.py and tests/kernels/.
"""
import numpy as np
import pytest
import torch

from fastgrok.backends.cpu_engine import CpuBackend
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.population import Population
from fastgrok.store import TrainingState
from fastgrok.tasks import Task
from fastgrok.train import train_reference
from population_checks import assert_params_close, flat

TASK = Task(TaskConfig("x+y", 7))
# d_head 5, d_mlp 24, d_vocab 9: no multiple of a vector width or a tile.
CFG = ModelConfig.for_task(TASK.cfg, d_model=12, n_heads=2, d_head=5, d_mlp=24)
OPTIM = OptimConfig(warmup_steps=3)
# One example, a tile's worth, random labels, and no weight decay; each its own lr.
RUNS = [RunSpec(train_size=1, data_seed=0, init_seed=0, lr=3e-3, weight_decay=0.5),
        RunSpec(train_size=20, data_seed=1, init_seed=1, lr=1e-2, weight_decay=1.0),
        RunSpec(train_size=37, data_seed=2, init_seed=2, lr=2e-3, weight_decay=0.0, random_labels=True)]
TRITON_TILING = dict(block_n=16, block_c=16, block_k=16, group_tiles=2, programs=2)
# Interpreted Triton is slow: it trains for fewer steps.
STEPS = {"torch": 100, "cpu": 100, "triton": 4}
# Which backends promise a model's bits independent of its batch-mates.
BATCH_INVARIANT = {"torch": False, "cpu": True, "triton": True}


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request, interpreted):
    """The backend's name; every test here runs in the interpreter's process (``interpreted``)."""
    if request.param == "cpu" and not CpuBackend.available(torch.device("cpu"))[0]:
        pytest.skip("the C++ engine is not built (tests/test_cpu_engine.py says why)")
    return request.param


def population(backend, runs, optim=OPTIM, dtype=torch.float32):
    if backend == "triton":
        from fastgrok.backends.triton_engine import TritonBackend

        # Built directly: it refuses a CPU device, which the interpreter runs on.
        return Population(TASK, CFG, runs, optim, backend=TritonBackend(**TRITON_TILING), dtype=dtype,
                          precision="fp32")
    pop = Population(TASK, CFG, runs, optim, backend=backend, dtype=dtype)
    assert pop.backend == backend
    return pop


def reference(run, steps, dtype):
    return train_reference(TASK, CFG, run, steps, OPTIM, eval_every=steps, dtype=dtype)[0]


def test_float64_training_equals_the_float64_oracle(backend):
    """In float64 the comparison tests the algorithm, not float32 rounding: a wrong term,
    a misrouted row or a missing decay moves parameters by ~lr * steps."""
    if backend == "triton":
        pytest.skip("the Triton kernels compute in float32 only")
    steps = STEPS[backend]
    pop = population(backend, RUNS, dtype=torch.float64)
    losses = np.stack([pop.step().numpy() for _ in range(steps)])          # (steps, M)
    for m, run in enumerate(RUNS):
        curve = []
        model, _ = train_reference(TASK, CFG, run, steps, OPTIM, eval_every=1, dtype=torch.float64,
                                   log=lambda step, hist: curve.append(hist.train_loss[-1]))
        # The backend reports the loss before update s, the reference records it after.
        np.testing.assert_allclose(losses[:, m], curve[:-1], rtol=1e-6, err_msg=f"model {m}: loss curves")
        assert_params_close(pop, m, model, rtol=1e-5)


def test_float32_error_is_within_three_times_the_float32_oracles(backend):
    """flash-attention's bound, with factor 3: float32 runs of these models are chaotic,
    both errors are random in size."""
    steps = STEPS[backend]
    pop = population(backend, RUNS)
    for _ in range(steps):
        pop.step()
    for m, run in enumerate(RUNS):
        truth = flat(getattr(reference(run, steps, torch.float64), k).detach() for k in PARAM_NAMES)
        err_ref = (flat(getattr(reference(run, steps, torch.float32), k).detach() for k in PARAM_NAMES)
                   - truth).abs().max().item()
        err = (flat(pop.params[k][m] for k in PARAM_NAMES) - truth).abs().max().item()
        assert err <= 3 * err_ref + 1e-5, f"model {m}: {backend} error {err:.3g}, float32 oracle {err_ref:.3g}"


def test_logits_equal_the_reference_models(backend):
    pop = population(backend, RUNS)
    pop.step()
    logits = pop.all_logits()                                              # (M, n_pairs, V)
    for m in range(len(RUNS)):
        net = Transformer(CFG)
        net.load_state_dict(pop.model_params(m))
        with torch.no_grad():
            want = net(torch.as_tensor(TASK.tokens))[:, -1]
        torch.testing.assert_close(logits[m], want, rtol=1e-5, atol=1e-5, msg=lambda msg: f"model {m}: {msg}")


def test_a_diverging_model_is_frozen_and_the_others_are_untouched(backend):
    steps = max(STEPS[backend], 4)
    poisoned = [r if m != 1 else RunSpec(r.train_size, r.data_seed, r.init_seed, lr=1e37) for m, r in enumerate(RUNS)]
    clean, blowup = population(backend, RUNS), population(backend, poisoned)
    for step in range(1, steps + 1):
        clean.step()
        loss = blowup.step()
        if step == 2:
            frozen = [getattr(blowup, k)[1].clone() for k in ("flat_params", "exp_avg", "exp_avg_sq")]
    assert not torch.isfinite(loss[1])
    assert list(blowup.failed_step) == [-1, 2, -1], "the first update blows up, step 2 is non-finite"
    for name, before in zip(("flat_params", "exp_avg", "exp_avg_sq"), frozen):
        torch.testing.assert_close(getattr(blowup, name)[1], before, rtol=0, atol=0, equal_nan=True,
                                   msg=f"a frozen model's {name} moved")
    for m in (0, 2):
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(blowup, name)[m], getattr(clean, name)[m]), f"model {m}: {name} changed"


def test_a_model_alone_and_among_others(backend):
    steps = STEPS[backend]
    together, alone = population(backend, RUNS), population(backend, RUNS[2:])
    for _ in range(steps):
        together.step(), alone.step()
    for name in ("flat_params", "exp_avg", "exp_avg_sq"):
        a, b = getattr(alone, name)[0], getattr(together, name)[2]
        if BATCH_INVARIANT[backend]:
            assert torch.equal(a, b), f"{name}: alone differs from among others"
        else:  # float32 rounding of batched products, grown over the steps
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda msg: f"{name}: {msg}")


def test_resume_from_a_saved_state_is_bit_identical(backend):
    steps = STEPS[backend]
    straight = population(backend, RUNS)
    for _ in range(2 * steps):
        straight.step()
    first = population(backend, RUNS)
    for _ in range(steps):
        first.step()
    saved = TrainingState.of(first)
    resumed = population(backend, RUNS)
    saved.load_into(resumed)
    for _ in range(steps):
        resumed.step()
    assert resumed.step_count == straight.step_count
    for name in ("flat_params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), f"{name} after resume"
