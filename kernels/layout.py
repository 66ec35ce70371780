"""What every fused kernel agrees on: the flat parameter layout, the padded
block shapes, the (token, position) rows and the matmul precision.

Kernels see a model's parameters as one row of the population's flat (M, P)
buffer, in ``fastgrok.model.PARAM_NAMES`` order; ``Layout`` turns a
``ModelConfig`` into the offsets of each parameter in that row and into the
dimensions the kernels take as constexprs; blocks are powers of two (what
``tl.arange`` needs), and a padded lane is masked on every load and store, so
it reads zeros and writes nothing.

Every matmul is done a head or a chunk at a time (``gemm`` below), so that no
operand is larger than about (64, 32) fp32: Triton keeps a dot's operands in
registers, and a whole (128, 128) operand would not fit beside the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastgrok.config import ModelConfig
from fastgrok.model import PARAM_NAMES, param_shapes

# Matmul input precisions. "ieee" is fp32 FMA on the CUDA cores; "tf32x3" splits each
# fp32 operand into two tf32 parts and keeps three of the four products
# (relative error per product ~2^-21 instead of 2^-24); "tf32" rounds the
# inputs to 10 mantissa bits; "bf16" casts the inputs to bfloat16 (8 bits).
# Every mode accumulates in fp32 and keeps fp32 parameters and moments.
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
DEFAULT_PRECISION = "tf32x3"

# Launch options of each kernel at its default tile sizes. ptxas trades a few
# spilled bytes for occupancy in ways that change with the precision and the
# architecture, so these are measured, not derived: every kernel compiles
# without spills at the paper config on sm_80 and sm_90 with Triton 3.9.0's
# ptxas (bench/triton_resources.py prints the figures; the slow test
# tests/kernels/test_resources.py checks them). Re-measure after upgrading
# Triton. The example kernel's 8 warps hold a 64-example tile in at most 255
# registers per thread, which leaves one program per SM.
LAUNCH_OPTIONS = {
    "tables_forward": dict(num_warps=4, num_stages=3),
    "examples": dict(num_warps=8, num_stages=3),
    "adamw": dict(num_warps=4, num_stages=3),
}
LAUNCH_EXCEPTIONS = {
    ("examples", "ieee", 90): dict(num_stages=1),
    ("adamw", "ieee", 90): dict(num_stages=1, maxnreg=128),
    ("adamw", "tf32", 90): dict(num_stages=1),
}
ARCHS = (80, 90)


def launch_options(kernel: str, precision: str, arch: int) -> dict:
    """num_warps, num_stages (and maxnreg) for ``kernel`` on compute capability ``arch`` (x10).

    Architectures other than the two measured ones take the options of the
    nearest one below (sm_86/89 -> sm_80, sm_100 -> sm_90).
    """
    measured = max((a for a in ARCHS if a <= arch), default=ARCHS[0])
    return {**LAUNCH_OPTIONS[kernel], **LAUNCH_EXCEPTIONS.get((kernel, precision, measured), {})}


@dataclass(frozen=True)
class Layout:
    """Offsets into a model's flat parameter row, and the model's dimensions.

    n elements, V = n + 2 vocabulary, R = 2n + 2 (token, position) rows.
    """

    D: int
    H: int
    Dh: int
    F: int
    V: int
    offsets: dict
    P: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Layout":
        if cfg.n_ctx != 4:
            raise ValueError(f"n_ctx={cfg.n_ctx}: the fused kernels assume <x> <op> <y> <=> (4 positions)")
        offsets, start = {}, 0
        for name, shape in param_shapes(cfg).items():
            offsets[name] = start
            start += math.prod(shape)
        assert tuple(offsets) == PARAM_NAMES
        return cls(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, offsets, start)

    @property
    def n(self) -> int:
        return self.V - 2

    @property
    def R(self) -> int:
        return 2 * self.n + 2

    @property
    def scale(self) -> float:
        """Attention score scale 1/sqrt(Dh), rounded to float32 where it multiplies."""
        return 1 / math.sqrt(self.Dh)

    @property
    def block_dh(self) -> int:
        """A head's lanes padded to a power of two (>= 16 for tl.dot)."""
        return max(16, triton.next_power_of_2(self.Dh))

    @property
    def dims(self) -> dict:
        return dict(D=self.D, H=self.H, Dh=self.Dh, F=self.F, V=self.V)

    def offset_args(self, *names: str) -> dict:
        """{"OFF_W_E": ..., ...} for the named parameters, plus the row length P."""
        return {f"OFF_{k}": self.offsets[k] for k in names} | {"P": self.P}


@triton.jit
def row_token_pos(r, n: tl.constexpr):
    """Token and position of (token, position) row r (fastgrok.engine.TokenRows)."""
    first_y, eq_row = n + 1, 2 * n + 1
    token = tl.where(r < n, r, tl.where(r == n, n, tl.where(r < eq_row, r - first_y, n + 1)))
    pos = tl.where(r < n, 0, tl.where(r == n, 1, tl.where(r < eq_row, 2, 3)))
    return token, pos


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation in the chosen input precision."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@dataclass
class Workspace:
    """Per-step scratch of the fused kernels, (M, ...) float32.

    K, V: (M, R, H*Dh) key and value tables; S: (M, R, H) scaled scores;
    q: (M, H*Dh) the query (launch 1). dV, dS, dc: their gradients (dc of the
    last position's residual), summed over examples with atomics (launch 2).
    dq: (M, H*Dh) and Rt: (M, R, D), the rows' residual stream, written by the
    table backward (launch 3), which also overwrites K with dK once it has
    used K. loss: (M,) mean training loss. check: (M,) the sum of every
    gradient contribution of launch 2 and check_tab: (M, row blocks) the sum of
    launch 1's tables, one slot per program: together non-finite iff a
    gradient would be (barring float32 overflow), the test Population.step
    applies to its gradients, known before launch 3 computes the last ones.
    """

    K: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    q: torch.Tensor
    dV: torch.Tensor
    dS: torch.Tensor
    dq: torch.Tensor
    dc: torch.Tensor
    Rt: torch.Tensor
    loss: torch.Tensor
    check: torch.Tensor
    check_tab: torch.Tensor

    @classmethod
    def allocate(cls, layout: Layout, M: int, device, block_r: int = 32) -> "Workspace":
        """block_r: rows per program of launch 1 (one check_tab slot each)."""
        R, HD = layout.R, layout.H * layout.Dh

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(K=zeros(M, R, HD), V=zeros(M, R, HD), S=zeros(M, R, layout.H), q=zeros(M, HD),
                   dV=zeros(M, R, HD), dS=zeros(M, R, layout.H), dq=zeros(M, HD), dc=zeros(M, layout.D),
                   Rt=zeros(M, R, layout.D), loss=zeros(M), check=zeros(M),
                   check_tab=zeros(M, triton.cdiv(R, block_r)))


@triton.jit
def gemm(acc, a_ptr, SA_I: tl.constexpr, SA_K: tl.constexpr, offs_i, mask_i,
         b_ptr, SB_K: tl.constexpr, SB_J: tl.constexpr, offs_j, mask_j,
         K: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A[offs_i, :K] @ B[:K, offs_j], both read from memory BLOCK_K at a time.

    A[i, k] is at a_ptr + i*SA_I + k*SA_K and B[k, j] at b_ptr + k*SB_K + j*SB_J,
    so transposed operands are only a matter of strides. Streaming K keeps
    each operand at (BLOCK_I or BLOCK_J) x BLOCK_K.
    """
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_i[:, None] * SA_I + offs_k[None, :] * SA_K,
                    mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * SB_K + offs_j[None, :] * SB_J,
                    mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc
