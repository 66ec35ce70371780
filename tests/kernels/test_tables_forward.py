"""Launch 1 (fastgrok.kernels.tables_forward) in the interpreter against float64 tables (fp32 products
in every precision)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastgrok.config import ModelConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import init_params
from fastgrok.precision import round_mantissa, split_bf16

# (p, d_model, n_heads, d_head): odd sizes exercise every padded lane; p = 37 gives
# launch 1 several programs per model (39 tokens in blocks of 16 or 32).
SHAPES = [(7, 12, 2, 5), (11, 16, 1, 16), (5, 9, 3, 4), (37, 12, 3, 5)]


def rows_of(n: int) -> list[tuple[int, int]]:
    """(token, position) of each table row: x at 0, op at 1, y at 2, '=' at 3."""
    return [(e, 0) for e in range(n)] + [(n, 1)] + [(e, 2) for e in range(n)] + [(n + 1, 3)]


def flat(params: dict) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1) for k in PARAM_NAMES])


# The interpreter fixture holds modules only: nothing to reset between examples.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(SHAPES), M=st.integers(1, 3), seed=st.integers(0, 2**16),
       block_r=st.sampled_from([16, 32]))
@example(shape=(37, 12, 3, 5), M=2, seed=0, block_r=16)
def test_tables_match_float64(interpreted, shape, M, seed, block_r):
    p, D, H, Dh = shape
    cfg = ModelConfig(d_vocab=p + 2, d_model=D, n_heads=H, d_head=Dh, d_mlp=16)
    layout = interpreted.layout.Layout.from_config(cfg)
    models = [init_params(cfg, seed + m) for m in range(M)]
    params = torch.stack([flat(P) for P in models])
    ws = interpreted.layout.Workspace.allocate(layout, M, 1, 1, "cpu", block_r=block_r)

    interpreted.tables_forward.tables_forward_launch(layout, params, ws, block_r=block_r, block_k=16)

    for m, P in enumerate(models):
        P = {k: v.double() for k, v in P.items()}
        resid = torch.stack([P["W_E"][t] + P["W_pos"][pos] for t, pos in rows_of(p)])     # (R, D)
        K = torch.einsum("rd,hde->rhe", resid, P["W_K"])
        V = torch.einsum("rd,hde->rhe", resid, P["W_V"])
        q = torch.einsum("d,hde->he", resid[-1], P["W_Q"])
        S = torch.einsum("rhe,he->rh", K, q) / math.sqrt(Dh)
        for name, got, want in (("K", ws.K[m], K.reshape(len(resid), -1)), ("V", ws.V[m], V.reshape(len(resid), -1)),
                                ("q", ws.q[m], q.reshape(-1)), ("S", ws.S[m], S)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6,
                                       msg=lambda msg: f"model {m}, table {name}: {msg}")
        sums = (K.sum() + V.sum()).item() + q.sum().item() * ws.check_tab.shape[1]
        assert math.isclose(ws.check_tab[m].sum().item(), sums, rel_tol=1e-4, abs_tol=1e-4), f"model {m} checksum"



def test_a_non_finite_weight_of_an_unused_row_reaches_the_checksum(interpreted):
    """W_K can be inf only in rows no example uses; the gradients would still be NaN (0 * inf)."""
    cfg = ModelConfig(d_vocab=9, d_model=12, n_heads=2, d_head=5, d_mlp=16)
    layout = interpreted.layout.Layout.from_config(cfg)
    params = torch.stack([flat(init_params(cfg, m)) for m in range(2)])
    params[1, layout.offsets["W_E"] + 3 * cfg.d_model] = float("inf")   # token 3's embedding
    ws = interpreted.layout.Workspace.allocate(layout, 2, 1, 1, "cpu")
    interpreted.tables_forward.tables_forward_launch(layout, params, ws, block_k=16)
    assert ws.check_tab[0].isfinite().all()
    assert not ws.check_tab[1].sum().isfinite()


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "bf16x3"])
def test_the_weight_operands_are_the_flat_rows_rounded_at_the_precision(interpreted, precision):
    """Launch 1's Workspace.weights: W_O..W_U of every model as fastgrok.precision rounds them
    (tf32, bf16; fp32 unchanged; bf16x3 as the 32-bit word of split_bf16's hi and lo bit
    patterns, a NaN as the quiet 0x7FC0), every slot written whatever the row blocks' split
    (R = 2n + 2 rows in blocks of 16; 3 models)."""
    cfg = ModelConfig(d_vocab=9, d_model=12, n_heads=2, d_head=5, d_mlp=24)
    layout = interpreted.layout.Layout.from_config(cfg)
    params = torch.stack([flat(init_params(cfg, m)) for m in range(3)])
    params[1, -5:] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-41, -0.0])
    ws = interpreted.layout.Workspace.allocate(layout, 3, 1, 1, "cpu", block_r=16, precision=precision)
    ws.weights.fill_(12345)   # a slot left unwritten would keep this
    interpreted.tables_forward.tables_forward_launch(layout, params, ws, precision, block_r=16, block_k=16,
                                                     block_w=32)
    rows = params[:, layout.offsets["W_O"]:]
    if precision == "bf16x3":
        def bits16(v):   # the upper half of the float32 pattern, NaN made quiet
            return torch.where(v.isnan(), 0x7FC0, (v.view(torch.int32) >> 16) & 0xFFFF)
        hi, lo = split_bf16(rows)
        want = (bits16(hi) << 16) | bits16(lo)
        assert ws.weights.dtype == torch.int32
        assert torch.equal(ws.weights, want.to(torch.int32))
        return
    want = {"tf32": round_mantissa(rows, 10), "bf16": round_mantissa(rows, 7)}.get(precision, rows)
    assert torch.equal(ws.weights.float().view(torch.int32), want.view(torch.int32))   # bit for bit, NaN too
