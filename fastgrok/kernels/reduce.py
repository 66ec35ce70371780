"""Launch 3 of the fused step: launch 2's sums, completed in a fixed order.

Launch 2 (``fastgrok.kernels.examples``) adds nothing across tiles of
different programs: each group of tiles leaves its sums in its own row of
``Workspace.partial``, and the gradients of the rows that examples share
(x-rows and y-rows of the table) per example in ``Workspace.dz`` and ``co``.
This launch sums both, grid (M, NB + cdiv(partial_len, BLOCK)):

* block b < NB = cdiv(n, BLOCK_E), the elements e of block b:
    dV[x-row e] = sum of a_x dz,  dS[x-row e] = sum of ds_x
  over the model's examples with x = e, in example order (``Tiles.order_x``,
  built once on the host), and the same for the y-rows (FIRST_Y_ROW + e) with
  a_y, ds_y; an element no example uses gets zeros.
* block b >= NB: BLOCK columns of the model's partial rows, summed in group
  order, into the flat gradients of W_O..W_U, dc, dV and dS of the operator
  and '=' rows and the loss (``Workspace``).

Each program also writes the sum of the gradients it wrote into its slot of
``Workspace.check`` (M, programs): non-finite iff one of them is, the
finiteness test the AdamW launch applies (summed there with launch 1's
check_tab), here rather than in launch 2, whose per-chunk reductions to a
scalar would cost cross-warp sums and barriers in its inner loops.

Every output is written by one program and every sum has one order, which
depends on the model's own training set only: two runs are bitwise equal and
a model's result does not depend on its batch-mates. Reading per-example dz
costs 4 H*Dh bytes per example (0.5 MB per model at the paper config's
n_train = 1000), a few percent of launch 2's traffic.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastgrok.kernels.examples import Tiles
from fastgrok.kernels.layout import REDUCE_BLOCKS, Layout, Workspace, launch_options


@triton.jit
def _row_sums(m, elems, mask_e, order_ptr, start_ptr, dz_ptr, co_ptr, dV_ptr, dS_ptr, first_row, stride_data,
              max_row_count, CO_A: tl.constexpr, CO_DS: tl.constexpr, N_ELEM: tl.constexpr, H: tl.constexpr,
              Dh: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_DH: tl.constexpr):
    """dV and dS of rows first_row + elems: the model's examples of each element, in order.
    Per example one (H,) load of each coefficient, broadcast over the head's Dh lanes.
    Returns the sum of what it wrote."""
    HD: tl.constexpr = H * Dh
    begin = tl.load(start_ptr + m * (N_ELEM + 1) + elems, mask=mask_e, other=0)
    count = tl.load(start_ptr + m * (N_ELEM + 1) + elems + 1, mask=mask_e, other=0) - begin
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    lanes = tl.arange(0, BLOCK_DH)
    cols = heads[:, None] * Dh + lanes[None, :]                               # (BLOCK_H, BLOCK_DH)
    mask_c = mask_h[:, None] & (lanes < Dh)[None, :]
    dV = tl.zeros((BLOCK_E, BLOCK_H, BLOCK_DH), tl.float32)
    dS = tl.zeros((BLOCK_E, BLOCK_H), tl.float32)
    for j in range(0, max_row_count):
        valid = j < count
        ex = m * stride_data + tl.load(order_ptr + m * stride_data + begin + j, mask=valid, other=0)
        mask_eh = valid[:, None] & mask_h[None, :]
        co = co_ptr + ex[:, None] * (4 * H) + heads[None, :]
        a = tl.load(co + CO_A * H, mask=mask_eh, other=0.0)
        ds = tl.load(co + CO_DS * H, mask=mask_eh, other=0.0)
        dz = tl.load(dz_ptr + ex[:, None, None] * HD + cols[None, :, :], mask=valid[:, None, None] & mask_c[None, :, :],
                     other=0.0)
        dV = tl.where(valid[:, None, None], dV + a[:, :, None] * dz, dV)
        dS = tl.where(valid[:, None], dS + ds, dS)
    rows = first_row + elems
    tl.store(dV_ptr + m * (R * HD) + rows[:, None, None] * HD + cols[None, :, :], dV,
             mask=mask_e[:, None, None] & mask_c[None, :, :])
    tl.store(dS_ptr + m * (R * H) + rows[:, None] * H + heads[None, :], dS, mask=mask_e[:, None] & mask_h[None, :])
    return tl.sum(tl.sum(tl.sum(dV, axis=2), axis=1), axis=0) + tl.sum(tl.sum(dS, axis=1), axis=0)


@triton.jit
def reduce_kernel(
    grads_ptr, dz_ptr, co_ptr, partial_ptr, dV_ptr, dS_ptr, dc_ptr, loss_ptr, check_ptr,
    group_first_ptr, order_x_ptr, start_x_ptr, order_y_ptr, start_y_ptr, stride_data, max_groups, max_row_count,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr, R: tl.constexpr, OP_ROW: tl.constexpr,
    FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, N_ELEM: tl.constexpr, OFF_W_O: tl.constexpr, P: tl.constexpr,
    TAIL_DC: tl.constexpr, TAIL_DV_OP: tl.constexpr, TAIL_DV_EQ: tl.constexpr, TAIL_DS_OP: tl.constexpr,
    TAIL_DS_EQ: tl.constexpr, TAIL_LOSS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK: tl.constexpr,
):
    HD: tl.constexpr = H * Dh
    NB: tl.constexpr = (N_ELEM + BLOCK_E - 1) // BLOCK_E
    m = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if blk < NB:
        elems = blk * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = elems < N_ELEM
        check = _row_sums(m, elems, mask_e, order_x_ptr, start_x_ptr, dz_ptr, co_ptr, dV_ptr, dS_ptr, 0,
                          stride_data, max_row_count, 0, 2, N_ELEM, H, Dh, R, BLOCK_E, BLOCK_H, BLOCK_DH)
        check += _row_sums(m, elems, mask_e, order_y_ptr, start_y_ptr, dz_ptr, co_ptr, dV_ptr, dS_ptr, FIRST_Y_ROW,
                           stride_data, max_row_count, 1, 3, N_ELEM, H, Dh, R, BLOCK_E, BLOCK_H, BLOCK_DH)
    else:
        c = (blk - NB) * BLOCK + tl.arange(0, BLOCK)
        mask = c < PARTIAL
        first = tl.load(group_first_ptr + m)
        groups = tl.load(group_first_ptr + m + 1) - first
        row = partial_ptr + first.to(tl.int64) * PARTIAL + c
        s = tl.load(row, mask=mask, other=0.0)
        for i in range(1, max_groups):
            valid = mask & (tl.full((BLOCK,), i, tl.int32) < groups)
            s = tl.where(valid, s + tl.load(row + i * PARTIAL, mask=valid, other=0.0), s)
        # Each column goes to one destination; masked lanes' offsets are never used.
        tl.store(grads_ptr + m * P + OFF_W_O + c, s, mask=c < TAIL_DC)
        tl.store(dc_ptr + m * D + (c - TAIL_DC), s, mask=(c >= TAIL_DC) & (c < TAIL_DV_OP))
        tl.store(dV_ptr + m * (R * HD) + OP_ROW * HD + (c - TAIL_DV_OP), s, mask=(c >= TAIL_DV_OP) & (c < TAIL_DV_EQ))
        tl.store(dV_ptr + m * (R * HD) + EQ_ROW * HD + (c - TAIL_DV_EQ), s, mask=(c >= TAIL_DV_EQ) & (c < TAIL_DS_OP))
        tl.store(dS_ptr + m * (R * H) + OP_ROW * H + (c - TAIL_DS_OP), s, mask=(c >= TAIL_DS_OP) & (c < TAIL_DS_EQ))
        tl.store(dS_ptr + m * (R * H) + EQ_ROW * H + (c - TAIL_DS_EQ), s, mask=(c >= TAIL_DS_EQ) & (c < TAIL_LOSS))
        tl.store(loss_ptr + m + (c - TAIL_LOSS), s, mask=c == TAIL_LOSS)
        check = tl.sum(tl.where(c < TAIL_LOSS, s, 0.0), axis=0)
    tl.store(check_ptr + m * tl.num_programs(1) + blk, check)


def reduce_args(layout: Layout, grads: Tensor, ws: Workspace, tiles: Tiles, stride_data: int,
                block_e: int = REDUCE_BLOCKS[0], block: int = REDUCE_BLOCKS[1], arch: int = 90) -> tuple[tuple, dict]:
    """Grid and keyword arguments of reduce_kernel; stride_data: N, the example slots per model."""
    M = layout.check_flat(grads=grads)
    n = layout.rows.n
    if tiles.start_x.shape != (M, n + 1) or ws.dz.shape[:2] != (M, stride_data):
        raise ValueError(f"tiles for {tuple(tiles.start_x.shape)} element starts and a workspace for "
                         f"{tuple(ws.dz.shape[:2])} examples; expected {(M, n + 1)} and {(M, stride_data)}")
    grid = (M, layout.reduce_programs(block_e, block))
    if ws.check.shape != grid:
        raise ValueError(f"ws.check has shape {tuple(ws.check.shape)}; block_e={block_e}, block={block} need {grid} "
                         f"(Workspace.allocate sizes it for the default REDUCE_BLOCKS {REDUCE_BLOCKS})")
    return grid, dict(
        grads_ptr=grads, dz_ptr=ws.dz, co_ptr=ws.co, partial_ptr=ws.partial, dV_ptr=ws.dV, dS_ptr=ws.dS,
        dc_ptr=ws.dc, loss_ptr=ws.loss, check_ptr=ws.check, group_first_ptr=tiles.group_first,
        order_x_ptr=tiles.order_x, start_x_ptr=tiles.start_x, order_y_ptr=tiles.order_y,
        start_y_ptr=tiles.start_y, stride_data=stride_data, max_groups=tiles.max_groups,
        max_row_count=tiles.max_row_count, D=layout.D, H=layout.H, Dh=layout.Dh,
        **layout.row_args("R", "OP_ROW", "FIRST_Y_ROW", "EQ_ROW"), N_ELEM=n, **layout.offset_args("W_O"),
        **layout.tail, PARTIAL=layout.partial_len, BLOCK_E=block_e,
        BLOCK_H=triton.next_power_of_2(layout.H), BLOCK_DH=triton.next_power_of_2(layout.Dh),
        BLOCK=block, **launch_options("reduce", "fp32", arch),
    )


def reduce_launch(*args, **kwargs) -> None:
    """Gradients of W_O..W_U into ``grads``, and ws.dV, dS, dc, loss, check (arguments: reduce_args)."""
    grid, kw = reduce_args(*args, **kwargs)
    reduce_kernel[grid](**kw)
