"""What is specific to the torch backend (the batched PyTorch engine).

The checks every backend shares are in tests/test_conformance.py; here: drawn
configurations with several example chunks per model, one step's gradients
at 1e-5 of the float64 oracle, padding, backend selection and bad runs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.tasks import Task
from population_checks import assert_params_close, ragged_runs
from fastgrok.train import train_reference

TASK = Task(TaskConfig("x+y", 11))
CFG = ModelConfig.for_task(TASK.cfg, d_model=16, n_heads=2, d_head=8, d_mlp=32)

@settings(max_examples=6, deadline=None)
@given(p=st.sampled_from([5, 7, 13]), d_head=st.sampled_from([2, 4]), n_heads=st.integers(1, 3),
       d_mlp=st.sampled_from([4, 24]), sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4),
       lr=st.floats(1e-4, 1e-2), wd=st.floats(0, 2), seed=st.integers(0, 1000))
def test_population_matches_reference_on_drawn_configs(p, d_head, n_heads, d_mlp, sizes, lr, wd, seed):
    task = Task(TaskConfig("x-y", p))
    cfg = ModelConfig.for_task(task.cfg, d_model=n_heads * d_head, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp)
    runs = [RunSpec(D, data_seed=seed + m, init_seed=seed + 7 * m, lr=lr * (m + 1), weight_decay=wd)
            for m, D in enumerate(sizes)]
    pop = Population(task, cfg, runs, dtype=torch.float64,
                     backend_options={"torch": {"chunk": 8}})  # small chunks: several per model
    for _ in range(40):
        pop.step()
    for m, run in enumerate(runs):
        model, _ = train_reference(task, cfg, run, 40, eval_every=40, dtype=torch.float64)
        assert_params_close(pop, m, model, rtol=1e-6)


def test_one_step_gradients_match_float64_reference():
    runs = ragged_runs(3)
    pop = Population(TASK, CFG, runs)
    loss = pop.loss_and_grad()
    for m, run in enumerate(runs):
        model = Transformer(CFG, run.init_seed).double()
        split = TASK.split(run.data_seed, run.train_size)
        ref = model.loss(torch.as_tensor(TASK.tokens[split.train_idx]), torch.as_tensor(split.train_labels))
        ref.backward()
        assert abs(loss[m].item() - ref.item()) < 1e-6 * ref.item()
        for k in PARAM_NAMES:
            g, g_ref = pop.grads[k][m].double(), getattr(model, k).grad
            err = (g - g_ref).abs().max().item()
            assert err <= 1e-5 * g_ref.abs().max().item() + 1e-9, f"model {m}, d{k}: error {err:.3g}"


def test_padding_never_reads_other_models_data():
    """Model 0 trained alone equals model 0 trained beside a larger model."""
    alone = Population(TASK, CFG, ragged_runs(1))
    together = Population(TASK, CFG, ragged_runs(1) + [RunSpec(121, data_seed=9, init_seed=9)])
    for _ in range(5):
        alone.step(), together.step()
    torch.testing.assert_close(alone.flat_params[0], together.flat_params[0], rtol=1e-6, atol=1e-7)


def test_unavailable_backend_falls_back_with_reason():
    with pytest.warns(UserWarning, match="triton.*unavailable"):
        pop = Population(TASK, CFG, ragged_runs(1), backend="triton")
    assert pop.backend == "torch"
    with pytest.raises(ValueError, match="'gpu'.*valid backends"):
        Population(TASK, CFG, ragged_runs(1), backend="gpu")
    with pytest.raises(ValueError, match="options for \\['tpu'\\]"):
        Population(TASK, CFG, ragged_runs(1), backend_options={"tpu": {}})
    with pytest.raises(ValueError, match="chunk=0"):
        Population(TASK, CFG, ragged_runs(1), backend_options={"torch": {"chunk": 0}})


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0), "lr=0.0"), (dict(weight_decay=-1.0), "weight_decay=-1.0"), (dict(train_size=500), "500"),
])
def test_bad_runs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        Population(TASK, CFG, [RunSpec(**{**dict(train_size=10), **bad})])
