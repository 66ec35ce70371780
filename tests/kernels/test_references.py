"""The plain-torch references at the top of each kernel file, against the oracles.

Each reference documents its kernel's algorithm; here it meets the float64
reference model (autograd) or torch.optim.AdamW, without Triton.
"""
import math

import pytest
import torch

from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.kernels.adamw import adamw_ref
from fastgrok.kernels.examples import examples_ref
from fastgrok.kernels.tables_backward import tables_backward_ref
from fastgrok.kernels.tables_forward import tables_forward_ref
from fastgrok.layout import PARAM_NAMES, POS_EQ
from fastgrok.model import Transformer
from fastgrok.population import Population
from fastgrok.tasks import Task

TASK = Task(TaskConfig(p=7))
CFG = ModelConfig(d_vocab=TASK.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)


def test_table_and_example_references_give_the_oracles_loss_and_gradients():
    pop = Population(TASK, CFG, [RunSpec(train_size=d, data_seed=m, init_seed=m) for m, d in enumerate((1, 13))])
    params = {k: v.double() for k, v in pop.params.items()}
    K, V, S = tables_forward_ref(params, pop.rows)
    # 1/D in float64 (the population keeps it in float32).
    weight = (pop.train_weight > 0) / torch.as_tensor(pop.train_size, dtype=torch.float64).unsqueeze(1)
    loss, grads, acc = examples_ref(params, pop.rows, pop.train_x, pop.train_y, pop.train_labels, weight)
    grads |= {k: torch.zeros_like(params[k]) for k in ("W_E", "W_pos", "W_Q", "W_K", "W_V")}
    tables_backward_ref(params, grads, pop.rows, acc.dV, acc.dS, acc.dc)
    for m in range(pop.M):
        model = Transformer(CFG).double()
        with torch.no_grad():
            for k in PARAM_NAMES:
                getattr(model, k).copy_(params[k][m])
        tokens = torch.as_tensor(TASK.tokens[pop.splits[m].train_idx])
        want = model.loss(tokens, torch.as_tensor(pop.splits[m].train_labels))
        want.backward()
        assert loss[m].item() == pytest.approx(want.item(), rel=1e-12)
        for k in PARAM_NAMES:
            torch.testing.assert_close(grads[k][m], getattr(model, k).grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda msg: f"model {m}, {k}: {msg}")
        q = torch.einsum("d,hde->he", params["W_E"][m, pop.rows.eq_token] + params["W_pos"][m, POS_EQ],
                         params["W_Q"][m])
        torch.testing.assert_close(S[m], torch.einsum("rhe,he->rh", K[m].view(*S.shape[1:], -1), q)
                                   / math.sqrt(CFG.d_head))
        assert V.shape == K.shape == (pop.M, pop.rows.R, CFG.n_heads * CFG.d_head)


def test_adamw_reference_is_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    m1, m2 = torch.zeros_like(params), torch.zeros_like(params)
    lr, wd = torch.tensor([1e-3, 3e-2], dtype=torch.float64), torch.tensor([1.0, 0.1], dtype=torch.float64)
    oracle = [torch.nn.Parameter(params[m].clone()) for m in range(2)]
    opts = [torch.optim.AdamW([oracle[m]], lr=lr[m].item(), betas=(0.9, 0.98), weight_decay=wd[m].item())
            for m in range(2)]
    for step in range(1, 4):
        grads = torch.randn(2, 50, generator=gen, dtype=torch.float64)
        adamw_ref(params, grads, m1, m2, lr, wd, step, (0.9, 0.98), 1e-8)
        for m in range(2):
            oracle[m].grad = grads[m].clone()
            opts[m].step()
            torch.testing.assert_close(params[m], oracle[m].detach(), rtol=1e-12, atol=1e-14)
