"""fastgrok.backends.triton_engine: whole training runs in the interpreter.

Compared with the batched PyTorch engine (same population, torch backend, same
precision) and with the reference trainer (fastgrok.train, torch.optim.AdamW),
per model and per step: odd training-set sizes including 1, per-model lr and
weight decay, warm-up, every matmul precision, a model that turns NaN while the
others carry on, bitwise repeatability and independence of batch-mates, and
the first-step self-check.
"""
import warnings

import numpy as np
import pytest
import torch

import fastgrok.kernels.reduce as reduce  # not in the interpreted fixture (tests/conftest.py)
from fastgrok.backends import select_backend
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.tasks import Task
from fastgrok.train import train_reference
from population_checks import assert_repeatable_and_alone

TASK = Task(TaskConfig(p=7))
CFG = ModelConfig(d_vocab=TASK.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)
OPTIM = OptimConfig(warmup_steps=2)
# Two tiles per group: D = 37 is three tiles in two groups, so sums run over tiles and groups.
TILING = dict(block_n=16, block_c=16, block_k=16, group_tiles=2, programs=2)
RUNS = [RunSpec(train_size=1, data_seed=0, init_seed=0, lr=3e-3, weight_decay=0.5),
        RunSpec(train_size=20, data_seed=1, init_seed=1, lr=1e-2, weight_decay=1.0),
        RunSpec(train_size=37, data_seed=2, init_seed=2, lr=2e-3, weight_decay=0.0, random_labels=True)]
STEPS = 4


def triton_population(interpreted, runs, precision="fp32", **options):
    # Built with the backend object: select_backend refuses the CPU device the interpreter runs on.
    return Population(TASK, CFG, runs, OPTIM, backend=interpreted.engine.TritonBackend(**(TILING | options)),
                      precision=precision)


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str):
    for m in range(got.shape[0]):
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=2e-6, msg=lambda msg: f"model {m}, {what}: {msg}")


@pytest.mark.parametrize("runs", [RUNS[:1], RUNS], ids=["M=1", "M=3"])
def test_training_matches_the_batched_engine_and_the_reference_trainer(interpreted, runs):
    fused, batched = triton_population(interpreted, runs), Population(TASK, CFG, runs, OPTIM)
    for step in range(1, STEPS + 1):
        loss_fused = fused.step()
        loss_batched = batched.step()
        assert fused.step_count == batched.step_count == step
        torch.testing.assert_close(loss_fused, loss_batched, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step}: {m}")
        assert_rows_close(fused.flat_grads, batched.flat_grads, f"gradients after step {step}")
        assert_rows_close(fused.flat_params, batched.flat_params, f"parameters after step {step}")
    assert (fused.failed_step == -1).all()

    for m, run in enumerate(runs):
        model, _ = train_reference(TASK, CFG, run, STEPS, OPTIM, eval_every=STEPS)
        reference = torch.cat([getattr(model, k).detach().reshape(-1) for k in fused.params])
        torch.testing.assert_close(fused.flat_params[m], reference, rtol=1e-4, atol=2e-6,
                                   msg=lambda msg: f"model {m} against the reference trainer: {msg}")


def test_host_changes_to_lr_and_freezing_reach_the_kernels(interpreted):
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    fused.step()
    batched.step()
    for pop in (fused, batched):
        pop.lr[0] = 5e-2
        pop.failed_step[2] = 1  # frozen by hand, e.g. after a checkpoint says so
    fused.step()
    batched.step()
    assert_rows_close(fused.flat_params, batched.flat_params, "parameters")
    assert fused.failed_step.tolist() == [-1, -1, 1]


def test_a_step_and_a_gradient_are_four_launches_each(interpreted, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launched.append(self.__name__)
                        or run(self, *a, **k))
    pop = triton_population(interpreted, RUNS)
    pop.step()
    assert launched == ["tables_forward_kernel", "examples_kernel", "reduce_kernel", "adamw_kernel"]
    launched.clear()
    pop.loss_and_grad()
    assert launched == ["tables_forward_kernel", "examples_kernel", "reduce_kernel", "tables_backward_kernel"]


def test_loss_and_grad_updates_nothing_and_matches_the_batched_engine(interpreted):
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    fused.step()
    batched.step()
    before = [t.clone() for t in (fused.flat_params, fused.exp_avg, fused.exp_avg_sq)]
    loss_fused, loss_batched = fused.loss_and_grad(), batched.loss_and_grad()
    torch.testing.assert_close(loss_fused, loss_batched, rtol=1e-5, atol=1e-7)
    assert_rows_close(fused.flat_grads, batched.flat_grads, "gradients")
    assert all(torch.equal(a, b) for a, b in zip(before, (fused.flat_params, fused.exp_avg, fused.exp_avg_sq)))
    assert fused.step_count == 1 and (fused.failed_step == -1).all()


def test_logits_are_the_batched_engines(interpreted):
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    torch.testing.assert_close(fused.all_logits([2, 0], slice(0, 9)), batched.all_logits([2, 0], slice(0, 9)))


def test_the_device_state_follows_the_population_buffers(interpreted):
    pop = triton_population(interpreted, RUNS[:1])
    backend = pop.engine
    first = backend.device_state(pop)
    assert backend.device_state(pop) is first
    pop.train_weight = pop.train_weight.clone()
    assert backend.device_state(pop) is not first


def test_availability_needs_a_cuda_device_and_selection_falls_back(interpreted):
    ok, reason = interpreted.engine.TritonBackend.available(torch.device("cpu"))
    assert not ok and "CUDA" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = select_backend("triton", torch.device("cpu"), {"triton": {"block_n": 32}})
    assert backend.name == "torch"
    assert any("triton" in str(w.message) and "CUDA" in str(w.message) for w in caught)


def test_options_are_checked_and_cuda_graphs_need_a_gpu(interpreted):
    with pytest.raises(ValueError, match="precision='fp16': backend 'triton' offers fp32, tf32, bf16, bf16x3"):
        triton_population(interpreted, RUNS[:1], precision="fp16")
    with pytest.raises(ValueError, match="group_tiles=0"):
        interpreted.engine.TritonBackend(group_tiles=0)
    with pytest.raises(ValueError, match="block_n=24"):
        interpreted.engine.TritonBackend(block_n=24)
    with pytest.raises(ValueError, match="programs=0"):
        interpreted.engine.TritonBackend(programs=0)
    with pytest.raises(ValueError, match="stage_tiles='yes'"):
        interpreted.engine.TritonBackend(stage_tiles="yes")
    with pytest.raises(ValueError, match="one_pass=1: must be True, False or None"):
        interpreted.engine.TritonBackend(one_pass=1)
    with pytest.raises(ValueError, match="stage_tiles=True holds the fused MLP's operands.*fused_mlp=False"):
        triton_population(interpreted, RUNS[:1], precision="tf32", fused_mlp=False, stage_tiles=True).step()
    pop = triton_population(interpreted, RUNS[:1], cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        pop.step()
    assert pop.step_count == 0 and np.array_equal(pop.failed_step, [-1]), "a refused step changes nothing"


# Both backends round the same operands and accumulate in float32 in different
# orders: after two steps their gradients agree to ~2e-6 of each model's largest
# (measured), while rounding to another precision moves them by 4e-4 (tf32 vs
# bf16x3) to >1e-3 (bf16 vs fp32).
SAME_PRECISION_RTOL = 2e-5


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| of a model relative to that model's largest |b|, over models."""
    return ((a - b).abs().amax(1) / b.abs().amax(1)).max().item()


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "bf16x3"])
def test_each_precision_matches_the_torch_backend_at_that_precision(interpreted, precision):
    fused = triton_population(interpreted, RUNS, precision)
    batched = Population(TASK, CFG, RUNS, OPTIM, precision=precision)
    for step in range(1, 3):
        loss_fused, loss_batched = fused.step(), batched.step()
        torch.testing.assert_close(loss_fused, loss_batched, rtol=SAME_PRECISION_RTOL, atol=0,
                                   msg=lambda m: f"{precision}, step {step}: {m}")
        err = relative_difference(fused.flat_grads, batched.flat_grads)
        assert err < SAME_PRECISION_RTOL, f"{precision}, step {step}: gradients differ by {err:.3g} of their scale"
    assert fused.backend == "triton", "the self-check passed"


def test_the_precision_comparison_tells_precisions_apart(interpreted):
    """The tolerance above is far below what the operand rounding changes: the bf16
    kernels against the fp32 torch backend, and the tf32 against the bf16x3."""
    for fused_precision, batched_precision in (("bf16", "fp32"), ("tf32", "bf16x3")):
        fused = triton_population(interpreted, RUNS, fused_precision, self_check=False)
        batched = Population(TASK, CFG, RUNS, OPTIM, precision=batched_precision)
        fused.step(), batched.step()
        err = relative_difference(fused.flat_grads, batched.flat_grads)
        assert err > 10 * SAME_PRECISION_RTOL, f"{fused_precision} vs {batched_precision}: only {err:.3g} apart"


def test_runs_are_bitwise_repeatable_and_independent_of_batch_mates(interpreted):
    """No float atomics: the same population twice, a model alone, and a different
    persistent grid give the same bits."""
    runs = [RUNS[2], RUNS[1]]
    assert_repeatable_and_alone(triton_population(interpreted, runs, "bf16x3"),
                                triton_population(interpreted, runs, "bf16x3"),
                                triton_population(interpreted, runs[:1], "bf16x3", programs=1), 0, 2)


def test_a_nan_weight_gives_a_nan_loss_and_freezes_only_its_model(interpreted):
    """A NaN reaching the relu, the softmax max and the cross-entropy max must stay NaN (torch.relu,
    torch.max), so the model is frozen as on the CPU."""
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    for pop in (fused, batched):
        with torch.no_grad():
            pop.params["b_in"][1, 3] = float("nan")
            pop.params["W_U"][2, 0, 1] = float("nan")
    loss = fused.step()
    batched.step()
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0]), loss
    assert fused.failed_step.tolist() == batched.failed_step.tolist() == [-1, 1, 1]
    assert_rows_close(fused.flat_params[:1], batched.flat_params[:1], "the healthy model's parameters")


def test_the_self_check_hands_a_mismatching_population_to_the_torch_backend(interpreted, monkeypatch):
    real = reduce.reduce_launch

    def corrupted(layout, grads, *args, **kwargs):  # a kernel bug: one gradient off by 1%
        real(layout, grads, *args, **kwargs)
        grads[1, -1] += 0.01 * grads[1].abs().max()

    monkeypatch.setattr(interpreted.engine, "reduce_launch", corrupted)
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.step()
    assert len(caught) == 1 and "model 1: gradients differ" in str(caught[0].message), [str(w.message) for w in caught]
    assert "continues on the torch backend" in str(caught[0].message)
    assert fused.backend == "torch", "the run file records the backend that ran"
    batched.step()
    for _ in range(2):
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(fused, name), getattr(batched, name)), f"{name}: not the torch backend's"
        fused.step(), batched.step()
    assert fused.step_count == batched.step_count == 3


def test_a_passing_self_check_keeps_the_triton_backend_quietly(interpreted):
    pop = triton_population(interpreted, RUNS[:2], "tf32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pop.step()
    assert pop.backend == "triton"
