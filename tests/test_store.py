"""The run: round trip, self-description, writes that cost what is new, crash safety, readers."""
import dataclasses
import json
import os
import shutil
import signal
import time
import traceback

import h5py
import numpy as np
import pytest

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.metrics import Evaluation, metric_names
from fastgrok.layout import PARAM_NAMES, ParamLayout, param_shapes
from fastgrok.schedule import EvalSchedule
from fastgrok.store import (SCHEMA_VERSION, MetricHistory, RunHeader, RunWriter, TrainingState,
                            partial_path, read_params, read_resume_point, read_run, read_snapshots,
                            run_dir, run_files)
from fastgrok.tasks import Task

TASK = TaskConfig("x+y", 7)
MODEL = ModelConfig.for_task(TASK, d_model=8, n_heads=2, d_head=4, d_mlp=16)
RUNS = (RunSpec(train_size=20, data_seed=1, init_seed=2, lr=3e-3, weight_decay=0.5),
        RunSpec(train_size=35, data_seed=4, init_seed=5, random_labels=True))
HEADER = RunHeader("store-test", TASK, MODEL, OptimConfig(betas=(0.9, 0.95)), RUNS, EvalSchedule(5, 20, 10))
M, P = len(RUNS), ParamLayout.from_config(MODEL).P


def make_state(step: int, seed: int, n_params: int = P) -> TrainingState:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(M, n_params)).astype(np.float32) for _ in range(3)]
    return TrainingState(step, *arrays, np.array([-1, 7], dtype=np.int64))


def make_history(steps) -> MetricHistory:
    names = metric_names(TASK.op)
    history = MetricHistory(names)
    for e, step in enumerate(steps):
        values = {name: np.array([k + 0.25 * e, -k - e], dtype=np.float64) for k, name in enumerate(names)}
        history.append(Evaluation(step, values), wall_seconds=0.5 * e)
    return history


def assert_state_equal(a: TrainingState, b: TrainingState) -> None:
    assert a.step == b.step
    for name in ("params", "exp_avg", "exp_avg_sq", "failed_step"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def listing(path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, mtime_ns, size) of every file of the run."""
    return {p.name: (s.st_ino, s.st_mtime_ns, s.st_size) for p in run_files(path) for s in [p.stat()]}


def test_round_trip_is_self_describing(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, HEADER, target_steps=100, backend="torch")
    state, history = make_state(40, 0), make_history([0, 5, 10, 40])
    snapshot = np.random.default_rng(1).normal(size=(M, P)).astype(np.float32)
    writer.write(state, history, complete=False, timings={"seconds_eval": 1.5},
                 new_snapshots={10: snapshot})

    data = read_run(path)
    assert data.header == HEADER
    assert (data.target_steps, data.complete, data.state_step, data.backend) == (100, False, 40, "torch")
    assert data.steps.tolist() == [0, 5, 10, 40]
    assert data.wall_seconds.tolist() == [0.0, 0.5, 1.0, 1.5]
    for k, name in enumerate(metric_names(TASK.op)):
        assert data.metrics[name].shape == (M, 4)
        np.testing.assert_array_equal(data.metrics[name][0], k + 0.25 * np.arange(4))
        np.testing.assert_array_equal(data.metrics[name][1], -k - np.arange(4))
    assert data.snapshot_steps == [10]
    assert data.timings["seconds_eval"] == 1.5
    np.testing.assert_array_equal(data.failed_step, [-1, 7])

    _, resumed, resumed_history = read_resume_point(path)
    assert_state_equal(resumed, state)
    assert resumed_history.steps == history.steps
    assert read_params(path, 10)[0] == 10
    np.testing.assert_array_equal(read_params(path, 10, [1, 0])[1], snapshot[[1, 0]])
    np.testing.assert_array_equal(read_params(path)[1], state.params)

    # The layout: one small file, the arrays in files of their own beside it.
    assert [p.name for p in run_files(path)] == ["run.h5", "checkpoint-0000000040.h5", "snapshot-0000000010.h5"]
    assert run_dir(path) == tmp_path / "run.h5.d"
    assert path.stat().st_size < 64 * 1024

    # Readable without fastgrok: configs are JSON, splits and layout explicit, arrays behind links.
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 2
        assert json.loads(f.attrs["optim"])["betas"] == [0.9, 0.95]
        layout = json.loads(f.attrs["param_layout"])
        assert layout["names"] == list(PARAM_NAMES)
        assert [tuple(s) for s in layout["shapes"]] == [param_shapes(MODEL)[k] for k in PARAM_NAMES]
        task = Task(TASK)
        for m, run in enumerate(RUNS):
            split = task.split(run.data_seed, run.train_size, run.random_labels)
            idx, labels = f["runs/train_idx"][m], f["runs/train_labels"][m]
            np.testing.assert_array_equal(idx[:run.train_size], split.train_idx)
            np.testing.assert_array_equal(labels[:run.train_size], split.train_labels)
            assert (idx[run.train_size:] == -1).all()
            assert f["runs/lr"][m] == run.lr and bool(f["runs/random_labels"][m]) == run.random_labels
        assert f.get("state", getlink=True).filename == "run.h5.d/checkpoint-0000000040.h5"
        assert f["state"].attrs["step"] == 40
        np.testing.assert_array_equal(f["state/exp_avg_sq"][()], state.exp_avg_sq)
        assert f["snapshots/step_0000000010"].attrs["step"] == 10
        np.testing.assert_array_equal(f["snapshots/step_0000000010"][()], snapshot)


def test_long_dataframe_matches_arrays(tmp_path):
    path = tmp_path / "run.h5"
    RunWriter(path, HEADER, 100, "torch").write(make_state(10, 0), make_history([0, 5, 10]),
                                                 complete=False, timings={})
    data = read_run(path)
    frame = data.to_dataframe()
    names = metric_names(TASK.op)
    assert len(frame) == M * 3 * len(names)
    for m in range(M):
        for e, step in enumerate([0, 5, 10]):
            for name in ("train_loss", "gen_logit_test"):
                row = frame[(frame.model == m) & (frame.step == step) & (frame.metric == name)]
                assert row.value.item() == data.metrics[name][m, e]
                assert row.train_size.item() == RUNS[m].train_size
                assert row.random_labels.item() == RUNS[m].random_labels
    assert set(data.to_dataframe(["test_acc"]).metric) == {"test_acc"}
    with pytest.raises(ValueError, match="unknown metric.*'nope'"):
        data.to_dataframe(["nope"])
    runs = data.runs_frame()
    assert runs.to_dict("list")["data_seed"] == [r.data_seed for r in RUNS]


def test_snapshots_accumulate_across_writes(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, HEADER, 100, "torch")
    first = make_state(5, 1).params
    writer.write(make_state(5, 0), make_history([0, 5]), complete=False, timings={}, new_snapshots={5: first})
    writer.write(make_state(9, 0), make_history([0, 5]), complete=False, timings={})
    second = make_state(20, 2).params
    # A new session (a resumed run) learns the stored snapshots from the file.
    RunWriter(path, HEADER, 100, "torch").write(make_state(20, 0), make_history([0, 5, 20]), complete=True,
                                                timings={}, new_snapshots={20: second})
    assert read_run(path).snapshot_steps == [5, 20]
    np.testing.assert_array_equal(read_params(path, 5)[1], first)
    np.testing.assert_array_equal(read_params(path, 20)[1], second)
    assert sorted(read_snapshots(path)) == [5, 20]
    np.testing.assert_array_equal(read_snapshots(path)[20], second)
    with pytest.raises(ValueError, match=r"no parameter snapshot at step 7; snapshots: \[5, 20\]"):
        read_params(path, 7)
    with pytest.raises(ValueError, match="model index 2 is outside 0..1"):
        read_params(path, None, [2])
    # Only the latest checkpoint is kept.
    assert sorted(listing(path)) == ["checkpoint-0000000020.h5", "run.h5", "snapshot-0000000005.h5",
                                     "snapshot-0000000020.h5"]


# --------------------------------------------------- a write costs what is new
BIG_MODEL = ModelConfig.for_task(TASK, d_model=32, n_heads=2, d_head=16, d_mlp=128)
BIG = dataclasses.replace(HEADER, model=BIG_MODEL)
BIG_P = ParamLayout.from_config(BIG_MODEL).P
SNAPSHOT_BYTES = M * BIG_P * 4


def bytes_written_by_this_process() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar:")).split()[1])
    except OSError:
        return None


@pytest.mark.parametrize("n_snapshots", [0, 10, 40])
def test_write_cost_is_flat_in_the_number_of_snapshots(tmp_path, n_snapshots):
    path = tmp_path / "run.h5"
    snapshot = make_state(0, 3, BIG_P).params
    history = make_history(range(0, 200, 5))
    RunWriter(path, BIG, 1000, "torch").write(make_state(100, 0, BIG_P), history, complete=False, timings={},
                                              new_snapshots={s: snapshot for s in range(n_snapshots)})
    before, wchar = listing(path), bytes_written_by_this_process()
    RunWriter(path, BIG, 1000, "torch").write(make_state(200, 1, BIG_P), history, complete=False, timings={})
    wchar = None if wchar is None else bytes_written_by_this_process() - wchar
    after = listing(path)

    touched = sorted(name for name, stat in after.items() if before.get(name) != stat)
    assert touched == ["checkpoint-0000000200.h5", "run.h5"]
    assert sorted(set(before) - set(after)) == ["checkpoint-0000000100.h5"]
    assert len(after) == n_snapshots + 2
    # What was written: the state (3 arrays) and the small file, whose snapshot
    # links grow it by ~100 bytes per snapshot, not by a snapshot's 105 kB.
    state_bytes = 3 * SNAPSHOT_BYTES
    main = after["run.h5"][2]
    assert main < 60_000 + 200 * n_snapshots, main
    assert sum(after[name][2] for name in touched) < state_bytes + 60_000 + 200 * n_snapshots
    if wchar is not None:
        assert state_bytes <= wchar < state_bytes + 100_000 + 200 * n_snapshots, wchar


def test_snapshots_are_written_once(tmp_path):
    path = tmp_path / "run.h5"
    first = make_state(5, 1).params
    RunWriter(path, HEADER, 100, "torch").write(make_state(5, 0), make_history([0, 5]), complete=False,
                                                timings={}, new_snapshots={5: first})
    stat = listing(path)["snapshot-0000000005.h5"]
    time.sleep(0.01)   # a rewrite would show in the mtime too
    for session in range(3):
        writer = RunWriter(path, HEADER, 100, "torch")
        for k in range(2):
            step = 10 + 10 * session + k
            # Offering step 5 again (a resumed run that re-took it) must not rewrite it.
            writer.write(make_state(step, step), make_history([0, 5, step]), complete=False, timings={},
                         new_snapshots={5: np.zeros_like(first), step: make_state(step, 7).params})
    assert listing(path)["snapshot-0000000005.h5"] == stat
    np.testing.assert_array_equal(read_params(path, 5)[1], first)
    assert read_run(path).snapshot_steps == [5, 10, 11, 20, 21, 30, 31]


# ------------------------------------------------------------------ crashes
def test_failed_write_leaves_previous_run_intact(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    RunWriter(path, HEADER, 100, "torch").write(make_state(5, 0), make_history([0, 5]), complete=False,
                                                timings={}, new_snapshots={5: make_state(5, 1).params})
    before, main_bytes = listing(path), path.read_bytes()
    replace = os.replace

    def crash_at_the_switch(src, dst):
        if os.fspath(dst) == os.fspath(path):
            raise OSError("simulated crash before X.h5 is replaced")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_the_switch)
    with pytest.raises(OSError, match="simulated crash"):
        RunWriter(path, HEADER, 100, "torch").write(make_state(10, 1), make_history([0, 5, 10]), complete=False,
                                                    timings={}, new_snapshots={10: make_state(10, 2).params})
    assert path.read_bytes() == main_bytes
    assert partial_path(path).exists()          # the half-done write is beside the run, not in it
    assert {"checkpoint-0000000010.h5", "snapshot-0000000010.h5"} <= set(listing(path))
    data, state, _ = read_resume_point(path)
    assert (data.state_step, data.snapshot_steps) == (5, [5]) and state.step == 5
    monkeypatch.undo()
    RunWriter(path, HEADER, 100, "torch").write(make_state(10, 1), make_history([0, 5, 10]), complete=False,
                                                timings={}, new_snapshots={10: make_state(10, 2).params})
    assert read_run(path).state_step == 10 and not partial_path(path).exists()
    assert sorted(listing(path)) == ["checkpoint-0000000010.h5", "run.h5", "snapshot-0000000005.h5",
                                     "snapshot-0000000010.h5"]
    assert listing(path)["snapshot-0000000005.h5"] == before["snapshot-0000000005.h5"]


# Every file-system step of a write; the child kills itself just before the k-th.
FS_CALLS = [(os, "replace"), (os, "unlink"), (os, "fsync"), (os, "mkdir"), (h5py.File, "__init__"),
            (h5py.File, "close"), (h5py.Group, "create_dataset"), (h5py.Group, "create_group"),
            (h5py.Group, "__setitem__")]


def write_killed_at(k: int, path, state, history, snapshots) -> tuple[bool, str]:
    """Fork; the child writes and SIGKILLs itself before its k-th file-system call.
    (killed, what it was about to do)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                              # child: never returns into pytest
        try:
            os.close(read_fd)
            count = [0]

            def hook(owner, name, original):
                def call(*args, **kwargs):
                    count[0] += 1
                    if count[0] == k:
                        os.write(write_fd, f"{name} {args[1:2] if owner is not os else args[:1]}".encode())
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(*args, **kwargs)
                return call

            for owner, name in FS_CALLS:
                setattr(owner, name, hook(owner, name, getattr(owner, name)))
            RunWriter(path, HEADER, 100, "torch").write(state, history, complete=False, timings={},
                                                        new_snapshots=snapshots)
            os._exit(0)
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
            os._exit(1)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as r:
        said = r.read()
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, said
        return False, said
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True, said


@pytest.mark.parametrize("first_write", [False, True], ids=["later-write", "first-write"])
def test_kill_at_every_step_of_a_write_leaves_a_readable_resumable_run(tmp_path, first_write):
    """kill -9 before each file-system call of a write: the run reads as the old or the new
    write, never anything else, and the resumed session's next write leaves only its files."""
    old, old_history, old_snap = make_state(5, 0), make_history([0, 5]), make_state(5, 1).params
    new, new_history, new_snap = make_state(10, 2), make_history([0, 5, 10]), make_state(10, 3).params
    outcomes, k = [], 0
    while True:
        k += 1
        path = tmp_path / f"k{k}" / "run.h5"
        path.parent.mkdir()
        if not first_write:
            RunWriter(path, HEADER, 100, "torch").write(old, old_history, complete=False, timings={},
                                                        new_snapshots={5: old_snap})
        killed, at = write_killed_at(k, path, new, new_history, {10: new_snap})
        if not killed:
            break
        if not path.exists():                  # killed before the run's first file: no run yet
            assert first_write
            outcomes.append(("none", at))
        else:
            data, state, history = read_resume_point(path)
            if data.state_step == 5:
                assert_state_equal(state, old)
                assert (history.steps, data.snapshot_steps) == (old_history.steps, [5])
                outcomes.append(("old", at))
            else:
                assert_state_equal(state, new)
                assert (history.steps, data.snapshot_steps) == (new_history.steps, [10] if first_write else [5, 10])
                np.testing.assert_array_equal(read_params(path, 10)[1], new_snap)
                outcomes.append(("new", at))
            if data.snapshot_steps[:1] == [5]:
                np.testing.assert_array_equal(read_params(path, 5)[1], old_snap)
        if outcomes[-1][0] != "new" and (run_dir(path) / "checkpoint-0000000010.h5").exists():
            outcomes.append(("checkpoint written, X.h5 not yet replaced", at))
        # The resumed session: redo the write; every orphan goes.
        RunWriter(path, HEADER, 100, "torch").write(new, new_history, complete=False, timings={},
                                                    new_snapshots={10: new_snap})
        expected_files = {"run.h5", "checkpoint-0000000010.h5", "snapshot-0000000010.h5"}
        if not first_write:
            expected_files.add("snapshot-0000000005.h5")
        assert set(listing(path)) == expected_files, (k, at)
        assert not partial_path(path).exists()
        assert_state_equal(read_resume_point(path)[1], new)
        shutil.rmtree(path.parent)
    kinds = {kind for kind, _ in outcomes}
    assert k > 20 and "new" in kinds and "checkpoint written, X.h5 not yet replaced" in kinds, outcomes
    assert ("old" in kinds) != first_write and ("none" in kinds) == first_write, outcomes


# ------------------------------------------------------------------ readers
def test_a_reader_that_loses_the_race_with_a_write_starts_over(tmp_path, monkeypatch):
    """Between a reader's opening X.h5 and its checkpoint, a whole write lands and removes that
    checkpoint: the reader must return the new write, consistently, not fail."""
    path = tmp_path / "run.h5"
    RunWriter(path, HEADER, 100, "torch").write(make_state(5, 0), make_history([0, 5]), complete=False, timings={})
    new = make_state(10, 1)
    original, raced = h5py.File.__init__, []

    def open_(self, name, *args, **kwargs):
        if str(name).endswith("checkpoint-0000000005.h5") and not raced:
            raced.append(name)
            RunWriter(path, HEADER, 100, "torch").write(new, make_history([0, 5, 10]), complete=False,
                                                        timings={})
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "__init__", open_)
    data, state, history = read_resume_point(path)
    assert raced and data.state_step == state.step == 10 and history.steps == [0, 5, 10]
    assert_state_equal(state, new)
    raced.clear()
    RunWriter(path, HEADER, 100, "torch").write(make_state(5, 0), make_history([0, 5]), complete=False, timings={})
    assert read_params(path)[0] == 10 and raced
    np.testing.assert_array_equal(read_params(path)[1], new.params)


def test_a_reader_in_another_process_sees_only_whole_writes(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, HEADER, 10_000, "torch")

    def state_of(step):  # every array says which write it belongs to
        full = np.full((M, P), step, np.float32)
        return TrainingState(step, full, full + 1, full + 2, np.full(M, -1, np.int64))

    writer.write(state_of(1), make_history([1]), complete=False, timings={})
    pid = os.fork()
    if pid == 0:                              # child: the writer; never returns into pytest
        try:
            for step in range(2, 120):
                writer.write(state_of(step), make_history(range(1, step + 1)), complete=False, timings={},
                             new_snapshots={step: np.full((M, P), -step, np.float32)} if step % 10 == 0 else {})
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    reads, seen, status = 0, set(), None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
        data, state, history = read_resume_point(path)
        assert data.state_step == state.step and history.steps == list(range(1, state.step + 1))
        assert (state.params == state.step).all() and (state.exp_avg_sq == state.step + 2).all()
        step, params = read_params(path)
        assert step >= state.step and (params == step).all()
        if data.snapshot_steps:
            s = data.snapshot_steps[-1]
            assert (read_params(path, s)[1] == -s).all()
        reads, seen = reads + 1, seen | {state.step}
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert reads >= 10 and len(seen) >= 3, (reads, len(seen))
    assert read_run(path).state_step == 119


def test_a_run_moves_as_its_file_and_directory(tmp_path):
    path = tmp_path / "run.h5"
    state, snap = make_state(10, 0), make_state(10, 1).params
    RunWriter(path, HEADER, 100, "torch").write(state, make_history([0, 10]), complete=False, timings={},
                                                new_snapshots={10: snap})
    moved = tmp_path / "elsewhere" / "renamed.h5"
    moved.parent.mkdir()
    for p in (path, run_dir(path)):
        p.rename(moved.parent / p.name.replace("run.h5", "renamed.h5"))
    # A decoy where the links' names point, as the original left behind would be.
    RunWriter(tmp_path / "elsewhere" / "run.h5", HEADER, 100, "torch").write(
        make_state(10, 9), make_history([0, 10]), complete=False, timings={}, new_snapshots={10: -snap})
    np.testing.assert_array_equal(read_params(moved)[1], state.params)
    np.testing.assert_array_equal(read_params(moved, 10)[1], snap)
    assert_state_equal(read_resume_point(moved)[1], state)
    RunWriter(moved, HEADER, 100, "torch").write(state, make_history([0, 10]), complete=True, timings={})
    with h5py.File(moved, "r") as f:   # the resumed run's links name its own directory again
        assert f.get("state", getlink=True).filename.startswith("renamed.h5.d/")
        assert f.get("snapshots/step_0000000010", getlink=True).filename.startswith("renamed.h5.d/")

    # The file alone still has the configuration and metrics; parameters need the directory.
    alone = tmp_path / "alone.h5"
    shutil.copy(moved, alone)
    assert read_run(alone).steps.tolist() == [0, 10]
    for step in (None, 10):
        with pytest.raises(ValueError, match="alone.h5.d beside it; copy or move them together"):
            read_params(alone, step)


def schema_1_copy(v2_path, v1_path) -> None:
    """The same run in the schema-1 layout: one file, state and snapshots inline."""
    with h5py.File(v2_path, "r") as src, h5py.File(v1_path, "w") as out:
        for key, value in src.attrs.items():
            if key != "state_step":
                out.attrs[key] = value
        out.attrs["schema_version"] = 1
        for name in ("runs", "metrics", "state"):   # copying follows the link to the checkpoint
            out.copy(src[name], name)
        g = out.create_group("snapshots")
        for name in src["snapshots"]:
            g.copy(src["snapshots"][name], name)


def test_schema_1_runs_are_read_and_resumed(tmp_path):
    v2, v1 = tmp_path / "new.h5", tmp_path / "old.h5"
    state, snap = make_state(10, 0), make_state(5, 1).params
    RunWriter(v2, HEADER, 100, "torch").write(state, make_history([0, 5, 10]), complete=False, timings={},
                                              new_snapshots={5: snap})
    schema_1_copy(v2, v1)
    assert [p.name for p in run_files(v1)] == ["old.h5"]
    data, resumed, history = read_resume_point(v1)
    assert (data.state_step, data.snapshot_steps, history.steps) == (10, [5], [0, 5, 10])
    assert_state_equal(resumed, state)
    np.testing.assert_array_equal(read_params(v1, 5, [1])[1], snap[[1]])
    np.testing.assert_array_equal(read_params(v1)[1], state.params)

    # Resuming it moves its snapshots out, once, and it is a schema-2 run from then on.
    RunWriter(v1, HEADER, 100, "torch").write(make_state(20, 2), make_history([0, 5, 10, 20]), complete=True,
                                              timings={})
    with h5py.File(v1, "r") as f:
        assert f.attrs["schema_version"] == 2
    assert [p.name for p in run_files(v1)] == ["old.h5", "checkpoint-0000000020.h5", "snapshot-0000000005.h5"]
    np.testing.assert_array_equal(read_params(v1, 5)[1], snap)


def test_header_mismatches_are_named(tmp_path):
    path = "run.h5"
    with pytest.raises(ValueError, match="holds experiment 'store-test', not 'other'"):
        dataclasses.replace(HEADER, experiment="other").check_same_run(HEADER, path)
    with pytest.raises(ValueError, match="was written with task .*p=7.*this run has .*p=11"):
        dataclasses.replace(HEADER, task=TaskConfig("x+y", 11)).check_same_run(HEADER, path)
    changed = (RUNS[0], dataclasses.replace(RUNS[1], weight_decay=0.3))
    with pytest.raises(ValueError, match="model 1 was written as .*weight_decay=1.0.*this run has .*0.3"):
        dataclasses.replace(HEADER, runs=changed).check_same_run(HEADER, path)
    with pytest.raises(ValueError, match="holds 2 models, this run has 1"):
        dataclasses.replace(HEADER, runs=RUNS[:1]).check_same_run(HEADER, path)
    init = {"source": "a.h5", "step": None, "models": [0, 1], "sha256": "ab"}
    moved = dict(init, source="elsewhere/a.h5")
    dataclasses.replace(HEADER, init_from=moved).check_same_run(dataclasses.replace(HEADER, init_from=init), path)
    with pytest.raises(ValueError, match="init_from"):
        dataclasses.replace(HEADER, init_from=dict(init, sha256="cd")).check_same_run(
            dataclasses.replace(HEADER, init_from=init), path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    RunWriter(path, HEADER, 100, "torch").write(make_state(0, 0), make_history([0]), complete=False, timings={})
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    for read in (read_run, read_params, read_resume_point):
        with pytest.raises(ValueError, match="schema version 99; this fastgrok .* reads version 2 and the older 1"):
            read(path)
    with pytest.raises(ValueError, match="schema version 99"):
        RunWriter(path, HEADER, 100, "torch").write(make_state(1, 0), make_history([0, 1]), complete=False,
                                                    timings={})
