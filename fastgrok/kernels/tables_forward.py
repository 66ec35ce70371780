"""Launch 1 of the fused step: the per-model (token, position) tables.

Algorithm (fastgrok.backends.torch_engine docstring): every key and value depends only on the
(token, position) of its row, and the query only on the last position (always
``=``). So, per model, the R rows of the residual stream
``R_tab = W_E[token] + W_pos[pos]`` are projected once per step:

    K_tab = R_tab @ W_K,  V_tab = R_tab @ W_V          (R, H*Dh)
    q     = c @ W_Q,  c = W_E[=] + W_pos[3]            (H*Dh,)
    S_tab[r, h] = K_tab[r, h] . q[h] / sqrt(Dh)        (R, H)

and the example kernel only gathers rows. The products are linear in the
rows, and an element's x-row and y-row differ only in their W_pos row, so a
program projects its element tokens' W_E rows once, K_E = W_E[e] W_K, and
writes K_tab[x-row e] = K_E + W_pos[POS_X] W_K and K_tab[y-row e] = K_E +
W_pos[POS_Y] W_K (the same for V): the n + 2 tokens (elements, operator, '=',
the last two with their positions' W_pos rows) take half the FLOPs of the
2n + 2 rows. Grid (M, cdiv(n + 2, BLOCK_R)) (``Layout.table_programs``); a
program projects BLOCK_R tokens one head and BLOCK_K columns of d_model at a
time (operands of (BLOCK_R, BLOCK_K) and (BLOCK_K, Dh)).

The products are fp32 (tl.dot in "ieee" mode) whatever the population's
matmul precision (fastgrok.precision: the tables are computed once per step
on a few hundred rows). Each program also writes the sum of its tables to
its own check_tab slot, and rounds 1/cdiv(n + 2, BLOCK_R) of the model's W_O..W_U
into ``weights``, the example kernel's operands at the population's precision
(fastgrok.kernels.layout.Workspace).

The rows (R, OP_ROW, ..., EQ_POS) are constexprs from
``fastgrok.layout.TokenRows`` (``Layout.row_args``).

Limits: n_ctx = 4; blocks are powers of two (>= 16 where they enter a
matmul), padded lanes masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgrok.backends.torch_engine import tables_forward
from fastgrok.kernels.layout import Layout, Workspace, launch_options, mma, to_operand
from fastgrok.layout import TokenRows


def tables_forward_ref(params: dict[str, Tensor], rows: TokenRows) -> tuple[Tensor, Tensor, Tensor]:
    """K_tab, V_tab (M, R, H*Dh) and S_tab (M, R, H) in plain torch (the batched engine's)."""
    device = params["W_E"].device
    tab = tables_forward(params, rows, (torch.as_tensor(rows.token, device=device),
                                        torch.as_tensor(rows.pos, device=device)))
    M, R = tab.K_tab.shape[:2]
    return tab.K_tab.reshape(M, R, -1), tab.V_tab.reshape(M, R, -1), tab.S_tab


@triton.jit
def tables_forward_kernel(
    params_ptr, K_ptr, V_ptr, S_ptr, q_ptr, check_tab_ptr, weights_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, OFF_W_O: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr, SCALE: tl.constexpr,
    WEIGHTS_PRECISION: tl.constexpr, BLOCK_W: tl.constexpr,
):
    HD: tl.constexpr = H * Dh
    NUM_RB: tl.constexpr = (OP_ROW + 2 + BLOCK_R - 1) // BLOCK_R
    m = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    p = params_ptr + m * P

    # This program's tokens: elements (token e: x-row e and y-row FIRST_Y_ROW + e), then
    # the operator and '=' (one row each, their positions' W_pos rows included).
    f = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = f < OP_ROW + 2
    is_elem = f < OP_ROW
    special = mask_t & (f >= OP_ROW)
    token = tl.where(is_elem, f, tl.where(f == OP_ROW, OP_TOKEN, EQ_TOKEN))
    pos = tl.where(f == OP_ROW, POS_OP, EQ_POS)
    row_a = tl.where(f == OP_ROW + 1, EQ_ROW, f)                          # x-row, or the operator's or '=' row
    row_b = FIRST_Y_ROW + f                                              # y-row (elements only)
    lanes = tl.arange(0, BLOCK_DH)
    mask_l = lanes < Dh
    mask_al = mask_t[:, None] & mask_l[None, :]
    mask_bl = is_elem[:, None] & mask_l[None, :]
    checksum = tl.zeros((), tl.float32)
    for h in range(H):
        # T = W_E[token] W_[h] (+ W_pos[pos] W_[h] for the operator and '='), q = c W_Q[h] and
        # the x and y positions' rows W_pos[POS_X] W_[h], W_pos[POS_Y] W_[h], d_model BLOCK_K
        # at a time; an element's x-row is T + the x position's, its y-row T + the y position's.
        K = tl.zeros((BLOCK_R, BLOCK_DH), tl.float32)
        Vh = tl.zeros((BLOCK_R, BLOCK_DH), tl.float32)
        q = tl.zeros((BLOCK_DH,), tl.float32)
        K_x = tl.zeros((BLOCK_DH,), tl.float32)
        K_y = tl.zeros((BLOCK_DH,), tl.float32)
        V_x = tl.zeros((BLOCK_DH,), tl.float32)
        V_y = tl.zeros((BLOCK_DH,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            resid = (tl.load(p + OFF_W_E + token[:, None] * D + offs_k[None, :],
                             mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                     + tl.load(p + OFF_W_pos + pos[:, None] * D + offs_k[None, :],
                               mask=special[:, None] & mask_k[None, :], other=0.0))
            w_offs = h * (D * Dh) + offs_k[:, None] * Dh + lanes[None, :]
            mask_kl = mask_k[:, None] & mask_l[None, :]
            w_k = tl.load(p + OFF_W_K + w_offs, mask=mask_kl, other=0.0)
            w_v = tl.load(p + OFF_W_V + w_offs, mask=mask_kl, other=0.0)
            K = mma(resid, w_k, K, "fp32")
            Vh = mma(resid, w_v, Vh, "fp32")
            pos_x = tl.load(p + OFF_W_pos + POS_X * D + offs_k, mask=mask_k, other=0.0)[:, None]
            pos_y = tl.load(p + OFF_W_pos + POS_Y * D + offs_k, mask=mask_k, other=0.0)[:, None]
            K_x += tl.sum(pos_x * w_k, axis=0)
            K_y += tl.sum(pos_y * w_k, axis=0)
            V_x += tl.sum(pos_x * w_v, axis=0)
            V_y += tl.sum(pos_y * w_v, axis=0)
            c = (tl.load(p + OFF_W_E + EQ_TOKEN * D + offs_k, mask=mask_k, other=0.0)
                 + tl.load(p + OFF_W_pos + EQ_POS * D + offs_k, mask=mask_k, other=0.0))
            q += tl.sum(c[:, None] * tl.load(p + OFF_W_Q + w_offs, mask=mask_kl, other=0.0), axis=0)
        K_a = tl.where(is_elem[:, None], K + K_x[None, :], K)
        V_a = tl.where(is_elem[:, None], Vh + V_x[None, :], Vh)
        K_b = tl.where(mask_bl, K + K_y[None, :], 0.0)
        V_b = tl.where(mask_bl, Vh + V_y[None, :], 0.0)
        cols = m * (R * HD) + h * Dh + lanes[None, :]
        tl.store(K_ptr + cols + row_a[:, None] * HD, K_a, mask=mask_al)
        tl.store(V_ptr + cols + row_a[:, None] * HD, V_a, mask=mask_al)
        tl.store(K_ptr + cols + row_b[:, None] * HD, K_b, mask=mask_bl)
        tl.store(V_ptr + cols + row_b[:, None] * HD, V_b, mask=mask_bl)
        s_offs = m * (R * H) + h
        tl.store(S_ptr + s_offs + row_a * H, tl.sum(K_a * q[None, :], axis=1) * SCALE, mask=mask_t)
        tl.store(S_ptr + s_offs + row_b * H, tl.sum(K_b * q[None, :], axis=1) * SCALE, mask=is_elem)
        tl.store(q_ptr + m * HD + h * Dh + lanes, q, mask=lanes < tl.where(rb == 0, Dh, 0))
        # Non-finite weights reach the gradients of W_E..W_V through these
        # tables even where no example uses a row (0 * inf), so they count
        # (padded rows and lanes are zeros).
        checksum += tl.sum(tl.sum(K_a + V_a + K_b + V_b, axis=1), axis=0) + tl.sum(q, axis=0)
    tl.store(check_tab_ptr + m * NUM_RB + rb, checksum)

    # This program's slice of the model's W_O..W_U as the example kernel's operands, at the
    # population's precision (this kernel's own products are fp32 whatever it is).
    W: tl.constexpr = P - OFF_W_O
    SLICE: tl.constexpr = (W + NUM_RB - 1) // NUM_RB
    for w0 in range(0, SLICE, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        offs = rb * SLICE + offs_w
        mask = (offs_w < SLICE) & (offs < W)
        value = tl.load(p + OFF_W_O + offs, mask=mask, other=0.0)
        tl.store(weights_ptr + m * W + offs, to_operand(value, WEIGHTS_PRECISION), mask=mask)


def tables_forward_args(layout: Layout, params: Tensor, ws: Workspace, precision: str = "fp32", block_r: int = 32,
                        block_k: int = 32, block_w: int = 1024, arch: int = 90) -> tuple[tuple, dict]:
    """Grid and keyword arguments of tables_forward_kernel (for launching and for AOT compiling).

    precision: the population's, at which ws.weights is written (``Workspace.check_precision``);
    arch: compute capability x10 of the GPU, which picks the launch options.
    """
    M = params.shape[0]
    grid = (M, layout.table_programs(block_r))
    if ws.check_tab.shape != grid:
        raise ValueError(f"ws.check_tab has shape {tuple(ws.check_tab.shape)}; block_r={block_r} needs {grid}")
    ws.check_precision(precision)
    return grid, dict(
        params_ptr=params, K_ptr=ws.K, V_ptr=ws.V, S_ptr=ws.S, q_ptr=ws.q, check_tab_ptr=ws.check_tab,
        weights_ptr=ws.weights, D=layout.D, H=layout.H, Dh=layout.Dh, **layout.row_args(),
        **layout.offset_args("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O"),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_DH=layout.block_dh, SCALE=layout.scale, WEIGHTS_PRECISION=precision,
        BLOCK_W=block_w,
        **launch_options("tables_forward", "fp32", arch),
    )


def tables_forward_launch(layout: Layout, params: Tensor, ws: Workspace, precision: str = "fp32", **tiling) -> None:
    """Fill ws.K, ws.V, ws.S, ws.q, ws.check_tab and ws.weights from ``params`` (M, P)."""
    grid, kwargs = tables_forward_args(layout, params, ws, precision, **tiling)
    tables_forward_kernel[grid](**kwargs)
