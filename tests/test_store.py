"""The run file: round trip, self-description, atomic replacement, header checks, reader."""
import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.metrics import Evaluation, metric_names
from fastgrok.model import PARAM_NAMES, param_shapes
from fastgrok.schedule import EvalSchedule
from fastgrok.store import (MetricHistory, RunHeader, RunWriter, TrainingState, partial_path,
                            read_params, read_resume_point, read_run)
from fastgrok.tasks import Task

TASK = TaskConfig("x+y", 7)
MODEL = ModelConfig.for_task(TASK, d_model=8, n_heads=2, d_head=4, d_mlp=16)
RUNS = (RunSpec(train_size=20, data_seed=1, init_seed=2, lr=3e-3, weight_decay=0.5),
        RunSpec(train_size=35, data_seed=4, init_seed=5, random_labels=True))
HEADER = RunHeader("store-test", TASK, MODEL, OptimConfig(betas=(0.9, 0.95)), RUNS, EvalSchedule(5, 20, 10))
M, P = len(RUNS), MODEL.n_params


def make_state(step: int, seed: int) -> TrainingState:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(M, P)).astype(np.float32) for _ in range(3)]
    return TrainingState(step, *arrays, np.array([-1, 7], dtype=np.int64))


def make_history(steps) -> MetricHistory:
    names = metric_names(TASK.op)
    history = MetricHistory(names)
    for e, step in enumerate(steps):
        values = {name: np.array([k + 0.25 * e, -k - e], dtype=np.float64) for k, name in enumerate(names)}
        history.append(Evaluation(step, values), wall_seconds=0.5 * e)
    return history


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
    for name in ("params", "exp_avg", "exp_avg_sq", "failed_step"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(state, name))
    assert resumed.step == 40 and resumed_history.steps == history.steps
    assert read_params(path, 10)[0] == 10
    np.testing.assert_array_equal(read_params(path, 10, [1, 0])[1], snapshot[[1, 0]])
    np.testing.assert_array_equal(read_params(path)[1], state.params)

    # Readable without fastgrok: configs are JSON, splits and layout explicit.
    with h5py.File(path, "r") as f:
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
    writer.write(make_state(20, 0), make_history([0, 5, 20]), complete=True, timings={},
                 new_snapshots={20: second})
    assert read_run(path).snapshot_steps == [5, 20]
    np.testing.assert_array_equal(read_params(path, 5)[1], first)
    np.testing.assert_array_equal(read_params(path, 20)[1], second)
    with pytest.raises(ValueError, match=r"no parameter snapshot at step 7; snapshots: \[5, 20\]"):
        read_params(path, 7)
    with pytest.raises(ValueError, match="model index 2 is outside 0..1"):
        read_params(path, None, [2])


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, HEADER, 100, "torch")
    writer.write(make_state(5, 0), make_history([0, 5]), complete=False, timings={})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        writer.write(make_state(10, 1), make_history([0, 5, 10]), complete=False, timings={})
    assert path.read_bytes() == before
    assert partial_path(path).exists()          # the half-done write is beside it, not in it
    monkeypatch.undo()
    writer.write(make_state(10, 1), make_history([0, 5, 10]), complete=False, timings={})
    assert read_run(path).state_step == 10 and not partial_path(path).exists()


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
    with pytest.raises(ValueError, match="schema version 99; this fastgrok .* reads version 1"):
        read_run(path)
