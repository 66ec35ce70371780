"""Launch 4's AdamW (fastgrok.kernels.adamw) in the interpreter against torch.optim.AdamW."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgrok.config import ModelConfig

CFG = ModelConfig(d_vocab=9, d_model=12, n_heads=2, d_head=5, d_mlp=24)
BETAS, EPS = (0.9, 0.98), 1e-8


def run_kernel(interpreted, params, grads, m1, m2, lr, wd, failed, loss, check, step, warm):
    L = interpreted.layout.Layout.from_config(CFG)
    ws = interpreted.layout.Workspace.allocate(L, params.shape[0], 1, 1, "cpu")
    ws.loss.copy_(loss)
    ws.check[:, -1] = check  # launch 3's last program's slot: every slot is summed
    hyper = torch.tensor(interpreted.adamw.step_scalars(step, warm, BETAS), dtype=torch.float64)
    interpreted.adamw.adamw_launch(L, params, grads, m1, m2, lr, wd, failed, hyper, ws, BETAS, EPS,
                                   with_table_grads=False, block=256)


# The interpreter fixture holds modules only: nothing to reset between examples.
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), warmup=st.integers(0, 4),
       lrs=st.lists(st.floats(1e-4, 1e-1), min_size=3, max_size=3),
       wds=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3))
def test_matches_torch_adamw_per_model_and_freezes(interpreted, seed, warmup, lrs, wds):
    P = interpreted.layout.Layout.from_config(CFG).P
    gen = torch.Generator().manual_seed(seed)
    M = 4
    params = torch.randn(M, P, generator=gen)
    m1, m2 = torch.zeros(M, P), torch.zeros(M, P)
    lr = torch.tensor(lrs + [1e-3], dtype=torch.float64)
    wd = torch.tensor(wds + [1.0], dtype=torch.float64)
    failed = torch.tensor([-1, -1, -1, 2], dtype=torch.int32)   # model 3 froze at step 2
    oracle = [torch.nn.Parameter(params[m].clone()) for m in range(3)]
    opts = [torch.optim.AdamW([oracle[m]], lr=lrs[m], betas=BETAS, eps=EPS, weight_decay=wds[m]) for m in range(3)]
    frozen = params[3].clone()
    for step in range(1, 4):
        warm = 1.0 if warmup == 0 else min(1.0, step / warmup)
        grads = torch.randn(M, P, generator=gen) * torch.logspace(-6, 0, P)  # small and large gradients
        run_kernel(interpreted, params, grads, m1, m2, lr, wd, failed, torch.ones(M), torch.zeros(M), step, warm)
        for m in range(3):
            opts[m].param_groups[0]["lr"] = lrs[m] * warm
            oracle[m].grad = grads[m].clone()
            opts[m].step()
            torch.testing.assert_close(params[m], oracle[m].detach(), rtol=1e-6, atol=1e-7,
                                       msg=lambda msg: f"model {m}, step {step}: {msg}")
        assert torch.equal(params[3], frozen) and (m1[3] == 0).all(), "a frozen model is left alone"
    assert failed.tolist() == [-1, -1, -1, 2]


def test_a_model_turning_non_finite_is_frozen_at_this_step(interpreted):
    P = interpreted.layout.Layout.from_config(CFG).P
    M = 3
    params, grads = torch.randn(M, P), torch.randn(M, P)
    before = params.clone()
    m1, m2 = torch.zeros(M, P), torch.zeros(M, P)
    failed = torch.full((M,), -1, dtype=torch.int32)
    loss = torch.tensor([1.0, float("nan"), 1.0])
    check = torch.tensor([0.0, 0.0, float("inf")])
    lr = torch.full((M,), 1e-3, dtype=torch.float64)
    run_kernel(interpreted, params, grads, m1, m2, lr, lr, failed, loss, check, step=7, warm=1.0)
    assert failed.tolist() == [-1, 7, 7]
    assert not torch.equal(params[0], before[0])
    for m in (1, 2):
        assert torch.equal(params[m], before[m]) and (m1[m] == 0).all() and (m2[m] == 0).all(), f"model {m}"
