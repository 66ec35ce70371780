"""``fastgrok``: the paper's experiments as commands.

    fastgrok sweep --sizes 1500:2050:20 --seeds 10      # semi-grokking (Fig. 5, 10)
    fastgrok grok --seeds 5                               # grokking (Fig. 1a)
    fastgrok ungrok --wd 0.5,1,2                          # ungrokking (Figs. 4, 7)
    fastgrok efficiency                                   # circuit efficiency (Fig. 3)
    fastgrok toy                                          # the two-circuit simulation (Fig. 2)
    fastgrok plot FILE | fastgrok info FILE
    fastgrok sweep --shard K/N ...; fastgrok merge OUT SHARD...   # across processes / nodes

Every invalid argument is reported on one line that names the value and what
would be valid, with exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

from fastgrok.config import PRESETS, OptimConfig, get_preset
from fastgrok.backends import BACKENDS
from fastgrok.precision import PRECISIONS
from fastgrok.shard import Shard, local_device, partition, shard_from_env
from fastgrok.experiments import (DEFAULTS, SCHEDULES, check_seeds, draw_figures, grid_runs, parse_floats, parse_sizes,
                                  pretrain_path, summarize, ungrok_plan, write_toy)
from fastgrok.config import OPS

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the command line: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, sizes_help: str):
    p.add_argument("--preset", default="paper", help=f"model/task preset: {', '.join(PRESETS)} (default paper)")
    p.add_argument("--task", help=f"operation, default the preset's ({', '.join(OPS)})")
    p.add_argument("--p", type=int, help="modulus, default the preset's")
    p.add_argument("--steps", type=int, help="training steps per model (default: the experiment's)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default: the experiment's)")
    p.add_argument("--lr", default=None, help="learning rate, or a comma list crossed with the rest")
    p.add_argument("--wd", default=None, help="weight decay, or a comma list crossed with the rest")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="training backend (default auto)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="operands of the per-example matmuls, rounded as a GPU's tensor cores take them, "
                        "on every backend (default: the backend's; fp32 on the CPU); fp32 accumulation, "
                        "master weights and moments in every mode")
    p.add_argument("--cuda-graph", action="store_true", help="triton backend: capture the step in a CUDA graph")
    p.add_argument("--out", type=Path, help="output HDF5 file (default runs/<experiment>-<preset>.h5)")
    p.add_argument("--resume", action="store_true", help="continue --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="where stdout is not a terminal (batch jobs, > log): seconds between plain progress "
                        "lines (default 60; 0: every step)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figure at the end")
    p.add_argument("--until-converged", type=int, metavar="MAX_STEPS",
                   help="after --steps, keep doubling the steps until every model's test accuracy held within "
                        "+-0.05 over the last third of training, or MAX_STEPS (see fastgrok.analysis)")
    p.add_argument("--shard", help="train only shard K/N (0 <= K < N) of the models into OUT.shardK-of-N.h5; "
                                   "default: from torchrun (RANK/WORLD_SIZE) or a Slurm array, else all")
    if sizes_help:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--sizes", help=sizes_help)
        g.add_argument("--fractions", help="training-set sizes as fractions of all pairs, comma list")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgrok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sizes = "START:STOP:COUNT (COUNT evenly spaced, inclusive), geom:START:STOP:COUNT, or a,b,c"
    _common(sub.add_parser("sweep", help="semi-grokking sweep (Section 5.3)"), sizes)
    _common(sub.add_parser("grok", help="grokking: one configuration, many seeds (Fig. 1a)"), sizes)
    ung = sub.add_parser("ungrok", help="ungrokking (Section 5.2)")
    _common(ung, "reduced sizes D' " + sizes)
    ung.add_argument("--pretrain-steps", type=int, help="steps on the full dataset before reducing it")
    ung.add_argument("--pretrain-wd", type=float, default=1.0, help="weight decay while pre-training (default 1)")
    eff = sub.add_parser("efficiency", help="circuit efficiency (Section 5.1)")
    _common(eff, "")
    eff.add_argument("--mem-sizes", help="sizes of the memorisation-only (random label) runs; " + sizes)
    eff.add_argument("--gen-sizes", help="sizes of the generalisation-only runs; " + sizes)
    toy = sub.add_parser("toy", help="the two-circuit simulation (Section 3, Appendix C)")
    toy.add_argument("--steps", type=int, help="gradient-descent steps per column")
    toy.add_argument("--out", type=Path, default=Path("runs/toy.h5"))
    toy.add_argument("--resume", action="store_true", help="overwrite an existing --out (the toy takes seconds)")
    toy.add_argument("--no-plot", action="store_true")
    mrg = sub.add_parser("merge", help="join shard files into the file an unsharded run writes")
    mrg.add_argument("out", type=Path)
    mrg.add_argument("shards", type=Path, nargs="+")
    pr = sub.add_parser("precision", help="does matmul precision change grokking? the same seeds per precision")
    pr.add_argument("--preset", default="cpu", help="model/task preset (default cpu)")
    pr.add_argument("--p", type=int, help="modulus, default the preset's")
    pr.add_argument("--precisions", default="fp32,tf32,bf16", help="comma list (default fp32,tf32,bf16)")
    pr.add_argument("--seeds", type=int, default=16, help="seeds of the grokking configuration (default 16)")
    pr.add_argument("--steps", type=int, help="grokking steps (default: the grok experiment's)")
    pr.add_argument("--sizes", help="training-set size of the grokking runs (default: the grok experiment's)")
    pr.add_argument("--ungrok", default="", metavar="OPTIONS",
                    help="also an ungrokking run per precision with these fastgrok ungrok options, quoted, "
                         "e.g. '--sizes 120:300:7 --seeds 2 --wd 3 --steps 8000' (default: none); a --backend "
                         "there is the ungrokking runs' own")
    pr.add_argument("--backend", default="auto", choices=BACKENDS, help="training backend (default auto)")
    pr.add_argument("--out-dir", type=Path, help="where the run files go (default runs/precision-<preset>); "
                                                 "files there are resumed, complete ones reused")
    pr.add_argument("--quiet", action="store_true", help="no progress display")
    pr.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS")
    dc = sub.add_parser("dcrit", help="the critical dataset size from ungrok, efficiency and sweep files")
    dc.add_argument("files", type=Path, nargs="+")
    dc.add_argument("--out", type=Path, help="figure path prefix (default: beside the first file, _dcrit)")
    for name, what in (("plot", "draw the figure for a run file"), ("info", "what a run file holds")):
        q = sub.add_parser(name, help=what)
        q.add_argument("file", type=Path)
        if name == "plot":
            q.add_argument("--out", type=Path, help="figure path prefix (default: beside FILE)")
    return parser


# ------------------------------------------------------------------- validation
def _preset(args):
    overrides = {}
    if args.task is not None:
        overrides["op"] = args.task
    if args.p is not None:
        overrides["p"] = args.p
    if args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r}: unknown; valid presets: {', '.join(PRESETS)}")
    try:
        return get_preset(args.preset, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _positive(value, flag):
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: must be >= 1")
    return value


def _valid_devices() -> list[str]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    return (["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])
            + (["mps"] if mps is not None and mps.is_available() else []))


def _device(text: str) -> str:
    """The torch device the run trains on, checked before anything is written;
    under torchrun a bare ``cuda`` is the rank's GPU (``local_device``)."""
    import torch

    valid = _valid_devices()
    named = f"valid devices on this machine: {', '.join(valid)}"
    device = local_device(text)
    via = f" (LOCAL_RANK={os.environ.get('LOCAL_RANK')} selects {device})" if device != text else ""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {text!r}: not a device; {named}") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise UsageError(f"--device {text}: this torch {torch.__version__} is built without CUDA; {named}")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is visible (torch.cuda.is_available() is False); "
                             f"{named}")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {text}{via}: this machine has {count} CUDA device{'s' * (count != 1)}; "
                             f"{named}")
    elif parsed.type == "mps":
        if "mps" not in valid:
            raise UsageError(f"--device {text}: MPS is not available; {named}")
    elif parsed.type != "cpu" or parsed.index not in (None, 0):
        raise UsageError(f"--device {text}: fastgrok trains on cpu, cuda[:N] or mps; {named}")
    return device


def _check_run_options(args):
    """Options every training command shares, checked before anything is written."""
    args.device = _device(args.device)
    cap = args.until_converged
    if cap is not None:
        steps = args.steps if args.steps is not None else 1
        if cap < max(steps, 1):
            raise UsageError(f"--until-converged {cap}: the step cap must be >= --steps ({steps})")
        if args.shard or shard_from_env() is not None:
            raise UsageError("--until-converged: shards would stop at different steps and not merge; "
                             "run the shards for a fixed --steps")
    if math.isnan(args.progress_every) or args.progress_every < 0:
        raise UsageError(f"--progress-every {args.progress_every:g}: must be a number of seconds >= 0")


def _sizes(args, text, n_pairs, flag="--sizes"):
    if getattr(args, "fractions", None):
        fractions = parse_floats(args.fractions, "--fractions", 0.0, strict=True)
        for f in fractions:
            if f > 1:
                raise ValueError(f"--fractions {f:g}: a fraction of all pairs must be in (0, 1]")
        return parse_sizes(",".join(str(max(1, round(f * n_pairs))) for f in fractions), n_pairs, "--fractions")
    return parse_sizes(text, n_pairs, flag)


def _shard(args) -> Shard | None:
    return Shard.parse(args.shard) if args.shard else shard_from_env()


def _out_path(args, experiment: str, shard: Shard | None = None) -> Path:
    out = args.out or Path("runs") / f"{experiment}-{args.preset}.h5"
    if shard is not None:
        out = shard.file_path(out)
    if out.exists() and not args.resume:
        raise UsageError(f"--out {out}: the file exists; pass --resume to continue it, or choose another --out")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file path ending in .h5")
    return out


def _select(shard: Shard | None, costs, n_models: int, groups=None) -> list[int]:
    """Indices of the models this process trains (all of them without a shard)."""
    if shard is None:
        return list(range(n_models))
    models = partition(costs, shard.count, groups)[shard.index]
    if not models:
        raise UsageError(f"--shard {shard}: this shard gets no models; the experiment has only {n_models} "
                         f"(groups of) models for {shard.count} shards")
    return models


def _shard_info(shard: Shard | None, models: list[int], all_runs) -> dict | None:
    """Which models of the experiment a shard trains; ``experiment_sha256``
    identifies the whole experiment's run list, so merge can tell shards of
    different experiments apart."""
    if shard is None:
        return None
    import dataclasses
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in all_runs]).encode()).hexdigest()
    return dict(index=shard.index, count=shard.count, models=models, total=len(all_runs),
                experiment_sha256=digest)


def _check_resumable(out: Path, experiment: str):
    """A file to resume must hold this experiment (the runner checks the configuration)."""
    from fastgrok.experiments import file_experiment

    if out.exists():
        found = file_experiment(out)
        if found != experiment:
            raise UsageError(f"--resume {out}: the file holds experiment {found!r}, not {experiment!r}")


# --------------------------------------------------------------------- progress
def population_counts(pop, evaluation) -> dict[str, int]:
    """How many models are memorised (train >= 99 %, test < 50 %), partial
    (train >= 99 %, test in [50, 99) %), grokked (test >= 99 %) and failed
    (non-finite, frozen) at ``evaluation``: the numbers both displays show."""
    train, test = evaluation.values["train_acc"], evaluation.values["test_acc"]
    grokked = test >= 0.99
    return dict(memorised=int(((train >= 0.99) & (test < 0.5)).sum()),
                partial=int(((train >= 0.99) & (test >= 0.5) & ~grokked).sum()),
                grokked=int(grokked.sum()), failed=int((pop.failed_step >= 0).sum()))


def format_counts(counts: dict[str, int], sep: str = " · ") -> str:
    return sep.join(f"{name} {n}" for name, n in counts.items())


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _duration(seconds: float | None) -> str:
    """1m56s, 3h07m, 2d05h: two units, enough to plan by."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


class Progress:
    """A run's progress with steps/s, model-steps/s, ETA and population counts.

    Where stdout is a terminal: a rich bar. Elsewhere (Slurm, nohup, ``> log``)
    rich would show nothing until the end, so instead a plain, flushed line at
    the first step, then every ``every`` seconds, and at the last step (or
    where an interrupted run stopped). ``quiet``: nothing. Counts are computed
    only when shown, not at every step.
    """

    def __init__(self, total_steps: int, n_models: int, label: str, quiet: bool, every: float = 60.0,
                 stream=None, clock=time.perf_counter, interactive: bool | None = None):
        self.total, self.n_models, self.label, self.every = total_steps, n_models, label, every
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        if interactive is None:
            try:
                interactive = self.stream.isatty()
            except (AttributeError, ValueError):   # no isatty, or a closed stream
                interactive = False
        self.mode = "quiet" if quiet else "bar" if interactive else "lines"
        self._pop = self._evaluation = self._step = self._s0 = self._printed = None
        self._t0 = self._last = 0.0
        if self.mode != "bar":
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"), refresh_per_second=4, transient=False,
            console=Console(file=self.stream))
        self.task = self.bar.add_task(label, total=total_steps, rate="", counts="")
        self.bar.start()

    @property
    def counts(self) -> str:
        """The latest evaluation's counts ("" before the first)."""
        if self._evaluation is None:
            return ""
        return format_counts(population_counts(self._pop, self._evaluation))

    def _steps_per_second(self, now: float) -> float | None:
        if self._step is None or self._step <= self._s0 or now <= self._t0:
            return None
        return (self._step - self._s0) / (now - self._t0)

    def __call__(self, step, pop, evaluation):
        self._step, self._pop, self._evaluation = step, pop, evaluation
        if self.mode == "quiet":
            return
        now = self.clock()
        first = self._s0 is None
        if first:
            self._t0, self._s0 = now, step
        if self.mode == "lines":
            if first or now - self._last >= self.every or step == self.total:
                self._line(now)
            return
        if now - self._last < 0.25 and step != self.total:
            return
        self._last = now
        rate = self._steps_per_second(now) or 0.0
        self.bar.update(self.task, completed=step, counts=self.counts,
                        rate=f"{rate:,.0f} steps/s · {rate * self.n_models:,.0f} model-steps/s")

    def _line(self, now: float):
        self._last, self._printed = now, self._step
        rate = self._steps_per_second(now)
        model_rate = None if rate is None else rate * self.n_models
        eta = None if rate is None else (self.total - self._step) / rate
        counts = population_counts(self._pop, self._evaluation) if self._evaluation is not None else {}
        print(f"{self.label}: step {self._step}/{self.total}  {_rate(rate)} steps/s  "
              f"{_rate(model_rate)} model-steps/s  ETA {_duration(eta)}  {format_counts(counts, ' ')}".rstrip(),
              file=self.stream, flush=True)

    def close(self):
        if self.mode == "bar":
            self.bar.stop()
        elif self.mode == "lines" and self._step is not None and self._step != self._printed:
            self._line(self.clock())


# ------------------------------------------------------------------ experiments
def _train(args, experiment, out, preset, runs, steps, extend=True, **kw):
    """Train ``runs`` into ``out``; with --until-converged (and ``extend``), then double the
    steps until every model converged or the cap is reached."""
    from fastgrok.analysis import converged
    from fastgrok.runner import run_experiment
    from fastgrok.store import read_run

    optim = OptimConfig()
    options = {"triton": {"cuda_graph": True}} if args.cuda_graph else None
    cap = args.until_converged if extend else None
    resume = args.resume
    if cap is not None and resume and out.exists():
        steps = max(steps, min(cap, read_run(out).target_steps))   # an earlier session may have extended it
    while True:
        progress = Progress(steps, len(runs), f"{experiment} ({len(runs)} models)", args.quiet, args.progress_every)
        try:
            pop = run_experiment(out, experiment, preset.task, preset.model, optim, runs, steps,
                                 schedule=SCHEDULES[preset.name], backend=args.backend, backend_options=options,
                                 precision=args.precision,
                                 device=args.device, resume=resume, progress=progress, **kw)
        finally:
            progress.close()
        print(f"{experiment}: {len(runs)} models x {steps:,} steps on backend {pop.backend} -> {out}"
              + (f"; {progress.counts}" if progress.counts else ""))
        if cap is None:
            return pop
        data = read_run(out)
        done = converged(data.steps, data.metrics["test_acc"])
        if done.all() or steps >= cap:
            print(f"{experiment}: {int(done.sum())} of {len(done)} models converged by step {steps:,}"
                  + ("" if done.all() else f" (the cap, --until-converged {cap:,})"))
            return pop
        steps, resume = min(cap, 2 * steps), True
        print(f"{experiment}: {int((~done).sum())} of {len(done)} models still moving; continuing to step {steps:,}")


def _train_selected(args, experiment, out, preset, runs, steps, shard):
    """Train the shard's share of ``runs`` (or all of them) and draw the figure."""
    models = _select(shard, [r.train_size * steps for r in runs], len(runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    _train(args, experiment, out, preset, [runs[i] for i in models], steps,
           shard=_shard_info(shard, models, runs))
    if shard is None:
        _finish(args, out)
    else:
        print(f"shard {shard}: models {models} -> {out}; join the shards with: fastgrok merge OUT SHARD...")


def _finish(args, out: Path):
    if not args.no_plot:
        for path in draw_figures(out):
            print(f"figure: {path}")


def cmd_grid(args, experiment):
    preset = _preset(args)
    _check_run_options(args)
    d = DEFAULTS[preset.name][experiment]
    n_pairs = preset.task.n_pairs
    sizes = _sizes(args, args.sizes or d["sizes"], n_pairs)
    seeds = check_seeds(args.seeds if args.seeds is not None else d["seeds"])
    steps = _positive(args.steps if args.steps is not None else d["steps"], "--steps")
    lrs = parse_floats(args.lr or preset.optim.lr, "--lr", 0.0, strict=True)
    wds = parse_floats(args.wd if args.wd is not None else preset.optim.weight_decay, "--wd", 0.0, strict=False)
    shard = _shard(args)
    out = _out_path(args, experiment, shard)
    if args.resume:
        _check_resumable(out, experiment)
    runs = grid_runs(sizes, seeds, lrs, wds)
    _train_selected(args, experiment, out, preset, runs, steps, shard)


def cmd_ungrok(args):
    from fastgrok.runner import InitFrom

    preset = _preset(args)
    _check_run_options(args)
    d = DEFAULTS[preset.name]["ungrok"]
    n_pairs = preset.task.n_pairs
    sizes = _sizes(args, args.sizes or d["sizes"], n_pairs)
    seeds = check_seeds(args.seeds if args.seeds is not None else d["seeds"])
    steps = _positive(args.steps if args.steps is not None else d["steps"], "--steps")
    pre_steps = _positive(args.pretrain_steps if args.pretrain_steps is not None else d["pretrain_steps"],
                          "--pretrain-steps")
    lrs = parse_floats(args.lr or preset.optim.lr, "--lr", 0.0, strict=True)
    if len(lrs) != 1:
        raise UsageError(f"--lr {args.lr}: ungrok takes one learning rate (it sweeps D' and --wd)")
    wds = parse_floats(args.wd or d["wd"], "--wd", 0.0, strict=False)
    parse_floats(args.pretrain_wd, "--pretrain-wd", 0.0, strict=False)
    shard = _shard(args)
    out = _out_path(args, "ungrok", shard)
    pre = pretrain_path(out)
    if pre.exists() and not args.resume:
        raise UsageError(f"--out {out}: its pre-training file {pre} exists; pass --resume or choose another --out")
    if args.resume:
        _check_resumable(out, "ungrok")
        _check_resumable(pre, "ungrok.pretrain")
    plan = ungrok_plan(n_pairs, sizes, seeds, lrs[0], wds, args.pretrain_wd)
    # A seed's pre-training model and its continuations stay in one shard.
    costs = [r.train_size * pre_steps for r in plan.pretrain] + [r.train_size * steps for r in plan.continuation]
    groups = list(range(seeds)) + plan.sources
    chosen = _select(shard, costs, len(costs), groups)
    pre_models = [i for i in chosen if i < seeds]
    cont_models = [i - seeds for i in chosen if i >= seeds]
    out.parent.mkdir(parents=True, exist_ok=True)
    _train(args, "ungrok.pretrain", pre, preset, [plan.pretrain[i] for i in pre_models], pre_steps,
           extend=False, shard=_shard_info(shard, pre_models, plan.pretrain))
    sources = [pre_models.index(plan.sources[i]) for i in cont_models]
    _train(args, "ungrok", out, preset, [plan.continuation[i] for i in cont_models], steps,
           init_from=InitFrom(pre, sources), shard=_shard_info(shard, cont_models, plan.continuation))
    if shard is None:
        _finish(args, out)


def cmd_efficiency(args):
    preset = _preset(args)
    _check_run_options(args)
    if preset.task.op != "x+y":
        raise UsageError(f"--task {preset.task.op}: efficiency measures the C_gen/C_mem logits of "
                         f"Appendix B, defined for x+y only")
    d = DEFAULTS[preset.name]["efficiency"]
    n_pairs = preset.task.n_pairs
    mem_sizes = parse_sizes(args.mem_sizes or d["mem_sizes"], n_pairs, "--mem-sizes")
    gen_sizes = parse_sizes(args.gen_sizes or d["gen_sizes"], n_pairs, "--gen-sizes")
    seeds = check_seeds(args.seeds if args.seeds is not None else d["seeds"])
    steps = _positive(args.steps if args.steps is not None else d["steps"], "--steps")
    lrs = parse_floats(args.lr or preset.optim.lr, "--lr", 0.0, strict=True)
    wds = parse_floats(args.wd or d["wd"], "--wd", 0.0, strict=False)
    shard = _shard(args)
    out = _out_path(args, "efficiency", shard)
    if args.resume:
        _check_resumable(out, "efficiency")
    runs = grid_runs(mem_sizes, seeds, lrs, wds, random_labels=True) + grid_runs(gen_sizes, seeds, lrs, wds)
    _train_selected(args, "efficiency", out, preset, runs, steps, shard)


def cmd_toy(args):
    from fastgrok.toy import run_toy, summarize as toy_summary

    _positive(args.steps, "--steps")
    if args.out.exists() and not args.resume:
        raise UsageError(f"--out {args.out}: the file exists; pass --resume to overwrite it, or choose another --out")
    result = run_toy(args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_toy(args.out, result)
    for column, values in toy_summary(result).items():
        print(f"toy column {column}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    print(f"toy -> {args.out}")
    _finish(args, args.out)


def cmd_merge(args):
    from fastgrok.experiments import file_experiment
    from fastgrok.merge import merge
    from fastgrok.store import read_run

    experiments = {file_experiment(p) for p in args.shards}
    if len(experiments) > 1:
        raise UsageError(f"merge: the shards hold different experiments {sorted(experiments)}")
    if experiments == {"ungrok"}:
        # The continuation's models start from the pre-training shards: join those too.
        sources = list(dict.fromkeys(Path(read_run(p).header.init_from["source"]) for p in args.shards))
        pre = pretrain_path(args.out)
        if not pre.exists():
            print(f"merged pre-training -> {merge(pre, sources)}")
    print(f"merged {len(args.shards)} shards -> {merge(args.out, args.shards)}")


def cmd_plot(args):
    for path in draw_figures(args.file, args.out):
        print(f"figure: {path}")


def cmd_precision(args):
    import shlex

    from fastgrok import plots
    from fastgrok.precision_study import compare, format_table, study_statistics
    from fastgrok.store import read_run

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            raise UsageError(f"--precisions: {p!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    if "fp32" not in precisions:
        raise UsageError(f"--precisions {args.precisions}: the study compares against fp32; include it")
    check_seeds(args.seeds)
    ungrok_options = shlex.split(args.ungrok)
    for option in ("--precision", "--out", "--preset"):
        if option in ungrok_options:
            raise UsageError(f"--ungrok: {option} is set by the study itself; leave it out")
    directory = args.out_dir or Path("runs") / f"precision-{args.preset}"
    common = ["--preset", args.preset, *(["--p", str(args.p)] if args.p is not None else []), "--backend", args.backend, "--resume", "--no-plot",
              "--progress-every", str(args.progress_every)] + (["--quiet"] if args.quiet else [])
    by_precision = {}
    for p in precisions:
        grok_file, ungrok_file = directory / f"grok-{p}.h5", directory / f"ungrok-{p}.h5"
        steps = (["--steps", str(args.steps)] if args.steps is not None else []) + \
            (["--sizes", args.sizes] if args.sizes else [])
        if main(["grok", *common, "--seeds", str(args.seeds), *steps, "--precision", p,
                 "--out", str(grok_file)]) != 0:
            raise UsageError(f"precision study: the {p} grokking run failed (see above)")
        if ungrok_options and main(["ungrok", *common, *ungrok_options, "--precision", p,
                                    "--out", str(ungrok_file)]) != 0:
            raise UsageError(f"precision study: the {p} ungrokking run failed (see above)")
        by_precision[p] = study_statistics(read_run(grok_file), read_run(ungrok_file) if ungrok_options else None)
    table = format_table(compare(by_precision))
    (directory / "study.txt").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    title = f"Matmul precision and grokking: {args.seeds} seeds, preset {args.preset}"
    for figure in plots.plot_precision_study(by_precision, directory / "precision", title):
        print(f"figure: {figure}")


def cmd_dcrit(args):
    from fastgrok import plots
    from fastgrok.analysis import dcrit
    from fastgrok.experiments import file_experiment
    from fastgrok.store import read_run

    estimates = []
    for path in args.files:
        if file_experiment(path) not in ("ungrok", "efficiency", "sweep"):
            raise UsageError(f"dcrit: {path} holds experiment {file_experiment(path)!r}; "
                             f"D_crit comes from ungrok, efficiency or sweep files")
        data = read_run(path)
        if len(data.steps) == 0:
            raise UsageError(f"dcrit: {path} has no evaluation yet")
        found = dcrit(data)
        for e in found:
            print(f"{e.line()}  [{path}]")
        estimates += found
    prefix = args.out or args.files[0].with_suffix("").with_name(args.files[0].stem + "_dcrit")
    for figure in plots.plot_dcrit(estimates, prefix):
        print(f"figure: {figure}")


def cmd_info(args):
    import pandas as pd

    lines, frame = summarize(args.file)
    print("\n".join(lines))
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))


def _notice(message, category, filename, lineno, file=None, line=None):
    """A warning as one plain line (e.g. a circuit analysis skipped for a large p)."""
    print(f"fastgrok: notice: {str(message).splitlines()[0]}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    shown = warnings.showwarning
    warnings.showwarning = _notice
    try:
        args = parser.parse_args(argv)
        if args.command in ("sweep", "grok"):
            cmd_grid(args, args.command)
        else:
            {"ungrok": cmd_ungrok, "efficiency": cmd_efficiency, "toy": cmd_toy, "merge": cmd_merge,
             "plot": cmd_plot, "info": cmd_info, "dcrit": cmd_dcrit,
             "precision": cmd_precision}[args.command](args)
    except (UsageError, ValueError, FileExistsError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastgrok: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("fastgrok: interrupted; the run file keeps its last checkpoint (continue with --resume)",
              file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
