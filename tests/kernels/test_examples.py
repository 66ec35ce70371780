"""Launches 1-3 and the table backward in the interpreter: loss and every gradient
against the float64 oracle.

The oracle is fastgrok.model's Transformer in float64 with autograd, one model
at a time on its own training set (fp32 products: the other precisions are
compared with the torch backend in tests/kernels/test_triton_engine.py).
"""
import pytest
import torch
import triton
import triton.language as tl

import fastgrok.kernels.examples as examples
import fastgrok.kernels.reduce as reduce  # not in the interpreted fixture (tests/conftest.py)
from fastgrok.backends.torch_engine import TorchBackend, examples_forward, tables_forward
from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.population import Population
from fastgrok.tasks import Task

TASK = Task(TaskConfig(p=7))
# Odd sizes: every dimension is padded and masked somewhere.
CFG = ModelConfig(d_vocab=TASK.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)
TILING = dict(block_n=16, block_c=16, block_k=16)


def oracle(pop: Population, m: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of model m of ``pop`` in float64."""
    model = Transformer(pop.cfg).double()
    with torch.no_grad():
        for k, v in pop.model_params(m).items():
            getattr(model, k).copy_(v.double())
    D = int(pop.train_size[m])
    tokens = torch.as_tensor(pop.task.tokens[pop.splits[m].train_idx])
    loss = model.loss(tokens, torch.as_tensor(pop.splits[m].train_labels[:D]))
    loss.backward()
    return loss.item(), {k: getattr(model, k).grad for k in PARAM_NAMES}


def kernel_loss_and_grads(interpreted, pop: Population, programs: int, group_tiles: int = 2,
                          **mlp) -> torch.Tensor:
    """Run launches 1-3 and the table backward (no AdamW); losses (M,), gradients land in pop.flat_grads.
    mlp: fused_mlp, stage_tiles, the example kernel's two MLP variants (the precision's otherwise),
    or other tiles of its."""
    L = interpreted.layout.Layout.from_config(pop.cfg, pop.rows)
    tiles = interpreted.examples.Tiles.build(pop.train_size, pop.train_x, pop.train_y, pop.rows.n,
                                             TILING["block_n"], group_tiles, "cpu")
    ws = interpreted.layout.Workspace.allocate(L, pop.M, pop.train_x.shape[1], tiles.count, "cpu")
    scratch = interpreted.examples.allocate_scratch(L, programs, "fp32", TILING["block_n"], "cpu")
    interpreted.tables_forward.tables_forward_launch(L, pop.flat_params, ws, block_k=TILING["block_k"])
    interpreted.examples.examples_launch(L, pop.flat_params, ws, scratch, pop.train_x, pop.train_y,
                                         pop.train_labels, pop.train_weight, tiles, "fp32", group_tiles=group_tiles,
                                         **TILING, **mlp)
    reduce.reduce_launch(L, pop.flat_grads, ws, tiles, pop.train_x.shape[1])
    params_before = pop.flat_params.clone()
    interpreted.tables_backward.tables_backward_launch(L, pop.flat_params, pop.flat_grads, ws)
    assert torch.equal(pop.flat_params, params_before), "the table backward leaves the parameters alone"
    return ws.loss


def assert_matches_oracle(pop: Population, losses: torch.Tensor):
    for m in range(pop.M):
        loss, grads = oracle(pop, m)
        assert losses[m].item() == pytest.approx(loss, rel=1e-5, abs=1e-7), f"model {m}: loss"
        for k in PARAM_NAMES:
            want = grads[k]
            scale = want.abs().max().item() + 1e-12
            torch.testing.assert_close(pop.grads[k][m].double(), want, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda msg: f"model {m}, gradient of {k}: {msg}")


MLP_VARIANTS = {"chained": dict(fused_mlp=False, stage_tiles=False),
                "fused": dict(fused_mlp=True, stage_tiles=False),
                "fused-staged": dict(fused_mlp=True, stage_tiles=True)}


@pytest.mark.parametrize("mlp", MLP_VARIANTS)
@pytest.mark.parametrize("sizes, programs", [((1,), 1), ((1, 20, 37), 2)], ids=["M=1,D=1", "M=3,D=1,20,37"])
def test_loss_and_gradients_match_the_float64_oracle(interpreted, sizes, programs, mlp):
    # Three tiles for D = 37 in two groups (of 2 and 1 tiles) and two programs:
    # groups of different models share a program's scratch, a group sums
    # several tiles, and the last tile of each model is partial.
    runs = [RunSpec(train_size=d, data_seed=m, init_seed=10 + m, random_labels=m == 2) for m, d in enumerate(sizes)]
    pop = Population(TASK, CFG, runs)
    with torch.no_grad():  # non-zero biases so that their gradients are exercised fully
        pop.params["b_in"].normal_(0, 0.3)
        pop.params["b_out"].normal_(0, 0.3)
    assert_matches_oracle(pop, kernel_loss_and_grads(interpreted, pop, programs, **MLP_VARIANTS[mlp]))


@pytest.mark.parametrize("block_v, one_pass", [(16, False), (32, False), (32, True)],
                         ids=["two passes over two chunks", "two passes over one chunk", "one pass"])
def test_cross_entropy_over_chunks_of_the_vocabulary(interpreted, block_v, one_pass):
    """p = 23: 25 logits, in two chunks of 16 (the running max and rescaled wrong-class
    mass across chunks, then the logits again for the gradient) or in one of 32, in two
    passes or one."""
    task = Task(TaskConfig(p=23))
    cfg = ModelConfig(d_vocab=task.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)
    runs = [RunSpec(train_size=d, data_seed=m, init_seed=20 + m) for m, d in enumerate((30, 17))]
    pop = Population(task, cfg, runs)
    assert_matches_oracle(pop, kernel_loss_and_grads(interpreted, pop, programs=2, block_v=block_v,
                                                     one_pass=one_pass))


def test_one_pass_needs_every_logit_in_one_chunk(interpreted):
    task = Task(TaskConfig(p=23))
    cfg = ModelConfig(d_vocab=task.cfg.d_vocab, d_model=12, n_heads=2, d_head=5, d_mlp=24)
    pop = Population(task, cfg, [RunSpec(train_size=5)])
    with pytest.raises(ValueError, match="one_pass=True takes every logit in one chunk: d_vocab=25 > block_v=16; "
                                         "use block_v >= 32"):
        kernel_loss_and_grads(interpreted, pop, programs=1, block_v=16, one_pass=True)


@pytest.mark.parametrize("mlp", MLP_VARIANTS)
def test_tiny_losses_keep_their_relative_precision(interpreted, mlp):
    """A near-perfect fit, loss ~1e-10, where p_y - 1 would round the label's gradient to 0."""
    D = 8  # fewer examples than d_model: W_U can set every logit exactly
    pop = Population(TASK, CFG, [RunSpec(train_size=D, data_seed=3, init_seed=4)])
    params64 = {k: v.double() for k, v in pop.params.items()}
    row_index = TorchBackend().row_index(pop)
    tab = tables_forward(params64, pop.rows, row_index)
    _, cache = examples_forward(params64, pop.rows, tab, pop.train_x, pop.train_y)
    target = torch.zeros(D, CFG.d_vocab, dtype=torch.float64)
    target[torch.arange(D), torch.as_tensor(pop.splits[0].train_labels)] = 25.0
    W_U = torch.linalg.lstsq(cache.resid_fin[0], target).solution                 # (D_model, V)
    with torch.no_grad():
        pop.params["W_U"][0] = W_U.float()
    losses = kernel_loss_and_grads(interpreted, pop, programs=1, **MLP_VARIANTS[mlp])
    loss, grads = oracle(pop, 0)
    assert 1e-12 < loss < 1e-8, f"the fit should be near-perfect; loss {loss}"
    assert losses[0].item() == pytest.approx(loss, rel=1e-3), "relative precision of a tiny loss"
    for k in PARAM_NAMES:
        scale = grads[k].abs().max().item() + 1e-30
        torch.testing.assert_close(pop.grads[k][0].double(), grads[k], rtol=1e-3, atol=1e-3 * scale,
                                   msg=lambda msg: f"gradient of {k}: {msg}")


@triton.jit
def _log1p_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, examples._log1p(tl.load(x_ptr + offs)))


def test_log1p_is_accurate_relative_to_its_result(interpreted):
    """The loss of a confident model is log1p(wrong-class mass): needs relative, not absolute, accuracy."""
    x = torch.logspace(-30, 2, 1024, dtype=torch.float64).float()
    out = torch.empty_like(x)
    _log1p_kernel[(1,)](x, out, BLOCK=1024)
    want = torch.log1p(x.double())
    assert ((out.double() - want).abs() / want).max().item() < 4 * 2**-24
