"""Part of launch 4: gradients of W_E, W_pos, W_Q, W_K, W_V from the row tables.

After launches 2 and 3 have summed dV (R, H*Dh), dS (R, H) and dc (D,) over
every example, one program per model (block 0 of the AdamW launch, fastgrok.kernels.adamw)
turns them into parameter gradients, then applies AdamW to them. Without an
update (``Backend.loss_and_grad``), ``tables_backward_kernel`` runs the same
code alone, grid (M,).
With dS' = dS / sqrt(Dh) and R_tab, K_tab, q, c as in launch 1:

    dq     = sum_r dS'[r, h] K_tab[r, h]             dK = dS' (x) q
    dW_K   = R_tab^T dK,  dW_V = R_tab^T dV,  dW_Q = c (x) dq
    dR     = dK W_K^T + dV W_V^T,   dR[=] += dq W_Q^T + dc
    dW_E[e] = dR[x-row e] + dR[y-row e],  dW_E[op] = dR[op],  dW_E[=] = dR[=]
    dW_pos = (sum of x-rows, dR[op], sum of y-rows, dR[=])

Element e's x-row is e and its y-row FIRST_Y_ROW + e; the x-rows end at
OP_ROW (every row number is a constexpr from fastgrok.layout.TokenRows).

Element e's x-row and y-row are handled in the same block, so every dW_E row is
written once and needs no clearing or atomics. It costs one program
~6 R D H Dh FLOPs (~30 MFLOP at the paper config, ~1.5% of a D = 2000 model
step). Like the example kernel it is a chain of small matmuls whose operands
stream from memory (fastgrok.kernels.layout.gemm): R_tab, dq and dK (over K_tab, no
longer needed) are first written to the workspace. Running here rather than
at the end of launch 2 keeps the example kernel's registers for itself, and
the launch boundary makes the summed tables visible with no inter-program
synchronisation. Its products are fp32 (tl.dot in "ieee" mode) whatever the
population's matmul precision: table products are not rounded
(fastgrok.precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgrok.backends.torch_engine import TableGrads, tables_backward, tables_forward
from fastgrok.kernels.layout import Layout, Workspace, gemm, launch_options, row_token_pos
from fastgrok.layout import TokenRows


def tables_backward_ref(params: dict[str, Tensor], grads: dict[str, Tensor], rows: TokenRows, dV: Tensor,
                        dS: Tensor, dc: Tensor) -> None:
    """Write the W_E..W_V gradients into ``grads`` (the batched engine's plain-torch code).

    dV (M, R, H*Dh), dS (M, R, H), dc (M, D) are the summed row-table gradients.
    """
    device = params["W_E"].device
    row_index = (torch.as_tensor(rows.token, device=device), torch.as_tensor(rows.pos, device=device))
    M, H, _, Dh = params["W_K"].shape
    tab = tables_forward(params, rows, row_index)
    acc = TableGrads(dV=dV.reshape(M * rows.R, H, Dh), dS=dS.reshape(M * rows.R, H), dc=dc)
    tables_backward(params, grads, rows, row_index, tab, acc)


@triton.jit
def _rows_dR(acc, rows, mask_r, offs_d, mask_d, p, dK_tab, dV_tab, D: tl.constexpr, H: tl.constexpr,
             Dh: tl.constexpr, OFF_W_K: tl.constexpr, OFF_W_V: tl.constexpr, BLOCK_DH: tl.constexpr):
    """acc + columns offs_d of dR = sum_h dK[h] W_K[h]^T + dV[h] W_V[h]^T for some rows.

    W_X[h, d, e] read as the (Dh, D) matrix W_X[h]^T: strides 1 (e) and Dh (d).
    """
    HD: tl.constexpr = H * Dh
    for h in range(H):
        acc = gemm(acc, dK_tab + h * Dh, HD, 1, rows, mask_r, p + OFF_W_K + h * D * Dh, 1, Dh, offs_d, mask_d,
                   Dh, BLOCK_DH, "fp32")
        acc = gemm(acc, dV_tab + h * Dh, HD, 1, rows, mask_r, p + OFF_W_V + h * D * Dh, 1, Dh, offs_d, mask_d,
                   Dh, BLOCK_DH, "fp32")
    return acc


@triton.jit
def tables_backward_tail(
    m, params_ptr, grads_ptr, K_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr, Rt_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DH: tl.constexpr, SCALE: tl.constexpr,
):
    """Table gradients of model m (int64); SCALE = 1/sqrt(Dh); see the module docstring."""
    HD: tl.constexpr = H * Dh
    p = params_ptr + m * P
    g = grads_ptr + m * P
    K_tab = K_ptr + m * (R * HD)
    dV_tab = dV_ptr + m * (R * HD)
    dS_tab = dS_ptr + m * (R * H)
    Rt = Rt_ptr + m * (R * D)
    q_m = q_ptr + m * HD
    dq_m = dq_ptr + m * HD
    lanes = tl.arange(0, BLOCK_DH)
    mask_l = lanes < Dh
    chunk = tl.arange(0, BLOCK_C)

    # dq[h] = sum_r dS'[r, h] K_tab[r, h], over every row.
    for h in range(H):
        dq = tl.zeros((BLOCK_DH,), tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask_r = rows < R
            dS = tl.load(dS_tab + rows * H + h, mask=mask_r, other=0.0)
            K = tl.load(K_tab + rows[:, None] * HD + h * Dh + lanes[None, :],
                        mask=mask_r[:, None] & mask_l[None, :], other=0.0)
            dq += tl.sum(dS[:, None] * K, axis=0)
        tl.store(dq_m + h * Dh + lanes, dq * SCALE, mask=mask_l)
    tl.debug_barrier()  # K is read above by other threads before it is overwritten below

    # Operands of the matmuls below: R_tab, and dK = dS' (x) q over K_tab.
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        token, pos = row_token_pos(rows, OP_ROW, FIRST_Y_ROW, EQ_ROW, OP_TOKEN, EQ_TOKEN, POS_X, POS_OP, POS_Y,
                                   EQ_POS)
        for d0 in range(0, D, BLOCK_C):
            offs_d = d0 + chunk
            mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
            resid = (tl.load(p + OFF_W_E + token[:, None] * D + offs_d[None, :], mask=mask_rd, other=0.0)
                     + tl.load(p + OFF_W_pos + pos[:, None] * D + offs_d[None, :], mask=mask_rd, other=0.0))
            tl.store(Rt + rows[:, None] * D + offs_d[None, :], resid, mask=mask_rd)
        for h in range(H):
            dS = tl.load(dS_tab + rows * H + h, mask=mask_r, other=0.0) * SCALE
            q = tl.load(q_m + h * Dh + lanes, mask=mask_l, other=0.0)
            tl.store(K_tab + rows[:, None] * HD + h * Dh + lanes[None, :], dS[:, None] * q[None, :],
                     mask=mask_r[:, None] & mask_l[None, :])
    tl.debug_barrier()
    dK_tab = K_tab

    # dW_Q = c (x) dq, dW_K = R_tab^T dK, dW_V = R_tab^T dV, as (D, H*Dh) tiles.
    for d0 in range(0, D, BLOCK_C):
        offs_d = d0 + chunk
        mask_d = offs_d < D
        c = (tl.load(p + OFF_W_E + EQ_TOKEN * D + offs_d, mask=mask_d, other=0.0)
             + tl.load(p + OFF_W_pos + EQ_POS * D + offs_d, mask=mask_d, other=0.0))
        for j0 in range(0, HD, BLOCK_C):
            cols = j0 + chunk
            mask_c = cols < HD
            mask_dc = mask_d[:, None] & mask_c[None, :]
            w_offs = (cols // Dh)[None, :] * (D * Dh) + offs_d[:, None] * Dh + (cols % Dh)[None, :]
            dW_Q = c[:, None] * tl.load(dq_m + cols, mask=mask_c, other=0.0)[None, :]
            dW_K = gemm(tl.zeros((BLOCK_C, BLOCK_C), tl.float32), Rt, 1, D, offs_d, mask_d, dK_tab, HD, 1,
                        cols, mask_c, R, BLOCK_R, "fp32")
            dW_V = gemm(tl.zeros((BLOCK_C, BLOCK_C), tl.float32), Rt, 1, D, offs_d, mask_d, dV_tab, HD, 1,
                        cols, mask_c, R, BLOCK_R, "fp32")
            tl.store(g + OFF_W_Q + w_offs, dW_Q, mask=mask_dc)
            tl.store(g + OFF_W_K + w_offs, dW_K, mask=mask_dc)
            tl.store(g + OFF_W_V + w_offs, dW_V, mask=mask_dc)

    # dR, BLOCK_C columns at a time: element e's x-row and y-row together give
    # dW_E[e]; the op and '=' rows form a two-row block, '=' also gets
    # dq W_Q^T and dc.
    for d0 in tl.range(0, D, BLOCK_C, disable_licm=True):  # hoisting here only lengthens live ranges
        offs_d = d0 + chunk
        mask_d = offs_d < D
        pos0 = tl.zeros((BLOCK_C,), tl.float32)
        pos2 = tl.zeros((BLOCK_C,), tl.float32)
        for e0 in range(0, OP_ROW, BLOCK_R):
            elems = e0 + tl.arange(0, BLOCK_R)
            mask_e = elems < OP_ROW
            dR_x = _rows_dR(tl.zeros((BLOCK_R, BLOCK_C), tl.float32), elems, mask_e, offs_d, mask_d, p, dK_tab,
                            dV_tab, D, H, Dh, OFF_W_K, OFF_W_V, BLOCK_DH)
            dR_y = _rows_dR(tl.zeros((BLOCK_R, BLOCK_C), tl.float32), elems + FIRST_Y_ROW, mask_e, offs_d, mask_d, p,
                            dK_tab, dV_tab, D, H, Dh, OFF_W_K, OFF_W_V, BLOCK_DH)
            tl.store(g + OFF_W_E + elems[:, None] * D + offs_d[None, :], dR_x + dR_y,
                     mask=mask_e[:, None] & mask_d[None, :])
            pos0 += tl.sum(dR_x, axis=0)
            pos2 += tl.sum(dR_y, axis=0)
        special = tl.arange(0, BLOCK_R)
        special_rows = tl.where(special == 0, OP_ROW, EQ_ROW)
        dR = _rows_dR(tl.zeros((BLOCK_R, BLOCK_C), tl.float32), special_rows, special < 2, offs_d, mask_d, p,
                      dK_tab, dV_tab, D, H, Dh, OFF_W_K, OFF_W_V, BLOCK_DH)
        for h in range(H):
            # dq as row 1 ('=') of a (BLOCK_R, Dh) operand whose other rows are masked.
            dR = gemm(dR, dq_m + h * Dh, 0, 1, special, special == 1, p + OFF_W_Q + h * D * Dh, 1, Dh,
                      offs_d, mask_d, Dh, BLOCK_DH, "fp32")
        dR_op = tl.sum(tl.where(special[:, None] == 0, dR, 0.0), axis=0)
        dR_eq = tl.sum(tl.where(special[:, None] == 1, dR, 0.0), axis=0) + tl.load(dc_ptr + m * D + offs_d,
                                                                                    mask=mask_d, other=0.0)
        tl.store(g + OFF_W_E + OP_TOKEN * D + offs_d, dR_op, mask=mask_d)
        tl.store(g + OFF_W_E + EQ_TOKEN * D + offs_d, dR_eq, mask=mask_d)
        tl.store(g + OFF_W_pos + POS_X * D + offs_d, pos0, mask=mask_d)
        tl.store(g + OFF_W_pos + POS_OP * D + offs_d, dR_op, mask=mask_d)
        tl.store(g + OFF_W_pos + POS_Y * D + offs_d, pos2, mask=mask_d)
        tl.store(g + OFF_W_pos + EQ_POS * D + offs_d, dR_eq, mask=mask_d)


@triton.jit
def tables_backward_kernel(
    params_ptr, grads_ptr, K_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr, Rt_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DH: tl.constexpr, SCALE: tl.constexpr,
):
    """Grid (M,): the table gradients of each model, with no update."""
    tables_backward_tail(tl.program_id(0).to(tl.int64), params_ptr, grads_ptr, K_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr,
                         dc_ptr, Rt_ptr, D, H, Dh, R, OP_ROW, FIRST_Y_ROW, EQ_ROW, OP_TOKEN, EQ_TOKEN, POS_X, POS_OP,
                         POS_Y, EQ_POS, OFF_W_E, OFF_W_pos, OFF_W_Q, OFF_W_K, OFF_W_V, P, BLOCK_R, BLOCK_C, BLOCK_DH,
                         SCALE)


def tables_backward_args(layout: Layout, params: Tensor, grads: Tensor, ws: Workspace, block_r: int = 16,
                         block_c: int = 16, arch: int = 90) -> tuple[tuple, dict]:
    """Grid and keyword arguments of tables_backward_kernel (launch 3's tiles: fastgrok.kernels.adamw.adamw_args)."""
    return (layout.check_flat(params=params, grads=grads),), dict(
        params_ptr=params, grads_ptr=grads, K_ptr=ws.K, q_ptr=ws.q, dV_ptr=ws.dV, dS_ptr=ws.dS, dq_ptr=ws.dq,
        dc_ptr=ws.dc, Rt_ptr=ws.Rt, D=layout.D, H=layout.H, Dh=layout.Dh, **layout.row_args(),
        **layout.offset_args("W_E", "W_pos", "W_Q", "W_K", "W_V"),
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_DH=layout.block_dh, SCALE=layout.scale,
        **launch_options("tables_backward", "fp32", arch),
    )


def tables_backward_launch(*args, **kwargs) -> None:
    """The W_E..W_V gradients of every model into ``grads`` (arguments: tables_backward_args)."""
    grid, kw = tables_backward_args(*args, **kwargs)
    tables_backward_kernel[grid](**kw)
