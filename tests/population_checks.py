"""Helpers shared by the tests that hold an engine against the oracle."""
import torch

from fastgrok.config import RunSpec
from fastgrok.layout import PARAM_NAMES


def ragged_runs(M):
    """M models that differ in everything a population lets them differ in."""
    return [RunSpec(train_size=20 + 13 * m, data_seed=m, init_seed=100 + m,
                    lr=[1e-3, 3e-3, 2e-3][m % 3], weight_decay=[1.0, 0.1, 0.0, 2.0][m % 4])
            for m in range(M)]


def assert_params_close(pop, m, model, rtol):
    """Every tensor of model m within rtol of its scale; the message names it."""
    for k in PARAM_NAMES:
        ref = getattr(model, k).detach()
        err = (pop.params[k][m] - ref).abs().max().item()
        scale = ref.abs().max().item() + 1e-6
        assert err <= rtol * scale, f"model {m}, {k}: max abs error {err:.3g} vs scale {scale:.3g}"


def assert_repeatable_and_alone(first, again, alone, m: int, steps: int, what: str = ""):
    """Step the three populations ``steps`` times: ``again`` (the same as ``first``) must
    equal ``first`` bitwise and ``alone`` (model m of ``first`` by itself) its model m,
    in parameters, gradients and both moments."""
    for _ in range(steps):
        for pop in (first, again, alone):
            pop.step()
    for name in ("flat_params", "flat_grads", "exp_avg", "exp_avg_sq"):
        a, b, c = (getattr(pop, name) for pop in (first, again, alone))
        assert torch.equal(a, b), f"{what}{name}: two runs differ"
        assert torch.equal(a[m], c[0]), f"{what}{name}: model {m} alone differs from model {m} among others"


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])
