"""MEASURED model-steps/s of the fused Triton step against the batched PyTorch engine.

Needs a CUDA GPU; without one it prints why and exits 0 (nothing measured),
and ``--dry-run`` prints the plan and the static model's estimates only.
For each population size M (``--models``) both engines train the same
population (paper config by default) in the same process, so their ratio
means something on a shared machine: the torch backend at fp32 and with TF32
matmuls (torch.backends.cuda.matmul.allow_tf32, cuBLAS's own rounding, not
the emulated "tf32" precision), then the triton backend at each precision.
Prints time per step next to model-steps/s, achieved TFLOP/s (FLOPs as counted
by bench/roofline.py), device memory per model (peak allocated / M) and the
static model's estimate (bench/sass_model.py CSVs given with --predictions),
and writes long-format CSV rows (Liger-Kernel style) with --csv.

    python bench/bench_gpu.py                                   # M = 200, D 1500..2050
    python bench/bench_gpu.py --models 8 64 200 2000 --sizes 2000:2000 --predictions static_M*.csv --csv out.csv
    python bench/bench_gpu.py --dry-run --models 8 200 --predictions static.csv
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

# Torch backend modes: (label, precision of the population, cuBLAS TF32 allowed).
TORCH_MODES = (("fp32", "fp32", False), ("tf32-cublas", "fp32", True))


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


def load_predictions(paths: list[str]) -> dict:
    """{(provider, mode, M, gpu): estimated us per model-step} from bench/sass_model.py CSVs."""
    out = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["metric"] != "estimate_time":
                    continue
                if row["method"] == "sass-model" and row["kernel"] == "step":
                    out[("triton", row["precision"], int(row["M"]), row["gpu"])] = float(row["value"])
                elif row["method"] == "torch-model":
                    mode = {"fp32": "fp32", "tf32": "tf32-cublas"}[row["precision"]]
                    out[("torch", mode, int(row["M"]), row["gpu"])] = float(row["value"])
    return out


def plan(args) -> list[tuple[int, str, str]]:
    """(M, provider, mode) of every measurement, in order."""
    return [(M, provider, mode) for M in args.models
            for provider, modes in (("torch", [m[0] for m in TORCH_MODES]), ("triton", args.precision))
            for mode in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--models", type=int, nargs="+", default=[200], help="population sizes M")
    parser.add_argument("--sizes", default="1500:2050", help="lo:hi training-set sizes, evenly spaced over models")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--block-n", type=int, default=None,
                        help="examples per tile of the triton backend (default: the precision's)")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (p20/p50/p80 over them)")
    parser.add_argument("--predictions", nargs="*", default=[], help="bench/sass_model.py CSV files")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates; measure nothing")
    parser.add_argument("--csv", help="write result rows to this CSV file")
    args = parser.parse_args(argv)
    predictions = load_predictions(args.predictions)
    gpu_names = sorted({k[3] for k in predictions})

    def estimate(provider, mode, M, device):
        name = next((g for g in gpu_names if g.split("-")[0] in device), None)
        return predictions.get((provider, mode, M, name), float("nan"))

    if args.dry_run:
        print(f"DRY RUN, nothing measured: {args.preset}, sizes {args.sizes}, steps {args.steps} x {args.repeats}")
        for M, provider, mode in plan(args):
            cells = ", ".join(f"{g} {predictions.get((provider, mode, M, g), float('nan')):.3f}" for g in gpu_names)
            print(f"  M={M:<5} {provider:<7} {mode:<12} static estimate us/model-step: {cells or 'none given'}")
        return 0
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
    L = Layout.from_config(preset.model)
    device = torch.cuda.get_device_name()
    gpu = next((g for g in GPUS if g.name.split("-")[0] in device), None)
    print(f"MEASURED on {device}: {args.preset} D={lo}:{hi} block_n={args.block_n} graph={args.cuda_graph}; "
          f"torch {torch.__version__}, fastgrok {__version__}")
    results = []
    for M in args.models:
        sizes = np.linspace(lo, hi, M).round().astype(int)
        runs = [RunSpec(train_size=int(d), data_seed=m, init_seed=m) for m, d in enumerate(sizes)]
        # Useful FLOPs: the training examples' and the tables', no padding to tiles.
        flops_per_step = sum(model_step(L, int(d), 1)[0] for d in sizes)
        config = f"{args.preset} M={M} D={lo}:{hi} block_n={args.block_n} graph={args.cuda_graph}"
        baseline = None
        for _, provider, mode in [p for p in plan(args) if p[0] == M]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            if provider == "torch":
                _, precision, allow_tf32 = next(t for t in TORCH_MODES if t[0] == mode)
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                pop = Population(task, preset.model, runs, preset.optim, device="cuda", backend="torch",
                                 precision=precision)
            else:
                torch.backends.cuda.matmul.allow_tf32 = False
                backend = TritonBackend(block_n=args.block_n, cuda_graph=args.cuda_graph)
                pop = Population(task, preset.model, runs, preset.optim, device="cuda", backend=backend,
                                 precision=mode)
            time_steps(pop.step, 3, 1)  # compile, self-check, capture
            seconds = time_steps(pop.step, args.steps, args.repeats)
            memory = (torch.cuda.max_memory_allocated() - before) / M
            p20, p50, p80 = np.percentile(seconds, [20, 50, 80])
            tflops = flops_per_step / p50 / 1e12
            peak_key = {"fp32": "fp32", "tf32-cublas": "tf32"}.get(mode, mode)
            peak = gpu.tflops.get(peak_key, float("nan")) if gpu is not None else float("nan")
            baseline = p50 if baseline is None else baseline
            results.append(dict(op="train_step", provider=provider, precision=mode, M=M, backend_ran=pop.backend,
                                p50_ms=p50 * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                                model_steps_per_s=M / p50, us_per_model_step=p50 / M * 1e6,
                                static_us_per_model_step=estimate(provider, mode, M, device),
                                memory_mb_per_model=memory / 1e6, tflops=tflops, fraction_of_peak=tflops / peak,
                                speedup_over_torch_fp32=baseline / p50, config=config, device=device,
                                version=__version__,
                                timestamp=datetime.datetime.now().isoformat(timespec="seconds")))
            r = results[-1]
            print(f"M={M:<5} {provider:<7} {mode:<12} {r['p50_ms']:9.2f} ms/step [{r['p20_ms']:.2f}, "
                  f"{r['p80_ms']:.2f}]  {r['model_steps_per_s']:10.4g} model-steps/s  "
                  f"{r['us_per_model_step']:8.2f} us/model-step (static {r['static_us_per_model_step']:.2f})  "
                  f"{r['memory_mb_per_model']:7.2f} MB/model  {tflops:7.2f} TFLOP/s  "
                  f"x{r['speedup_over_torch_fp32']:.2f} vs torch fp32  ran: {r['backend_ran']}", flush=True)
            del pop
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
