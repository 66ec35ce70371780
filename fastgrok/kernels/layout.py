"""What every fused kernel agrees on: the layout they are given, the padded
block shapes, the matmul precision and its operand rounding, launch options and
the per-step workspace.

Kernels see a model's parameters as one row of the population's flat (M, P)
buffer and its (token, position) rows as ``fastgrok.layout`` defines them:
``Layout`` hands them a ``ParamLayout``'s offsets and a ``TokenRows``'s row
numbers as constexprs (``offset_args``, ``row_args``), with the dimensions;
blocks are powers of two (what ``tl.arange`` needs), and a padded lane is
masked on every load and store, so it reads zeros and writes nothing.

Matmuls are done a head or a chunk at a time (``gemm`` below, K streamed
BLOCK_K at a time; ``mma`` for operands already in registers): Triton keeps a
dot's accumulator and register operands in registers, 255 per thread, so the
chunk sizes are what the example kernel's tiles per precision
(fastgrok.kernels.examples.TILINGS) are measured for.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgrok import precision as _precision
from fastgrok.config import ModelConfig
from fastgrok.layout import N_CTX, POS_EQ, POS_OP, POS_X, POS_Y, ParamLayout, TokenRows

# Matmul input precisions: fastgrok.precision's modes, for the per-example products
# with W_O, W_in, W_out and W_U (``mma`` below); the table products and the
# attention arithmetic are fp32 in every mode. The default is bf16 inputs, the
# fastest tensor-core mode, because the precision study (README, "Does matmul
# precision change grokking?") found its grokking statistics within fp32's
# seed-to-seed spread; fp32, tf32 and bf16x3 are one --precision away.
PRECISIONS = _precision.PRECISIONS
DEFAULT_PRECISION = "bf16"

# Launch options of each kernel at its default tile sizes. ptxas trades a few
# spilled bytes for occupancy in ways that change with the precision and the
# architecture, so these are measured, not derived: every kernel compiles
# without spills at the paper config on sm_80 and sm_90 with Triton 3.9.0's
# ptxas (bench/triton_resources.py prints the figures; the slow test
# tests/kernels/test_resources.py checks them). Re-measure after upgrading
# Triton. The example kernel's 8 warps hold its tile (fastgrok.kernels.examples.TILINGS)
# in at most 255 registers per thread, which leaves one program per SM; in fp32 on
# sm_90 ptxas settles at 128 registers and spills unless maxnreg says 255; tf32's
# 128-example tiles on sm_90 and bf16x3's on sm_80 fit with two pipeline stages, not three.
# The table backward (AdamW's block 0, or alone) on sm_80: ptxas picks 72-80 registers
# and spills unless maxnreg allows 128 (it takes 96), and AdamW's launch there fits
# with two stages.
LAUNCH_OPTIONS = {
    "tables_forward": dict(num_warps=4, num_stages=3),
    "examples": dict(num_warps=8, num_stages=3),
    "reduce": dict(num_warps=4, num_stages=1),
    "adamw": dict(num_warps=4, num_stages=3),
    # Launched alone (a gradient without an update), not as launch 3's block 0.
    "tables_backward": dict(num_warps=4, num_stages=1),
}
# The table kernels (tables_forward, reduce, adamw, tables_backward) compute in
# fp32 whatever the population's precision: they take "fp32" here.
LAUNCH_EXCEPTIONS = {
    ("examples", "fp32", 90): dict(num_stages=1, maxnreg=255),
    ("examples", "bf16x3", 80): dict(num_stages=2),
    ("examples", "tf32", 90): dict(num_stages=2),
    ("adamw", "fp32", 80): dict(num_stages=2),
    ("tables_backward", "fp32", 80): dict(maxnreg=128),
}
ARCHS = (80, 90)


# Whether Triton may contract a * b + c into one FMA. Pinned, not left to the
# default: Triton 3.9 fuses unless TRITON_DEFAULT_FP_FUSION says otherwise and
# 3.10 will not, and the kernels were verified and their resources measured
# with fusion on, so an upgrade must not change their results silently.
FP_FUSION = True


def launch_options(kernel: str, precision: str, arch: int) -> dict:
    """num_warps, num_stages (and maxnreg) for ``kernel`` on compute capability ``arch`` (x10),
    and the pinned FP_FUSION.

    Architectures other than the two measured ones take the options of the
    nearest one below (sm_86/89 -> sm_80, sm_100 -> sm_90).
    """
    measured = max((a for a in ARCHS if a <= arch), default=ARCHS[0])
    return {**LAUNCH_OPTIONS[kernel], **LAUNCH_EXCEPTIONS.get((kernel, precision, measured), {}),
            "enable_fp_fusion": FP_FUSION}


# The row constexprs a kernel may take: TokenRows.constexprs() and the operator's
# token and the positions the table kernels gather W_pos rows with.
ROW_ARGS = ("R", "OP_ROW", "FIRST_Y_ROW", "EQ_ROW", "OP_TOKEN", "EQ_TOKEN", "POS_X", "POS_OP", "POS_Y", "EQ_POS")


# Launch 3's tiles (``kernels.reduce``): elements per program of the row sums, and
# columns of the partial rows per program; they fix Workspace.check's width, the
# slots every AdamW program sums (wide column blocks keep them few: 28 at the paper
# config, where 2048 columns gave 88 and spilled the AdamW kernel's registers).
REDUCE_BLOCKS = (16, 8192)


@dataclass(frozen=True)
class Layout:
    """``fastgrok.layout``'s parameter row and token rows, as the kernels take them.

    ``params`` (offsets, P) and ``rows`` (R and every row number) are the
    layout module's own objects; nothing here re-derives them. What is added
    is kernel-specific: the dimensions, the padded head width and the score
    scale as constexprs.
    """

    params: ParamLayout
    rows: TokenRows
    D: int
    H: int
    Dh: int
    F: int
    V: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, rows: TokenRows | None = None) -> "Layout":
        """The kernels' layout of ``cfg``; ``rows`` default to a task of d_vocab - 2 elements (op and = follow)."""
        if cfg.n_ctx != N_CTX:
            raise ValueError(f"n_ctx={cfg.n_ctx}: the fused kernels assume <x> <op> <y> <=> ({N_CTX} positions)")
        rows = TokenRows(cfg.d_vocab - 2) if rows is None else rows
        if rows.token.max() >= cfg.d_vocab:
            raise ValueError(f"token rows of n={rows.n} elements need more than d_vocab={cfg.d_vocab} tokens")
        _check_row_order(rows)
        return cls(ParamLayout.from_config(cfg), rows, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp,
                   cfg.d_vocab)

    @property
    def offsets(self) -> dict[str, int]:
        return self.params.offsets

    @property
    def P(self) -> int:
        return self.params.P

    @property
    def R(self) -> int:
        return self.rows.R

    @property
    def scale(self) -> float:
        """Attention score scale 1/sqrt(Dh), rounded to float32 where it multiplies."""
        return 1 / math.sqrt(self.Dh)

    @property
    def block_dh(self) -> int:
        """A head's lanes padded to a power of two (>= 16 for tl.dot)."""
        return max(16, triton.next_power_of_2(self.Dh))

    @property
    def block_d(self) -> int:
        """The residual width padded to a power of two (>= 16): the example kernel's
        residual-stream products take it in one block."""
        return max(16, triton.next_power_of_2(self.D))

    @property
    def dims(self) -> dict:
        return dict(D=self.D, H=self.H, Dh=self.Dh, F=self.F, V=self.V)

    @property
    def tail(self) -> dict[str, int]:
        """Offsets in a ``Workspace.partial`` row of what follows the W_O..W_U gradients."""
        D, HD, H = self.D, self.H * self.Dh, self.H
        start = self.P - self.offsets["W_O"]
        return dict(TAIL_DC=start, TAIL_DV_OP=start + D, TAIL_DV_EQ=start + D + HD, TAIL_DS_OP=start + D + 2 * HD,
                    TAIL_DS_EQ=start + D + 2 * HD + H, TAIL_LOSS=start + D + 2 * HD + 2 * H)

    @property
    def partial_len(self) -> int:
        """Floats per row of ``Workspace.partial``: the W_O..W_U gradients and the tail."""
        return self.tail["TAIL_LOSS"] + 1

    def table_programs(self, block_r: int) -> int:
        """Programs per model of launch 1 (``kernels.tables_forward``): blocks of block_r of
        the n + 2 tokens (elements, operator, '='); each leaves one slot of ``Workspace.check_tab``."""
        return triton.cdiv(self.rows.n + 2, block_r)

    def reduce_programs(self, block_e: int = REDUCE_BLOCKS[0], block: int = REDUCE_BLOCKS[1]) -> int:
        """Programs per model of launch 3 (``kernels.reduce``): element blocks of block_e,
        then partial-row blocks of block; each leaves one slot of ``Workspace.check``."""
        return triton.cdiv(self.rows.n, block_e) + triton.cdiv(self.partial_len, block)

    def offset_args(self, *names: str) -> dict:
        """{"OFF_W_E": ..., ...} for the named parameters, plus the row length P."""
        return {f"OFF_{k}": self.offsets[k] for k in names} | {"P": self.P}

    def check_flat(self, **buffers: Tensor) -> int:
        """M of the named (M, P) buffers, which must be contiguous float32 with one row per model."""
        M = next(iter(buffers.values())).shape[0]
        for name, t in buffers.items():
            if not t.is_contiguous() or t.shape != (M, self.P) or t.dtype != torch.float32:
                raise ValueError(f"{name}: expected a contiguous float32 tensor of shape {(M, self.P)}, "
                                 f"got {t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()})")
        return M

    def row_args(self, *names: str) -> dict:
        """The named row constexprs (all of ROW_ARGS by default), from ``rows``."""
        every = self.rows.constexprs() | dict(OP_TOKEN=self.rows.op_token, POS_X=POS_X, POS_OP=POS_OP, POS_Y=POS_Y)
        return {k: every[k] for k in names or ROW_ARGS}


def _check_row_order(rows: TokenRows) -> None:
    """The kernels take every row number from ``rows`` but rely on their order
    (fastgrok.layout): x rows (row = element), the operator, y rows (FIRST_Y_ROW +
    element), '='; the token and position of each row in that order, built here,
    must be TokenRows's."""
    r = np.arange(rows.R)
    x_rows, op_row, y_rows = r < rows.op_row, r == rows.op_row, r < rows.eq_row
    token = np.where(x_rows, r, np.where(op_row, rows.op_token, np.where(y_rows, r - rows.first_y_row, rows.eq_token)))
    pos = np.where(x_rows, POS_X, np.where(op_row, POS_OP, np.where(y_rows, POS_Y, POS_EQ)))
    if not (np.array_equal(token, rows.token) and np.array_equal(pos, rows.pos)):
        raise ValueError(f"TokenRows(n={rows.n}) are not in the order the fused kernels assume "
                         "(x rows, the operator, y rows, '=')")


# The dtype bf16-rounded operands enter tl.dot in. The interpreter
# (TRITON_INTERPRET=1) has no working bfloat16 (its casts corrupt values), so
# there they stay float32, which holds them exactly: the same products.
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
OPERAND_BF16 = tl.constexpr(tl.float32 if INTERPRETING else tl.bfloat16)


@triton.jit
def round_mantissa(x, DROP: tl.constexpr):
    """fp32 ``x`` rounded to 23 - DROP explicit mantissa bits, nearest, ties to even
    (DROP = 13: tf32, 16: bf16), exactly as fastgrok.precision.round_mantissa.

    On the bit pattern: add half a unit of the last kept place, minus one unless
    that place is odd, clear the dropped bits (unsigned, so the carry out of the
    largest finite magnitudes gives infinity and nothing overflows). NaN is kept
    apart, since its payload may lie only in the dropped bits. Integer arithmetic
    is what makes the interpreter, which has no tf32 and ignores bf16, compute
    the rounded operands a tensor core takes.
    """
    i = x.to(tl.uint32, bitcast=True)
    KEEP: tl.constexpr = (0xFFFFFFFF >> DROP) << DROP
    HALF: tl.constexpr = (1 << (DROP - 1)) - 1
    rounded = ((i + HALF + ((i >> DROP) & 1)) & KEEP).to(tl.float32, bitcast=True)
    return tl.where((i & 0x7FFFFFFF) > 0x7F800000, x, rounded)


def operand_dtype(precision: str) -> torch.dtype:
    """The dtype the fused kernels store matmul operands in at ``precision`` (``to_operand``):
    bf16 for bf16 inputs (float32 in the interpreter, which has no bfloat16), int32 for
    bf16x3 (a packed split, ``split_bf16x3``), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not INTERPRETING.value:
        return torch.bfloat16
    return torch.int32 if precision == "bf16x3" else torch.float32


@triton.jit
def to_bf16(x):
    """fp32 ``x`` rounded to bf16 (nearest, ties to even), in OPERAND_BF16: on a GPU the
    conversion instruction itself (cvt.rn.bf16x2.f32, which keeps subnormals and
    gives infinity past the largest finite bf16, as ``round_mantissa`` does), one
    instruction per two values instead of ``round_mantissa``'s integer sequence;
    in the interpreter ``round_mantissa``, whose result fp32 holds exactly."""
    if INTERPRETING:
        return round_mantissa(x, 16)
    else:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne")


@triton.jit
def _bf16_bits(v):
    """The 16 bits (uint32, low half) of a bf16-rounded fp32 ``v``; any NaN as the quiet
    NaN 0x7FC0, since a NaN's payload may lie only in the 16 bits dropped."""
    i = v.to(tl.uint32, bitcast=True)
    return tl.where((i & 0x7FFFFFFF) > 0x7F800000, tl.full(i.shape, 0x7FC0, tl.uint32), i >> 16)


@triton.jit
def split_bf16x3(x):
    """fp32 ``x`` as bf16x3's stored operand: one 32-bit word holding hi = bf16(x) in its
    upper half and lo = bf16(x - hi) in its lower (fastgrok.precision.split_bf16), so
    the split is made once, where the operand is written, not in every product that
    reads it; ``unpack_bf16x3`` gives hi and lo back as fp32 with two integer ops."""
    hi, lo = _halves(x, False)
    return ((_bf16_bits(hi) << 16) | _bf16_bits(lo)).to(tl.int32, bitcast=True)


@triton.jit
def unpack_bf16x3(word):
    """(hi, lo) as fp32 from ``split_bf16x3``'s word: a bf16 value is the upper half of its fp32."""
    u = word.to(tl.uint32, bitcast=True)
    return (u & 0xFFFF0000).to(tl.float32, bitcast=True), (u << 16).to(tl.float32, bitcast=True)


@triton.jit
def to_operand(x, PRECISION: tl.constexpr):
    """fp32 ``x`` as a matmul operand is stored (``operand_dtype``), rounded once, where it
    is written: to tf32; to bf16 in bf16 storage; for bf16x3 split into one packed word
    (``split_bf16x3``); unchanged for fp32. ``mma`` takes it with READY."""
    if PRECISION == "tf32":
        return round_mantissa(x, 13)
    elif PRECISION == "bf16":
        return to_bf16(x)
    elif PRECISION == "bf16x3":
        return split_bf16x3(x)
    else:
        return x


@triton.jit
def from_operand(x, PRECISION: tl.constexpr):
    """The fp32 value of a stored operand (``to_operand``): hi + lo for bf16x3's word."""
    if PRECISION == "bf16x3":
        hi, lo = unpack_bf16x3(x)
        return hi + lo
    else:
        return x.to(tl.float32)


@triton.jit
def _rounded(x, DROP: tl.constexpr, READY: tl.constexpr):
    if READY:
        return x
    else:
        return round_mantissa(x, DROP)


@triton.jit
def _halves(x, READY: tl.constexpr):
    """bf16x3's (hi, lo) of an operand: unpacked from its stored word, or split here."""
    if READY:
        return unpack_bf16x3(x)
    else:
        hi = to_bf16(x).to(tl.float32)
        return hi, to_bf16(x - hi).to(tl.float32)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, A_READY: tl.constexpr = False, B_READY: tl.constexpr = False):
    """acc + a @ b with fp32 accumulation, the operands taken at PRECISION (fastgrok.precision).

    Each operand is rounded explicitly first, so that what reaches the tensor
    core is already representable (the tf32 dot then takes it exactly, the
    bf16 cast is exact) and the interpreter computes the same products;
    A_READY / B_READY say an operand was stored rounded already (``to_operand``).
    bf16x3: a = a_hi + a_lo, a_hi = bf16(a), a_lo = bf16(a - a_hi) (a READY operand is
    the stored word of both); the small cross terms first, then a_hi b_hi, into the
    same fp32 accumulator.
    """
    if PRECISION == "fp32":
        return tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        return tl.dot(_rounded(a, 13, A_READY), _rounded(b, 13, B_READY), acc, input_precision="tf32")
    elif PRECISION == "bf16":
        a = a.to(OPERAND_BF16) if A_READY else to_bf16(a)
        b = b.to(OPERAND_BF16) if B_READY else to_bf16(b)
        return tl.dot(a, b, acc)
    else:
        tl.static_assert(PRECISION == "bf16x3", "PRECISION must be one of fp32, tf32, bf16, bf16x3")
        a_hi, a_lo = _halves(a, A_READY)
        b_hi, b_lo = _halves(b, B_READY)
        acc = tl.dot(a_hi.to(OPERAND_BF16), b_lo.to(OPERAND_BF16), acc)
        acc = tl.dot(a_lo.to(OPERAND_BF16), b_hi.to(OPERAND_BF16), acc)
        return tl.dot(a_hi.to(OPERAND_BF16), b_hi.to(OPERAND_BF16), acc)


@dataclass
class Workspace:
    """Per-step scratch of the fused kernels, float32, every sum in a fixed order.

    Launch 1: K, V (M, R, H*Dh) key and value tables, S (M, R, H) scaled
    scores, q (M, H*Dh) the query, check_tab (M, token blocks) the sum of each
    program's tables.
    Launch 2 (examples) writes no sum across tiles: per example slot, dz (M, N,
    H*Dh) the gradient of the attention output and co (M, N, 4, H) its a_x, a_y,
    ds_x, ds_y (attention weights and score gradients of the x and y rows); per
    group of tiles, one row of ``partial`` (groups, ``partial_len``): the
    group's sums of the W_O..W_U gradients (the flat row's tail from W_O on),
    then ``Tail``: dc, dV and dS of the operator and '=' rows, and the loss.
    Launch 3 (``kernels.reduce``) sums them in a fixed order into the
    gradients, dV, dS (M, R, ...), dc (M, D) and loss (M,), and check (M,
    ``Layout.reduce_programs``): each of its programs' sum of what it wrote.
    check and check_tab together are non-finite iff a gradient would be
    (barring float32 overflow), the test the torch backend's step applies to
    its gradients, known before the table backward computes the last ones.
    The table backward then writes dq (M, H*Dh), into Rt (M, R, D) the
    residual stream of its n + 4 folded rows, and over K and S the folded
    rows of dV and dS (kernels.tables_backward).
    Launch 1 also writes ``weights`` (M, P - offset of W_O): the flat rows from
    W_O on as matmul operands at the population's precision (``to_operand``:
    rounded once per step, bf16 storage for bf16), which launch 2 multiplies by.
    """

    K: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    q: torch.Tensor
    dz: torch.Tensor
    co: torch.Tensor
    partial: torch.Tensor
    dV: torch.Tensor
    dS: torch.Tensor
    dq: torch.Tensor
    dc: torch.Tensor
    Rt: torch.Tensor
    loss: torch.Tensor
    check: torch.Tensor
    check_tab: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def allocate(cls, layout: "Layout", M: int, N: int, groups: int, device, block_r: int = 32,
                 precision: str = "fp32") -> "Workspace":
        """N example slots per model, ``groups`` groups of tiles in all (``examples.Tiles``);
        block_r: rows per program of launch 1 (one check_tab slot each); precision: the
        population's, which sets the dtype of ``weights``."""
        R, HD = layout.R, layout.H * layout.Dh

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float32, device=device)

        return cls(K=zeros(M, R, HD), V=zeros(M, R, HD), S=zeros(M, R, layout.H), q=zeros(M, HD),
                   dz=zeros(M, N, HD), co=zeros(M, N, 4, layout.H), partial=zeros(groups, layout.partial_len),
                   dV=zeros(M, R, HD), dS=zeros(M, R, layout.H), dq=zeros(M, HD), dc=zeros(M, layout.D),
                   Rt=zeros(M, R, layout.D), loss=zeros(M), check=zeros(M, layout.reduce_programs()),
                   check_tab=zeros(M, layout.table_programs(block_r)),
                   weights=torch.zeros(M, layout.P - layout.offsets["W_O"], dtype=operand_dtype(precision),
                                       device=device))

    def check_precision(self, precision: str) -> None:
        """``weights`` must hold operands at ``precision`` (allocated for it)."""
        if self.weights.dtype != operand_dtype(precision):
            raise ValueError(f"ws.weights is {self.weights.dtype}; precision {precision} stores its operands as "
                             f"{operand_dtype(precision)} (Workspace.allocate(..., precision={precision!r}))")


@triton.jit
def gemm(acc, a_ptr, SA_I: tl.constexpr, SA_K: tl.constexpr, offs_i, mask_i,
         b_ptr, SB_K: tl.constexpr, SB_J: tl.constexpr, offs_j, mask_j,
         K: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
         A_READY: tl.constexpr = False, B_READY: tl.constexpr = False):
    """acc + A[offs_i, :K] @ B[:K, offs_j], both read from memory BLOCK_K at a time.

    A[i, k] is at a_ptr + i*SA_I + k*SA_K and B[k, j] at b_ptr + k*SB_K + j*SB_J,
    so transposed operands are only a matter of strides. Streaming K keeps
    each operand at (BLOCK_I or BLOCK_J) x BLOCK_K. A_READY, B_READY: see ``mma``.
    """
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_i[:, None] * SA_I + offs_k[None, :] * SA_K,
                    mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * SB_K + offs_j[None, :] * SB_J,
                    mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, A_READY, B_READY)
    return acc
