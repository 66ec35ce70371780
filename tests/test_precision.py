"""Matmul precision modes: the rounding against its definition, and whole steps against the oracle.

The rounding reference below is written from the definition of a binary
floating-point format with b explicit mantissa bits and float32's exponent
range, in exact rational arithmetic: the representable neighbours of x are
multiples of 2^(e - b) with e = max(floor(log2 |x|), -126); take the nearer,
the one with an even multiple on a tie, and infinity at or past 2^128.
"""
import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from fastgrok import precision as mp
from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.population import Population
from fastgrok.tasks import Task
from fastgrok.train import train_reference
from population_checks import flat


def reference_round(x: float, bits: int) -> float:
    """x (a float32 value) rounded to ``bits`` explicit mantissa bits, by the definition."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    v = abs(Fraction(x))
    e = max(math.floor(math.log2(v)), -126)
    while Fraction(2) ** e > v:          # log2 of a float rounds; fix e exactly
        e -= 1
    while Fraction(2) ** (e + 1) <= v and e >= -126:
        e += 1
    e = max(e, -126)
    unit = Fraction(2) ** (e - bits)
    q, rest = divmod(v, unit)
    if rest > unit / 2 or (rest == unit / 2 and q % 2 == 1):
        q += 1
    r = q * unit
    if r >= Fraction(2) ** 128:
        return math.copysign(math.inf, x)
    return math.copysign(float(r), x)


def f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def hard_cases(bits: int) -> list[float]:
    """Ties both ways, just off ties, subnormals, the largest finite values, zeros, inf."""
    drop = 23 - bits
    half = 1 << (drop - 1)
    cases = []
    for exponent in (1, 100, 127, 200, 254):            # biased exponents
        for kept in (0b1010, 0b1011, (1 << bits) - 1):   # even and odd last kept bits, all ones
            base = (exponent << 23) | (kept << drop)
            for low in (0, 1, half - 1, half, half + 1, (1 << drop) - 1):
                for sign in (0, 1 << 31):
                    cases.append(f32(sign | base | low))
    for sub in (1, 2, half - 1, half, half + 1, 3 * half, (1 << drop) - 1, 1 << drop, 0x7FFFFF, 0x400000 | half):
        cases += [f32(sub), f32(sub | 1 << 31)]          # subnormals, positive and negative
    cases += [f32(0x7F7FFFFF), f32(0xFF7FFFFF), 0.0, -0.0, math.inf, -math.inf, 1.0, -1.0, 3.0]
    return cases


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_rounding_equals_the_definition_on_hard_cases(precision):
    bits = mp.MANTISSA_BITS[precision]
    cases = hard_cases(bits)
    got = mp.operand(torch.tensor(cases, dtype=torch.float32), precision).tolist()
    for x, g in zip(cases, got):
        want = reference_round(x, bits)
        assert struct.pack("<f", g) == struct.pack("<f", want), f"{precision}: {x!r} -> {g!r}, definition {want!r}"


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_rounding_equals_the_definition_on_random_float32(precision):
    bits = mp.MANTISSA_BITS[precision]
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(words.view(np.float32).copy())
    x = x[torch.isfinite(x)]
    got = mp.operand(x, precision)
    want = torch.tensor([reference_round(v, bits) for v in x.tolist()], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_bf16_rounding_equals_torchs_conversion():
    """An independent implementation of the same rule: torch's float32 -> bfloat16 cast
    (normal numbers only: a CPU's bf16 conversion instruction may flush subnormals)."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    x = x[torch.isfinite(x) & (x.abs() >= torch.finfo(torch.float32).tiny)]
    assert torch.equal(mp.operand(x, "bf16").view(torch.int32), x.bfloat16().float().view(torch.int32))


@pytest.mark.parametrize("precision", ["tf32", "bf16", "bf16x3"])
def test_prepared_operands_give_the_products_of_rounded_operands(precision):
    """What the engines use (an operand prepared once, then transposed or not) against the
    definition: the product of the operands rounded by the reference above, in float64."""
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 4)
    want = mp.matmul(a.double(), b.double(), precision)    # float64 arithmetic on the same roundings
    got = mp.product(mp.transposed(mp.transposed(mp.operand(a, precision))), mp.operand(b, precision))
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-5)
    bits = {"tf32": 10, "bf16": 7}.get(precision)
    if bits is not None:
        ref = torch.tensor([reference_round(v, bits) for v in a.reshape(-1).tolist()]).reshape(a.shape)
        assert torch.equal(mp.operand(a, precision), ref)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_nan_stays_nan_whatever_its_payload(precision):
    payloads = [0x7F800001, 0x7F800FFF, 0x7FC00000, 0xFF800001, 0x7FFFFFFF, 0x7F801000]
    x = torch.tensor([f32(b) for b in payloads], dtype=torch.float32)
    assert torch.isnan(mp.operand(x, precision)).all()


def test_bf16x3_split_is_two_bf16_values_carrying_16_bits():
    x = torch.randn(10_000, dtype=torch.float32) * 10.0 ** torch.randint(-20, 20, (10_000,))
    hi, lo = mp.split_bf16(x)
    for part in (hi, lo):
        assert torch.equal(part, part.bfloat16().float())
    rel = ((hi.double() + lo.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0 ** -16, rel


def test_products_are_exact_in_float32_for_rounded_operands():
    """What makes the CPU emulation exact: a product of two rounded operands has no rounding."""
    a, b = torch.randn(1000), torch.randn(1000)
    for precision in ("tf32", "bf16"):
        ra, rb = mp.operand(a, precision), mp.operand(b, precision)
        assert torch.equal((ra * rb).double(), ra.double() * rb.double())


# ---------------------------------------------------------------- whole steps
TASK = Task(TaskConfig("x+y", 7))
CFG = ModelConfig.for_task(TASK.cfg, d_model=12, n_heads=2, d_head=5, d_mlp=24)
RUNS = [RunSpec(train_size=20, data_seed=1, init_seed=1, lr=1e-2, weight_decay=1.0),
        RunSpec(train_size=37, data_seed=2, init_seed=2, lr=2e-3, weight_decay=0.0, random_labels=True)]


def oracle_gradients(run, precision, dtype):
    """The reference model's loss and flat gradient on the run's training set."""
    model, _ = train_reference(TASK, CFG, run, 0, eval_every=1, dtype=dtype, precision=precision)
    split = TASK.split(run.data_seed, run.train_size, run.random_labels)
    tokens = torch.as_tensor(TASK.tokens)[split.train_idx]
    loss = model.loss(tokens, torch.as_tensor(split.train_labels))
    loss.backward()
    return loss.item(), flat(getattr(model, k).grad for k in PARAM_NAMES)


def backend_gradients(backend, precision, dtype):
    pop = Population(TASK, CFG, RUNS, backend=backend, dtype=dtype, precision=precision)
    loss = pop.loss_and_grad()
    return loss, [flat(pop.grads[k][m] for k in PARAM_NAMES) for m in range(len(RUNS))]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "bf16x3"])
def test_torch_engine_rounds_the_oracles_operands(precision):
    """In float64 the engine's restructured algorithm must round exactly the operands the
    oracle rounds: then only float64 accumulation order separates them (~1e-12). Rounding
    anything else, or missing one product, moves a gradient by ~2^-8 (bf16) of its scale,
    as the comparison with the unrounded oracle shows."""
    loss, grads = backend_gradients("torch", precision, torch.float64)
    for m, run in enumerate(RUNS):
        want_loss, want = oracle_gradients(run, precision, torch.float64)
        _, unrounded = oracle_gradients(run, "fp32", torch.float64)
        scale = want.abs().max().item()
        err = (grads[m] - want).abs().max().item()
        effect = (unrounded - want).abs().max().item()
        assert abs(loss[m].item() - want_loss) <= 1e-12 * abs(want_loss), f"model {m}: loss"
        assert err <= 1e-10 * scale, f"model {m}: gradient error {err:.3g} (scale {scale:.3g})"
        assert effect >= 1e4 * err, f"model {m}: {precision} moves the gradient only by {effect:.3g}"


@pytest.mark.parametrize("precision", ["tf32", "bf16", "bf16x3"])
def test_float32_engine_step_matches_the_oracle_at_the_same_precision(precision):
    """In float32 a rounding boundary can fall between the engine's and the oracle's activations;
    such flips are rare (~1e-7 / 2^-8 per element) and small, far below the rounding's effect."""
    _, grads = backend_gradients("torch", precision, torch.float32)
    for m, run in enumerate(RUNS):
        _, want = oracle_gradients(run, precision, torch.float64)
        _, unrounded = oracle_gradients(run, "fp32", torch.float64)
        err = (grads[m] - want).abs().max().item()
        effect = (unrounded - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), f"model {m}: error {err:.3g}"
        if precision != "bf16x3":        # bf16x3 is fp32-class: its effect is near float32 noise
            assert effect >= 30 * err, f"model {m}: {precision}'s effect {effect:.3g} vs error {err:.3g}"


def test_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision='fp16': backend 'torch' offers fp32, tf32, bf16, bf16x3"):
        Population(TASK, CFG, RUNS, backend="torch", precision="fp16")
