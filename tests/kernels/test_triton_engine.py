"""fastgrok.triton_engine: whole training runs in the interpreter.

Compared with the batched PyTorch engine (same population, torch backend) and
with the reference trainer (fastgrok.train, torch.optim.AdamW), per model and
per step: odd training-set sizes including 1, per-model lr and weight decay,
warm-up, and a model that turns NaN while the others carry on.
"""
import warnings

import numpy as np
import pytest
import torch

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.engine import Population, resolve_backend
from fastgrok.tasks import Task
from fastgrok.train import train_reference

TASK = Task(TaskConfig(p=7))
CFG = ModelConfig(d_vocab=TASK.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)
OPTIM = OptimConfig(warmup_steps=2)
TILING = dict(block_n=16, block_c=16, block_k=16, programs=2, precision="ieee")
RUNS = [RunSpec(train_size=1, data_seed=0, init_seed=0, lr=3e-3, weight_decay=0.5),
        RunSpec(train_size=20, data_seed=1, init_seed=1, lr=1e-2, weight_decay=1.0),
        RunSpec(train_size=37, data_seed=2, init_seed=2, lr=2e-3, weight_decay=0.0, random_labels=True)]
STEPS = 4


def triton_population(interpreted, runs):
    pop = Population(TASK, CFG, runs, OPTIM)
    interpreted.engine.configure(pop, **TILING)
    return pop


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str):
    for m in range(got.shape[0]):
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=2e-6, msg=lambda msg: f"model {m}, {what}: {msg}")


@pytest.mark.parametrize("runs", [RUNS[:1], RUNS], ids=["M=1", "M=3"])
def test_training_matches_the_batched_engine_and_the_reference_trainer(interpreted, runs):
    fused, batched = triton_population(interpreted, runs), Population(TASK, CFG, runs, OPTIM)
    for step in range(1, STEPS + 1):
        loss_fused = interpreted.engine.step(fused)
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


def test_a_nan_model_is_frozen_and_the_others_train_on(interpreted):
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    interpreted.engine.step(fused)
    batched.step()
    for pop in (fused, batched):
        with torch.no_grad():
            pop.params["W_in"][1, 0, 0] = float("nan")
    frozen = fused.flat_params[1].clone()
    for _ in range(2):
        loss_fused, loss_batched = interpreted.engine.step(fused), batched.step()
    assert fused.failed_step.tolist() == batched.failed_step.tolist() == [-1, 2, -1]
    assert torch.equal(fused.flat_params[1].nan_to_num(), frozen.nan_to_num()), "the NaN model is untouched"
    assert torch.isnan(loss_fused[1]) and torch.isnan(loss_batched[1])
    for m in (0, 2):
        torch.testing.assert_close(loss_fused[m], loss_batched[m], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fused.flat_params[m], batched.flat_params[m], rtol=1e-4, atol=2e-6,
                                   msg=lambda msg: f"healthy model {m}: {msg}")


def test_host_changes_to_lr_and_freezing_reach_the_kernels(interpreted):
    fused, batched = triton_population(interpreted, RUNS), Population(TASK, CFG, RUNS, OPTIM)
    interpreted.engine.step(fused)
    batched.step()
    for pop in (fused, batched):
        pop.lr[0] = 5e-2
        pop.failed_step[2] = 1  # frozen by hand, e.g. after a checkpoint says so
    interpreted.engine.step(fused)
    batched.step()
    assert_rows_close(fused.flat_params, batched.flat_params, "parameters")
    assert fused.failed_step.tolist() == [-1, -1, 1]


def test_one_step_is_three_launches(interpreted, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launched.append(self.__name__)
                        or run(self, *a, **k))
    pop = triton_population(interpreted, RUNS)
    interpreted.engine.step(pop)
    assert launched == ["tables_forward_kernel", "examples_kernel", "adamw_kernel"]


def test_availability_needs_a_cuda_device_and_the_engine_falls_back(interpreted):
    ok, reason = interpreted.engine.available("cpu")
    assert not ok and "CUDA" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name, impl = resolve_backend("triton", torch.device("cpu"))
    assert (name, impl) == ("torch", None)
    assert any("triton" in str(w.message) and "CUDA" in str(w.message) for w in caught)


def test_options_are_checked_and_cuda_graphs_need_a_gpu(interpreted):
    with pytest.raises(ValueError, match="precision='fp16'"):
        interpreted.engine.Options(precision="fp16")
    with pytest.raises(ValueError, match="block_n=24"):
        interpreted.engine.Options(block_n=24)
    pop = Population(TASK, CFG, RUNS[:1])
    interpreted.engine.configure(pop, cuda_graph=True, **TILING)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        interpreted.engine.step(pop)
    assert pop.step_count == 0 and np.array_equal(pop.failed_step, [-1]), "a refused step changes nothing"
