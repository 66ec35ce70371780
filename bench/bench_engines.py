"""Side-by-side throughput of every CPU training method, in one process.

Methods, all on the same task, splits and initial weights:
  reference  the loop researchers write today: one fastgrok.model.Transformer
             and torch.optim.AdamW per model, stepped model after model;
  vmap       a torch.func ensemble: the reference model vmapped over stacked
             parameters (all models share one D), one torch.optim.AdamW;
  engine     fastgrok's batched PyTorch engine (backend="torch");
  cpu        fastgrok's C++ engine (backend="cpu"), when it is built;
  cpu:tf32, cpu:bf16, cpu:bf16x3
             the C++ engine in a matmul precision (fastgrok.precision): the
             per-example products computed directly with rounded operands
             instead of fp32's algebraic rewrite (csrc/engine.cpp, "The direct
             path"); any method:precision works for engine and cpu.

Rounds interleave the methods so that a noisy machine slows them alike; the
median round is reported. Achieved GFLOP/s counts the batched engine's FLOPs
per model-step (fastgrok.backends.torch_engine.flops_per_model_step) for every method, so it
is throughput in common units, and it is compared with the machine's sgemm
peak measured at start-up (the precision modes execute about those FLOPs,
bf16x3 about three times as many (three GEMMs per product), fp32's rewrite 55% of them);
"x cpu" is the speed relative to the C++ engine at fp32 in the same rounds,
"own GF/s" the C++ engine's own FLOPs (CpuBackend.flops_per_model_step) per
second.
Memory is measured per method in a fresh
subprocess: peak RSS of constructing and stepping M models, minus the RSS
before, per model, minus the parameters and both AdamW moments (4 bytes x 3P).

    python bench/bench_engines.py                 # paper (M=8, D=2000) and cpu (M=64)
    python bench/bench_engines.py --configs paper --rounds 5
    python bench/bench_engines.py --methods cpu cpu:tf32 cpu:bf16 cpu:bf16x3   # precisions side by side
Appends long-format rows to bench/results.csv (a precision is part of the
method's name, and of params).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastgrok
from fastgrok.config import RunSpec, get_preset
from fastgrok.backends.torch_engine import flops_per_model_step
from fastgrok.population import Population
from fastgrok.layout import PARAM_NAMES, ParamLayout
from fastgrok.model import Transformer
from fastgrok.precision import PRECISIONS
from fastgrok.tasks import Task

CONFIGS = {"paper": dict(preset="paper", M=8, D=2000), "cpu": dict(preset="cpu", M=64, D=925)}
METHODS = ("reference", "vmap", "engine", "cpu", "cpu:tf32", "cpu:bf16", "cpu:bf16x3")


def split_method(method: str) -> tuple[str, str]:
    """("cpu", "tf32") for "cpu:tf32"; a bare name is fp32."""
    name, _, precision = method.partition(":")
    return name, precision or "fp32"


def sgemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_runs(M: int, D: int) -> list[RunSpec]:
    return [RunSpec(D, data_seed=m, init_seed=m) for m in range(M)]


class Reference:
    """M independent models and optimisers, stepped one after another."""

    def __init__(self, task, cfg, runs):
        self.items = []
        tokens = torch.as_tensor(task.tokens)
        for r in runs:
            split = task.split(r.data_seed, r.train_size)
            model = Transformer(cfg, r.init_seed)
            opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.98), weight_decay=r.weight_decay)
            self.items.append((model, opt, tokens[split.train_idx], torch.as_tensor(split.train_labels)))

    def step(self):
        for model, opt, x, y in self.items:
            opt.zero_grad(set_to_none=True)
            model.loss(x, y).backward()
            opt.step()


class VmapEnsemble:
    """The reference model vmapped over stacked parameters (torch.func)."""

    def __init__(self, task, cfg, runs):
        models = [Transformer(cfg, r.init_seed) for r in runs]
        params, _ = torch.func.stack_module_state(models)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.base = Transformer(cfg).to("meta")
        tokens = torch.as_tensor(task.tokens)
        splits = [task.split(r.data_seed, r.train_size) for r in runs]
        self.x = torch.stack([tokens[s.train_idx] for s in splits])           # (M, N, T)
        self.y = torch.stack([torch.as_tensor(s.train_labels) for s in splits])
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=runs[0].lr, betas=(0.9, 0.98),
                                     weight_decay=runs[0].weight_decay)

        def loss(p, x, y):
            return torch.func.functional_call(self.base, p, (x,))[:, -1].log_softmax(-1).gather(
                -1, y.unsqueeze(-1)).mean().neg()

        self.grad_fn = torch.func.vmap(torch.func.grad(loss))

    def step(self):
        grads = self.grad_fn(self.params, self.x, self.y)
        for k in PARAM_NAMES:
            self.params[k].grad = grads[k]
        self.opt.step()


def build(method, task, cfg, runs):
    name, precision = split_method(method)
    if name in ("reference", "vmap") and precision != "fp32":
        raise ValueError(f"method {method!r}: only engine and cpu take a precision")
    if name == "reference":
        return Reference(task, cfg, runs)
    if name == "vmap":
        return VmapEnsemble(task, cfg, runs)
    return Population(task, cfg, runs, backend={"engine": "torch", "cpu": "cpu"}[name], precision=precision)


def own_flops(cfg, D: int, method: str) -> float:
    """FLOPs per model-step the method itself executes (the C++ engine's own count), else the batched count."""
    name, precision = split_method(method)
    if name == "cpu":
        from fastgrok.backends.cpu_engine import CpuBackend

        return CpuBackend.flops_per_model_step(cfg, D, precision)
    return flops_per_model_step(cfg, D)


def available_methods(task, cfg, methods=METHODS) -> list[str]:
    from fastgrok.backends.cpu_engine import CpuBackend

    cpu_ok = CpuBackend.available(torch.device("cpu"))[0]
    return [m for m in methods if split_method(m)[0] != "cpu" or cpu_ok]


def memory_per_model_mb(config: str, method: str) -> float:
    """Peak working memory per model beyond params and moments, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", config, method],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(config: str, method: str):
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    c = CONFIGS[config]
    pr = get_preset(c["preset"])
    task, runs = Task(pr.task), make_runs(c["M"], c["D"])
    build(method, task, pr.model, make_runs(1, 10)).step()  # warm up torch's own allocations
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    runner = build(method, task, pr.model, runs)
    for _ in range(3):
        runner.step()
    peak = status("VmHWM:")
    per_model = (peak - before) / c["M"] - 3 * 4 * ParamLayout.from_config(pr.model).P
    print(per_model / 2**20)


def bench_config(name: str, rounds: int, steps_per_round: int, peak: float, csv_path: Path,
                 methods=METHODS, memory: bool = True):
    c = CONFIGS[name]
    pr = get_preset(c["preset"])
    task, runs, M, D = Task(pr.task), make_runs(c["M"], c["D"]), c["M"], c["D"]
    methods = available_methods(task, pr.model, methods)
    runners = {m: build(m, task, pr.model, runs) for m in methods}
    for r in runners.values():
        r.step()  # warm-up: allocations, thread pools, lazy init
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m, r in runners.items():
            t = time.perf_counter()
            for _ in range(steps_per_round):
                r.step()
            times[m].append((time.perf_counter() - t) / steps_per_round)
    flops = flops_per_model_step(pr.model, D)
    rates = {m: M / statistics.median(times[m]) for m in methods}
    ref, cpu = rates.get("reference"), rates.get("cpu")
    print(f"\n{name}: p={pr.task.p} d_model={pr.model.d_model} d_mlp={pr.model.d_mlp} M={M} D={D} "
          f"({flops / 1e6:.0f} MFLOP per model-step); sgemm peak {peak:.0f} GFLOP/s")
    print(f"{'method':<12} {'model-steps/s':>13} {'x reference':>12} {'x cpu':>6} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'own GF/s':>9} {'MB/model':>9}")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for m in methods:
        rate = rates[m]
        gflops = rate * flops / 1e9
        mem = memory_per_model_mb(name, m) if memory else float("nan")
        vs_ref = rate / ref if ref else float("nan")
        vs_cpu = rate / cpu if cpu else float("nan")
        own = rate * own_flops(pr.model, D, m) / 1e9
        print(f"{m:<12} {rate:>13.1f} {vs_ref:>12.2f} {vs_cpu:>6.2f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}% "
              f"{own:>9.1f} {mem:>9.2f}")
        metrics = [("model_steps_per_s", rate, "1/s"), ("gflops", gflops, "GFLOP/s"),
                   ("fraction_of_sgemm_peak", gflops / peak, "1"), ("own_gflops", own, "GFLOP/s")]
        if ref:
            metrics.append(("speedup_vs_reference", vs_ref, "x"))
        if cpu:
            metrics.append(("speed_vs_cpu_fp32", vs_cpu, "x"))
        if memory:
            metrics.append(("memory_per_model_beyond_params_moments", mem, "MB"))
        for metric, value, unit in metrics:
            rows.append(dict(config=name, method=m, M=M, D=D, metric=metric, value=f"{value:.6g}", unit=unit,
                             rounds=rounds, steps_per_round=steps_per_round, sgemm_peak_gflops=f"{peak:.1f}",
                             threads=torch.get_num_threads(), version=fastgrok.__version__,
                             torch=torch.__version__, timestamp=now,
                             params=json.dumps(dict(preset=c["preset"], p=pr.task.p, d_model=pr.model.d_model,
                                                    precision=split_method(m)[1]))))
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="methods, a precision after a colon for engine and cpu (default: %(default)s)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory probes")
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_name("results.csv"))
    ap.add_argument("--memory-probe", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        _memory_probe(*args.memory_probe)
        return
    for m in args.methods:
        name, precision = split_method(m)
        if name not in ("reference", "vmap", "engine", "cpu") or precision not in PRECISIONS:
            ap.error(f"method {m!r}: a name of reference, vmap, engine, cpu, then optionally "
                     f":{'|'.join(PRECISIONS)} (engine and cpu)")
    peak = sgemm_peak_gflops()
    for name in args.configs:
        bench_config(name, args.rounds, args.steps_per_round, peak, args.csv, args.methods, not args.no_memory)
    print(f"\nrows appended to {args.csv}")


if __name__ == "__main__":
    main()
