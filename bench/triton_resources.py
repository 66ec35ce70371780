"""Registers, spills and shared memory of the fused step's kernels on sm_80 and sm_90.

Compiles every kernel ahead of time for each GPU architecture (no GPU needed;
fastgrok.kernels.aot) at a model config (default: the paper's) and prints one
row per (kernel, architecture, precision), plus the launches per training
step; the four of a step, then the table backward that a gradient without
an update launches instead of AdamW.

    python bench/triton_resources.py                     # paper config, every precision
    python bench/triton_resources.py --precision bf16x3 --csv out.csv

Exits with status 1 if any kernel spills or needs more shared memory than
its architecture allows per block.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict

from fastgrok.config import get_preset
from fastgrok.kernels.aot import LAUNCHES_PER_STEP, SHARED_LIMIT, step_resources, tables_backward_resources
from fastgrok.kernels.layout import PRECISIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="model config preset (default: paper)")
    parser.add_argument("--precision", choices=PRECISIONS, action="append",
                        help="matmul precision(s) to compile (default: all)")
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), action="append",
                        help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset).model
    rows, failures = [], []
    start = time.perf_counter()
    print(f"preset {args.preset}: d_model {cfg.d_model}, heads {cfg.n_heads}x{cfg.d_head}, d_mlp {cfg.d_mlp}, "
          f"d_vocab {cfg.d_vocab}; launches per training step: {LAUNCHES_PER_STEP}")
    header = f"{'kernel':<22} {'arch':>5} {'precision':>9} {'warps':>5} {'regs':>5} {'spill B':>8} " \
             f"{'local B':>8} {'smem KB':>8} {'limit KB':>8}"
    print(header)
    for arch in args.arch or sorted(SHARED_LIMIT):
        for precision in args.precision or PRECISIONS:
            for r in step_resources(cfg, arch, precision) + [tables_backward_resources(cfg, arch)]:
                rows.append(dict(asdict(r), shared_limit=r.shared_limit, launches_per_step=LAUNCHES_PER_STEP))
                print(f"{r.kernel:<22} {'sm_' + str(arch):>5} {r.precision:>9} {r.num_warps:>5} {r.registers:>5} "
                      f"{r.spill_stores + r.spill_loads:>8} {r.local_bytes:>8} {r.shared_bytes / 1024:>8.1f} "
                      f"{r.shared_limit / 1024:>8.0f}", flush=True)
                failures += [f"{r.kernel} sm_{arch} {precision}: {p}" for p in r.problems()]
    print(f"compiled {len(rows)} kernels in {time.perf_counter() - start:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for failure in failures:
        print("PROBLEM:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
