"""The table backward (fastgrok.kernels.tables_backward) in the interpreter against the
batched engine's unfolded formulas in float64.

The kernel folds the 2n + 2 rows into n + 4 and uses the keys' rank-one gradient;
the batched engine (fastgrok.backends.torch_engine.tables_backward) projects every
row through full products, so agreement checks the folding. n = 37 elements make
three blocks of element rows (BLOCK_R = 16), three heads pad to four and d_head 5
to 8."""
import pytest
import torch

from fastgrok.backends.torch_engine import TableGrads, tables_backward, tables_forward
from fastgrok.config import ModelConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import init_params

N_ELEM = 37
CFG = ModelConfig(d_vocab=N_ELEM + 2, d_model=12, n_heads=3, d_head=5, d_mlp=16)


@pytest.mark.parametrize("seed", [0, 1])
def test_folded_table_gradients_match_the_unfolded_float64_ones(interpreted, seed):
    layout = interpreted.layout.Layout.from_config(CFG)
    M, R, H, Dh = 2, layout.R, CFG.n_heads, CFG.d_head
    models = [init_params(CFG, seed * 10 + m) for m in range(M)]
    params = torch.stack([torch.cat([P[k].reshape(-1) for k in PARAM_NAMES]) for P in models])
    ws = interpreted.layout.Workspace.allocate(layout, M, 1, 1, "cpu", block_r=16)
    interpreted.tables_forward.tables_forward_launch(layout, params, ws, block_r=16, block_k=16)
    gen = torch.Generator().manual_seed(seed)
    ws.dV.copy_(torch.randn(ws.dV.shape, generator=gen))
    ws.dS.copy_(torch.randn(ws.dS.shape, generator=gen))
    ws.dc.copy_(torch.randn(ws.dc.shape, generator=gen))
    dV, dS, dc = ws.dV.double(), ws.dS.double(), ws.dc.double()
    grads = torch.zeros_like(params)

    interpreted.tables_backward.tables_backward_launch(layout, params, grads, ws)

    rows = layout.rows
    p64 = {k: torch.stack([P[k] for P in models]).double() for k in PARAM_NAMES}
    want = {k: torch.zeros_like(v) for k, v in p64.items()}
    index = (torch.as_tensor(rows.token), torch.as_tensor(rows.pos))
    tables_backward(p64, want, rows, index, tables_forward(p64, rows, index),
                    TableGrads(dV=dV.reshape(M * R, H, Dh), dS=dS.reshape(M * R, H), dc=dc))
    for k in ("W_E", "W_pos", "W_Q", "W_K", "W_V"):
        got = grads[:, layout.offsets[k]:layout.offsets[k] + want[k][0].numel()].reshape(want[k].shape)
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got.double(), want[k], rtol=1e-5, atol=1e-6 * scale, msg=lambda msg: f"{k}: {msg}")
