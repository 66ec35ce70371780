"""ESTIMATES, not measurements: a roofline of the fused Triton step on A100 and H100.

For the paper config (or any preset) it counts, per model-step, the FLOPs the
kernels execute and the bytes they move, then bounds model-steps/s by
each resource a GPU has:

* compute: FLOPs / peak rate of the matmul precision (fp32: the FP32 FMA rate;
  bf16x3: one third of the BF16 tensor-core rate, it issues three MMAs per
  product; tf32 and bf16: their tensor-core rates), datasheet dense peaks;
* HBM: the bytes that must reach DRAM once per step (parameters, AdamW moments,
  gradients, tables, training data) / HBM bandwidth;
* L2: what every tile of BLOCK_N examples streams through L2 (the model's
  weights, twice, and its weight-gradient atomics) / an assumed L2 bandwidth.
  The per-tile activations live in a per-program scratch that is assumed to
  hit in L1/L2 (fastgrok.kernels.examples).

The time of a model-step is at least the largest of the three; the sweep
estimate multiplies it by the number of model-steps. Peaks are never reached
in practice (expect 1.5-3x longer); bench/bench_gpu.py measures the real rate.

    python bench/roofline.py                        # paper config, BLOCK_N = 64 (the default)
    python bench/roofline.py --block-n 32 --l2-tbs 5.5 7.0
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from fastgrok.config import ModelConfig, get_preset
from fastgrok.kernels.layout import PRECISIONS, Layout


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: dict           # dense peak TFLOP/s per matmul precision
    hbm_tbs: float         # HBM bandwidth, TB/s
    l2_tbs: float          # assumed L2 bandwidth, TB/s (not a datasheet figure)


# Datasheet dense peaks (NVIDIA A100 80GB SXM and H100 SXM5 datasheets);
# bf16x3 = BF16 / 3. L2 bandwidth: assumed, order of magnitude from public
# microbenchmarks (e.g. chipsandcheese.com, "Nvidia's H100: Funny L2, and Tons
# of Bandwidth", 2023); override with --l2-tbs.
GPUS = (
    GPU("A100-SXM4-80GB", dict(fp32=19.5, bf16x3=312 / 3, tf32=156, bf16=312), hbm_tbs=2.039, l2_tbs=4.0),
    GPU("H100-SXM5", dict(fp32=67.0, bf16x3=989.4 / 3, tf32=494.7, bf16=989.4), hbm_tbs=3.35, l2_tbs=5.5),
)

FP32 = 4


def example_flops(L: Layout) -> int:
    """Matmul FLOPs of one example in fastgrok.kernels.examples, forward and backward."""
    D, HD, F, V = L.D, L.H * L.Dh, L.F, L.V
    forward = 2 * (HD * D + D * F + F * D + 2 * D * V)       # logits twice: the loss makes two passes
    backward = 2 * (2 * D * V + 4 * D * F + 2 * HD * D)      # dW_U, dresid; dW_out, dpre, dW_in, dresid_mid; dW_O, dz
    attention = 2 * 2 * 4 * HD                               # z and its gradient over the 4 positions
    return forward + backward + attention


def table_flops(L: Layout) -> int:
    """Per model-step: launch 1's tables and launch 3's table backward."""
    D, HD, R = L.D, L.H * L.Dh, L.R
    forward = 2 * 2 * R * D * HD + 2 * D * HD + 2 * R * HD        # K, V; q; scores
    backward = 2 * R * HD + 2 * 2 * D * R * HD + 2 * 2 * R * HD * D + D * HD  # dq; dW_K, dW_V; dR; dW_Q
    return forward + backward


def hbm_bytes(L: Layout, n_examples: int) -> dict[str, int]:
    """Bytes one model-step must move to or from DRAM (at least once each)."""
    P, R, D, HD, H = L.P, L.R, L.D, L.H * L.Dh, L.H
    accumulated = P - L.offsets["W_O"]
    return {
        "AdamW: read p, g, m, v; write p, m, v": 7 * FP32 * P,
        "gradients W_O..W_U: clear, write back after atomics": 2 * FP32 * accumulated,
        "gradients W_E..W_V: write, read back by AdamW (L2)": FP32 * (P - accumulated),
        "weights read by launches 1-2 (once, then L2)": FP32 * P,
        "row tables K, V, S, q, dV, dS, dq, R_tab (write + read)": 2 * FP32 * (3 * R * HD + 2 * R * H + 2 * HD + R * D),
        "training data x, y, label (int64), weight (fp32)": (3 * 8 + 4) * n_examples,
    }


def l2_bytes_per_tile(L: Layout, block_n: int) -> int:
    """Weights streamed (forward and backward) and gradient atomics of one tile."""
    weights = L.P - L.offsets["W_O"]                   # W_O, W_in, b_in, W_out, b_out, W_U
    per_tile = 2 * weights + L.D * L.V                 # twice each, W_U a third time (two loss passes)
    atomics = weights + block_n * 2 * L.H * L.Dh       # weight gradients, then dV rows
    return FP32 * (per_tile + atomics)


def sweep_sizes() -> np.ndarray:
    """The semi-grokking sweep (docs/design.md, "Experiments"): sizes 1500..2050, 20 of them, 10 seeds each (200 models)."""
    return np.repeat(np.linspace(1500, 2050, 20).round().astype(int), 10)


def model_step(L: Layout, D: int, block_n: int) -> tuple[float, float, float]:
    """FLOPs, HBM bytes and L2 bytes of one model-step with D training examples."""
    tiles = math.ceil(D / block_n)
    flops = tiles * block_n * example_flops(L) + table_flops(L)
    return flops, sum(hbm_bytes(L, D).values()), tiles * l2_bytes_per_tile(L, block_n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--block-n", type=int, default=64, help="examples per tile (fastgrok.kernels.examples BLOCK_N)")
    parser.add_argument("--l2-tbs", type=float, nargs=2, metavar=("A100", "H100"),
                        help="assumed L2 bandwidths in TB/s (default: %s)" % " ".join(str(g.l2_tbs) for g in GPUS))
    parser.add_argument("--steps", type=float, default=1e7, help="steps per model of the sweep (default 1e7)")
    args = parser.parse_args(argv)
    gpus = GPUS if args.l2_tbs is None else tuple(
        GPU(g.name, g.tflops, g.hbm_tbs, l2) for g, l2 in zip(GPUS, args.l2_tbs))
    cfg: ModelConfig = get_preset(args.preset).model
    L = Layout.from_config(cfg)
    D_paper = get_preset(args.preset).train_size
    flops, hbm, l2 = model_step(L, D_paper, args.block_n)

    print("ESTIMATES (roofline bounds from datasheet peaks and an assumed L2 bandwidth), not measurements")
    print(f"preset {args.preset}: P = {L.P} parameters per model, D = {D_paper} examples, BLOCK_N = {args.block_n}")
    print(f"  FLOPs per example             {example_flops(L) / 1e6:8.3f} MFLOP")
    print(f"  FLOPs per model-step (tables) {table_flops(L) / 1e6:8.1f} MFLOP")
    print(f"  FLOPs per model-step          {flops / 1e9:8.3f} GFLOP")
    print(f"  HBM bytes per model-step      {hbm / 1e6:8.2f} MB")
    for what, nbytes in hbm_bytes(L, D_paper).items():
        print(f"      {nbytes / 1e6:7.2f} MB  {what}")
    print(f"  L2 bytes per model-step       {l2 / 1e6:8.1f} MB  ({l2_bytes_per_tile(L, args.block_n) / 1e6:.2f} MB "
          f"per tile of {args.block_n} examples)")
    print(f"  intensity: {flops / hbm:.0f} FLOP/B of HBM, {flops / l2:.1f} FLOP/B of L2")

    sizes = sweep_sizes()
    sweep = [model_step(L, int(D), args.block_n) for D in sizes]
    print(f"\nsemi-grokking sweep: {len(sizes)} models (D {sizes.min()}..{sizes.max()}) x {args.steps:.0e} steps")
    print(f"{'GPU':<16} {'precision':>9} {'compute':>9} {'HBM':>9} {'L2':>9}   {'model-steps/s':>13} "
          f"{'sweep h':>8}  limit")
    print(f"{'':<16} {'':>9} {'us/model-step (paper D)':^29}   {'(bound)':>13} {'(bound)':>8}")
    for gpu in gpus:
        for precision in PRECISIONS:
            bounds = {"compute": flops / (gpu.tflops[precision] * 1e12), "HBM": hbm / (gpu.hbm_tbs * 1e12),
                      "L2": l2 / (gpu.l2_tbs * 1e12)}
            limit = max(bounds, key=bounds.get)
            sweep_seconds = args.steps * sum(
                max(f / (gpu.tflops[precision] * 1e12), h / (gpu.hbm_tbs * 1e12), c / (gpu.l2_tbs * 1e12))
                for f, h, c in sweep)
            print(f"{gpu.name:<16} {precision:>9} {bounds['compute'] * 1e6:9.1f} {bounds['HBM'] * 1e6:9.1f} "
                  f"{bounds['L2'] * 1e6:9.1f}   {1 / bounds[limit]:13.3g} {sweep_seconds / 3600:8.1f}  {limit}")
    print("\nGoal: the sweep in <= 6 h on one H100. A bound above 6 h cannot be met by this design in that mode;"
          "\none below it may still be missed by the gap between peaks and achieved rates.")


if __name__ == "__main__":
    main()
