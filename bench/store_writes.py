"""What one checkpoint write of a run costs: flat in the number of snapshots, and at product size.

    python bench/store_writes.py                 # 50 paper-size models, then the 2,000-model state
    python bench/store_writes.py --models 20 --no-product

Part 1 times one write (state + a whole run's metrics, no new snapshot) of a
run that already holds 0, 10 and 40 snapshots, for the current store
(``fastgrok.store``) and the single-file store it replaced (schema 1, loaded
from git history as a separate module, so the package keeps no old code),
interleaved in one process, median of ``--repeats``. "MB written" is what
the process passed to write(2) during the write (``/proc/self/io`` wchar):
it does not vary with a loaded machine as seconds do.

Part 2 writes the product's target state once: 2,000 paper-size models
(p = 113, d_model 128, 4 heads x 32, d_mlp 512), parameters and both AdamW
moments in float32, with a 549-point metric history (3*10^7 steps), arrays
only (no training); it needs ~5.5 GB of memory and disk, checked first.
Every write fsyncs, so the seconds are the disk's, not the page cache's.
Everything written goes under ``--dir`` (a new temporary directory by
default) and is deleted at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastgrok import store
from fastgrok.layout import ParamLayout
from fastgrok.config import RunSpec, get_preset
from fastgrok.metrics import Evaluation, metric_names
from fastgrok.schedule import EvalSchedule

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def old_store():
    """The schema-1 store: fastgrok/store.py at the newest commit that still wrote schema 1."""
    revs = subprocess.run(["git", "log", "--format=%H", "--", "fastgrok/store.py"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
    for rev in revs:
        source = subprocess.run(["git", "show", f"{rev}:fastgrok/store.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        if "\nSCHEMA_VERSION = 1\n" in source:
            path = Path(tempfile.mkdtemp()) / "store_schema1.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location("store_schema1", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module   # dataclasses look their module up there
            spec.loader.exec_module(module)
            shutil.rmtree(path.parent)
            return module, rev[:8]
    return None, None


def wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar:")).split()[1])
    except OSError:
        return 0


class Case:
    """One run of M paper-size models: its header, a state and a full metric history."""

    def __init__(self, models: int):
        preset = get_preset("paper")
        self.task, self.model, self.optim = preset.task, preset.model, preset.optim
        self.M, self.P = models, ParamLayout.from_config(preset.model).P
        self.runs = tuple(RunSpec(train_size=1500 + m % 20 * 25, data_seed=m // 20, init_seed=m // 20)
                          for m in range(models))
        self.schedule = EvalSchedule()
        self.points = self.schedule.points(30_000_000)
        self.state_arrays = [np.full((models, self.P), v, np.float32) for v in (0.5, 1e-3, 1e-7)]
        self.names = metric_names(self.task.op)

    def objects(self, module):
        header = module.RunHeader("bench", self.task, self.model, self.optim, self.runs, self.schedule)
        state = module.TrainingState(int(self.points[-1]), *self.state_arrays, np.full(self.M, -1, np.int64))
        history = module.MetricHistory(self.names)
        values = {name: np.linspace(0, 1, self.M) for name in self.names}
        for e, step in enumerate(self.points):
            history.append(Evaluation(int(step), values), wall_seconds=float(e))
        return header, state, history

    @property
    def state_bytes(self) -> int:
        return 3 * self.M * self.P * 4


def remove_run(path: Path) -> None:
    for p in (path, store.partial_path(path)):
        p.unlink(missing_ok=True)
    shutil.rmtree(store.run_dir(path), ignore_errors=True)


def check_disk(where: Path, needed: float) -> None:
    free = shutil.disk_usage(where).free
    if free < 1.5 * needed:
        sys.exit(f"{where}: {free / GB:.1f} GB free, this bench writes up to {needed / GB:.1f} GB; "
                 f"pass --dir elsewhere or fewer --models")


def timed_write(module, path, header, state, history, snapshots=None) -> tuple[float, float]:
    """(seconds, bytes written) of one write by a new writer, as a resumed session's first."""
    writer = module.RunWriter(path, header, int(state.step), "torch")
    start_bytes, start = wchar(), time.perf_counter()
    writer.write(state, history, complete=False, timings={}, new_snapshots=snapshots or {})
    return time.perf_counter() - start, wchar() - start_bytes


def flat_in_snapshots(case: Case, where: Path, old, repeats: int) -> None:
    stores = [("new (schema 2)", store)] + ([("old (schema 1)", old)] if old else [])
    snapshot = case.state_arrays[0]
    print(f"\n## One checkpoint write with snapshots present: {case.M} paper-size models "
          f"(P = {case.P}), state {case.state_bytes / GB:.2f} GB, snapshot {snapshot.nbytes / GB:.3f} GB, "
          f"{len(case.points)} evaluation points x {len(case.names)} metrics; median of {repeats}\n")
    print("| snapshots | store | seconds | MB written | run size GB |")
    print("|---|---|---|---|---|")
    for n in (0, 10, 40):
        rows = {}
        paths = {}
        for label, module in stores:
            header, state, history = case.objects(module)
            paths[label] = where / f"{label.split()[0]}-{n}.h5"
            # The snapshots were written by earlier writes; make them in one go.
            module.RunWriter(paths[label], header, int(state.step), "torch").write(
                state, history, complete=False, timings={}, new_snapshots={s: snapshot for s in range(n)})
            rows[label] = []
        for _ in range(repeats):              # interleaved: both see the same machine
            for label, module in stores:
                header, state, history = case.objects(module)
                rows[label].append(timed_write(module, paths[label], header, state, history))
        for label, _ in stores:
            size = sum(p.stat().st_size for p in store.run_files(paths[label]))
            seconds = statistics.median(r[0] for r in rows[label])
            written = statistics.median(r[1] for r in rows[label])
            print(f"| {n} | {label} | {seconds:.2f} | {written / 1e6:.0f} | {size / GB:.2f} |", flush=True)
            remove_run(paths[label])


def product_state(where: Path, old, models: int, repeats: int) -> None:
    case = Case(models)
    stores = [("new (schema 2)", store)] + ([("old (schema 1)", old)] if old else [])
    path = where / "product.h5"
    print(f"\n## One write of the product's state: {models} paper-size models, arrays only; "
          f"median (min-max) of {repeats}, interleaved\n")
    print("| store | state GB | run size GB | seconds | GB/s |")
    print("|---|---|---|---|---|")
    seconds, sizes = {label: [] for label, _ in stores}, {}
    for _ in range(repeats):
        for label, module in stores:
            header, state, history = case.objects(module)
            seconds[label].append(timed_write(module, path, header, state, history)[0])
            sizes[label] = sum(p.stat().st_size for p in store.run_files(path))
            remove_run(path)
    for label, _ in stores:
        t, size = seconds[label], sizes[label]
        print(f"| {label} | {case.state_bytes / GB:.2f} | {size / GB:.2f} | {statistics.median(t):.1f} "
              f"({min(t):.1f}-{max(t):.1f}) | {size / GB / statistics.median(t):.2f} |", flush=True)
    snapshot = models * case.P * 4
    print(f"\nEach snapshot of this run is {snapshot / GB:.2f} GB: the old store copied every stored one "
          f"into each write ({40 * snapshot / GB:.0f} GB more per write with 40), the new one writes it once.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=50, help="models of the snapshot table's run")
    ap.add_argument("--product-models", type=int, default=2000)
    ap.add_argument("--no-product", action="store_true", help="skip the 2,000-model state write")
    ap.add_argument("--no-old", action="store_true", help="time the current store only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a new temporary directory)")
    args = ap.parse_args()

    old, rev = (None, None) if args.no_old else old_store()
    print(f"fastgrok store schema {store.SCHEMA_VERSION}; old store: "
          f"{'schema 1 from git ' + rev if old else 'not timed'}")
    where = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        case = Case(args.models)
        check_disk(where, case.state_bytes + 41 * case.state_bytes / 3 * (2 if old else 1))
        flat_in_snapshots(case, where, old, args.repeats)
        if not args.no_product:
            check_disk(where, 3 * args.product_models * case.P * 4 * 1.1)
            del case
            product_state(where, old, args.product_models, args.repeats)
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
