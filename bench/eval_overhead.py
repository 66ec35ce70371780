"""Share of run time spent evaluating, at the paper config with the default schedule.

    python bench/eval_overhead.py [--models 1 8] [--backend torch]

Times training steps and evaluations of one population, then weighs them by
the default schedule's number of evaluation points for the preset's run length.
"""
from __future__ import annotations

import argparse
import time

from fastgrok.config import RunSpec, get_preset
from fastgrok.population import Population
from fastgrok.metrics import Evaluator
from fastgrok.schedule import EvalSchedule
from fastgrok.tasks import Task


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--models", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    pre = get_preset(args.preset)
    n_evals = len(EvalSchedule().points(pre.steps))
    for M in args.models:
        runs = [RunSpec(pre.train_size, data_seed=s, init_seed=s) for s in range(M)]
        pop = Population(Task(pre.task), pre.model, runs, pre.optim, backend=args.backend)
        evaluate = Evaluator(pop)
        pop.step(), evaluate(pop)  # warm-up
        t = time.perf_counter()
        for _ in range(10):
            pop.step()
        step = (time.perf_counter() - t) / 10
        t = time.perf_counter()
        for _ in range(3):
            evaluate(pop)
        evaluation = (time.perf_counter() - t) / 3
        share = n_evals * evaluation / (pre.steps * step + n_evals * evaluation)
        print(f"M={M} backend={pop.backend}: step {step * 1e3:.1f} ms, evaluation {evaluation * 1e3:.1f} ms "
              f"(= {evaluation / step:.2f} steps); {n_evals} evaluations in {pre.steps:,} steps -> "
              f"{100 * share:.2f}% of run time")


if __name__ == "__main__":
    main()
