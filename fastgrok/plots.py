"""The paper's figures, drawn from plain numpy arrays.

Every function takes arrays (or dicts of arrays), an ``out_prefix`` such as
``runs/sweep/fig5``, writes ``<out_prefix>.png`` and ``<out_prefix>.pdf``
(parent directories are created; a trailing .png/.pdf on the prefix is
dropped) and returns the two paths. Reading run files is the caller's job.

Figures are built on ``matplotlib.figure.Figure`` directly rather than
through pyplot, so drawing never touches the global backend or figure
registry of a user's interactive session, and PNGs are rendered by Agg.

Non-finite values (NaN for a run that failed or was not evaluated at a
point) are dropped from what is drawn; inputs with nothing finite left, or
with mismatched lengths, raise ValueError naming the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from fastgrok.toy import TABLE_1

GEN_LABEL = r"$C_\mathrm{gen}$"
MEM_LABEL = r"$C_\mathrm{mem}$"
STEPS_LABEL = "Training steps (= epochs, full batch)"
PNG_DPI = 150


# ---------------------------------------------------------------- helpers

def _out_paths(out_prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(out_prefix)
    if prefix.suffix.lower() in (".png", ".pdf"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".pdf")


def _save(fig: Figure, out_prefix: str | Path) -> tuple[Path, Path]:
    png, pdf = _out_paths(out_prefix)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=PNG_DPI)
    fig.savefig(pdf)
    return png, pdf


def _vector(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}; expected a 1-D array")
    return array


def _columns(figure: str, **named) -> dict[str, np.ndarray]:
    """Equal-length 1-D float arrays with every row holding a non-finite value dropped."""
    arrays = {name: _vector(name, values) for name, values in named.items()}
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{figure}: inputs differ in length {lengths}; they must be equal")
    n_rows = next(iter(lengths.values()))
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays.values()])
    if not keep.any():
        raise ValueError(f"{figure}: no row with finite {', '.join(arrays)} among {n_rows} rows")
    return {name: a[keep] for name, a in arrays.items()}


def _series(figure: str, steps, name: str, values) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one curve, keeping points drawable on a log step axis."""
    steps, values = _vector("steps", steps), _vector(name, values)
    if len(steps) != len(values):
        raise ValueError(f"{figure}: steps has {len(steps)} points but {name} has {len(values)}")
    keep = np.isfinite(steps) & np.isfinite(values) & (steps > 0)  # step 0 has no place on a log axis
    return steps[keep], values[keep]


@dataclass(frozen=True)
class Buckets:
    """Geometric buckets of positive values: bucket b holds edges[b] <= v < edges[b + 1]
    (the last bucket also holds its upper edge, the maximum)."""

    edges: np.ndarray  # (B + 1,)
    index: np.ndarray  # (N,) bucket of each value

    @property
    def count(self) -> int:
        return len(self.edges) - 1

    def label(self, b: int, symbol: str) -> str:
        return f"{symbol} in [{self.edges[b]:.3g}, {self.edges[b + 1]:.3g}]"


def geometric_buckets(values: np.ndarray, n_buckets: int) -> Buckets:
    """Split positive finite ``values`` into ``n_buckets`` buckets of equal width in log space."""
    values = _vector("values", values)
    if not (isinstance(n_buckets, (int, np.integer)) and n_buckets >= 1):
        raise ValueError(f"n_buckets={n_buckets!r}: must be an integer >= 1")
    if values.size == 0 or not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"geometric buckets need non-empty, finite, positive values; got {values.size} "
                         f"values with minimum {np.nanmin(values) if values.size else 'n/a'}")
    low, high = values.min(), values.max()
    if low == high:  # one distinct value: a single bucket, not n empty ones
        return Buckets(np.array([low, high]), np.zeros(values.size, dtype=np.int64))
    edges = np.geomspace(low, high, n_buckets + 1)
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_buckets - 1)
    return Buckets(edges, index)


@dataclass(frozen=True)
class IsologitCurve:
    """Runs whose correct logit fell in [logit_low, logit_high]: mean parameter norm per D."""

    logit_low: float
    logit_high: float
    D: np.ndarray  # (K,) distinct dataset sizes, ascending
    mean_param_norm: np.ndarray  # (K,)
    n_runs: np.ndarray  # (K,) runs averaged at each D


def isologit_curves(logit, param_norm, D, n_buckets: int = 6) -> list[IsologitCurve]:
    """Figure 3's isologit curves: logits bucketed geometrically, parameter norm vs D per bucket.

    Rows with a non-finite value or a logit <= 0 (no place in a geometric
    bucket; C_mem-only runs can have them) are left out. Empty buckets give
    no curve.
    """
    rows = _columns("isologit curves", logit=logit, param_norm=param_norm, D=D)
    positive = rows["logit"] > 0
    if not positive.any():
        raise ValueError(f"isologit curves: no positive correct logit among {len(positive)} finite rows "
                         f"(maximum {rows['logit'].max():.3g}); geometric buckets need logits > 0")
    logit, norm, sizes = rows["logit"][positive], rows["param_norm"][positive], rows["D"][positive]
    buckets = geometric_buckets(logit, n_buckets)
    curves = []
    for b in range(buckets.count):
        in_bucket = buckets.index == b
        if not in_bucket.any():
            continue
        unique_D, inverse, counts = np.unique(sizes[in_bucket], return_inverse=True, return_counts=True)
        mean_norm = np.bincount(inverse, weights=norm[in_bucket]) / counts
        curves.append(IsologitCurve(float(buckets.edges[b]), float(buckets.edges[b + 1]),
                                    unique_D, mean_norm, counts))
    return curves


def _colorbar(fig: Figure, ax, norm, cmap: str, label: str):
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=ax, label=label)


def _size_norm(D: np.ndarray):
    # Dataset sizes in the efficiency runs span orders of magnitude (random
    # labels on tens of examples up to the full p^2); a log colour scale keeps
    # the small sizes distinguishable.
    low, high = D.min(), D.max()
    if low > 0 and high / low > 10:
        return LogNorm(low, high)
    return Normalize(low, high if high > low else low + 1)


# ---------------------------------------------------------------- Figure 1

def plot_training_curves(steps, train_acc, test_acc, out_prefix, *, train_loss=None, test_loss=None,
                         param_norm=None, title: str = "Grokking: train and test curves"):
    """Figure 1 / 6 style: accuracy (and loss, parameter norm if given) of one run vs steps, log x."""
    panels = [("Accuracy", [("train", train_acc), ("test", test_acc)], False)]
    if train_loss is not None or test_loss is not None:
        panels.append(("Loss", [("train", train_loss), ("test", test_loss)], True))
    if param_norm is not None:
        panels.append((r"Parameter norm $\|\theta\|_2$", [("all parameters", param_norm)], False))
    fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = {"train": "tab:blue", "test": "tab:red", "all parameters": "tab:green"}
    for ax, (ylabel, curves, log_y) in zip(axes, panels):
        drawn = 0
        for label, values in curves:
            if values is None:
                continue
            x, y = _series(title, steps, f"{label} {ylabel.lower()}", values)
            if log_y:
                keep = y > 0
                x, y = x[keep], y[keep]
            if x.size:
                ax.plot(x, y, label=label, color=colours[label])
                drawn += 1
        if not drawn:
            raise ValueError(f"{title}: no finite point at a step > 0 to draw for {ylabel}")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        if ylabel == "Accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(STEPS_LABEL)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- Figure 2

TOY_KEYS = ("step", "train_loss", "test_loss", "w_gen", "w_mem", "norm_gen", "norm_mem", "norm_total")


def plot_toy(result: dict[str, dict[str, np.ndarray]], out_prefix):
    """Figure 2: per column of ``fastgrok.toy.run_toy()``, losses, circuit weights and norms vs steps."""
    if not result:
        raise ValueError("plot_toy: empty result; expected columns such as fastgrok.toy.run_toy() returns")
    for name, column in result.items():
        missing = [k for k in TOY_KEYS if k not in column]
        if missing:
            raise ValueError(f"plot_toy: column {name!r} lacks {missing}; expected keys {list(TOY_KEYS)}")
    fig = Figure(figsize=(4.6 * len(result), 9.0), layout="constrained")
    axes = fig.subplots(3, len(result), squeeze=False, sharex="col")
    for j, (name, column) in enumerate(result.items()):
        step = _vector("step", column["step"])
        rows = [
            ("Loss", [("train loss", column["train_loss"], "tab:blue", "-"),
                      ("test loss", column["test_loss"], "tab:red", "-")]),
            ("Circuit weight $w$", [(r"$w_G$ (" + GEN_LABEL + ")", column["w_gen"], "tab:green", "-"),
                                   (r"$w_M$ (" + MEM_LABEL + ")", column["w_mem"], "tab:purple", "-")]),
            ("Parameter norm", [(r"$P'_G$", column["norm_gen"], "tab:green", "-"),
                                (r"$P'_M$", column["norm_mem"], "tab:purple", "-"),
                                (r"total $\sqrt{P'^2_G + P'^2_M}$", column["norm_total"], "black", "--")]),
        ]
        for i, (ylabel, curves) in enumerate(rows):
            ax = axes[i, j]
            for label, values, colour, style in curves:
                values = _vector(label, values)
                if len(values) != len(step):
                    raise ValueError(f"plot_toy: column {name!r}: {label} has {len(values)} points, "
                                     f"step has {len(step)}")
                ax.plot(step, values, label=label, color=colour, linestyle=style)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        axes[0, j].set_title(TABLE_1[name].title if name in TABLE_1 else name, fontsize="medium", wrap=True)
        axes[-1, j].set_xlabel("Step")
    fig.suptitle("Minimal example: two circuits with different efficiency and learning speed")
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- Figure 3

def _efficiency_rows(name: str, runs) -> dict[str, np.ndarray]:
    try:
        logit, norm, sizes = runs["logit"], runs["param_norm"], runs["D"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"efficiency: {name} must be a dict with arrays 'logit', 'param_norm', 'D'; "
                         f"missing {error}") from None
    return _columns(f"efficiency ({name})", logit=logit, param_norm=norm, D=sizes)


def plot_efficiency(mem, gen, out_prefix, n_buckets: int = 6):
    """Figure 3: correct logit vs parameter norm coloured by D, and isologit curves.

    mem / gen: dicts of equal-length arrays "logit" (mean correct-class
    logit at convergence), "param_norm" and "D", one entry per run, for the
    C_mem-only (random labels) and C_gen-only runs; either may be None.
    """
    families = [(label, name, runs) for label, name, runs in
                ((MEM_LABEL, "mem", mem), (GEN_LABEL, "gen", gen)) if runs is not None]
    if not families:
        raise ValueError("efficiency: both mem and gen are None; pass at least one family of runs")
    rows = [(label, _efficiency_rows(name, runs)) for label, name, runs in families]
    all_D = np.concatenate([r["D"] for _, r in rows])
    size_norm = _size_norm(all_D)
    cmap = matplotlib.colormaps["viridis"]
    fig = Figure(figsize=(11.0, 4.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for i, (label, r) in enumerate(rows):
        scatter_ax, curve_ax = axes[i]
        scatter_ax.scatter(r["param_norm"], r["logit"], c=r["D"], cmap=cmap, norm=size_norm, s=14,
                           alpha=0.8, edgecolors="none")
        curves = isologit_curves(r["logit"], r["param_norm"], r["D"], n_buckets)
        for edge in sorted({c.logit_low for c in curves} | {curves[-1].logit_high}):
            scatter_ax.axhline(edge, color="grey", linestyle=":", linewidth=0.8)
        scatter_ax.set_xlabel(r"Parameter norm $P$")
        scatter_ax.set_ylabel(r"Correct logit $o^y$")
        scatter_ax.set_title(f"{label}: correct logit vs parameter norm")
        scatter_ax.grid(alpha=0.3)
        _colorbar(fig, scatter_ax, size_norm, "viridis", "Dataset size D")
        bucket_colours = matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, len(curves)))
        for curve, colour in zip(curves, bucket_colours):
            curve_ax.plot(curve.D, curve.mean_param_norm, marker="o", markersize=3, color=colour,
                          label=f"$o^y$ in [{curve.logit_low:.3g}, {curve.logit_high:.3g}]")
        if r["D"].min() > 0 and r["D"].max() / r["D"].min() > 10:
            curve_ax.set_xscale("log")
        curve_ax.set_xlabel("Dataset size D")
        curve_ax.set_ylabel(r"Mean parameter norm $P$")
        curve_ax.set_title(f"{label}: isologit curves")
        curve_ax.grid(alpha=0.3)
        # Outside the axes: the curves fill the panel wherever the legend would go.
        curve_ax.legend(fontsize="small", title="correct logit bucket", title_fontsize="small",
                        loc="upper left", bbox_to_anchor=(1.02, 1.0))
    # One norm scale for both families' isologit curves: a flat C_gen curve is only
    # flat next to the C_mem curves' rise, not on an axis zoomed into its own wiggles.
    low = min(ax.get_ylim()[0] for ax in axes[:, 1])
    high = max(ax.get_ylim()[1] for ax in axes[:, 1])
    for ax in axes[:, 1]:
        ax.set_ylim(low, high)
    fig.suptitle("Efficiency of memorisation and generalisation")
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- Figure 4

def plot_ungrokking(d_prime, test_acc, weight_decay, out_prefix, when: str = "at convergence"):
    """Figure 4: final test accuracy vs reduced dataset size D', one line per weight decay.

    One entry per run; runs sharing (D', weight decay) (seeds) are averaged
    for the line and drawn individually as faint points. ``when`` says what
    "final" is: "at convergence" only if every run converged
    (``fastgrok.analysis.converged``), else "at the end of training".
    """
    rows = _columns("ungrokking", d_prime=d_prime, test_acc=test_acc, weight_decay=weight_decay)
    decays = np.unique(rows["weight_decay"])
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(decays)))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for wd, colour in zip(decays, colours):
        mine = rows["weight_decay"] == wd
        sizes, acc = rows["d_prime"][mine], rows["test_acc"][mine]
        unique_sizes, inverse, counts = np.unique(sizes, return_inverse=True, return_counts=True)
        ax.scatter(sizes, acc, color=colour, s=10, alpha=0.35, edgecolors="none")
        ax.plot(unique_sizes, np.bincount(inverse, weights=acc) / counts, marker="o", markersize=4,
                color=colour, label=f"{wd:g}")
    ax.set_xlabel("Reduced dataset size D'")
    ax.set_ylabel(f"Test accuracy {when}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(title="weight decay")
    ax.set_title("Ungrokking: test accuracy after training on a subset of size D'")
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- Figure 5

def plot_sweep(steps, test_acc, out_prefix, final_acc=None,
               title: str = "Semi-grokking sweep: test accuracy over training"):
    """Figure 5: test accuracy vs steps (log x) for every run, coloured by final test accuracy.

    steps: (S,) shared by all runs, or (R, S) per run; test_acc: (R, S), NaN
    where a run has no value. final_acc: (R,), defaults to each run's last
    finite test accuracy.
    """
    acc = np.asarray(test_acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] == 0:
        raise ValueError(f"sweep: test_acc has shape {acc.shape}; expected (runs, points) with runs >= 1")
    step_grid = np.asarray(steps, dtype=np.float64)
    if step_grid.ndim == 1:
        step_grid = np.broadcast_to(step_grid, acc.shape) if step_grid.shape[0] == acc.shape[1] else step_grid
    if step_grid.shape != acc.shape:
        raise ValueError(f"sweep: steps has shape {np.shape(steps)}; expected ({acc.shape[1]},) or {acc.shape} "
                         f"to match test_acc")
    if final_acc is None:
        final = np.full(acc.shape[0], np.nan)
        for r, row in enumerate(acc):
            finite = np.nonzero(np.isfinite(row))[0]
            if finite.size:
                final[r] = row[finite[-1]]
    else:
        final = _vector("final_acc", final_acc)
        if len(final) != acc.shape[0]:
            raise ValueError(f"sweep: final_acc has {len(final)} entries for {acc.shape[0]} runs")
    lines, colours = [], []
    for r in range(acc.shape[0]):
        x, y = _series("sweep", step_grid[r], f"test_acc[{r}]", acc[r])
        if x.size and np.isfinite(final[r]):
            lines.append(np.column_stack([x, y]))
            colours.append(final[r])
    if not lines:
        raise ValueError(f"sweep: none of the {acc.shape[0]} runs has a finite test accuracy at a step > 0")
    # Low-accuracy runs first, so the rarer (semi-)grokked runs are drawn on top.
    order = np.argsort(colours, kind="stable")
    colour_norm = Normalize(0.0, 1.0)
    collection = LineCollection([lines[i] for i in order], array=np.asarray(colours)[order],
                                cmap="viridis", norm=colour_norm, linewidths=0.8, alpha=0.85)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.add_collection(collection)
    all_points = np.concatenate(lines)
    ax.set_xscale("log")
    low, high = all_points[:, 0].min(), all_points[:, 0].max()
    # A run with one evaluation after step 0 has a single point on the log axis.
    if high == low:
        low, high = low / 2, high * 2
    ax.set_xlim(low, high)
    ax.set_ylim(-0.02, 1.02)
    fig.colorbar(collection, ax=ax, label="Final test accuracy")
    ax.set_xlabel(STEPS_LABEL)
    ax.set_ylabel("Test accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} ({len(lines)} runs)")
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- Figure 10

def plot_logit_ratio(D, logit_ratio, test_acc, param_norm, out_prefix, n_buckets: int = 5,
                     when: str = "at convergence"):
    """Figure 10: C_gen/C_mem correct-logit ratio and test accuracy vs D, coloured by parameter-norm bucket.

    One entry per run at its final evaluation; ``when`` as in ``plot_ungrokking``. Parameter norms are bucketed
    geometrically; each bucket's line is the median over runs at each D
    (ratios span orders of magnitude, so the mean would follow the largest).
    The ratio axis is logarithmic, symmetric-logarithmic if some ratio is <= 0
    (a negative C_mem correct logit, Appendix B).
    """
    rows = _columns("logit ratio", D=D, logit_ratio=logit_ratio, test_acc=test_acc, param_norm=param_norm)
    if not np.all(rows["param_norm"] > 0):
        raise ValueError(f"logit ratio: parameter norms must be > 0; minimum is {rows['param_norm'].min():.3g}")
    buckets = geometric_buckets(rows["param_norm"], n_buckets)
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, buckets.count))
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    ratio_ax, acc_ax = fig.subplots(1, 2)
    for b in range(buckets.count):
        mine = buckets.index == b
        if not mine.any():
            continue
        sizes = rows["D"][mine]
        unique_sizes = np.unique(sizes)
        for ax, key in ((ratio_ax, "logit_ratio"), (acc_ax, "test_acc")):
            values = rows[key][mine]
            ax.scatter(sizes, values, color=colours[b], s=10, alpha=0.35, edgecolors="none")
            medians = [np.median(values[sizes == d]) for d in unique_sizes]
            ax.plot(unique_sizes, medians, marker="o", markersize=3, color=colours[b],
                    label=buckets.label(b, "$P$"))
    if np.all(rows["logit_ratio"] > 0):
        ratio_ax.set_yscale("log")
    else:
        # Linear only below the decade of the smallest non-zero |ratio|, so no ratio is flattened;
        # a decade threshold and two decades of height for the linear band keep the -t, 0, t tick
        # labels as far apart as the logarithmic ones.
        magnitudes = np.abs(rows["logit_ratio"])
        smallest = float(magnitudes[magnitudes > 0].min(initial=1.0))
        ratio_ax.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(smallest)), linscale=2.0)
    ratio_ax.set_ylabel(r"Logit ratio $o^y_t / o^y_m$")
    ratio_ax.set_title(r"(a) Logit ratio ($C_\mathrm{gen}$ / $C_\mathrm{mem}$) vs dataset size")
    acc_ax.set_ylabel("Test accuracy")
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.set_title("(b) Test accuracy vs dataset size")
    for ax in (ratio_ax, acc_ax):
        ax.set_xlabel("Dataset size D")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="parameter norm bucket", title_fontsize="small")
    fig.suptitle(f"Relative strength of the circuits {when}")
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- precision study

def plot_precision_study(by_precision: dict[str, dict[str, np.ndarray]], out_prefix, title: str):
    """The precision study (``fastgrok.precision_study``): one panel per statistic, every seed
    as a point per precision, the median as a bar; a seed that never reached the level hollow."""
    statistics = list(next(iter(by_precision.values())))
    fig = Figure(figsize=(3.6 * len(statistics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(statistics), squeeze=False)[0]
    colours = matplotlib.colormaps["tab10"](np.arange(len(by_precision)))
    rng = np.random.default_rng(0)
    for ax, statistic in zip(axes, statistics):
        finite_max = max((v[np.isfinite(v)].max(initial=0) for v in
                          (s[statistic] for s in by_precision.values())), default=1.0)
        for i, ((precision, stats), colour) in enumerate(zip(by_precision.items(), colours)):
            x = stats[statistic]
            # A seed that never reached the level is drawn above the others, hollow.
            shown = np.where(np.isfinite(x), x, finite_max * 1.08)
            jitter = i + rng.uniform(-0.15, 0.15, len(x))
            ax.scatter(jitter[np.isfinite(x)], shown[np.isfinite(x)], color=colour, s=14)
            ax.scatter(jitter[~np.isfinite(x)], shown[~np.isfinite(x)], facecolors="none", edgecolors=colour, s=14)
            median = float(np.median(x))
            if np.isfinite(median):
                ax.plot([i - 0.3, i + 0.3], [median, median], color="black", linewidth=1.5)
        ax.set_xticks(range(len(by_precision)), list(by_precision))
        ax.set_title(statistic + (" (hollow: never)" if "step" in statistic or "D'" in statistic else ""),
                     fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return _save(fig, out_prefix)


# ---------------------------------------------------------------- D_crit

def plot_dcrit(estimates, out_prefix, title: str = "Critical dataset size, three ways"):
    """Each D_crit estimate (``fastgrok.analysis.Estimate``) as a point with its interval.

    One row per (method, group); an estimate with no value is listed with
    "none" and why; a sweep estimate from unconverged runs is drawn hollow
    (an upper bound).
    """
    if not estimates:
        raise ValueError("dcrit: no estimates to draw")
    fig = Figure(figsize=(8.0, 1.2 + 0.45 * len(estimates)), layout="constrained")
    ax = fig.subplots()
    colours = {"ungrokking": "tab:blue", "efficiency": "tab:orange", "sweep": "tab:green"}
    labels = []
    for i, e in enumerate(estimates):
        y = len(estimates) - 1 - i
        colour = colours.get(e.method, "black")
        label = f"{e.method}, {e.group} ({e.n_converged}/{e.n_runs} converged)"
        if np.isfinite(e.value):
            if np.isfinite(e.low):
                ax.plot([e.low, e.high], [y, y], color=colour, linewidth=2)
            hollow = e.method == "sweep" and e.n_converged < e.n_runs
            ax.plot([e.value], [y], marker="o", markersize=7, color=colour,
                    markerfacecolor="white" if hollow else colour)
        else:
            label += ": none"
        labels.append((y, label))
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize="small")
    shown = [v for e in estimates for v in (e.value, e.low, e.high) if np.isfinite(v) and v > 0]
    if shown and max(shown) / min(shown) > 10:     # estimates a decade apart: a log axis
        ax.set_xscale("log")
    ax.set_xlabel("D_crit (training-set size); bars: interval, hollow: upper bound")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title)
    return _save(fig, out_prefix)


__all__ = ["plot_precision_study", "plot_dcrit", "geometric_buckets", "Buckets", "isologit_curves", "IsologitCurve", "plot_training_curves",
           "plot_toy", "plot_efficiency", "plot_ungrokking", "plot_sweep", "plot_logit_ratio"]
