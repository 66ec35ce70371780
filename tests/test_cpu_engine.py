"""The C++ CPU engine (csrc/, fastgrok.cpu_engine) against the reference model and trainer.

The engine computes in float32 for training and in float64 on request: the
float64 runs check the algorithm itself against the float64 oracle to
rounding level, the float32 runs check that its rounding is no worse than
the float32 oracle's own.
"""
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastgrok import cpu_engine
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.engine import Population
from fastgrok.model import PARAM_NAMES, Transformer
from fastgrok.tasks import Task
from population_checks import assert_params_close, flat, ragged_runs
from fastgrok.train import train_reference

TASK = Task(TaskConfig("x+y", 11))
# d_mlp = 24 and d_vocab = 13 are not multiples of the vector width: the
# padded table columns are exercised everywhere.
CFG = ModelConfig.for_task(TASK.cfg, d_model=16, n_heads=2, d_head=8, d_mlp=24)
COMPILER = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(autouse=True)
def built_engine(request):
    """A missing build is a bug wherever a compiler exists: fail, don't skip."""
    if request.function.__name__ == "test_unavailable_engine_says_why_and_population_falls_back":
        return
    ok, reason = cpu_engine.available("cpu")
    if not ok:
        if COMPILER:
            pytest.fail(f"the C++ engine did not build although {COMPILER} exists: {reason}")
        pytest.skip(f"no C++ compiler on this machine: {reason}")




def cpu_population(runs, task=TASK, cfg=CFG, **kwargs):
    pop = Population(task, cfg, runs, backend="cpu", **kwargs)
    assert pop.backend == "cpu"
    return pop






@functools.lru_cache(maxsize=None)
def reference_run(run, steps, dtype, optim=OptimConfig(warmup_steps=10)):
    """(final model, train loss after each of steps 0..steps): shared by the tests."""
    curve = []
    model, _ = train_reference(TASK, CFG, run, steps, optim, eval_every=1, dtype=dtype,
                               log=lambda step, hist: curve.append(hist.train_loss[-1]))
    return model, np.array(curve)


def reference_grads(task, cfg, run, dtype=torch.float64):
    model = Transformer(cfg, run.init_seed).to(dtype)
    split = task.split(run.data_seed, run.train_size, run.random_labels)
    loss = model.loss(torch.as_tensor(task.tokens[split.train_idx]), torch.as_tensor(split.train_labels))
    loss.backward()
    return loss.item(), {k: getattr(model, k).grad for k in PARAM_NAMES}


@pytest.mark.parametrize("M", [1, 3, 8])
def test_population_matches_reference_trainer_in_float64(M):
    """M ragged models, 300 steps with warm-up, against the oracle trained one by one.

    In float64 the comparison sees the algorithm, not float32 rounding (which
    chaotic stretches of these tiny runs amplify to O(0.1), see
    tests/test_engine.py); a real bug moves parameters by ~lr * steps = 0.3.
    M = 1 runs the example-sharded path whenever torch uses 2+ threads.
    """
    steps, runs, optim = 300, ragged_runs(M), OptimConfig(warmup_steps=10)
    pop = cpu_population(runs, optim_cfg=optim, dtype=torch.float64)
    losses = np.stack([pop.step().numpy() for _ in range(steps)])         # (steps, M)
    for m, run in enumerate(runs):
        model, ref_losses = reference_run(run, steps, torch.float64, optim)
        # The engine reports the loss before update s, the reference records after it.
        np.testing.assert_allclose(losses[:, m], ref_losses[:-1], rtol=1e-6, err_msg=f"model {m}: loss curves differ")
        assert_params_close(pop, m, model, rtol=1e-5)


def test_float32_training_is_as_accurate_as_float32_reference():
    """Against the float64 oracle after 300 steps, the float32 engine's error is
    no worse than the float32 oracle's own, summed over 8 models.

    Not model by model: these runs are chaotic in float32. A ReLU unit that
    comes alive with one example's input near 0 flips on rounding, and Adam
    turns the flip into lr-sized steps, so the error of any float32
    implementation is random in size: measured per-model ratios
    engine / fp32-oracle ranged 0.34..480, and the batched PyTorch engine
    lands on the same 0.06 as this engine where the fp32 oracle got 1e-4.
    The sums agree (0.44 vs 0.45 measured). The algorithm itself is pinned
    by the float64 test above to 1e-5.
    """
    steps, runs, optim = 300, ragged_runs(8), OptimConfig(warmup_steps=10)
    pop = cpu_population(runs, optim_cfg=optim)
    for _ in range(steps):
        pop.step()
    err_engine, err_ref = [], []
    for m, run in enumerate(runs):
        (m32, _), (m64, _) = reference_run(run, steps, torch.float32, optim), reference_run(run, steps, torch.float64, optim)
        truth = flat(getattr(m64, k).detach() for k in PARAM_NAMES)
        err_engine.append((flat(pop.params[k][m] for k in PARAM_NAMES) - truth).abs().max().item())
        err_ref.append((flat(getattr(m32, k).detach() for k in PARAM_NAMES) - truth).abs().max().item())
    assert sum(err_engine) <= 2 * sum(err_ref) + 1e-4, (
        f"per-model errors {np.round(err_engine, 5)} vs float32 oracle {np.round(err_ref, 5)}")


def test_one_step_float32_gradients_match_float64_reference():
    runs = ragged_runs(3)
    pop = cpu_population(runs)
    loss = cpu_engine.loss_and_grad(pop)
    for m, run in enumerate(runs):
        ref_loss, ref = reference_grads(TASK, CFG, run)
        assert abs(loss[m].item() - ref_loss) < 1e-6 * ref_loss, f"model {m}: loss {loss[m].item()} vs {ref_loss}"
        for k in PARAM_NAMES:
            err = (pop.grads[k][m].double() - ref[k]).abs().max().item()
            # float32 rounding of sums over <= 60 examples and D = 16 terms.
            assert err <= 1e-5 * ref[k].abs().max().item() + 1e-9, f"model {m}, d{k}: error {err:.3g}"


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(["x-y", "x/y", "x^2+xy+y^2"]), p=st.sampled_from([5, 7, 13, 17]),
       d_model=st.integers(3, 20), d_head=st.integers(1, 5), n_heads=st.integers(1, 3),
       d_mlp=st.sampled_from([1, 4, 24, 40]), sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
       seed=st.integers(0, 1000))
def test_float64_gradients_match_reference_on_drawn_shapes(op, p, d_model, d_head, n_heads, d_mlp, sizes, seed):
    """Odd shapes: GEMM edge strips, widths below one vector, partial x blocks, D = 1."""
    task = Task(TaskConfig(op, p))
    cfg = ModelConfig.for_task(task.cfg, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp)
    runs = [RunSpec(min(D, task.n_pairs), data_seed=seed + m, init_seed=seed + 7 * m) for m, D in enumerate(sizes)]
    pop = cpu_population(runs, task=task, cfg=cfg, dtype=torch.float64)
    loss = cpu_engine.loss_and_grad(pop)
    for m, run in enumerate(runs):
        ref_loss, ref = reference_grads(task, cfg, run)
        assert abs(loss[m].item() - ref_loss) <= 1e-12 * ref_loss, f"model {m}: loss {loss[m].item()} vs {ref_loss}"
        for k in PARAM_NAMES:
            err = (pop.grads[k][m] - ref[k]).abs().max().item()
            assert err <= 1e-11 * ref[k].abs().max().item() + 1e-15, f"model {m}, d{k}: error {err:.3g}"


def test_tiny_losses_keep_their_precision():
    """SPEC numerics: at a loss near 1e-25 the float32 engine keeps full relative
    precision in the loss and in the correct-class gradient -(sum of the others).

    One training example; every weight zero except b_out[0] = 1 and W_U's row 0,
    so the logits are W_U[0] (+30 on the label, -30 elsewhere).
    """
    run = RunSpec(train_size=1, init_seed=0, data_seed=0)
    pop = cpu_population([run])
    label = int(TASK.split(0, 1).train_labels[0])
    pop.flat_params.zero_()
    pop.params["b_out"][0, 0] = 1.0
    pop.params["W_U"][0, 0] = -30.0
    pop.params["W_U"][0, 0, label] = 30.0
    loss = cpu_engine.loss_and_grad(pop)

    model = Transformer(CFG).double()
    with torch.no_grad():
        for k in PARAM_NAMES:
            getattr(model, k).copy_(pop.params[k][0])
    split = TASK.split(0, 1)
    ref = model.loss(torch.as_tensor(TASK.tokens[split.train_idx]), torch.as_tensor(split.train_labels))
    ref.backward()
    assert 1e-26 < ref.item() < 1e-23
    assert abs(loss[0].item() - ref.item()) <= 1e-5 * ref.item()
    g, g_ref = pop.grads["W_U"][0, 0].double(), model.W_U.grad[0]
    assert g[label] < 0, "the correct-class gradient must not round to zero"
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("poison", ["nan_weight", "huge_lr"])
def test_diverged_model_is_frozen_and_others_are_bit_identical(poison):
    runs = ragged_runs(4)
    if poison == "huge_lr":
        runs_poisoned = [r if m != 2 else RunSpec(r.train_size, r.data_seed, r.init_seed, lr=1e37, weight_decay=1.0)
                         for m, r in enumerate(runs)]
    else:
        runs_poisoned = runs
    clean, poisoned = cpu_population(runs), cpu_population(runs_poisoned)
    for step in range(1, 16):
        if poison == "nan_weight" and step == 5:
            poisoned.params["W_in"][2, 3, 1] = float("nan")
            frozen_params = poisoned.flat_params[2].clone()
            frozen_moments = poisoned.exp_avg[2].clone(), poisoned.exp_avg_sq[2].clone()
        clean.step()
        loss = poisoned.step()
        if poison == "huge_lr" and step == 1:  # the first update blows up, step 2 is non-finite
            frozen_params = poisoned.flat_params[2].clone()
            frozen_moments = poisoned.exp_avg[2].clone(), poisoned.exp_avg_sq[2].clone()
    assert list(poisoned.failed_step) == [-1, -1, 5 if poison == "nan_weight" else 2, -1]
    assert not torch.isfinite(loss[2]), "a NaN weight must give a NaN loss, as in the reference model"
    for m in (0, 1, 3):
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(poisoned, name)[m], getattr(clean, name)[m]), f"model {m}: {name} changed"
    bitwise = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(poisoned.flat_params[2], frozen_params, **bitwise, msg="a frozen model must not move")
    torch.testing.assert_close(poisoned.exp_avg[2], frozen_moments[0], **bitwise)
    torch.testing.assert_close(poisoned.exp_avg_sq[2], frozen_moments[1], **bitwise)


def test_results_do_not_depend_on_the_thread_count():
    """M >= threads (whole models per thread) and M < threads (shared shards) alike:
    bitwise the same for 1, 2 and 3 threads."""
    for runs in (ragged_runs(3), [RunSpec(train_size=121, init_seed=5)]):
        states = []
        for threads in (1, 2, 3):
            pop = cpu_population(runs)
            for _ in range(5):
                cpu_engine.step(pop, n_threads=threads)
            states.append(torch.cat([pop.flat_params, pop.exp_avg, pop.exp_avg_sq, pop.flat_grads], 1))
        assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2]), f"M={len(runs)}"


def test_training_data_change_rebuilds_the_engine():
    pop = cpu_population(ragged_runs(2))
    cpu_engine.loss_and_grad(pop)
    pop.train_labels[0, 0] = (pop.train_labels[0, 0] + 1) % TASK.cfg.n
    loss = cpu_engine.loss_and_grad(pop)
    reference = Population(TASK, CFG, ragged_runs(2))
    reference.train_labels[0, 0] = pop.train_labels[0, 0]
    torch.testing.assert_close(loss, reference.loss_and_grad(), rtol=1e-6, atol=0)


def test_bad_inputs_are_named():
    from fastgrok import _cpu_engine

    x = np.zeros((1, 3), dtype=np.int64)
    args = dict(n=11, d_vocab=13, d_model=16, n_heads=2, d_head=8, d_mlp=24, x=x, y=x,
                train_size=np.array([3], dtype=np.int64))
    with pytest.raises(ValueError, match=r"model 0 example 1: \(x, y, label\) = \(0, 0, 13\)"):
        _cpu_engine.Engine(labels=np.array([[0, 13, 0]], dtype=np.int64), **args)
    with pytest.raises(TypeError, match="labels: dtype int32, expected int64"):
        _cpu_engine.Engine(labels=x.astype(np.int32), **args)
    with pytest.raises(ValueError, match="d_vocab=14: must be n \\+ 2 = 13"):
        _cpu_engine.Engine(labels=x, **{**args, "d_vocab": 14})
    engine = _cpu_engine.Engine(labels=x, **args)
    state = np.zeros((1, engine.n_params), dtype=np.float32)
    with pytest.raises(ValueError, match=r"grads: shape \(1, 5\), expected \(1, \d+\)"):
        engine.step(state, np.zeros((1, 5), np.float32), state.copy(), state.copy(), lr=None, weight_decay=None,
                    frozen=None, step=0, beta1=0.9, beta2=0.98, eps=1e-8, n_threads=1)


def test_unavailable_engine_says_why_and_population_falls_back(monkeypatch):
    assert cpu_engine.available("meta") == (False, "the C++ engine runs on the CPU only; the population is on meta")

    def missing():
        raise ImportError("No module named 'fastgrok._cpu_engine'")

    monkeypatch.setattr(cpu_engine, "_extension", missing)
    ok, reason = cpu_engine.available("cpu")
    assert not ok and "fastgrok._cpu_engine is not importable" in reason
    with pytest.warns(UserWarning, match="backend 'cpu' unavailable: fastgrok._cpu_engine is not importable"):
        pop = Population(TASK, CFG, ragged_runs(1), backend="cpu")
    assert pop.backend == "torch"


# ---------------------------------------------------------------- sanitizers

SANITIZED_RUN = textwrap.dedent("""
    # Runs under LD_PRELOAD=libasan: numpy only, no torch (whose own
    # uninstrumented allocations would drown the report).
    import importlib.util, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("_cpu_engine", sys.argv[1])
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    data = dict(np.load(sys.argv[2]))
    out = {}
    for dtype in (np.float32, np.float64):
        for threads in (1, 2, 3):  # 3 threads > M = 2 models: the sharded path
            engine = ext.Engine(n=int(data["n"]), d_vocab=int(data["d_vocab"]), d_model=int(data["d_model"]),
                                n_heads=int(data["n_heads"]), d_head=int(data["d_head"]), d_mlp=int(data["d_mlp"]),
                                x=data["x"], y=data["y"], labels=data["labels"], train_size=data["train_size"])
            state = [data["params"].astype(dtype)] + [np.zeros_like(data["params"], dtype=dtype) for _ in range(3)]
            for step in range(1, 11):
                loss, finite = engine.step(*state, lr=data["lr"], weight_decay=data["wd"],
                                           frozen=np.zeros(len(data["lr"]), dtype=bool), step=step,
                                           beta1=0.9, beta2=0.98, eps=1e-8, n_threads=threads)
            out[f"{np.dtype(dtype).name}_{threads}"] = state[0]
    np.savez(sys.argv[3], **out)
""")


@pytest.mark.slow
def test_sanitized_build_trains_without_reports(tmp_path):
    """Build csrc/ with -fsanitize=address,undefined and train a few steps on
    ragged data in float32 and float64, on the whole-model and sharded paths."""
    import pybind11

    if not COMPILER:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ext_path = tmp_path / ("_cpu_engine" + sysconfig.get_config_var("EXT_SUFFIX"))
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
    subprocess.run([COMPILER, *flags, f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{root}/csrc", f"{root}/csrc/engine.cpp", f"{root}/csrc/bindings.cpp", "-o", str(ext_path)],
                   check=True, capture_output=True, text=True)

    task = Task(TaskConfig("x+y", 13))
    cfg = ModelConfig.for_task(task.cfg, d_model=12, n_heads=3, d_head=4, d_mlp=20)
    runs = [RunSpec(train_size=37, data_seed=1, init_seed=1, lr=2e-3), RunSpec(train_size=150, data_seed=2, init_seed=2)]
    pop = Population(task, cfg, runs)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, params=pop.flat_params.numpy(), x=pop.train_x.numpy(), y=pop.train_y.numpy(),
             labels=pop.train_labels.numpy(), train_size=np.asarray(pop.train_size, dtype=np.int64),
             lr=pop.lr, wd=pop.weight_decay, n=task.cfg.n, d_vocab=cfg.d_vocab, d_model=cfg.d_model,
             n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp)
    script = tmp_path / "run.py"
    script.write_text(SANITIZED_RUN)
    asan = subprocess.run([COMPILER, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    ubsan = subprocess.run([COMPILER, "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "LD_PRELOAD": f"{asan} {ubsan}", "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    result = subprocess.run([sys.executable, str(script), str(ext_path), str(inputs), str(tmp_path / "out.npz")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "runtime error" not in result.stderr and "AddressSanitizer" not in result.stderr, result.stderr[-5000:]

    # The instrumented build trains the same models as the optimised one.
    for _ in range(10):
        cpu_engine.step(pop, n_threads=2)
    out = np.load(tmp_path / "out.npz")
    for key in out.files:
        np.testing.assert_allclose(out[key], pop.flat_params.numpy(), rtol=1e-3, atol=1e-5, err_msg=key)


def test_flop_count_matches_hand_count_at_the_paper_config():
    """Per example 2 * (3*F*V + 12*H*(F + V)) with F = 512, V = 115, H = 4:
    2 * (176640 + 30096) = 413472; the tables do not depend on the examples."""
    cfg = ModelConfig.for_task(TaskConfig("x+y", 113))
    per_example = cpu_engine.flops_per_model_step(cfg, 2) - cpu_engine.flops_per_model_step(cfg, 1)
    assert per_example == 413472
    # Keys and values alone: 2 products of (R = 228) x (D = 128) x (H*Dh = 128), forward and 2x backward.
    assert cpu_engine.flops_per_model_step(cfg, 0) > 2 * 3 * 2 * 228 * 128 * 128


def torch_vector_lanes(dtype) -> int:
    """Elements per vector of torch's CPU kernels on this machine (ATen's Vectorized<T>)."""
    width = 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32
    return width // torch.empty(0, dtype=dtype).element_size()


@pytest.mark.parametrize("d_mlp", [24, 23])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_is_bit_identical_to_the_batched_engines(dtype, d_mlp):
    """Given the same gradients, the engine's update equals torch._fused_adamw_
    (the batched engine's optimiser) bit for bit: per-model lr and weight
    decay (0 included), warm-up. Pins the operation order of torch's CPU
    kernel; a torch release that changes it shows up here, not as an
    unexplained drift between backends.

    torch's kernel runs its vector body and then a scalar loop over the last
    P mod lanes elements of each model's row. On AVX-512 builds that loop
    rounds like the body; on AVX2 (seen on an AMD EPYC) it does not, so there
    the last elements are held to 4 ulp, not bit identity. d_mlp = 23 gives
    an odd P, so every machine has such a tail."""
    task = TASK
    cfg = ModelConfig.for_task(task.cfg, d_model=16, n_heads=2, d_head=8, d_mlp=d_mlp)
    runs = ragged_runs(4)
    engine_pop, torch_pop = (Population(task, cfg, runs, backend="cpu", optim_cfg=OptimConfig(warmup_steps=5),
                                        dtype=dtype) for _ in range(2))
    P = cfg.n_params
    body = P - P % torch_vector_lanes(dtype)
    ulp = torch.finfo(dtype).eps
    for step in range(1, 11):
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):  # same start, so the same gradients
            getattr(torch_pop, name).copy_(getattr(engine_pop, name))
        cpu_engine.step(engine_pop)
        cpu_engine.loss_and_grad(torch_pop)
        torch_pop.step_count += 1
        torch_pop._adamw(torch_pop.healthy_models())
        for name in ("flat_params", "exp_avg", "exp_avg_sq"):
            mine, theirs = getattr(engine_pop, name), getattr(torch_pop, name)
            diff = (mine[:, :body] != theirs[:, :body]).nonzero()
            assert len(diff) == 0, f"step {step}, {name}: {len(diff)} values differ, first (model, index) {diff[0].tolist()}"
            tail_err = (mine[:, body:] - theirs[:, body:]).abs()
            assert (tail_err <= 4 * ulp * theirs[:, body:].abs()).all(), f"step {step}, {name}: tail {tail_err.max()}"
