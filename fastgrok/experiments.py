"""The paper's experiments as populations of runs, with defaults per preset.

Each experiment is one population (ungrokking: two, the pre-training and the
continuation) written to one run file by ``fastgrok.runner.run_experiment``,
and one function that draws its figure from that file.

  sweep       semi-grokking (Section 5.3, Fig. 5, Fig. 10): sizes x seeds x lr x wd
  grok        grokking (Fig. 1a): one training-set size, many seeds
  ungrok      ungrokking (Section 5.2, Figs. 4, 7): grok on a large D, then
              continue each copy on prefixes D' of its own split, over wd
  efficiency  circuit efficiency (Section 5.1, Fig. 3): memorisation-only runs
              (random labels) and generalisation-only runs (large D)
  toy         the two-circuit simulation (Section 3, Appendix C, Fig. 2)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgrok.analysis import CONVERGENCE_TOLERANCE, converged, final_values, movement
from fastgrok.config import RunSpec
from fastgrok.schedule import EvalSchedule

EXPERIMENTS = ("sweep", "grok", "ungrok", "efficiency", "toy")

# Evaluation schedules per preset: the CPU runs last thousands of steps, not
# millions, so their dense phase is coarser to keep evaluation a small
# fraction of run time.
SCHEDULES = {"paper": EvalSchedule(), "cpu": EvalSchedule(dense_every=25, dense_until=1000, per_decade=60)}

# Per-preset defaults. "paper" follows the paper (Appendix A, Sections 5.1-5.3);
# "cpu" scales every experiment to p = 43 so that it finishes in minutes on
# two cores: its sizes sit where that model memorises, groks and ungroks.
DEFAULTS: dict[str, dict[str, dict]] = {
    "paper": {
        "sweep": dict(sizes="1500:2050:20", seeds=10, steps=30_000_000),
        "grok": dict(sizes="3830", seeds=5, steps=30_000),
        "ungrok": dict(pretrain_steps=10_000, sizes="geom:390:1494:7", seeds=10,
                       wd="0.5,1,2", steps=100_000),
        "efficiency": dict(mem_sizes="geom:250:2000:4", gen_sizes="6000:12000:4", seeds=3,
                           wd="0.3,0.6,1,2", steps=50_000),
    },
    "cpu": {
        "sweep": dict(sizes="600:1000:5", seeds=4, steps=6_000),
        "grok": dict(sizes="925", seeds=4, steps=5_000),
        # D' around this model's D_crit (~210), long enough for wd >= 2 to converge:
        # middling test accuracy that holds, at the same D' for every weight decay.
        "ungrok": dict(pretrain_steps=1_500, sizes="120:300:7", seeds=2,
                       wd="2,3,4", steps=16_000),
        # 15 runs per size (3 seeds x 5 weight decays), converged: enough to fill
        # the isologit buckets of Fig. 3 at every size.
        "efficiency": dict(mem_sizes="geom:100:400:4", gen_sizes="1100:1700:3", seeds=3,
                           wd="0.7,1,1.4,2,2.8", steps=5_000),
    },
}


def parse_sizes(text: str, n_pairs: int, flag: str = "--sizes") -> list[int]:
    """Training-set sizes from ``START:STOP:COUNT`` (COUNT evenly spaced, STOP
    included, rounded), ``geom:START:STOP:COUNT`` (geometric spacing) or an
    explicit list ``a,b,c``. Each must be in 1..n_pairs."""
    spec = str(text).strip()
    try:
        if ":" in spec:
            parts = spec.split(":")
            geometric = parts[0] == "geom"
            if geometric:
                parts = parts[1:]
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise ValueError(f"{flag} {spec}: COUNT={count} must be >= 1")
            if geometric and (start <= 0 or stop <= 0):
                raise ValueError(f"{flag} {spec}: geometric spacing needs START and STOP > 0")
            for name, end in (("START", start), ("STOP", stop)):
                if not 1 <= end <= n_pairs:
                    raise ValueError(f"{flag} {spec}: {name}={end:g} is outside 1..{n_pairs} "
                                     f"(the task's number of pairs)")
            space = np.geomspace if geometric else np.linspace
            sizes = [int(round(v)) for v in space(start, stop, count)]
        else:
            sizes = [int(v) for v in spec.split(",")]
    except ValueError as exc:
        if exc.args and str(exc.args[0]).startswith(flag):
            raise
        raise ValueError(f"{flag} {spec!r}: expected START:STOP:COUNT, geom:START:STOP:COUNT "
                         f"or a comma list of integers") from None
    for size in sizes:
        if not 1 <= size <= n_pairs:
            raise ValueError(f"{flag}: training-set size {size} is outside 1..{n_pairs} "
                             f"(the task's number of pairs)")
    return list(dict.fromkeys(sizes))  # rounding can merge neighbours; keep order


def parse_floats(text: str | float, flag: str, minimum: float, strict: bool) -> list[float]:
    """A comma list of finite numbers, each > minimum (strict) or >= minimum
    (an infinite learning rate or weight decay trains every model to NaN)."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a number or a comma list of numbers") from None
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{flag} {v:g}: must be a finite number")
        if not (v > minimum if strict else v >= minimum):
            op = ">" if strict else ">="
            raise ValueError(f"{flag} {v:g}: must be {op} {minimum:g}")
    return values


def check_seeds(seeds: int) -> int:
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    return seeds


def grid_runs(sizes, seeds: int, lrs, wds, random_labels: bool = False, seed_offset: int = 0) -> list[RunSpec]:
    """Every (size, seed, lr, wd) combination; seed s fixes both the split and
    the initial weights, so one seed's smaller training sets are prefixes of
    its larger ones."""
    return [RunSpec(train_size=D, data_seed=seed_offset + s, init_seed=seed_offset + s, lr=lr,
                    weight_decay=wd, random_labels=random_labels)
            for D, s, lr, wd in itertools.product(sizes, range(seeds), lrs, wds)]


@dataclass(frozen=True)
class UngrokPlan:
    """Ungrokking: a pre-training population and its continuation."""

    pretrain: list[RunSpec]       # one per seed, on the full dataset
    continuation: list[RunSpec]   # seed x D' x wd, each on a prefix of its seed's split
    sources: list[int]            # continuation model -> pre-training model


def ungrok_plan(n_pairs: int, sizes, seeds: int, lr: float, wds, pretrain_wd: float) -> UngrokPlan:
    pretrain = [RunSpec(n_pairs, data_seed=s, init_seed=s, lr=lr, weight_decay=pretrain_wd)
                for s in range(seeds)]
    continuation, sources = [], []
    for s, D, wd in itertools.product(range(seeds), sizes, wds):
        continuation.append(RunSpec(D, data_seed=s, init_seed=s, lr=lr, weight_decay=wd))
        sources.append(s)
    return UngrokPlan(pretrain, continuation, sources)


def pretrain_path(out: Path) -> Path:
    """Where ungrokking keeps its pre-training run, beside the main file."""
    return out.with_name(out.stem + ".pretrain" + out.suffix)


# ------------------------------------------------------------------ the toy model
TOY_SCHEMA = "fastgrok-toy/1"


def write_toy(path: Path, result: dict[str, dict[str, np.ndarray]]) -> None:
    """The toy's curves, one group per Table 1 column, written atomically."""
    import os

    import h5py

    import fastgrok

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(experiment="toy", schema=TOY_SCHEMA, fastgrok_version=fastgrok.__version__)
        from dataclasses import asdict

        from fastgrok.toy import TABLE_1

        for column, arrays in result.items():
            g = f.create_group(column)
            if column in TABLE_1:  # the column's Table 1 hyperparameters
                g.attrs.update({k: v for k, v in asdict(TABLE_1[column]).items() if v is not None})
            for name, values in arrays.items():
                g.create_dataset(name, data=np.asarray(values))
    os.replace(tmp, path)


def read_toy(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import h5py

    with h5py.File(path, "r") as f:
        return {column: {name: g[name][()] for name in g} for column, g in f.items()}


def file_experiment(path: Path) -> str:
    """The experiment a fastgrok file holds; ValueError if it is not one."""
    import h5py

    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            experiment = f.attrs.get("experiment")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    if experiment is None:
        raise ValueError(f"{path}: not a fastgrok run file (no 'experiment' attribute)")
    experiment = experiment.decode() if isinstance(experiment, bytes) else str(experiment)
    if experiment.split(".")[0] not in EXPERIMENTS:
        raise ValueError(f"{path}: unknown experiment {experiment!r}; fastgrok writes {', '.join(EXPERIMENTS)}")
    return experiment


# ---------------------------------------------------------------------- figures
def _final(data, name: str) -> np.ndarray:
    """(M,) each model's last finite value of a metric (models frozen early keep theirs)."""
    return final_values(data.metrics[name])


def when_measured(data) -> str:
    """How a figure may call its runs' final values: "at convergence" only if all converged."""
    conv = converged(data.steps, data.metrics["test_acc"])
    if conv.all():
        return "at convergence"
    return f"at the end of training ({int(conv.sum())}/{len(conv)} runs converged)"


def _run_field(data, name: str) -> np.ndarray:
    return np.array([getattr(r, name) for r in data.header.runs])


def draw_figures(path: Path, out_prefix: Path | None = None) -> list[Path]:
    """Draw the paper's figure(s) for the experiment in ``path``; returns the files."""
    from fastgrok import plots
    from fastgrok.store import read_run

    path = Path(path)
    experiment = file_experiment(path)
    prefix = Path(out_prefix) if out_prefix is not None else path.with_suffix("")
    name = lambda tag: prefix.with_name(f"{prefix.name}_{tag}")
    if experiment == "toy":
        return list(plots.plot_toy(read_toy(path), name("fig2")))
    data = read_run(path)
    if len(data.steps) == 0:
        raise ValueError(f"{path}: the run has no evaluation yet; nothing to draw")
    m, out = data.metrics, []
    steps = data.steps
    if experiment == "grok":
        out += plots.plot_training_curves(steps, m["train_acc"][0], m["test_acc"][0], name("fig1"),
                                          train_loss=m["train_loss"][0], test_loss=m["test_loss"][0],
                                          param_norm=m["param_norm"][0],
                                          title=f"Grokking (seed 0, D = {data.header.runs[0].train_size})")
        out += plots.plot_sweep(steps, m["test_acc"], name("seeds"), title="Grokking: test accuracy of every seed")
    elif experiment == "sweep":
        out += plots.plot_sweep(steps, m["test_acc"], name("fig5"))
    elif experiment == "ungrok":
        out += plots.plot_ungrokking(_run_field(data, "train_size"), _final(data, "test_acc"),
                                     _run_field(data, "weight_decay"), name("fig4"), when_measured(data))
        out += plots.plot_sweep(steps, m["test_acc"], name("fig7"),
                                title="Ungrokking: test accuracy while training on D' < D")
    elif experiment == "efficiency":
        if "gen_logit_train" not in m:
            raise ValueError(f"{path}: efficiency needs the circuit metrics, which exist for x+y only")
        logit = _final(data, "gen_logit_train") + _final(data, "mem_logit_train")
        norm, D = _final(data, "param_norm"), _run_field(data, "train_size")
        mem = _run_field(data, "random_labels")
        # C_gen-only: > 95% of the logit table's energy in the trigonometric subspace (Section 5.1).
        gen = ~mem & (_final(data, "gen_energy_fraction") > 0.95)
        pick = lambda sel: dict(logit=logit[sel], param_norm=norm[sel], D=D[sel]) if sel.any() else None
        out += plots.plot_efficiency(pick(mem), pick(gen), name("fig3"))
    if experiment in ("sweep", "ungrok") and "gen_mem_ratio_train" in m:
        out += plots.plot_logit_ratio(_run_field(data, "train_size"), _final(data, "gen_mem_ratio_train"),
                                      _final(data, "test_acc"), _final(data, "param_norm"), name("fig10"),
                                      when=when_measured(data))
    return [Path(p) for p in out]


# ---------------------------------------------------------------------- summary
def summarize(path: Path):
    """(description lines, pandas DataFrame of one row per configuration)."""
    import pandas as pd

    from fastgrok.store import read_run

    path = Path(path)
    experiment = file_experiment(path)
    if experiment == "toy":
        from fastgrok.toy import summarize as toy_summary

        frame = pd.DataFrame(toy_summary(read_toy(path))).T
        return [f"{path}: toy two-circuit simulation (Appendix C)"], frame
    data = read_run(path)
    h = data.header
    lines = [
        f"{path}: experiment {h.experiment!r}, fastgrok {data.fastgrok_version}, backend {data.backend}",
        f"task {h.task.op} p={h.task.p}; model d_model={h.model.d_model} heads={h.model.n_heads}x{h.model.d_head} "
        f"d_mlp={h.model.d_mlp}; {data.n_models} models",
        f"steps {data.state_step:,} of {data.target_steps:,} ({'complete' if data.complete else 'incomplete'}); "
        f"{len(data.steps)} evaluation points",
    ]
    if h.init_from:
        lines.append(f"initialised from {h.init_from.get('source')} (models {h.init_from.get('models')})")
    runs = data.runs_frame()
    for name in ("train_acc", "test_acc", "train_loss", "test_loss", "param_norm"):
        runs[name] = _final(data, name) if len(data.steps) else np.nan
    runs["grokked"] = runs["test_acc"] >= 0.99
    runs["failed"] = runs["failed_step"] >= 0
    if len(data.steps):
        runs["converged"] = converged(data.steps, data.metrics["test_acc"])
        runs["moved"] = movement(data.steps, data.metrics["test_acc"])
        lines.append(f"converged: {int(runs['converged'].sum())} of {len(runs)} models (test accuracy within "
                     f"+-{CONVERGENCE_TOLERANCE:g} of its final value over the last third of training; "
                     f"'moved' is the largest change there)")
    else:
        runs["converged"], runs["moved"] = False, np.nan
    keys = ["train_size", "lr", "weight_decay", "random_labels"]
    frame = runs.groupby(keys).agg(models=("model", "size"), train_acc=("train_acc", "mean"),
                                   test_acc=("test_acc", "mean"), grokked=("grokked", "sum"),
                                   failed=("failed", "sum"), converged=("converged", "sum"),
                                   moved=("moved", "max"), param_norm=("param_norm", "mean")).reset_index()
    return lines, frame
