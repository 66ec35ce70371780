"""Matmul input precision: what a GPU's tensor cores take, emulated exactly anywhere.

Modes (``PRECISIONS``), each a statement about the operands of a matrix
product; accumulation, master weights, AdamW moments and the loss stay in the
training dtype (float32) in every mode:

    fp32    operands as they are
    tf32    each operand rounded to TF32: 10 explicit mantissa bits, the
            float32 exponent range, round to nearest, ties to even
    bf16    each operand rounded to bfloat16: 7 explicit mantissa bits,
            round to nearest, ties to even
    bf16x3  each operand split a = hi + lo with hi = bf16(a), lo = bf16(a - hi);
            a @ b = hi_a @ hi_b + (hi_a @ lo_b + lo_a @ hi_b), the small cross
            term lo_a @ lo_b dropped: about 16 mantissa bits per operand

Which products are rounded (docs/design.md, "Numerics"): the per-example
products with the attention output and MLP and unembedding weights, W_O,
W_in, W_out and W_U, forward (activation @ W) and backward (d_out @ W^T and
activation^T @ d_out, both operands rounded). They carry ~96% of a step's
FLOPs at the paper config and are the products a GPU runs on tensor cores.
The per-step (token, position) tables (keys, values, queries, scores) and the
four-position attention arithmetic stay in the training dtype: every engine
computes them once per step on a few hundred rows, on ordinary FMA units.

A product of two rounded operands is exact in float32 (at most 2 x 8 = 16
significant bits for bf16, 22 for tf32), so the CPU emulation differs from a
tensor core only in the order of the float32 accumulation.

Special values: rounding keeps the sign, rounds the largest magnitudes that
would round past the format's largest finite value to infinity, keeps
infinities, and turns any NaN into a NaN; subnormal inputs round on the same
grid as the format's own subnormals (the float32 exponent range has 8 bits
in all three formats).
"""
from __future__ import annotations

import torch
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "bf16", "bf16x3")
# Explicit mantissa bits kept by each rounding format.
MANTISSA_BITS = {"tf32": 10, "bf16": 7}
# Mantissa bits of the storage dtype, and the integer type of its bits.
_STORAGE = {torch.float32: (23, torch.int32), torch.float64: (52, torch.int64)}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """x rounded to ``bits`` explicit mantissa bits, nearest, ties to even (a new tensor).

    Works on the bit pattern: adding half a unit of the kept last place,
    minus one unless that place is odd, then clearing the dropped bits is
    round-half-even on the magnitude (the sign bit is never reached below
    NaN's patterns), including subnormals and the carry into the exponent
    that turns the largest magnitudes into infinity. NaN is kept apart: its
    payload may lie only in the dropped bits.
    """
    storage_bits, int_dtype = _STORAGE[x.dtype]
    drop = storage_bits - bits
    if drop <= 0:
        return x.clone()
    i = x.contiguous().view(int_dtype)
    rounded = (i >> drop).bitwise_and_(1).add_(i).add_((1 << (drop - 1)) - 1).bitwise_and_(~((1 << drop) - 1))
    rounded = rounded.view(x.dtype)
    return rounded.where(x == x, x)          # x != x: NaN


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) with hi = bf16(x), lo = bf16(x - hi): the bf16x3 operand split."""
    hi = round_mantissa(x, 7)
    return hi, round_mantissa(x - hi, 7)


# A prepared operand: the tensor itself (fp32), its rounding (tf32, bf16), or its
# (hi, lo) split (bf16x3). An engine prepares each operand once and reuses it in
# every product it enters, transposed or not.
Operand = Tensor | tuple[Tensor, Tensor]


def operand(x: Tensor, precision: str) -> Operand:
    """x as every product at ``precision`` takes it."""
    if precision == "fp32":
        return x
    if precision in MANTISSA_BITS:
        return round_mantissa(x, MANTISSA_BITS[precision])
    if precision == "bf16x3":
        return split_bf16(x)
    raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")


def transposed(op: Operand) -> Operand:
    """The last two dimensions of a prepared operand swapped."""
    return tuple(t.transpose(-1, -2) for t in op) if isinstance(op, tuple) else op.transpose(-1, -2)


def product(a: Operand, b: Operand) -> Tensor:
    """a @ b of two prepared operands (batched like torch.matmul)."""
    if isinstance(a, tuple):
        (a_hi, a_lo), (b_hi, b_lo) = a, b
        return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)
    return a @ b


def matmul(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """a @ b (batched like torch.matmul) with the operands taken at ``precision``."""
    return product(operand(a, precision), operand(b, precision))


__all__ = ["PRECISIONS", "MANTISSA_BITS", "check_precision", "round_mantissa",
           "split_bf16", "Operand", "operand", "transposed", "product", "matmul"]
