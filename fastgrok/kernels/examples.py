"""Launch 2 of the fused step: forward and backward of every training example.

Tiles and groups (``Tiles``): a model with D_m examples owns cdiv(D_m,
BLOCK_N) tiles of BLOCK_N example slots, taken in groups of GROUP_TILES
consecutive tiles (a host-built list in model-major order), so ragged
training sets waste at most one partial tile per model. The tail slots of
that tile repeat the model's last example with weight 0: a real example of the
same model, so padding never creates a non-finite value the model did not
already have. Grid: a persistent one, ``programs`` programs (one per SM by
default) that take groups in turn and compute a group's tiles in order;
model-major order keeps the groups running at the same time on few models,
whose weights (0.9 MB at the paper config) stay in L2.

Per example only the last position is computed (fastgrok.backends.torch_engine docstring);
its four attention scores and values are gathered from launch 1's row tables:

    a = softmax_4(S_tab[x-row], S_tab[op], S_tab[y-row], S_tab[=])  per head
      (x-row = x, y-row = FIRST_Y_ROW + y; OP_ROW, EQ_ROW from fastgrok.layout.TokenRows)
    z = sum_t a_t V_tab[row_t]                         (H*Dh,)
    resid_mid = c + z W_O,  hidden = relu(resid_mid W_in + b_in)
    resid_fin = resid_mid + hidden W_out + b_out,  logits = resid_fin W_U

then the stable cross-entropy of fastgrok.model (max subtracted, log1p of the
wrong-class mass when the label is the argmax, the label's gradient
-(sum of the others)), scaled by the example's weight 1/D_m, and the backward
pass. The logits come BLOCK_V at a time: in one pass where one chunk holds
them all and registers allow (ONE_PASS, per precision in ``TILINGS``: bf16),
else in two (online max and rescaled wrong-class mass, then the gradient from
the logits computed again, +3% FLOPs).

The tile's activations live in the program's own scratch row (written once,
re-read by the next products; with one program per SM it stays in L2), stored as
matmul operands (``fastgrok.kernels.layout.to_operand``: rounded once where
written, bf16 storage for bf16, bf16x3's hi and lo packed in one word), plus,
for the chained MLP, one fp32 row for the residual terms (resid_mid for
resid_fin, dresid for d resid_mid; the fused MLP keeps them in registers). The
weights come from launch 1's per-step operand copy (``Workspace.weights``), so
no operand is rounded or split where it is multiplied except those made in
registers. The residual-stream products (z W_O, dlogits W_U^T) take BLOCK_DC
output columns at a time and the weight gradients BLOCK_G x BLOCK_C (BLOCK_V for
W_U, BLOCK_DC for W_O) chunks, their operands streamed BLOCK_K at a time
(fastgrok.kernels.layout.gemm); BLOCK_G rows of 128 fill both warp groups' wgmma
(a chunk of fewer rows than 64 per warp group is computed by both). The MLP
comes in two variants (FUSED_MLP, per precision in ``TILINGS``; Triton holds a
dot's accumulator and register operands in registers, 255 per thread, so what
fits differs):

* fused: BLOCK_C hidden units at a time against the whole residual width
  (BLOCK_D): a chunk of hidden is computed, relu'd and multiplied by W_out's
  chunk into the resid_fin accumulator without leaving the chip; the backward
  recomputes it (+13% FLOPs) and per chunk forms dpre, dW_out, dW_in, db_in
  and adds dpre W_in^T into the d resid_mid accumulator. STAGE_TILES keeps the
  tile's resid_mid and dresid operands in shared memory across the chunks
  instead of re-reading them (room enough with bf16's 2-byte operands).
* chained: hidden, then dpre, stored in scratch, every product a chain link
  of BLOCK_C output columns (the fp32-class and tf32 operands are too wide for
  the fused accumulators beside them).

Sums without atomics: the gradients of W_O, W_in, b_in, W_out, b_out, W_U,
the last position's dc, the op and '=' rows' dV and dS and the loss are
added tile by tile into the group's own row of ``Workspace.partial`` (plain
loads and stores: one program owns the row); the x- and y-rows' dV and dS,
rows that examples of a tile share, are left per example (dz and the
coefficients a_x, a_y, ds_x, ds_y in ``Workspace.dz``, ``co``). Launch 3
(fastgrok.kernels.reduce) sums both in a fixed order, so a run is bitwise
repeatable and a model's result does not depend on its batch-mates, and takes
the finiteness checksum of the gradients (nothing here is reduced to a
scalar for it). The gradients of W_E..W_V follow in launch 4
(fastgrok.kernels.tables_backward).

Matmul precision (PRECISION, fastgrok.precision): every product here is a
per-example product with W_O, W_in, W_out or W_U, so every one takes its
operands at the population's precision (fastgrok.kernels.layout.mma rounds
them on the bit pattern); accumulation is fp32.

Numerics on the GPU: exp is MUFU.EX2 after a multiply by log2(e) (PTX
ex2.approx.ftz.f32: relative error about 2^-22, plus the rounding of the
scaled argument, a few ulp for |x| up to ~20), log is MUFU.LG2 (lg2.approx:
absolute error about 2^-22, which is why _log1p uses a series below 0.4), and
division is the full-range approximate division (div.full.f32, MUFU.RCP and
a correction: at most 2 ulp). The max of the softmax and of the
cross-entropy and the relu propagate NaN (FMNMX.NAN, as torch.max and the CPU
engine), so a NaN anywhere makes the loss NaN and the model is frozen; the
slow test tests/kernels/test_resources.py checks the SASS for it. a * b + c is
contracted to an FMA (fastgrok.kernels.layout.FP_FUSION).

Limits: n_ctx = 4; dimensions are padded to powers of two and masked. The
interpreter (TRITON_INTERPRET=1) ignores the dot's input precision and has no
bf16, which the explicit operand rounding makes irrelevant.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgrok.backends.torch_engine import TableGrads, examples_backward, examples_forward, tables_forward
from fastgrok.kernels.layout import (ARCHS, Layout, Workspace, from_operand, gemm, launch_options, mma, operand_dtype,
                                     to_operand)
from fastgrok.layout import PARAM_NAMES, TokenRows
from fastgrok.model import stable_cross_entropy_fwd_bwd


def examples_ref(params: dict[str, Tensor], rows: TokenRows, x: Tensor, y: Tensor, labels: Tensor,
                 weight: Tensor) -> tuple[Tensor, dict[str, Tensor], TableGrads]:
    """Loss (M,), the gradients of W_O..W_U and the row-table gradients, in plain torch.

    The batched engine's functions on examples x, y, labels, weight (M, N);
    returns grads as a dict of (M, ...) tensors and dV (M*R, H, Dh), dS (M*R, H), dc (M, D).
    """
    tab = tables_forward(params, rows, (torch.as_tensor(rows.token, device=x.device),
                                        torch.as_tensor(rows.pos, device=x.device)))
    M = x.shape[0]
    _, R, H, Dh = tab.V_tab.shape
    logits, cache = examples_forward(params, rows, tab, x, y)
    loss, dlogits = stable_cross_entropy_fwd_bwd(logits, labels)
    dlogits.mul_(weight.unsqueeze(-1))
    grads = {k: torch.zeros_like(params[k]) for k in ("W_O", "W_in", "b_in", "W_out", "b_out", "W_U")}
    acc = TableGrads(dV=tab.V_tab.new_zeros(M * R, H, Dh), dS=tab.S_tab.new_zeros(M * R, H),
                     dc=tab.R_tab.new_zeros(M, params["W_E"].shape[2]))
    examples_backward(params, grads, rows, tab, cache, dlogits, acc)
    return (loss * weight).sum(1), grads, acc


@triton.jit
def _log1p(x):
    """log(1 + x), x >= 0, to a few ulp relative to the result.

    tl.log is the GPU's lg2.approx, whose absolute error (~2^-22) would swamp
    log(1 + x) for small x, so below 0.4 the series 2 atanh(s) =
    2 (s + s^3/3 + ... + s^11/11), s = x / (2 + x) <= 1/6, is used instead
    (truncation below 1e-9 relative).
    """
    s = x / (2.0 + x)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 / 11)))))
    return tl.where(x < 0.4, series, tl.log(1.0 + x))


@triton.jit
def _logits(scratch, wt, rows, all_rows, offs_v, mask_v, D: tl.constexpr, V: tl.constexpr, OFF_W_U: tl.constexpr,
            RF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr):
    """Logits offs_v (BLOCK_N, BLOCK_V) of the tile: resid_fin (scratch RF) W_U."""
    return gemm(tl.zeros((BLOCK_N, BLOCK_V), tl.float32), scratch + RF, D, 1, rows, all_rows,
                wt + OFF_W_U, V, 1, offs_v, mask_v, D, BLOCK_K, PRECISION, True, True)


@triton.jit
def _label_loss(z_label, top, other):
    """Per example: the loss from the label's logit, the max and the wrong-class mass
    rescaled to it (log1p of that mass when the label is the argmax), and the total mass."""
    z_y = z_label - top
    total = other + tl.exp(z_y)
    return tl.where(z_y == 0.0, _log1p(other), tl.log(total) - z_y), total


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN (torch.max, the CPU engine); a GPU's plain FMNMX drops NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _head_attention(S_tab, V_tab, row_x, row_y, h, lanes, mask_l, OP_ROW: tl.constexpr, EQ_ROW: tl.constexpr,
                    H: tl.constexpr, Dh: tl.constexpr):
    """Head h's softmax weights a_t (BLOCK_N,) and gathered values (BLOCK_N or 1, BLOCK_DH)."""
    s0 = tl.load(S_tab + row_x * H + h)
    s1 = tl.load(S_tab + OP_ROW * H + h)
    s2 = tl.load(S_tab + row_y * H + h)
    s3 = tl.load(S_tab + EQ_ROW * H + h)
    top = _max_nan(_max_nan(s0, s1), _max_nan(s2, s3))
    a0 = tl.exp(s0 - top)
    a1 = tl.exp(s1 - top)
    a2 = tl.exp(s2 - top)
    a3 = tl.exp(s3 - top)
    total = a0 + a1 + a2 + a3
    cols = h * Dh + lanes
    Vx = tl.load(V_tab + row_x[:, None] * (H * Dh) + cols[None, :], mask=mask_l[None, :], other=0.0)
    Vy = tl.load(V_tab + row_y[:, None] * (H * Dh) + cols[None, :], mask=mask_l[None, :], other=0.0)
    V_op = tl.load(V_tab + OP_ROW * (H * Dh) + cols, mask=mask_l, other=0.0)[None, :]
    V_eq = tl.load(V_tab + EQ_ROW * (H * Dh) + cols, mask=mask_l, other=0.0)[None, :]
    return a0 / total, a1 / total, a2 / total, a3 / total, Vx, V_op, Vy, V_eq


@triton.jit
def _tile_examples(start, m, x_ptr, y_ptr, label_ptr, weight_ptr, stride_data, size,
                   FIRST_Y_ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Slots, x-row, y-row, label, weight and validity of the BLOCK_N example slots from ``start``.

    Slots past the model's ``size`` examples repeat its last example with weight 0.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < size
    example = m * stride_data + tl.minimum(offs_n, size - 1)
    row_x = tl.load(x_ptr + example).to(tl.int32)
    row_y = tl.load(y_ptr + example).to(tl.int32) + FIRST_Y_ROW
    label = tl.load(label_ptr + example).to(tl.int32)
    w = tl.load(weight_ptr + example, mask=mask_n, other=0.0)
    return m * stride_data + offs_n, row_x, row_y, label, w, mask_n


@triton.jit
def _add_into(ptr, value, mask, accumulate):
    """*ptr = *ptr + value, or = value for the group's first tile: a sum only this program
    writes, in tile order (no atomics). Every element of ``value`` is read and written by
    the same threads; tiles are separated by a barrier."""
    prev = tl.load(ptr, mask=mask & accumulate, other=0.0)
    tl.store(ptr, tl.where(accumulate, prev + value, value), mask=mask)


@triton.jit
def _weight_grad(g_ptr, a_ptr, b_ptr, I: tl.constexpr, J: tl.constexpr, BLOCK_I: tl.constexpr,
                 BLOCK_J: tl.constexpr, accumulate, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """g[I, J] += A^T B over the tile's examples, A (BLOCK_N, I) and B (BLOCK_N, J)
    row-major in scratch, in BLOCK_I x BLOCK_J chunks."""
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < J
            acc = gemm(tl.zeros((BLOCK_I, BLOCK_J), tl.float32), a_ptr, 1, I, offs_i, mask_i,
                       b_ptr, J, 1, offs_j, mask_j, BLOCK_N, BLOCK_K, PRECISION, True, True)
            _add_into(g_ptr + offs_i[:, None] * J + offs_j[None, :], acc, mask_i[:, None] & mask_j[None, :],
                      accumulate)


@triton.jit
def _w_in_chunk(wt, cols_d, mask_d, offs_f, mask_f, F: tl.constexpr, OFF_W_in: tl.constexpr):
    """W_in's columns offs_f (BLOCK_D, BLOCK_C), as launch 1 stored them."""
    return tl.load(wt + OFF_W_in + cols_d[:, None] * F + offs_f[None, :], mask=mask_d[:, None] & mask_f[None, :],
                   other=0.0)


@triton.jit
def _hidden_chunk(resid_mid, w_in, p, offs_f, mask_f, OFF_b_in: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """relu(resid_mid W_in + b_in) for hidden units offs_f, resid_mid (BLOCK_N, BLOCK_D) as
    stored (``to_operand``), w_in ``_w_in_chunk``'s; a NaN stays NaN, as in torch.relu.
    The forward and the backward pass compute it with the same instructions, so the
    backward's mask (hidden > 0) is the forward's."""
    b_in = tl.load(p + OFF_b_in + offs_f, mask=mask_f, other=0.0)
    pre = mma(resid_mid, w_in, tl.zeros((BLOCK_N, BLOCK_C), tl.float32) + b_in[None, :],
              PRECISION, True, True)
    return _max_nan(pre, 0.0)


@triton.jit
def _resid_mid_cols(p, wt, scratch, rows, all_rows, offs_j, mask_j, D: tl.constexpr, HD: tl.constexpr,
                    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_O: tl.constexpr, EQ_TOKEN: tl.constexpr,
                    EQ_POS: tl.constexpr, Z: tl.constexpr, RM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """resid_mid = c + z W_O in columns offs_j (fp32), also stored into scratch RM as an operand."""
    c = (tl.load(p + OFF_W_E + EQ_TOKEN * D + offs_j, mask=mask_j, other=0.0)
         + tl.load(p + OFF_W_pos + EQ_POS * D + offs_j, mask=mask_j, other=0.0))
    resid_mid = gemm(tl.zeros((BLOCK_N, offs_j.shape[0]), tl.float32) + c[None, :], scratch + Z, HD, 1, rows,
                     all_rows, wt + OFF_W_O, D, 1, offs_j, mask_j, HD, BLOCK_K, PRECISION, True, True)
    tl.store(scratch + RM + rows[:, None] * D + offs_j[None, :], to_operand(resid_mid, PRECISION),
             mask=mask_j[None, :])
    return resid_mid


@triton.jit
def _dresid_cols(wt, g, scratch, rows, all_rows, offs_j, mask_j, accumulate, D: tl.constexpr, V: tl.constexpr,
                 OFF_W_U: tl.constexpr, OFF_b_out: tl.constexpr, DL: tl.constexpr, RF: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """dresid = dlogits W_U^T in columns offs_j (fp32), also stored into scratch RF (over
    resid_fin) as an operand; its sum over the tile, db_out, into the group's sums."""
    dresid = gemm(tl.zeros((BLOCK_N, offs_j.shape[0]), tl.float32), scratch + DL, V, 1, rows, all_rows,
                  wt + OFF_W_U, 1, V, offs_j, mask_j, V, BLOCK_K, PRECISION, True, True)
    tl.store(scratch + RF + rows[:, None] * D + offs_j[None, :], to_operand(dresid, PRECISION), mask=mask_j[None, :])
    _add_into(g + OFF_b_out + offs_j, tl.sum(dresid, axis=0), mask_j, accumulate)
    return dresid


@triton.jit
def _mlp_forward_fused(p, wt, scratch, resid_mid, rows, chunk, cols_d, mask_d, D: tl.constexpr, F: tl.constexpr,
                       OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr, OFF_W_out: tl.constexpr,
                       OFF_b_out: tl.constexpr, RM: tl.constexpr, RF: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, STAGE_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """resid_fin into scratch RF, BLOCK_C hidden units at a time: a chunk of hidden is
    the next product's operand straight from registers and never leaves the chip (the
    backward pass recomputes it); the residual-width accumulator, in registers, starts
    at resid_mid (fp32, the W_O product's accumulator, never stored) + b_out."""
    acc = resid_mid + tl.load(p + OFF_b_out + cols_d, mask=mask_d, other=0.0)[None, :]
    resid_mid_ptrs = scratch + RM + rows[:, None] * D + cols_d[None, :]
    if STAGE_TILES:
        resid_mid_staged = tl.load(resid_mid_ptrs, mask=mask_d[None, :], other=0.0)
    for f0 in tl.range(0, F, BLOCK_C, disable_licm=not STAGE_TILES):
        offs_f = f0 + chunk
        mask_f = offs_f < F
        if STAGE_TILES:
            resid_mid_op = resid_mid_staged
        else:
            resid_mid_op = tl.load(resid_mid_ptrs, mask=mask_d[None, :], other=0.0)
        w_in = _w_in_chunk(wt, cols_d, mask_d, offs_f, mask_f, F, OFF_W_in)
        hidden = _hidden_chunk(resid_mid_op, w_in, p, offs_f, mask_f, OFF_b_in, BLOCK_N, BLOCK_C, PRECISION)
        w_out = tl.load(wt + OFF_W_out + offs_f[:, None] * D + cols_d[None, :], mask=mask_f[:, None] & mask_d[None, :],
                        other=0.0)
        acc = mma(hidden, w_out, acc, PRECISION, False, True)
    tl.store(scratch + RF + rows[:, None] * D + cols_d[None, :], to_operand(acc, PRECISION), mask=mask_d[None, :])


@triton.jit
def _mlp_forward_chained(p, wt, scratch, residual, rows, all_rows, chunk, D: tl.constexpr, F: tl.constexpr,
                         OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr, OFF_W_out: tl.constexpr,
                         OFF_b_out: tl.constexpr, RM: tl.constexpr, RF: tl.constexpr, HID: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    """resid_fin into scratch RF as two chained products, BLOCK_C output columns at a
    time, hidden stored (as an operand) in scratch HID; resid_mid (fp32) from ``residual``."""
    for f0 in range(0, F, BLOCK_C):
        offs_f = f0 + chunk
        mask_f = offs_f < F
        b_in = tl.load(p + OFF_b_in + offs_f, mask=mask_f, other=0.0)
        pre = gemm(tl.zeros((BLOCK_N, BLOCK_C), tl.float32) + b_in[None, :], scratch + RM, D, 1, rows, all_rows,
                   wt + OFF_W_in, F, 1, offs_f, mask_f, D, BLOCK_K, PRECISION, True, True)
        tl.store(scratch + HID + rows[:, None] * F + offs_f[None, :], to_operand(_max_nan(pre, 0.0), PRECISION),
                 mask=mask_f[None, :])
    tl.debug_barrier()
    for j0 in range(0, D, BLOCK_C):
        offs_j = j0 + chunk
        mask_j = offs_j < D
        acc = (tl.load(residual + rows[:, None] * D + offs_j[None, :], mask=mask_j[None, :], other=0.0)
               + tl.load(p + OFF_b_out + offs_j, mask=mask_j, other=0.0)[None, :])
        acc = gemm(acc, scratch + HID, F, 1, rows, all_rows, wt + OFF_W_out, D, 1, offs_j, mask_j, F, BLOCK_K,
                   PRECISION, True, True)
        tl.store(scratch + RF + rows[:, None] * D + offs_j[None, :], to_operand(acc, PRECISION), mask=mask_j[None, :])


@triton.jit
def _mlp_backward_fused(p, wt, g, part, scratch, dresid, rows, chunk, cols_d, mask_d, accumulate,
                        D: tl.constexpr, F: tl.constexpr, OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr,
                        OFF_W_out: tl.constexpr, RM: tl.constexpr, RF: tl.constexpr, DRM: tl.constexpr,
                        TAIL_DC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                        STAGE_TILES: tl.constexpr, PRECISION: tl.constexpr):
    """d resid_mid into scratch DRM, BLOCK_C hidden units at a time with hidden recomputed:
    dpre = (dresid W_out^T) where the pre-activation is > 0; dW_out += hidden^T dresid,
    dW_in += resid_mid^T dpre, db_in into the group's sums; d resid_mid accumulates in
    registers over the chunks from dresid (fp32, the W_U^T product's accumulator, never
    stored); its sum, dc, too. A chunk's W_in is read once, for hidden and for dpre W_in^T."""
    acc = dresid
    resid_mid_ptrs = scratch + RM + rows[:, None] * D + cols_d[None, :]
    dresid_ptrs = scratch + RF + rows[:, None] * D + cols_d[None, :]
    if STAGE_TILES:
        resid_mid_staged = tl.load(resid_mid_ptrs, mask=mask_d[None, :], other=0.0)
        dresid_staged = tl.load(dresid_ptrs, mask=mask_d[None, :], other=0.0)
    for f0 in tl.range(0, F, BLOCK_C, disable_licm=not STAGE_TILES):
        offs_f = f0 + chunk
        mask_f = offs_f < F
        if STAGE_TILES:
            resid_mid_op = resid_mid_staged
            dresid_op = dresid_staged
        else:
            resid_mid_op = tl.load(resid_mid_ptrs, mask=mask_d[None, :], other=0.0)
            dresid_op = tl.load(dresid_ptrs, mask=mask_d[None, :], other=0.0)
        mask_fd = mask_f[:, None] & mask_d[None, :]
        w_in = _w_in_chunk(wt, cols_d, mask_d, offs_f, mask_f, F, OFF_W_in)
        hidden = _hidden_chunk(resid_mid_op, w_in, p, offs_f, mask_f, OFF_b_in, BLOCK_N, BLOCK_C, PRECISION)
        w_out_t = tl.load(wt + OFF_W_out + offs_f[None, :] * D + cols_d[:, None],
                          mask=mask_d[:, None] & mask_f[None, :], other=0.0)
        dhidden = mma(dresid_op, w_out_t, tl.zeros((BLOCK_N, BLOCK_C), tl.float32), PRECISION, True, True)
        dpre = tl.where(hidden > 0.0, dhidden, 0.0)
        g_out = mma(tl.trans(hidden), dresid_op, tl.zeros((BLOCK_C, BLOCK_D), tl.float32), PRECISION, False, True)
        _add_into(g + OFF_W_out + offs_f[:, None] * D + cols_d[None, :], g_out, mask_fd, accumulate)
        g_in = mma(tl.trans(resid_mid_op), dpre, tl.zeros((BLOCK_D, BLOCK_C), tl.float32), PRECISION, True, False)
        _add_into(g + OFF_W_in + cols_d[:, None] * F + offs_f[None, :], g_in, mask_d[:, None] & mask_f[None, :],
                  accumulate)
        db_in = tl.sum(dpre, axis=0)
        _add_into(g + OFF_b_in + offs_f, db_in, mask_f, accumulate)
        acc = mma(dpre, tl.trans(w_in), acc, PRECISION, False, True)
    tl.store(scratch + DRM + rows[:, None] * D + cols_d[None, :], to_operand(acc, PRECISION), mask=mask_d[None, :])
    dc = tl.sum(acc, axis=0)
    _add_into(part + TAIL_DC + cols_d, dc, mask_d, accumulate)


@triton.jit
def _mlp_backward_chained(wt, g, part, scratch, residual, rows, all_rows, chunk, accumulate,
                          D: tl.constexpr, F: tl.constexpr, OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr,
                          OFF_W_out: tl.constexpr, RM: tl.constexpr, RF: tl.constexpr, DRM: tl.constexpr,
                          HID: tl.constexpr, TAIL_DC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """d resid_mid into scratch DRM as chained products over the scratch, BLOCK_C columns at
    a time: dW_out = hidden^T dresid; dpre = (dresid W_out^T) where hidden > 0, over
    hidden's scratch, and db_in; dW_in = resid_mid^T dpre; d resid_mid = dresid (fp32, from
    ``residual``) + dpre W_in^T and its sum dc.
    The mask is taken on hidden as stored: it differs from fp32's only where a
    pre-activation is positive but rounds to 0 (below 2^-133 in bf16 and bf16x3)."""
    _weight_grad(g + OFF_W_out, scratch + HID, scratch + RF, F, D, BLOCK_G, BLOCK_C, accumulate, BLOCK_N,
                 BLOCK_K, PRECISION)
    tl.debug_barrier()
    for f0 in range(0, F, BLOCK_C):
        offs_f = f0 + chunk
        mask_f = offs_f < F
        dhidden = gemm(tl.zeros((BLOCK_N, BLOCK_C), tl.float32), scratch + RF, D, 1, rows, all_rows,
                       wt + OFF_W_out, 1, D, offs_f, mask_f, D, BLOCK_K, PRECISION, True, True)
        hid_offs = scratch + HID + rows[:, None] * F + offs_f[None, :]
        dpre = tl.where(from_operand(tl.load(hid_offs, mask=mask_f[None, :], other=0.0), PRECISION) > 0.0, dhidden,
                        0.0)
        tl.debug_barrier()  # every thread has read this chunk of hidden before it is overwritten
        tl.store(hid_offs, to_operand(dpre, PRECISION), mask=mask_f[None, :])
        db_in = tl.sum(dpre, axis=0)
        _add_into(g + OFF_b_in + offs_f, db_in, mask_f, accumulate)
    tl.debug_barrier()
    _weight_grad(g + OFF_W_in, scratch + RM, scratch + HID, D, F, BLOCK_G, BLOCK_C, accumulate, BLOCK_N,
                 BLOCK_K, PRECISION)
    for j0 in range(0, D, BLOCK_C):
        offs_j = j0 + chunk
        mask_j = offs_j < D
        acc = gemm(tl.load(residual + rows[:, None] * D + offs_j[None, :], mask=mask_j[None, :], other=0.0),
                   scratch + HID, F, 1, rows, all_rows, wt + OFF_W_in, 1, F, offs_j, mask_j, F, BLOCK_K, PRECISION,
                   True, True)
        tl.store(scratch + DRM + rows[:, None] * D + offs_j[None, :], to_operand(acc, PRECISION), mask=mask_j[None, :])
        dc = tl.sum(acc, axis=0)
        _add_into(part + TAIL_DC + offs_j, dc, mask_j, accumulate)


@triton.jit
def examples_kernel(
    params_ptr, weights_ptr, V_ptr, S_ptr, dz_ptr, co_ptr, partial_ptr, scratch_ptr, residual_ptr,
    x_ptr, y_ptr, label_ptr, weight_ptr, stride_data, group_model_ptr, group_start_ptr, train_size_ptr, n_groups,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr,
    EQ_TOKEN: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, OFF_W_O: tl.constexpr, OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr,
    OFF_W_out: tl.constexpr, OFF_b_out: tl.constexpr, OFF_W_U: tl.constexpr, P: tl.constexpr,
    TAIL_DC: tl.constexpr, TAIL_DV_OP: tl.constexpr, TAIL_DV_EQ: tl.constexpr, TAIL_DS_OP: tl.constexpr,
    TAIL_DS_EQ: tl.constexpr, TAIL_LOSS: tl.constexpr, PARTIAL: tl.constexpr,
    GROUP_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DH: tl.constexpr, FUSED_MLP: tl.constexpr, STAGE_TILES: tl.constexpr, ONE_PASS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    HD: tl.constexpr = H * Dh
    # This program's scratch: (BLOCK_N, .) activations of its current tile.
    Z: tl.constexpr = 0                      # z, attention output     (BLOCK_N, HD)
    RM: tl.constexpr = Z + BLOCK_N * HD      # resid_mid               (BLOCK_N, D)
    RF: tl.constexpr = RM + BLOCK_N * D      # resid_fin, then dresid  (BLOCK_N, D)
    DL: tl.constexpr = RF + BLOCK_N * D      # dlogits                 (BLOCK_N, V)
    DRM: tl.constexpr = DL + BLOCK_N * V     # d resid_mid             (BLOCK_N, D)
    HID: tl.constexpr = DRM + BLOCK_N * D    # hidden, then dpre       (BLOCK_N, F), unless FUSED_MLP
    SCRATCH: tl.constexpr = HID + BLOCK_N * F
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * SCRATCH
    # and its fp32 row (chained MLP): the tile's resid_mid, then dresid (BLOCK_N, D).
    residual = residual_ptr + tl.program_id(0).to(tl.int64) * (BLOCK_N * D)
    for group in tl.range(tl.program_id(0), n_groups, tl.num_programs(0), disable_licm=True):
        m = tl.load(group_model_ptr + group).to(tl.int64)
        size = tl.load(train_size_ptr + m)
        p = params_ptr + m * P
        # The model's operands W_O..W_U, addressed with their flat offsets.
        wt = weights_ptr + m * (P - OFF_W_O) - OFF_W_O
        S_tab = S_ptr + m * (R * H)
        V_tab = V_ptr + m * (R * HD)
        # The group's sums: W_O..W_U gradients at their flat offsets minus OFF_W_O, then the tail.
        part = partial_ptr + tl.cast(group, tl.int64) * PARTIAL
        g = part - OFF_W_O
        for t in tl.range(0, GROUP_TILES, disable_licm=True):
            start = tl.load(group_start_ptr + group) + t * BLOCK_N
            if start < size:
                accumulate = t > 0
                _tile(start, m, size, p, wt, g, part, S_tab, V_tab, dz_ptr, co_ptr, scratch, residual, accumulate,
                      x_ptr, y_ptr, label_ptr, weight_ptr, stride_data,
                      D, H, Dh, F, V, OP_ROW, FIRST_Y_ROW, EQ_ROW, EQ_TOKEN, EQ_POS,
                      OFF_W_E, OFF_W_pos, OFF_W_O, OFF_W_in, OFF_b_in, OFF_W_out, OFF_b_out, OFF_W_U,
                      TAIL_DC, TAIL_DV_OP, TAIL_DV_EQ, TAIL_DS_OP, TAIL_DS_EQ, TAIL_LOSS,
                      Z, RM, RF, DL, DRM, HID, BLOCK_N, BLOCK_D, BLOCK_DC, BLOCK_C, BLOCK_V, BLOCK_G, BLOCK_K,
                      BLOCK_DH, FUSED_MLP, STAGE_TILES, ONE_PASS, PRECISION)
            # The next tile overwrites the scratch and adds into the sums this one's
            # threads may still read.
            tl.debug_barrier()


@triton.jit
def _tile(start, m, size, p, wt, g, part, S_tab, V_tab, dz_ptr, co_ptr, scratch, residual, accumulate,
          x_ptr, y_ptr, label_ptr, weight_ptr, stride_data, D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
          F: tl.constexpr, V: tl.constexpr,
          OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, EQ_TOKEN: tl.constexpr,
          EQ_POS: tl.constexpr, OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_O: tl.constexpr,
          OFF_W_in: tl.constexpr, OFF_b_in: tl.constexpr, OFF_W_out: tl.constexpr, OFF_b_out: tl.constexpr,
          OFF_W_U: tl.constexpr, TAIL_DC: tl.constexpr, TAIL_DV_OP: tl.constexpr, TAIL_DV_EQ: tl.constexpr,
          TAIL_DS_OP: tl.constexpr, TAIL_DS_EQ: tl.constexpr, TAIL_LOSS: tl.constexpr,
          Z: tl.constexpr, RM: tl.constexpr, RF: tl.constexpr, DL: tl.constexpr, DRM: tl.constexpr,
          HID: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DH: tl.constexpr,
          FUSED_MLP: tl.constexpr, STAGE_TILES: tl.constexpr, ONE_PASS: tl.constexpr, PRECISION: tl.constexpr):
    """Forward and backward of one tile of BLOCK_N example slots from ``start`` of model m,
    its sums added into the group's ``partial`` row (``g``: that row minus OFF_W_O)."""
    HD: tl.constexpr = H * Dh
    # Index vectors are made here, not passed in: nothing but pointers and
    # scalars stays live from one tile to the next.
    rows = tl.arange(0, BLOCK_N)
    all_rows = rows < BLOCK_N
    chunk = tl.arange(0, BLOCK_C)
    lanes = tl.arange(0, BLOCK_DH)
    mask_l = lanes < Dh
    # Per-example vectors are loaded again where they are used rather than
    # kept live through the whole tile (registers are the scarce resource).

    # z = sum_t a_t V_tab[row_t], a = softmax over the 4 positions, per head.
    _, row_x, row_y, _, _, _ = _tile_examples(start, m, x_ptr, y_ptr, label_ptr, weight_ptr, stride_data, size,
                                              FIRST_Y_ROW, BLOCK_N)
    for h in range(H):
        a0, a1, a2, a3, Vx, V_op, Vy, V_eq = _head_attention(S_tab, V_tab, row_x, row_y, h, lanes, mask_l,
                                                             OP_ROW, EQ_ROW, H, Dh)
        z = a0[:, None] * Vx + a1[:, None] * V_op + a2[:, None] * Vy + a3[:, None] * V_eq
        tl.store(scratch + Z + rows[:, None] * HD + (h * Dh + lanes)[None, :], to_operand(z, PRECISION),
                 mask=mask_l[None, :])
    tl.debug_barrier()

    # resid_mid = c + z W_O (W_O as an (H*Dh, D) matrix), into scratch as an operand;
    # resid_fin = resid_mid + b_out + relu(resid_mid W_in + b_in) W_out. Fused: all
    # BLOCK_D columns at once, the fp32 resid_mid staying in registers as resid_fin's
    # accumulator; chained: BLOCK_DC columns at a time, in fp32 into ``residual``.
    cols_d = tl.arange(0, BLOCK_D)
    mask_d = cols_d < D
    if FUSED_MLP:
        resid_mid = _resid_mid_cols(p, wt, scratch, rows, all_rows, cols_d, mask_d, D, HD, OFF_W_E, OFF_W_pos,
                                    OFF_W_O, EQ_TOKEN, EQ_POS, Z, RM, BLOCK_N, BLOCK_K, PRECISION)
        tl.debug_barrier()
        _mlp_forward_fused(p, wt, scratch, resid_mid, rows, chunk, cols_d, mask_d, D, F, OFF_W_in, OFF_b_in,
                           OFF_W_out, OFF_b_out, RM, RF, BLOCK_N, BLOCK_C, STAGE_TILES, PRECISION)
    else:
        for j0 in range(0, D, BLOCK_DC):
            offs_j = j0 + tl.arange(0, BLOCK_DC)
            mask_j = offs_j < D
            resid_mid = _resid_mid_cols(p, wt, scratch, rows, all_rows, offs_j, mask_j, D, HD, OFF_W_E, OFF_W_pos,
                                        OFF_W_O, EQ_TOKEN, EQ_POS, Z, RM, BLOCK_N, BLOCK_K, PRECISION)
            tl.store(residual + rows[:, None] * D + offs_j[None, :], resid_mid, mask=mask_j[None, :])
        tl.debug_barrier()
        _mlp_forward_chained(p, wt, scratch, residual, rows, all_rows, chunk, D, F, OFF_W_in, OFF_b_in, OFF_W_out,
                             OFF_b_out, RM, RF, HID, BLOCK_N, BLOCK_C, BLOCK_K, PRECISION)
    tl.debug_barrier()

    # Cross-entropy, BLOCK_V logits at a time: the loss of
    # fastgrok.model.stable_cross_entropy_fwd_bwd, then dlogits weighted by 1/D_m, the
    # label's gradient -(sum of the others). ONE_PASS (one chunk holds every logit,
    # V <= BLOCK_V): from the same registers; otherwise the first pass keeps the running max,
    # the label's logit and the wrong-class mass rescaled to the max, and the second
    # recomputes the logits for the gradient (the same bits: 0 * exp(-inf) adds 0).
    _, _, _, label, w, _ = _tile_examples(start, m, x_ptr, y_ptr, label_ptr, weight_ptr, stride_data, size,
                                          FIRST_Y_ROW, BLOCK_N)
    if ONE_PASS:
        offs_v = tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = _logits(scratch, wt, rows, all_rows, offs_v, mask_v, D, V, OFF_W_U, RF, BLOCK_N, BLOCK_V, BLOCK_K,
                         PRECISION)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        is_label = offs_v[None, :] == label[:, None]
        z_label = tl.sum(tl.where(is_label, logits, 0.0), axis=1)
        top = tl.reduce(logits, 1, _max_nan)
        mass = tl.exp(logits - top[:, None])
        other = tl.sum(tl.where(is_label, 0.0, mass), axis=1)
        loss, total = _label_loss(z_label, top, other)
        dlabel = -other / total * w
        tl.store(scratch + DL + rows[:, None] * V + offs_v[None, :],
                 to_operand(tl.where(is_label, dlabel[:, None], mass / total[:, None] * w[:, None]), PRECISION),
                 mask=mask_v[None, :])
    else:
        top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        other = tl.zeros((BLOCK_N,), tl.float32)
        z_label = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            logits = _logits(scratch, wt, rows, all_rows, offs_v, mask_v, D, V, OFF_W_U, RF, BLOCK_N, BLOCK_V,
                             BLOCK_K, PRECISION)
            logits = tl.where(mask_v[None, :], logits, float("-inf"))
            is_label = offs_v[None, :] == label[:, None]
            z_label += tl.sum(tl.where(is_label, logits, 0.0), axis=1)
            new_top = _max_nan(top, tl.reduce(logits, 1, _max_nan))
            wrong = tl.where(is_label, 0.0, tl.exp(logits - new_top[:, None]))
            other = other * tl.exp(top - new_top) + tl.sum(wrong, axis=1)
            top = new_top
        loss, total = _label_loss(z_label, top, other)
        dlabel = -other / total * w
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            logits = _logits(scratch, wt, rows, all_rows, offs_v, mask_v, D, V, OFF_W_U, RF, BLOCK_N, BLOCK_V,
                             BLOCK_K, PRECISION)
            prob = tl.exp(logits - top[:, None]) / total[:, None] * w[:, None]
            is_label = offs_v[None, :] == label[:, None]
            tl.store(scratch + DL + rows[:, None] * V + offs_v[None, :],
                     to_operand(tl.where(is_label, dlabel[:, None], prob), PRECISION), mask=mask_v[None, :])
    _add_into(part + TAIL_LOSS, tl.sum(loss * w, axis=0), True, accumulate)
    tl.debug_barrier()

    # dW_U = resid_fin^T dlogits, summed over the tile's examples.
    _weight_grad(g + OFF_W_U, scratch + RF, scratch + DL, D, V, BLOCK_G, BLOCK_V, accumulate, BLOCK_N, BLOCK_K,
                 PRECISION)
    tl.debug_barrier()

    # dresid = dlogits W_U^T over resid_fin's scratch, its sum db_out; then the MLP
    # backward: dW_out, dpre, db_in, dW_in, and d resid_mid = dresid + dpre W_in^T (fp32),
    # whose sum is the last position's dc. Fused: dresid in one block, in registers as
    # d resid_mid's accumulator; chained: BLOCK_DC columns at a time, in fp32 into
    # ``residual``.
    if FUSED_MLP:
        dresid = _dresid_cols(wt, g, scratch, rows, all_rows, cols_d, mask_d, accumulate, D, V, OFF_W_U, OFF_b_out,
                              DL, RF, BLOCK_N, BLOCK_K, PRECISION)
        tl.debug_barrier()
        _mlp_backward_fused(p, wt, g, part, scratch, dresid, rows, chunk, cols_d, mask_d, accumulate, D, F,
                            OFF_W_in, OFF_b_in, OFF_W_out, RM, RF, DRM, TAIL_DC, BLOCK_N, BLOCK_D, BLOCK_C,
                            STAGE_TILES, PRECISION)
    else:
        for j0 in range(0, D, BLOCK_DC):
            offs_j = j0 + tl.arange(0, BLOCK_DC)
            mask_j = offs_j < D
            dresid = _dresid_cols(wt, g, scratch, rows, all_rows, offs_j, mask_j, accumulate, D, V, OFF_W_U,
                                  OFF_b_out, DL, RF, BLOCK_N, BLOCK_K, PRECISION)
            tl.store(residual + rows[:, None] * D + offs_j[None, :], dresid, mask=mask_j[None, :])
        tl.debug_barrier()
        _mlp_backward_chained(wt, g, part, scratch, residual, rows, all_rows, chunk, accumulate, D, F, OFF_W_in,
                              OFF_b_in, OFF_W_out, RM, RF, DRM, HID, TAIL_DC, BLOCK_N, BLOCK_C, BLOCK_G, BLOCK_K,
                              PRECISION)
    tl.debug_barrier()

    # dW_O = z^T d resid_mid
    _weight_grad(g + OFF_W_O, scratch + Z, scratch + DRM, HD, D, BLOCK_G, BLOCK_DC, accumulate, BLOCK_N, BLOCK_K,
                 PRECISION)

    # Per head: dz = d resid_mid W_O[h]^T and the softmax backward over the four
    # positions. The op and '=' rows' gradients are summed over the tile; those
    # of the x and y rows (rows shared by examples of the tile) are left per
    # example in dz and co, for launch 3 to sum row by row in a fixed order.
    ex, row_x, row_y, _, _, mask_n = _tile_examples(start, m, x_ptr, y_ptr, label_ptr, weight_ptr, stride_data,
                                                    size, FIRST_Y_ROW, BLOCK_N)
    mask_nl = mask_n[:, None] & mask_l[None, :]
    if STAGE_TILES:  # d resid_mid read once for the H heads' products, not once per head
        drm_staged = tl.load(scratch + DRM + rows[:, None] * D + cols_d[None, :], mask=mask_d[None, :], other=0.0)
    for h in tl.range(0, H, disable_licm=not STAGE_TILES):
        if STAGE_TILES:
            w_o_t = tl.load(wt + OFF_W_O + h * Dh * D + lanes[None, :] * D + cols_d[:, None],
                            mask=mask_d[:, None] & mask_l[None, :], other=0.0)
            dz = mma(drm_staged, w_o_t, tl.zeros((BLOCK_N, BLOCK_DH), tl.float32), PRECISION, True, True)
        else:
            dz = gemm(tl.zeros((BLOCK_N, BLOCK_DH), tl.float32), scratch + DRM, D, 1, rows, all_rows,
                      wt + OFF_W_O + h * Dh * D, 1, D, lanes, mask_l, D, BLOCK_K, PRECISION, True, True)
        a0, a1, a2, a3, Vx, V_op, Vy, V_eq = _head_attention(S_tab, V_tab, row_x, row_y, h, lanes, mask_l,
                                                             OP_ROW, EQ_ROW, H, Dh)
        da0 = tl.sum(dz * Vx, axis=1)
        da1 = tl.sum(dz * V_op, axis=1)
        da2 = tl.sum(dz * Vy, axis=1)
        da3 = tl.sum(dz * V_eq, axis=1)
        mean_da = a0 * da0 + a1 * da1 + a2 * da2 + a3 * da3
        dz = tl.where(mask_nl, dz, 0.0)
        ds_x = tl.where(mask_n, a0 * (da0 - mean_da), 0.0)
        ds_y = tl.where(mask_n, a2 * (da2 - mean_da), 0.0)
        a0 = tl.where(mask_n, a0, 0.0)
        a2 = tl.where(mask_n, a2, 0.0)
        tl.store(dz_ptr + ex[:, None] * HD + (h * Dh + lanes)[None, :], dz, mask=mask_nl)
        tl.store(co_ptr + ex * (4 * H) + h, a0, mask=mask_n)
        tl.store(co_ptr + ex * (4 * H) + H + h, a2, mask=mask_n)
        tl.store(co_ptr + ex * (4 * H) + 2 * H + h, ds_x, mask=mask_n)
        tl.store(co_ptr + ex * (4 * H) + 3 * H + h, ds_y, mask=mask_n)
        dV_op = tl.sum(a1[:, None] * dz, axis=0)
        dV_eq = tl.sum(a3[:, None] * dz, axis=0)
        _add_into(part + TAIL_DV_OP + h * Dh + lanes, dV_op, mask_l, accumulate)
        _add_into(part + TAIL_DV_EQ + h * Dh + lanes, dV_eq, mask_l, accumulate)
        ds_op = tl.sum(tl.where(mask_n, a1 * (da1 - mean_da), 0.0), axis=0)
        ds_eq = tl.sum(tl.where(mask_n, a3 * (da3 - mean_da), 0.0), axis=0)
        _add_into(part + TAIL_DS_OP + h, ds_op, True, accumulate)
        _add_into(part + TAIL_DS_EQ + h, ds_eq, True, accumulate)


# The example kernel's default tiles per precision, and the exceptions of one
# architecture (arch: compute capability x10, the nearest measured one at or below, as
# fastgrok.kernels.layout.launch_options picks). Like the launch options they are
# measured, not derived: the largest tiles that compile without spills and within
# shared memory at the paper config with Triton 3.9.0's ptxas (bench/triton_resources.py;
# the slow test tests/kernels/test_resources.py), keeping software pipelining (num_stages
# >= 2, the launch options) wherever it fits: the static model, bench/sass_model.py, does
# not price the load latency a single stage exposes. Re-measure after upgrading Triton.
# block_c: hidden units of a fused MLP chunk, or output columns of a chained
# product's; block_v: logits of a cross-entropy chunk and columns of dW_U's. A chain
# link re-reads its (BLOCK_N, K) operand once per chunk of output columns, so the
# widest chunks that fit cut the L2 traffic most (tf32 on sm_90: 243 -> 134 MB per
# model-step from 32 to 128 columns, by bench/sass_model.py). block_g: rows of a
# weight-gradient chunk; fused_mlp and stage_tiles: the module docstring; one_pass: the
# cross-entropy from one chunk of every logit (needs d_vocab <= block_v; tf32 on sm_90
# spills 12 bytes with it).
TILINGS = {
    "bf16": dict(block_n=128, block_c=32, block_v=128, block_g=128, block_k=32, group_tiles=8, fused_mlp=True,
                 stage_tiles=True, one_pass=True),
    "tf32": dict(block_n=128, block_c=128, block_v=128, block_g=128, block_k=16, group_tiles=8, fused_mlp=False,
                 stage_tiles=False, one_pass=False),
    "bf16x3": dict(block_n=64, block_c=64, block_v=64, block_g=128, block_k=32, group_tiles=8, fused_mlp=False,
                   stage_tiles=False, one_pass=False),
    "fp32": dict(block_n=64, block_c=128, block_v=64, block_g=128, block_k=16, group_tiles=8, fused_mlp=False,
                 stage_tiles=False, one_pass=False),
}
TILING_EXCEPTIONS = {
    # sm_80 has no wgmma: mma.sync's accumulator layout needs more registers.
    ("bf16", 80): dict(block_n=64, fused_mlp=False, stage_tiles=False),
    ("tf32", 80): dict(block_n=64, block_c=32, block_v=64, block_g=32, block_k=16),
    ("bf16x3", 80): dict(block_c=32, block_v=32, block_g=64),
    ("fp32", 80): dict(block_n=128, block_c=32, block_v=32, block_k=32),
}


def tiling(precision: str, arch: int = 90, **chosen) -> dict:
    """The example kernel's tiles at ``precision`` on compute capability ``arch`` (x10):
    TILINGS's with TILING_EXCEPTIONS's, and the ``chosen`` ones that are not None instead."""
    if precision not in TILINGS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(TILINGS)}")
    unknown = set(chosen) - set(TILINGS[precision])
    if unknown:
        raise ValueError(f"unknown tiling option(s) {sorted(unknown)}; valid: {sorted(TILINGS[precision])}")
    measured = max((a for a in ARCHS if a <= arch), default=ARCHS[0])
    tiles = {**TILINGS[precision], **TILING_EXCEPTIONS.get((precision, measured), {}),
             **{k: v for k, v in chosen.items() if v is not None}}
    if tiles["stage_tiles"] and not tiles["fused_mlp"]:
        raise ValueError(f"stage_tiles=True holds the fused MLP's operands on chip; with fused_mlp=False "
                         f"(precision {precision}, sm_{measured}) it must be False")
    return tiles


def allocate_scratch(layout: Layout, programs: int, precision: str, block_n: int, device) -> tuple[Tensor, Tensor]:
    """examples_kernel's per-program rows: the operand scratch (programs, scratch_floats) of
    ``operand_dtype(precision)`` and the fp32 residual row (programs, block_n * D)."""
    return (torch.empty(programs, scratch_floats(layout, block_n), dtype=operand_dtype(precision), device=device),
            torch.empty(programs, block_n * layout.D, dtype=torch.float32, device=device))


def scratch_floats(layout: Layout, block_n: int) -> int:
    """Scratch per program of examples_kernel (see its Z .. DRM offsets)."""
    L = layout
    return block_n * (L.H * L.Dh + 4 * L.D + L.V + L.F)


@dataclass
class Tiles:
    """The example tiles of a population in groups, and its examples by row (int32 device tensors).

    A model with D_m examples owns cdiv(D_m, block_n) tiles of block_n slots,
    taken in groups of up to ``group_tiles`` consecutive tiles: one program of
    launch 2 computes a group's tiles in order and alone owns the group's row
    of ``Workspace.partial``, so every sum has a fixed order and depends on the
    model's own training set only (not on its batch-mates, the grid or the GPU's
    scheduling).

    group_model, group_start: (groups,) the model and first example of each
    group, model-major; group_first: (M + 1,) each model's first group;
    train_size: (M,) real examples per model. order_x, order_y: (M, N) each
    model's examples sorted by x (by y), stable; start_x, start_y: (M, n + 1)
    where element e's examples begin in them. max_groups and max_row_count (the
    most groups of a model, the most examples of one element) bound launch 3's
    loops.
    """

    group_model: Tensor
    group_start: Tensor
    group_first: Tensor
    train_size: Tensor
    order_x: Tensor
    start_x: Tensor
    order_y: Tensor
    start_y: Tensor
    max_groups: int
    max_row_count: int

    @classmethod
    def build(cls, train_size: np.ndarray, x: Tensor, y: Tensor, n: int, block_n: int, group_tiles: int,
              device) -> "Tiles":
        """x, y: (M, N) the examples' operands (elements 0..n-1), slots past train_size[m] ignored."""
        sizes = np.asarray(train_size, dtype=np.int64)
        if sizes.ndim != 1 or (sizes < 1).any():
            raise ValueError(f"training-set sizes must be a 1-D array of integers >= 1; got {sizes!r}")
        x, y = x.cpu().numpy(), y.cpu().numpy()
        if x.shape != y.shape or x.shape[0] != len(sizes) or x.shape[1] < sizes.max():
            raise ValueError(f"x, y: expected two ({len(sizes)}, >= {sizes.max()}) arrays, got {x.shape} and {y.shape}")
        groups_of = -(-sizes // (block_n * group_tiles))
        model = np.repeat(np.arange(len(sizes)), groups_of)
        start = np.concatenate([np.arange(g) * block_n * group_tiles for g in groups_of])
        first = np.concatenate([[0], np.cumsum(groups_of)])
        order, starts, most = {}, {}, 0
        for name, operand in (("x", x), ("y", y)):
            order[name] = np.zeros(x.shape, dtype=np.int64)
            starts[name] = np.zeros((len(sizes), n + 1), dtype=np.int64)
            for m, size in enumerate(sizes):
                values = operand[m, :size]
                if values.min() < 0 or values.max() >= n:
                    raise ValueError(f"model {m}: {name} holds {values.min()}..{values.max()}, not elements 0..{n - 1}")
                counts = np.bincount(values, minlength=n)
                order[name][m, :size] = np.argsort(values, kind="stable")
                starts[name][m, 1:] = np.cumsum(counts)
                most = max(most, int(counts.max()))

        def dev(a):
            return torch.as_tensor(a, dtype=torch.int32, device=device)

        return cls(dev(model), dev(start), dev(first), dev(sizes), dev(order["x"]), dev(starts["x"]),
                   dev(order["y"]), dev(starts["y"]), int(groups_of.max()), most)

    @property
    def count(self) -> int:
        """Groups of tiles, the work items of launch 2."""
        return self.group_model.shape[0]


def examples_args(layout: Layout, params: Tensor, ws: Workspace, scratch: tuple[Tensor, Tensor], x: Tensor, y: Tensor,
                  labels: Tensor, weight: Tensor, tiles: Tiles, precision: str, arch: int = 90,
                  **chosen) -> tuple[tuple, dict]:
    """Grid and keyword arguments of examples_kernel.

    x, y, labels (M, N) int64, weight (M, N) float32; scratch: ``allocate_scratch``'s two
    tensors, one row each per program of the persistent grid; tiles built for block_n
    and group_tiles. arch: compute capability x10 of the GPU, which picks the
    launch options. chosen: block_n, block_c, block_v, block_g, block_k, group_tiles, fused_mlp, stage_tiles,
    one_pass where not the precision's (``tiling``).
    """
    chosen = tiling(precision, arch, **chosen)
    if chosen["one_pass"] and layout.V > chosen["block_v"]:
        raise ValueError(f"one_pass=True takes every logit in one chunk: d_vocab={layout.V} > block_v="
                         f"{chosen['block_v']}; use block_v >= {triton.next_power_of_2(layout.V)} or one_pass=False")
    block_n, block_c, block_k, group_tiles = (chosen[k] for k in ("block_n", "block_c", "block_k", "group_tiles"))
    for name, t in (("x", x), ("y", y), ("labels", labels), ("weight", weight)):
        if not t.is_contiguous() or t.shape != x.shape:
            raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(x.shape)}, "
                             f"got shape {tuple(t.shape)} (contiguous={t.is_contiguous()})")
    scratch, residual = scratch
    need, dtype = scratch_floats(layout, block_n), operand_dtype(precision)
    if scratch.dim() != 2 or scratch.shape[1] != need or not scratch.is_contiguous() or scratch.dtype != dtype:
        raise ValueError(f"scratch: expected a contiguous (programs, {need}) {dtype} tensor at precision {precision}, "
                         f"got {scratch.dtype} {tuple(scratch.shape)}")
    want = (scratch.shape[0], block_n * layout.D)
    if residual.shape != want or not residual.is_contiguous() or residual.dtype != torch.float32:
        raise ValueError(f"residual scratch: expected a contiguous float32 tensor of shape {want}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    ws.check_precision(precision)
    if ws.partial.shape != (tiles.count, layout.partial_len) or ws.dz.shape[1] != x.shape[1]:
        raise ValueError(f"workspace for {ws.partial.shape[0]} groups and {ws.dz.shape[1]} example slots; "
                         f"these tiles have {tiles.count} groups, the data {x.shape[1]} slots")
    return (min(scratch.shape[0], tiles.count),), dict(
        params_ptr=params, weights_ptr=ws.weights, V_ptr=ws.V, S_ptr=ws.S, dz_ptr=ws.dz, co_ptr=ws.co,
        partial_ptr=ws.partial, scratch_ptr=scratch, residual_ptr=residual, x_ptr=x, y_ptr=y, label_ptr=labels,
        weight_ptr=weight, stride_data=x.stride(0),
        group_model_ptr=tiles.group_model, group_start_ptr=tiles.group_start, train_size_ptr=tiles.train_size,
        n_groups=tiles.count,
        **layout.dims, **layout.row_args("R", "OP_ROW", "FIRST_Y_ROW", "EQ_ROW", "EQ_TOKEN", "EQ_POS"),
        **layout.offset_args(*PARAM_NAMES), **layout.tail, PARTIAL=layout.partial_len,
        GROUP_TILES=group_tiles, BLOCK_N=block_n, BLOCK_D=layout.block_d,
        BLOCK_DC=layout.block_d if chosen["fused_mlp"] else block_c,
        BLOCK_C=block_c, BLOCK_V=chosen["block_v"], BLOCK_G=chosen["block_g"], BLOCK_K=block_k,
        BLOCK_DH=layout.block_dh,
        FUSED_MLP=chosen["fused_mlp"], STAGE_TILES=chosen["stage_tiles"], ONE_PASS=chosen["one_pass"],
        PRECISION=precision, **launch_options("examples", precision, arch),
    )


def examples_launch(layout: Layout, params: Tensor, ws: Workspace, scratch: tuple[Tensor, Tensor], x: Tensor, y: Tensor,
                    labels: Tensor, weight: Tensor, tiles: Tiles, precision: str, **tiling) -> None:
    """Per-example dz and co, and each group's sums into ws.partial (see examples_args)."""
    grid, kwargs = examples_args(layout, params, ws, scratch, x, y, labels, weight, tiles, precision, **tiling)
    examples_kernel[grid](**kwargs)
