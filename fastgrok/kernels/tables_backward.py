"""Part of launch 4: gradients of W_E, W_pos, W_Q, W_K, W_V from the row tables.

After launches 2 and 3 have summed dV (R, H*Dh), dS (R, H) and dc (D,) over
every example, one program per model (block 0 of the AdamW launch, fastgrok.kernels.adamw)
turns them into parameter gradients, then applies AdamW to them. Without an
update (``Backend.loss_and_grad``), ``tables_backward_kernel`` runs the same
code alone, grid (M,).

Row r's residual is R_tab[r] = W_E[token r] + W_pos[pos r], with K = R_tab W_K,
V = R_tab W_V and the one query q = c W_Q, c the '=' row's residual. The
gradients are linear in the rows, and an x-row and a y-row differ only in
their W_pos row, so the R = 2n + 2 rows fold into NF = n + 4:

    folded row f   residual A[f]                tables B[f] (from dV), BS[f] (from dS')
    e < n          W_E[e]                       row x-e + row y-e
    n              W_pos[POS_X]                 sum of the x-rows
    n + 1          W_pos[POS_Y]                 sum of the y-rows
    n + 2          W_E[op] + W_pos[POS_OP]      the operator's row
    n + 3          W_E[=] + W_pos[EQ_POS]       the '=' row

with dS' = dS / sqrt(Dh). A key's gradient dK[r, h] = dS'[r, h] q[h] has rank
one per head, so with u[h] = A^T BS[:, h] (a D-vector) and kq[h] = W_K[h] q[h]:

    dW_K[h] = u[h] (x) q[h],   dq[h] = u[h] W_K[h],   dW_Q = c (x) dq
    dW_V = A^T B,   dF = B W_V^T + BS kq^T   (folded rows, D columns)
    dW_E[e] = dF[e],  dW_pos[POS_X] = dF[n],  dW_pos[POS_Y] = dF[n + 1],
    dW_E[op] = dW_pos[POS_OP] = dF[n + 2],  dW_E[=] = dW_pos[EQ_POS] = dF[n + 3] + dq W_Q^T + dc

Two products of NF x D x H Dh, ~4 NF D H Dh FLOPs (~7.7 MFLOP at the paper
config, a quarter of the unfolded 6 R D H Dh). Like the example kernel it is
a chain of small matmuls whose operands stream from memory
(fastgrok.kernels.layout.gemm): A is first written to the workspace's Rt, B
over K and BS over S (launch 1's tables, no longer needed; NF <= R since n >= 2).
Running here rather than at the end of launch 2 keeps the example kernel's
registers for itself, and the launch boundary makes the summed tables visible
with no inter-program synchronisation. Its products are fp32 (tl.dot in
"ieee" mode) whatever the population's matmul precision: table products are
not rounded (fastgrok.precision).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgrok.kernels.layout import Layout, Workspace, gemm, launch_options
from fastgrok.layout import POS_EQ, POS_OP, POS_X, POS_Y, TokenRows


def fold_rows(t: Tensor, rows: TokenRows) -> Tensor:
    """(M, R, ...) per-row tables -> (M, n + 4, ...) folded rows (module docstring)."""
    n, y0 = rows.n, rows.first_y_row
    x, y = t[:, :n], t[:, y0:y0 + n]
    return torch.cat([x + y, x.sum(1, keepdim=True), y.sum(1, keepdim=True),
                      t[:, rows.op_row:rows.op_row + 1], t[:, rows.eq_row:rows.eq_row + 1]], 1)


def tables_backward_ref(params: dict[str, Tensor], grads: dict[str, Tensor], rows: TokenRows, dV: Tensor,
                        dS: Tensor, dc: Tensor) -> None:
    """Write the W_E..W_V gradients into ``grads``: the kernel's folded algorithm in plain torch.

    dV (M, R, H*Dh), dS (M, R, H), dc (M, D) are the summed row-table gradients.
    """
    W_E, W_pos, W_Q, W_K, W_V = (params[k] for k in ("W_E", "W_pos", "W_Q", "W_K", "W_V"))
    M, H, D, Dh = W_K.shape
    n = rows.n
    A = torch.cat([W_E[:, :n], W_pos[:, POS_X:POS_X + 1], W_pos[:, POS_Y:POS_Y + 1],
                   (W_E[:, rows.op_token] + W_pos[:, POS_OP]).unsqueeze(1),
                   (W_E[:, rows.eq_token] + W_pos[:, POS_EQ]).unsqueeze(1)], 1)            # (M, NF, D)
    B = fold_rows(dV.reshape(M, rows.R, H, Dh), rows)                                       # (M, NF, H, Dh)
    BS = fold_rows(dS.reshape(M, rows.R, H), rows) / math.sqrt(Dh)                          # (M, NF, H)
    c = W_E[:, rows.eq_token] + W_pos[:, POS_EQ]
    q = torch.einsum("md,mhde->mhe", c, W_Q)
    u = torch.einsum("mfd,mfh->mhd", A, BS)
    dq = torch.einsum("mhd,mhde->mhe", u, W_K)
    grads["W_K"].copy_(u.unsqueeze(-1) * q.unsqueeze(2))
    grads["W_V"].copy_(torch.einsum("mfd,mfhe->mhde", A, B))
    grads["W_Q"].copy_(torch.einsum("md,mhe->mhde", c, dq))
    kq = torch.einsum("mhde,mhe->mhd", W_K, q)
    dF = torch.einsum("mfhe,mhde->mfd", B, W_V) + torch.einsum("mfh,mhd->mfd", BS, kq)
    dF[:, n + 3] += torch.einsum("mhe,mhde->md", dq, W_Q) + dc
    grads["W_E"].zero_()[:, :n] = dF[:, :n]
    grads["W_E"][:, rows.op_token] = dF[:, n + 2]
    grads["W_E"][:, rows.eq_token] = dF[:, n + 3]
    grads["W_pos"].zero_()
    for pos, f in ((POS_X, n), (POS_Y, n + 1), (POS_OP, n + 2), (POS_EQ, n + 3)):
        grads["W_pos"][:, pos] = dF[:, f]


@triton.jit
def _fold_columns(src, dst, stride, cols, mask_c, scale, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr,
                  EQ_ROW: tl.constexpr, BLOCK_R: tl.constexpr):
    """Folded rows of a (R, stride) table in columns ``cols``, times ``scale``, into dst (NF, stride)."""
    sx = tl.zeros(cols.shape, tl.float32)
    sy = tl.zeros(cols.shape, tl.float32)
    for e0 in range(0, OP_ROW, BLOCK_R):
        elems = e0 + tl.arange(0, BLOCK_R)
        mask = (elems < OP_ROW)[:, None] & mask_c[None, :]
        x = tl.load(src + elems[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        y = tl.load(src + (FIRST_Y_ROW + elems)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        tl.store(dst + elems[:, None] * stride + cols[None, :], (x + y) * scale, mask=mask)
        sx += tl.sum(x, axis=0)
        sy += tl.sum(y, axis=0)
    tl.store(dst + OP_ROW * stride + cols, sx * scale, mask=mask_c)
    tl.store(dst + (OP_ROW + 1) * stride + cols, sy * scale, mask=mask_c)
    tl.store(dst + (OP_ROW + 2) * stride + cols, tl.load(src + OP_ROW * stride + cols, mask=mask_c) * scale,
             mask=mask_c)
    tl.store(dst + (OP_ROW + 3) * stride + cols, tl.load(src + EQ_ROW * stride + cols, mask=mask_c) * scale,
             mask=mask_c)


@triton.jit
def _folded_dR(acc, f, mask_f, offs_d, mask_d, p, q_m, B_tab, BS_tab, lanes, mask_l, D: tl.constexpr,
               H: tl.constexpr, Dh: tl.constexpr, OFF_W_K: tl.constexpr, OFF_W_V: tl.constexpr,
               BLOCK_DH: tl.constexpr):
    """acc + columns offs_d of dF = B W_V^T + BS kq^T for folded rows f.

    W_V[h, d, e] read as the (Dh, D) matrix W_V[h]^T: strides 1 (e) and Dh (d).
    """
    HD: tl.constexpr = H * Dh
    for h in range(H):
        acc = gemm(acc, B_tab + h * Dh, HD, 1, f, mask_f, p + OFF_W_V + h * D * Dh, 1, Dh, offs_d, mask_d,
                   Dh, BLOCK_DH, "fp32")
        W_K = tl.load(p + OFF_W_K + h * D * Dh + offs_d[:, None] * Dh + lanes[None, :],
                      mask=mask_d[:, None] & mask_l[None, :], other=0.0)
        kq = tl.sum(W_K * tl.load(q_m + h * Dh + lanes, mask=mask_l, other=0.0)[None, :], axis=1)
        acc += tl.load(BS_tab + f * H + h, mask=mask_f, other=0.0)[:, None] * kq[None, :]
    return acc


@triton.jit
def tables_backward_tail(
    m, params_ptr, grads_ptr, K_ptr, S_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr, Rt_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr,
    SCALE: tl.constexpr,
):
    """Table gradients of model m (int64); SCALE = 1/sqrt(Dh); see the module docstring."""
    HD: tl.constexpr = H * Dh
    NF: tl.constexpr = OP_ROW + 4
    p = params_ptr + m * P
    g = grads_ptr + m * P
    A_tab = Rt_ptr + m * (R * D)
    B_tab = K_ptr + m * (R * HD)
    BS_tab = S_ptr + m * (R * H)
    q_m = q_ptr + m * HD
    dq_m = dq_ptr + m * HD
    lanes = tl.arange(0, BLOCK_DH)
    mask_l = lanes < Dh
    chunk = tl.arange(0, BLOCK_C)

    # The folded rows: residuals A into Rt, B over K, BS over S.
    for f0 in range(0, NF, BLOCK_R):
        f = f0 + tl.arange(0, BLOCK_R)
        mask_f = f < NF
        token = tl.where(f < OP_ROW, f, tl.where(f == OP_ROW + 2, OP_TOKEN, EQ_TOKEN))
        pos = tl.where(f == OP_ROW, POS_X, tl.where(f == OP_ROW + 1, POS_Y, tl.where(f == OP_ROW + 2, POS_OP,
                                                                                       EQ_POS)))
        with_token = mask_f & ((f < OP_ROW) | (f >= OP_ROW + 2))
        with_pos = mask_f & (f >= OP_ROW)
        for d0 in range(0, D, BLOCK_C):
            offs_d = d0 + chunk
            mask_d = offs_d < D
            resid = (tl.load(p + OFF_W_E + token[:, None] * D + offs_d[None, :],
                             mask=with_token[:, None] & mask_d[None, :], other=0.0)
                     + tl.load(p + OFF_W_pos + pos[:, None] * D + offs_d[None, :],
                               mask=with_pos[:, None] & mask_d[None, :], other=0.0))
            tl.store(A_tab + f[:, None] * D + offs_d[None, :], resid, mask=mask_f[:, None] & mask_d[None, :])
    for j0 in range(0, HD, BLOCK_C):
        cols = j0 + chunk
        _fold_columns(dV_ptr + m * (R * HD), B_tab, HD, cols, cols < HD, 1.0, OP_ROW, FIRST_Y_ROW, EQ_ROW,
                      BLOCK_R)
    heads = tl.arange(0, BLOCK_H)
    _fold_columns(dS_ptr + m * (R * H), BS_tab, H, heads, heads < H, SCALE, OP_ROW, FIRST_Y_ROW, EQ_ROW, BLOCK_R)
    tl.debug_barrier()  # the folded rows are read by other threads below

    # u[h] = A^T BS[:, h], dW_K[h] = u[h] (x) q[h], dq[h] = u[h] W_K[h].
    for h in range(H):
        q = tl.load(q_m + h * Dh + lanes, mask=mask_l, other=0.0)
        dq = tl.zeros((BLOCK_DH,), tl.float32)
        for d0 in range(0, D, BLOCK_C):
            offs_d = d0 + chunk
            mask_d = offs_d < D
            u = tl.zeros((BLOCK_C,), tl.float32)
            for f0 in range(0, NF, BLOCK_R):
                f = f0 + tl.arange(0, BLOCK_R)
                mask_f = f < NF
                A = tl.load(A_tab + f[:, None] * D + offs_d[None, :], mask=mask_f[:, None] & mask_d[None, :],
                            other=0.0)
                u += tl.sum(A * tl.load(BS_tab + f * H + h, mask=mask_f, other=0.0)[:, None], axis=0)
            mask_dl = mask_d[:, None] & mask_l[None, :]
            w_offs = h * D * Dh + offs_d[:, None] * Dh + lanes[None, :]
            dq += tl.sum(u[:, None] * tl.load(p + OFF_W_K + w_offs, mask=mask_dl, other=0.0), axis=0)
            tl.store(g + OFF_W_K + w_offs, u[:, None] * q[None, :], mask=mask_dl)
        tl.store(dq_m + h * Dh + lanes, dq, mask=mask_l)
    tl.debug_barrier()  # dq is read by other threads below

    # dW_Q = c (x) dq, dW_V = A^T B, as (D, H*Dh) tiles.
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
            dW_V = gemm(tl.zeros((BLOCK_C, BLOCK_C), tl.float32), A_tab, 1, D, offs_d, mask_d, B_tab, HD, 1,
                        cols, mask_c, NF, BLOCK_R, "fp32")
            tl.store(g + OFF_W_Q + w_offs, dW_Q, mask=mask_dc)
            tl.store(g + OFF_W_V + w_offs, dW_V, mask=mask_dc)

    # dF, BLOCK_C columns at a time: the element rows are dW_E's; the four
    # others (x and y positions, operator, '=') a block of their own, where
    # '=' also gets dq W_Q^T and dc.
    for d0 in tl.range(0, D, BLOCK_C, disable_licm=True):  # hoisting here only lengthens live ranges
        offs_d = d0 + chunk
        mask_d = offs_d < D
        for e0 in range(0, OP_ROW, BLOCK_R):
            elems = e0 + tl.arange(0, BLOCK_R)
            mask_e = elems < OP_ROW
            dF = _folded_dR(tl.zeros((BLOCK_R, BLOCK_C), tl.float32), elems, mask_e, offs_d, mask_d, p, q_m, B_tab,
                            BS_tab, lanes, mask_l, D, H, Dh, OFF_W_K, OFF_W_V, BLOCK_DH)
            tl.store(g + OFF_W_E + elems[:, None] * D + offs_d[None, :], dF, mask=mask_e[:, None] & mask_d[None, :])
        special = tl.arange(0, BLOCK_R)
        is_eq = special == 3
        dF = _folded_dR(tl.zeros((BLOCK_R, BLOCK_C), tl.float32), OP_ROW + special, special < 4, offs_d, mask_d,
                        p, q_m, B_tab, BS_tab, lanes, mask_l, D, H, Dh, OFF_W_K, OFF_W_V, BLOCK_DH)
        for h in range(H):
            # dq as row 3 ('=') of a (BLOCK_R, Dh) operand whose other rows are masked.
            dF = gemm(dF, dq_m + h * Dh, 0, 1, special, is_eq, p + OFF_W_Q + h * D * Dh, 1, Dh,
                      offs_d, mask_d, Dh, BLOCK_DH, "fp32")
        dF += tl.where(is_eq[:, None], tl.load(dc_ptr + m * D + offs_d, mask=mask_d, other=0.0)[None, :], 0.0)
        pos = tl.where(special == 0, POS_X, tl.where(special == 1, POS_Y, tl.where(special == 2, POS_OP, EQ_POS)))
        tl.store(g + OFF_W_pos + pos[:, None] * D + offs_d[None, :], dF, mask=(special < 4)[:, None] & mask_d[None, :])
        token = tl.where(special == 2, OP_TOKEN, EQ_TOKEN)
        tl.store(g + OFF_W_E + token[:, None] * D + offs_d[None, :], dF,
                 mask=((special == 2) | is_eq)[:, None] & mask_d[None, :])


@triton.jit
def tables_backward_kernel(
    params_ptr, grads_ptr, K_ptr, S_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr, Rt_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr,
    SCALE: tl.constexpr,
):
    """Grid (M,): the table gradients of each model, with no update."""
    tables_backward_tail(tl.program_id(0).to(tl.int64), params_ptr, grads_ptr, K_ptr, S_ptr, q_ptr, dV_ptr, dS_ptr,
                         dq_ptr, dc_ptr, Rt_ptr, D, H, Dh, R, OP_ROW, FIRST_Y_ROW, EQ_ROW, OP_TOKEN, EQ_TOKEN, POS_X,
                         POS_OP, POS_Y, EQ_POS, OFF_W_E, OFF_W_pos, OFF_W_Q, OFF_W_K, OFF_W_V, P, BLOCK_R, BLOCK_C,
                         BLOCK_H, BLOCK_DH, SCALE)


def tables_backward_args(layout: Layout, params: Tensor, grads: Tensor, ws: Workspace, block_r: int = 16,
                         block_c: int = 16, arch: int = 90) -> tuple[tuple, dict]:
    """Grid and keyword arguments of tables_backward_kernel (launch 3's tiles: fastgrok.kernels.adamw.adamw_args)."""
    return (layout.check_flat(params=params, grads=grads),), dict(
        params_ptr=params, grads_ptr=grads, K_ptr=ws.K, S_ptr=ws.S, q_ptr=ws.q, dV_ptr=ws.dV, dS_ptr=ws.dS,
        dq_ptr=ws.dq, dc_ptr=ws.dc, Rt_ptr=ws.Rt, D=layout.D, H=layout.H, Dh=layout.Dh, **layout.row_args(),
        **layout.offset_args("W_E", "W_pos", "W_Q", "W_K", "W_V"),
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_H=triton.next_power_of_2(layout.H),
        BLOCK_DH=layout.block_dh, SCALE=layout.scale, **launch_options("tables_backward", "fp32", arch),
    )


def tables_backward_launch(*args, **kwargs) -> None:
    """The W_E..W_V gradients of every model into ``grads`` (arguments: tables_backward_args)."""
    grid, kw = tables_backward_args(*args, **kwargs)
    tables_backward_kernel[grid](**kw)
