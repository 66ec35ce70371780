"""MEASURED model-steps/s of the fused Triton step against the batched PyTorch engine.

Needs a CUDA GPU; without one it prints why and exits 0 (nothing measured).
Both engines train the same population (paper config by default, the
semi-grokking sweep's ragged training sets) in the same process, so their
ratio means something on a shared machine. Prints time per step next to
model-steps/s, achieved TFLOP/s (FLOPs as counted by bench/roofline.py) and
the fraction of the precision's datasheet peak when the GPU is an A100 or
H100, and appends long-format CSV rows (Liger-Kernel style) with --csv.

    python bench/bench_gpu.py                               # 200 models, D 1500..2050
    python bench/bench_gpu.py --models 50 --precision tf32x3 tf32 --block-n 64 --cuda-graph
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import numpy as np
import torch

from fastgrok import __version__
from fastgrok.config import RunSpec, get_preset
from fastgrok.kernels.layout import PRECISIONS, Layout
from fastgrok.population import Population
from fastgrok.tasks import Task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import GPUS, model_step  # noqa: E402  (a sibling script, not a package)


def time_steps(step, steps: int, repeats: int) -> np.ndarray:
    """Seconds per step of ``repeats`` timed runs of ``steps`` steps each (CUDA events)."""
    out = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        stop.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(stop) / 1e3 / steps)
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--sizes", default="1500:2050", help="lo:hi training-set sizes, evenly spaced over models")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (p20/p50/p80 over them)")
    parser.add_argument("--csv", help="append result rows to this CSV file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("SKIP: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing was measured. "
              "Run this script on a machine with an NVIDIA GPU.")
        return 0
    from fastgrok.backends.triton_engine import TritonBackend

    ok, reason = TritonBackend.available(torch.device("cuda"))
    if not ok:
        print(f"SKIP: the Triton backend is unavailable ({reason}); nothing was measured.")
        return 0

    preset = get_preset(args.preset)
    task = Task(preset.task)
    lo, hi = (int(v) for v in args.sizes.split(":"))
    sizes = np.linspace(lo, hi, args.models).round().astype(int)
    runs = [RunSpec(train_size=int(d), data_seed=m, init_seed=m) for m, d in enumerate(sizes)]
    L = Layout.from_config(preset.model)
    flops_per_step = sum(model_step(L, int(d), args.block_n)[0] for d in sizes)
    device = torch.cuda.get_device_name()
    gpu = next((g for g in GPUS if g.name.split("-")[0] in device), None)
    config = f"{args.preset} M={args.models} D={lo}:{hi} block_n={args.block_n} graph={args.cuda_graph}"
    print(f"MEASURED on {device}: {config}; torch {torch.__version__}, fastgrok {__version__}")

    results = []

    def record(provider, seconds, precision):
        p20, p50, p80 = np.percentile(seconds, [20, 50, 80])
        tflops = flops_per_step / p50 / 1e12
        peak = gpu.tflops[precision] if gpu is not None and precision in gpu.tflops else float("nan")
        results.append(dict(op="train_step", provider=provider, precision=precision, p50_ms=p50 * 1e3,
                            p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, model_steps_per_s=args.models / p50,
                            tflops=tflops, fraction_of_peak=tflops / peak, config=config, device=device,
                            version=__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds")))
        r = results[-1]
        print(f"{provider:<22} {precision:>7} {r['p50_ms']:9.2f} ms/step [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}]  "
              f"{r['model_steps_per_s']:10.4g} model-steps/s  {tflops:7.2f} TFLOP/s  "
              f"{r['fraction_of_peak']:6.1%} of peak")

    batched = Population(task, preset.model, runs, preset.optim, device="cuda", backend="torch")
    time_steps(batched.step, 2, 1)  # warm-up
    record("batched torch engine", time_steps(batched.step, args.steps, args.repeats), "ieee")
    baseline = results[-1]["p50_ms"]
    for precision in args.precision:
        backend = TritonBackend(precision=precision, block_n=args.block_n, cuda_graph=args.cuda_graph)
        pop = Population(task, preset.model, runs, preset.optim, device="cuda", backend=backend)
        time_steps(pop.step, 3, 1)  # compile, capture
        record("fused triton", time_steps(pop.step, args.steps, args.repeats), precision)
        print(f"{'':<22} {'':>7} speed-up over the batched engine: {baseline / results[-1]['p50_ms']:.2f}x")

    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            if new:
                writer.writeheader()
            writer.writerows(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
