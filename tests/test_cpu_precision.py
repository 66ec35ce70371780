"""The C++ engine's matmul precision modes (csrc/precision.hpp; csrc/engine.cpp, "The direct path").

In tf32, bf16 and bf16x3 the engine computes the per-example products with
W_O, W_in, W_out and W_U directly, both operands rounded, as the torch engine
does (fp32 keeps the algebraic rewrite, where those products do not exist;
its bits are held by tests/test_cpu_engine.py and tests/test_conformance.py).

What is checked here, each precision against the torch engine (and in
float64 the oracle) at the same precision:

* the rounding itself, bit for bit against fastgrok.precision.round_mantissa
  on ties both ways, subnormals, the largest finite values, infinities, NaNs
  and negative numbers, in float32 and float64;
* one step's loss and gradients. In float64 only accumulation order
  separates the engines (1e-10 of the gradient scale), and any other
  precision, fp32 included, is 1e4 times farther. In float32 an operand whose
  value differs by an ulp between the engines can round to the other
  neighbour (a "flip", ~1e-7 / 2^-bits of the elements), so the tolerance is
  a relative norm over the model's whole gradient, per precision; tf32 and
  bf16 are then far from every other precision, bf16x3 is far from tf32 and
  bf16 but within float32 noise of fp32 (its ~16 bits per operand are what
  float32 accumulation resolves): the float64 case tells those two apart;
* 20 training steps (float32 and float64), logits, a diverged model among
  healthy ones, the precision chosen and changed on a population.
Batch-mate and thread-count independence in every precision:
tests/test_batch_invariance.py.
"""
import numpy as np
import pytest
import torch

from fastgrok.backends.cpu_engine import CpuBackend
from fastgrok.config import ModelConfig, RunSpec, TaskConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.population import Population
from fastgrok.precision import PRECISIONS, round_mantissa
from fastgrok.tasks import Task
from population_checks import flat, ragged_runs

pytestmark = pytest.mark.skipif(not CpuBackend.available(torch.device("cpu"))[0],
                                reason="the C++ engine is not built (tests/test_cpu_engine.py says why)")

TASK = Task(TaskConfig("x+y", 11))
# d_mlp = 24 and d_vocab = 13 are not multiples of any vector width.
CFG = ModelConfig.for_task(TASK.cfg, d_model=16, n_heads=2, d_head=8, d_mlp=24)
MODES = ("tf32", "bf16", "bf16x3")
# One example, a bf16x3 tile of examples and one more (24 on AVX2; tf32 and bf16: 48),
# partial tiles, all pairs; random labels.
RUNS = [RunSpec(train_size=1, data_seed=0, init_seed=0),
        RunSpec(train_size=25, data_seed=1, init_seed=1, random_labels=True),
        RunSpec(train_size=60, data_seed=2, init_seed=2),
        RunSpec(train_size=121, data_seed=3, init_seed=3)]


# ------------------------------------------------------------------ rounding
FORMATS = {np.float32: (np.uint32, 23, 8), np.float64: (np.uint64, 52, 11)}


def hard_patterns(dtype, bits: int) -> np.ndarray:
    """Bit patterns: ties both ways and just off them, subnormals, the largest finite values
    (rounding to infinity), zeros, infinities, NaNs with payloads in the dropped bits only,
    every one with both signs, and random patterns."""
    uint, mantissa, exponent_bits = FORMATS[dtype]
    drop, top = mantissa - bits, (1 << exponent_bits) - 1
    half, sign = 1 << (drop - 1), 1 << (mantissa + exponent_bits)
    words = []
    for exponent in (1, 2, top // 2, top - 1):
        for kept in (0b1010, 0b1011, (1 << bits) - 1):      # even and odd last kept bits, all ones
            for low in (0, 1, half - 1, half, half + 1, (1 << drop) - 1):
                words.append((exponent << mantissa) | (kept << drop) | low)
    for sub in (1, 2, half - 1, half, half + 1, 3 * half, (1 << drop) - 1, 1 << drop, (1 << mantissa) - 1,
                (1 << (mantissa - 1)) | half):
        words.append(sub)                                     # subnormals
    words += [(top << mantissa) - 1,                          # the largest finite value
              ((top - 1) << mantissa) | (((1 << bits) - 1) << drop) | (half - 1),  # the largest that stays finite
              0, top << mantissa,                             # zero, infinity
              (top << mantissa) | 1, (top << mantissa) | half, (top << mantissa) | (1 << (mantissa - 1)),  # NaNs
              (1 << (mantissa + exponent_bits)) - 1]          # the NaN of all ones
    words = np.array(words, dtype=uint)
    words = np.concatenate([words, words | uint(sign)])
    rng = np.random.default_rng(bits)
    randoms = rng.integers(0, np.iinfo(uint).max, size=5000, dtype=uint, endpoint=True)
    return np.concatenate([words, randoms])


@pytest.mark.parametrize("bits", [7, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_engine_rounding_is_round_mantissa_bit_for_bit(dtype, bits):
    from fastgrok import _cpu_engine

    uint = FORMATS[dtype][0]
    words = hard_patterns(dtype, bits)
    x = words.view(dtype)
    want = round_mantissa(torch.from_numpy(x.copy()), bits).numpy().view(uint)
    # Every length up to a few vectors: lanes of the vector loop and of the scalar tail.
    for n in list(range(0, 20)) + [len(x)]:
        got = _cpu_engine.round_mantissa(x[:n], bits).view(uint)
        bad = np.flatnonzero(got != want[:n])
        assert len(bad) == 0, (f"{np.dtype(dtype).name}, {bits} bits, length {n}: input {words[bad[0]]:#x} -> "
                               f"{got[bad[0]]:#x}, round_mantissa {want[bad[0]]:#x}")


def test_engine_rounding_hand_checked_cases():
    """A few results written out, independent of round_mantissa."""
    from fastgrok import _cpu_engine

    words = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x00008000, 0x00018000, 0x7F800001,
                      0xFFFFFFFF, 0xBF808000, 0x80000001], dtype=np.uint32)
    want = [0x3F800000,    # a tie, kept bit even: down
            0x3F820000,    # a tie, kept bit odd: up
            0x3F810000,    # just past the tie: up
            0x7F800000,    # the largest float32 rounds to infinity
            0x00000000,    # a subnormal tie rounds to the even 0
            0x00020000,    # a subnormal tie rounds up to even
            0x7F800001,    # NaN with its payload in the dropped bits stays that NaN, not infinity
            0xFFFFFFFF,    # negative NaN, all ones
            0xBF800000,    # negative tie, even: towards zero
            0x80000000]    # the smallest negative subnormal rounds to -0
    got = _cpu_engine.round_mantissa(words.view(np.float32), 7).view(np.uint32)
    for w, g, e in zip(words, got, want):
        assert g == e, f"bf16({w:#010x}) = {g:#010x}, expected {e:#010x}"
    with pytest.raises(ValueError, match="bits=24: must be in 0..23"):
        _cpu_engine.round_mantissa(words.view(np.float32), 24)
    with pytest.raises(TypeError, match="expected float32 or float64"):
        _cpu_engine.round_mantissa(words, 7)


# ------------------------------------------------------------------ one step
def step_gradients(backend, precision, dtype, runs=RUNS):
    """(loss (M,), flat gradients (M, P)) of one step's loss_and_grad, as float64."""
    pop = Population(TASK, CFG, runs, backend=backend, dtype=dtype, precision=precision)
    assert pop.backend == backend
    loss = pop.loss_and_grad()
    return loss.double(), pop.flat_grads.double().clone()


def oracle_gradients(run, precision):
    model = Transformer(CFG, run.init_seed, precision).double()
    split = TASK.split(run.data_seed, run.train_size, run.random_labels)
    loss = model.loss(torch.as_tensor(TASK.tokens[split.train_idx]), torch.as_tensor(split.train_labels))
    loss.backward()
    return loss.item(), flat(getattr(model, k).grad for k in PARAM_NAMES)


def max_error(got, want):
    """Per model: max |got - want| over the gradient, relative to want's largest entry."""
    return ((got - want).abs().amax(1) / want.abs().amax(1)).tolist()


def norm_error(got, want):
    """Per model: ||got - want|| / ||want|| over the whole flat gradient."""
    return ((got - want).norm(dim=1) / want.norm(dim=1)).tolist()


TOL64 = 1e-10


@pytest.mark.parametrize("precision", MODES)
def test_float64_step_equals_the_torch_engine_and_the_oracle(precision):
    loss, grads = step_gradients("cpu", precision, torch.float64)
    want_loss, want = step_gradients("torch", precision, torch.float64)
    for m, (err, run) in enumerate(zip(max_error(grads, want), RUNS)):
        assert abs(loss[m] - want_loss[m]) <= 1e-12 * want_loss[m], f"model {m}: loss {loss[m]} vs {want_loss[m]}"
        assert err <= TOL64, f"model {m}: gradient error {err:.3g} of the scale vs the torch engine"
        oracle_loss, oracle = oracle_gradients(run, precision)
        assert abs(loss[m].item() - oracle_loss) <= 1e-12 * oracle_loss, f"model {m}: loss vs the oracle"
        err = max_error(grads[m:m + 1], oracle[None])[0]
        assert err <= TOL64, f"model {m}: gradient error {err:.3g} of the scale vs the oracle"
    # The tolerance tells every precision from every other, fp32 included.
    for other in PRECISIONS:
        if other != precision:
            _, theirs = step_gradients("torch", other, torch.float64)
            for m, err in enumerate(max_error(grads, theirs)):
                assert err >= 1e4 * TOL64, f"model {m}: {precision} vs {other} differ by only {err:.3g}"


# float32: flat-gradient relative norm, per precision (module docstring).
TOL32 = {"tf32": 2e-5, "bf16": 2e-5, "bf16x3": 1e-5}


@pytest.mark.parametrize("precision", MODES)
def test_float32_step_matches_the_torch_engine(precision):
    loss, grads = step_gradients("cpu", precision, torch.float32)
    want_loss, want = step_gradients("torch", precision, torch.float32)
    for m, err in enumerate(norm_error(grads, want)):
        assert abs(loss[m] - want_loss[m]) <= 1e-6 * want_loss[m], f"model {m}: loss {loss[m]} vs {want_loss[m]}"
        assert err <= TOL32[precision], f"model {m}: gradient error {err:.3g} (tolerance {TOL32[precision]:.0e})"
    for other in PRECISIONS:
        if other == precision or {precision, other} == {"bf16x3", "fp32"}:
            continue
        _, theirs = step_gradients("torch", other, torch.float32)
        for m, err in enumerate(norm_error(grads, theirs)):
            assert err >= 5 * TOL32[precision], f"model {m}: {precision} vs {other} differ by only {err:.3g}"


# ------------------------------------------------------------------ training
def train(backend, precision, dtype, steps=20):
    pop = Population(TASK, CFG, ragged_runs(4), backend=backend, dtype=dtype, precision=precision)
    start = pop.flat_params.double().clone()
    losses = torch.stack([pop.step().double() for _ in range(steps)])
    return losses, pop.flat_params.double().clone(), start


def trajectory_error(a, b):
    """Per model: the distance between the final parameters relative to the distance travelled."""
    (_, pa, start), (_, pb, _) = a, b
    return ((pa - pb).norm(dim=1) / (pb - start).norm(dim=1)).tolist()


# After 20 AdamW steps (lr 1e-3..3e-3) in float32; flips move a trajectory
# by ~1e-5 (tf32), ~1e-4 (bf16) of its length, another precision by > 1e-3.
TRAIN_TOL32 = {"tf32": 3e-4, "bf16": 1e-3, "bf16x3": 3e-5}


@pytest.mark.parametrize("precision", MODES)
def test_training_follows_the_torch_engine(precision):
    ours64, theirs64 = train("cpu", precision, torch.float64), train("torch", precision, torch.float64)
    for m, err in enumerate(trajectory_error(ours64, theirs64)):
        assert err <= 1e-10, f"float64, model {m}: {err:.3g} of the distance travelled"
    ours, theirs = train("cpu", precision, torch.float32), train("torch", precision, torch.float32)
    for m, err in enumerate(trajectory_error(ours, theirs)):
        assert err <= TRAIN_TOL32[precision], f"float32, model {m}: {err:.3g} of the distance travelled"
        rel_loss = ((ours[0][:, m] - theirs[0][:, m]).abs() / theirs[0][:, m]).max().item()
        assert rel_loss <= 10 * TRAIN_TOL32[precision], f"float32, model {m}: losses differ by {rel_loss:.3g}"
    for other in PRECISIONS:
        if other == precision:
            continue
        for m, err in enumerate(trajectory_error(ours64, train("torch", other, torch.float64))):
            assert err >= 1e-6, f"float64, model {m}: {precision} and {other} trajectories differ by {err:.3g}"
        if {precision, other} != {"bf16x3", "fp32"}:
            for m, err in enumerate(trajectory_error(ours, train("torch", other, torch.float32))):
                assert err >= 2 * TRAIN_TOL32[precision], f"float32, model {m}: vs {other} only {err:.3g}"


# ------------------------------------------------------------------ the rest
@pytest.mark.parametrize("precision", MODES)
def test_logits_equal_the_torch_engines_and_do_not_depend_on_threads_or_models(precision):
    runs = ragged_runs(3)
    cpu = Population(TASK, CFG, runs, backend=CpuBackend(n_threads=1), dtype=torch.float64, precision=precision)
    ref = Population(TASK, CFG, runs, backend="torch", dtype=torch.float64, precision=precision)
    for _ in range(3):
        cpu.step()
        ref.step()
    ours, theirs = cpu.all_logits(), ref.all_logits()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-10 * theirs.abs().max().item(), f"logits differ by {err:.3g}"
    cpu.engine.n_threads = 2
    assert torch.equal(cpu.all_logits(), ours), "2 threads"
    assert torch.equal(cpu.all_logits([2, 0])[0], ours[2]), "model 2 listed with model 0"
    assert torch.equal(cpu.all_logits([1])[0], ours[1]), "model 1 alone"


@pytest.mark.parametrize("precision", MODES)
@pytest.mark.parametrize("weight", ["W_in", "W_U"])
def test_diverged_model_is_frozen_and_others_are_bit_identical(precision, weight):
    """A NaN weight flows through the rounded products (NaN stays NaN) into the loss; the
    model is frozen and the thread's next model sees no trace of it."""
    runs = ragged_runs(4)
    clean = Population(TASK, CFG, runs, backend=CpuBackend(n_threads=2), precision=precision)
    poisoned = Population(TASK, CFG, runs, backend=CpuBackend(n_threads=2), precision=precision)
    for step in range(1, 9):
        if step == 4:
            poisoned.params[weight][2, 3, 1] = float("nan")
            frozen = poisoned.flat_params[2].clone()
        clean.step()
        loss = poisoned.step()
    assert list(poisoned.failed_step) == [-1, -1, 4, -1]
    assert not torch.isfinite(loss[2])
    torch.testing.assert_close(poisoned.flat_params[2], frozen, rtol=0, atol=0, equal_nan=True)
    for m in (0, 1, 3):
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(poisoned, name)[m], getattr(clean, name)[m]), f"model {m}: {name} changed"


def test_precision_is_offered_recorded_and_a_change_rebuilds_the_engine():
    assert CpuBackend.precisions == PRECISIONS
    pop = Population(TASK, CFG, RUNS[:2], backend="cpu", precision="fp32")
    pop.loss_and_grad()
    assert pop.engine.engine(pop).precision == "fp32"
    pop.precision = "bf16"
    loss = pop.loss_and_grad()
    assert pop.engine.engine(pop).precision == "bf16"
    fresh = Population(TASK, CFG, RUNS[:2], backend="cpu", precision="bf16")
    assert torch.equal(fresh.loss_and_grad(), loss) and torch.equal(fresh.flat_grads, pop.flat_grads)


def test_native_engine_refuses_an_unknown_precision_by_name():
    from fastgrok import _cpu_engine

    pop = Population(TASK, CFG, RUNS[:1], backend="cpu")
    engine = pop.engine.engine(pop)
    assert engine.precision == "fp32"
    kwargs = dict(n=11, d_vocab=13, d_model=16, n_heads=2, d_head=8, d_mlp=24, n_ctx=4,
                  param_offsets=np.array([pop.layout.offsets[k] for k in PARAM_NAMES] + [pop.layout.P]),
                  row_token=pop.rows.token, row_pos=pop.rows.pos, op_row=pop.rows.op_row,
                  first_y_row=pop.rows.first_y_row, eq_row=pop.rows.eq_row, x=pop.train_x.numpy(),
                  y=pop.train_y.numpy(), labels=pop.train_labels.numpy(), train_size=np.array([1]))
    assert _cpu_engine.Engine(**kwargs, precision="bf16x3").precision == "bf16x3"
    with pytest.raises(ValueError, match="precision='fp16'; valid: fp32, tf32, bf16, bf16x3"):
        _cpu_engine.Engine(**kwargs, precision="fp16")


def test_flop_count_of_the_direct_path_at_the_paper_config():
    """Per example 2 * (3 * (H*Dh*D + 2*D*F + D*V) + 12*H*Dh) with H*Dh = D = 128, F = 512,
    V = 115: 2 * (3 * (16384 + 131072 + 14720) + 1536) = 976128; the products three times in bf16x3:
    2 * (9 * 162176 + 1536) = 2922240."""
    cfg = ModelConfig.for_task(TaskConfig("x+y", 113))
    per_example = {p: CpuBackend.flops_per_model_step(cfg, 2, p) - CpuBackend.flops_per_model_step(cfg, 1, p)
                   for p in PRECISIONS}
    assert per_example == {"fp32": 413472, "tf32": 976128, "bf16": 976128, "bf16x3": 2922240}
