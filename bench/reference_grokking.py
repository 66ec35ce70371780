"""Grokking with the reference trainer (the oracle), one model, timed.

    python bench/reference_grokking.py --preset cpu
    python bench/reference_grokking.py --preset paper --train-fraction 0.5 --steps 3000

Prints the first step at which train accuracy reaches 100% and test accuracy
reaches 95%, and the wall time; grokking is the gap between the two.
"""
from __future__ import annotations

import argparse

from fastgrok.config import RunSpec, get_preset
from fastgrok.tasks import Task
from fastgrok.train import train_reference


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--train-fraction", type=float, help="default: the preset's training-set size")
    ap.add_argument("--steps", type=int, help="default: the preset's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    pr = get_preset(args.preset)
    task = Task(pr.task)
    D = round(args.train_fraction * task.n_pairs) if args.train_fraction else pr.train_size
    steps = args.steps or pr.steps
    first = {}

    def log(step, h):
        if h.train_acc[-1] >= 1.0:
            first.setdefault("train 100%", step)
        if h.test_acc[-1] >= 0.95:
            first.setdefault("test 95%", step)
        if step % (20 * args.eval_every) == 0:
            print(f"step {step:>6}: train loss {h.train_loss[-1]:.3g} acc {h.train_acc[-1]:.3f}  "
                  f"test loss {h.test_loss[-1]:.3g} acc {h.test_acc[-1]:.3f}", flush=True)

    print(f"reference trainer: {pr.task.op} p={pr.task.p}, D={D} of {task.n_pairs} pairs, "
          f"d_model={pr.model.d_model}, {steps} steps")
    _, hist = train_reference(task, pr.model, RunSpec(D, data_seed=args.seed, init_seed=args.seed),
                              steps, pr.optim, eval_every=args.eval_every, log=log)
    print(f"train accuracy 100% first at step {first.get('train 100%', 'never')}; "
          f"test accuracy >= 95% first at step {first.get('test 95%', 'never')}; "
          f"final test accuracy {hist.test_acc[-1]:.4f}; wall time {hist.seconds:.0f} s")


if __name__ == "__main__":
    main()
