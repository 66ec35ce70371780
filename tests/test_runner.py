"""The training runner: schedule, oracle agreement, refusals, init_from, and crash safety
(SIGKILL at random moments and inside writes, resumed each time) with concurrent readers."""
import dataclasses
import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastgrok.layout import ParamLayout
from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
from fastgrok.population import Population
from fastgrok.runner import InitFrom, run_experiment
from fastgrok.schedule import EvalSchedule
from fastgrok.store import RunWriter, read_params, read_resume_point, read_run
from fastgrok.tasks import Task
from fastgrok.train import train_reference

TASK = TaskConfig("x+y", 7)
MODEL = ModelConfig.for_task(TASK, d_model=8, n_heads=2, d_head=4, d_mlp=16)
OPTIM = OptimConfig(lr=3e-3)
RUNS = [RunSpec(train_size=25, data_seed=1, init_seed=1),
        RunSpec(train_size=30, data_seed=2, init_seed=2, weight_decay=0.3),
        RunSpec(train_size=25, data_seed=3, init_seed=3, random_labels=True)]
SCHEDULE = EvalSchedule(dense_every=5, dense_until=20, per_decade=10)


def run(path, steps=60, **kwargs):
    kwargs = {"schedule": SCHEDULE, "checkpoint_every": 25, **kwargs}
    return run_experiment(path, kwargs.pop("experiment", "runner-test"), TASK, MODEL, OPTIM,
                          kwargs.pop("runs", RUNS), steps, **kwargs)


def assert_same_run(a, b):
    """Two run files hold identical evaluation points, metrics, state and snapshots."""
    da, db = read_run(a), read_run(b)
    assert da.steps.tolist() == db.steps.tolist(), "evaluation points lost or duplicated"
    for name in da.metrics:
        np.testing.assert_array_equal(da.metrics[name], db.metrics[name], err_msg=name)
    _, sa, _ = read_resume_point(a)
    _, sb, _ = read_resume_point(b)
    assert sa.step == sb.step
    for name in ("params", "exp_avg", "exp_avg_sq", "failed_step"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name), err_msg=name)
    assert da.snapshot_steps == db.snapshot_steps
    for step in da.snapshot_steps:
        np.testing.assert_array_equal(read_params(a, step)[1], read_params(b, step)[1])


# ------------------------------------------------------------------ schedule
def test_schedule_is_dense_then_log_spaced():
    schedule = EvalSchedule(dense_every=10, dense_until=1000, per_decade=100)
    points = schedule.points(10 ** 7)
    assert points[0] == 0 and points[-1] == 10 ** 7
    assert (np.diff(points) > 0).all()
    dense = points[points <= 1000]
    np.testing.assert_array_equal(dense, np.arange(0, 1001, 10))
    late = points[points > 1000][:-1]
    ratios = late[1:] / late[:-1]
    np.testing.assert_allclose(ratios, 10 ** 0.01, rtol=2e-3)   # 100 points per decade
    assert len(points) <= 3000
    assert len(EvalSchedule().points(3 * 10 ** 7)) <= 3000
    assert schedule.points(7).tolist() == [0, 7]
    with pytest.raises(ValueError, match="per_decade=0"):
        EvalSchedule(per_decade=0)


# -------------------------------------------------------------- one session
def test_run_matches_oracle_and_plain_population(tmp_path):
    path = tmp_path / "run.h5"
    schedule = EvalSchedule(dense_every=5, dense_until=40)
    runs = [r for r in RUNS if not r.random_labels]
    seen = []
    pop = run(path, steps=40, runs=runs, schedule=schedule, snapshot_steps=[0, 15],
              progress=lambda step, p, latest: seen.append((step, p.step_count, latest.step)))
    data = read_run(path)
    assert data.complete and data.state_step == 40
    assert data.steps.tolist() == list(range(0, 41, 5))
    assert seen == [(s, s, s - s % 5) for s in range(1, 41)]

    task = Task(TASK)
    for m, spec in enumerate(runs):
        _, history = train_reference(task, MODEL, spec, 40, OPTIM, eval_every=5)
        assert history.step == data.steps.tolist()
        for name in ("train_loss", "test_loss"):
            np.testing.assert_allclose(data.metrics[name][m], getattr(history, name), rtol=1e-3,
                                       err_msg=f"model {m} {name} against the reference trainer")

    plain = Population(task, MODEL, runs, OPTIM)
    for step in range(1, 41):
        plain.step()
        if step == 15:
            np.testing.assert_array_equal(read_params(path, 15)[1], plain.flat_params.numpy())
    np.testing.assert_array_equal(read_params(path)[1], plain.flat_params.numpy())
    np.testing.assert_array_equal(pop.flat_params.numpy(), plain.flat_params.numpy())
    np.testing.assert_array_equal(read_params(path, 0)[1][0], Population(task, MODEL, runs[:1]).flat_params[0].numpy())


def test_checkpoint_every_sets_the_writes(tmp_path, monkeypatch):
    written = []
    original = RunWriter.write

    def spy(self, state, *args, **kwargs):
        written.append(state.step)
        return original(self, state, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write", spy)
    run(tmp_path / "run.h5", steps=100, checkpoint_every=30)
    assert written == [0, 30, 60, 90, 100]


def test_refusals_name_the_value(tmp_path):
    path = tmp_path / "run.h5"
    run(path, steps=10)
    with pytest.raises(FileExistsError, match="run.h5 exists; pass resume=True"):
        run(path, steps=10)
    with pytest.raises(ValueError, match="holds experiment 'runner-test', not 'other'"):
        run(path, steps=10, experiment="other", resume=True)
    with pytest.raises(ValueError, match="model 2 was written as .*init_seed=3.*this run has .*init_seed=9"):
        run(path, steps=10, resume=True, runs=RUNS[:2] + [dataclasses.replace(RUNS[2], init_seed=9)])
    with pytest.raises(ValueError, match="was written with schedule"):
        run(path, steps=10, resume=True, schedule=EvalSchedule(dense_every=2))
    with pytest.raises(ValueError, match="is at step 10, beyond steps=5"):
        run(path, steps=5, resume=True)
    with pytest.raises(ValueError, match="snapshot_steps \\[11\\]: each must be in 0..10"):
        run(tmp_path / "new.h5", steps=10, snapshot_steps=[11])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_crash_and_resume_in_process_is_bit_identical(tmp_path, backend):
    if backend == "cpu":
        from fastgrok.backends.cpu_engine import CpuBackend

        ok, reason = CpuBackend.available(torch.device("cpu"))
        if not ok:   # tests/test_cpu_engine.py fails where a compiler exists but no build
            pytest.skip(reason)
    reference = tmp_path / "reference.h5"
    run(reference, steps=90, snapshot_steps=[30, 60], backend=backend)
    assert read_run(reference).backend == backend

    class Crash(Exception):
        pass

    def crash_at(step_to_crash):
        def progress(step, pop, latest):
            if step == step_to_crash:
                raise Crash
        return progress

    path = tmp_path / "crashed.h5"
    for crash_step in (12, 55, 77):        # before the first checkpoint, between, after snapshots
        with pytest.raises(Crash):
            run(path, steps=90, snapshot_steps=[30, 60], resume=True, progress=crash_at(crash_step),
                backend=backend)
        assert read_run(path).state_step == crash_step // 25 * 25
    run(path, steps=90, snapshot_steps=[30, 60], resume=True, backend=backend)
    assert_same_run(path, reference)

    # A complete run resumes to nothing; a longer one continues where it stopped.
    run(path, steps=90, resume=True, backend=backend)
    assert_same_run(path, reference)
    run(path, steps=120, resume=True, backend=backend)
    data = read_run(path)
    assert data.complete and data.state_step == 120 and data.target_steps == 120
    assert data.steps.tolist() == read_run(reference).steps.tolist() + [100, 120]
    if backend != "torch":
        with pytest.warns(UserWarning, match=f"trained on backend '{backend}' and continues on 'torch'"):
            run(path, steps=130, resume=True, backend="torch")


def test_init_from_copies_rows_and_resets_moments(tmp_path):
    source = tmp_path / "source.h5"
    run(source, steps=50, snapshot_steps=[20])
    final = read_params(source)[1]
    final_metrics = read_run(source).metrics

    # Same models, same splits: step 0 of the copy measures what the source ended with.
    path = tmp_path / "copy.h5"
    copy_runs = [RUNS[2], RUNS[0]]
    run(path, steps=0, runs=copy_runs, init_from=InitFrom(source, models=[2, 0]))
    _, state, history = read_resume_point(path)
    np.testing.assert_array_equal(state.params, final[[2, 0]])
    assert state.step == 0 and not state.exp_avg.any() and not state.exp_avg_sq.any()
    for name in ("train_loss", "test_acc", "param_norm"):
        np.testing.assert_allclose(read_run(path).metrics[name][:, 0], final_metrics[name][[2, 0], -1],
                                   rtol=1e-6, err_msg=name)
    assert read_run(path).header.init_from["models"] == [2, 0]

    # Ungrokking shape: each copy on a prefix D' of its own split, from a snapshot.
    prefix_runs = [dataclasses.replace(RUNS[0], train_size=10), dataclasses.replace(RUNS[0], train_size=15)]
    pop = run(tmp_path / "ungrok.h5", steps=10, runs=prefix_runs, init_from=InitFrom(source, [0, 0], step=20))
    assert pop.step_count == 10
    np.testing.assert_array_equal(read_params(tmp_path / "ungrok.h5", None)[1].shape, (2, ParamLayout.from_config(MODEL).P))
    with pytest.raises(ValueError, match="init_from"):
        run(tmp_path / "ungrok.h5", steps=10, runs=prefix_runs, resume=True,
            init_from=InitFrom(source, [0, 1], step=20))

    array_init = run(tmp_path / "array.h5", steps=0, runs=RUNS[:1], init_from=InitFrom(final, [1]))
    np.testing.assert_array_equal(array_init.flat_params.numpy(), final[[1]])
    with pytest.raises(ValueError, match="init_from lists 2 source models; the population has 1"):
        run(tmp_path / "bad.h5", steps=0, runs=RUNS[:1], init_from=InitFrom(final, [0, 1]))
    with pytest.raises(ValueError, match=r"init_from array has shape \(3, 5\)"):
        run(tmp_path / "bad.h5", steps=0, runs=RUNS[:1], init_from=InitFrom(np.zeros((3, 5)), [0]))


# ------------------------------------------------------- separate processes
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import h5py, torch
    torch.set_num_threads(1)
    from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
    from fastgrok.runner import run_experiment
    from fastgrok.schedule import EvalSchedule

    args = json.loads(sys.argv[1])
    if args["hooks"]:
        # Print where each write is and linger there, so that the parent can
        # kill this process inside the metric, checkpoint and snapshot writes
        # and between the complete temporary file and its rename.
        create_dataset, create_group = h5py.Group.create_dataset, h5py.Group.create_group
        def hooked_create_dataset(self, name, *a, **k):
            if (self.name, name) in (("/metrics", "step"), ("/state", "params")):
                print("in-write", self.name[1:], flush=True)
                time.sleep(0.03)
            return create_dataset(self, name, *a, **k)
        def hooked_create_group(self, name, *a, **k):
            if name == "snapshots":      # then old snapshots are copied, new ones added
                print("in-write snapshot", flush=True)
                time.sleep(0.03)
            return create_group(self, name, *a, **k)
        h5py.Group.create_dataset = hooked_create_dataset
        h5py.Group.create_group = hooked_create_group
        replace = os.replace
        def hooked_replace(src, dst):
            print("in-write replace", flush=True)
            time.sleep(0.03)
            replace(src, dst)
        os.replace = hooked_replace

    started = []
    def progress(step, pop, latest):
        if not started:
            started.append(step)
            print("training", flush=True)
        # Handshake: after each of the first writes, wait until the reader
        # says it has seen this state, so that it sees several whatever the
        # machine's load; then run freely while it keeps reading.
        if args["ack_file"] and step % args["checkpoint_every"] == 0 and step <= 3 * args["checkpoint_every"]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = open(args["ack_file"]).read().strip() if os.path.exists(args["ack_file"]) else ""
                if text and int(text) >= step:
                    break
                time.sleep(0.002)

    task = TaskConfig("x+y", 11)
    model = ModelConfig.for_task(task, d_model=12, n_heads=2, d_head=6, d_mlp=24)
    runs = [RunSpec(train_size=50, data_seed=1, init_seed=1),
            RunSpec(train_size=70, data_seed=2, init_seed=2, weight_decay=0.2),
            RunSpec(train_size=40, data_seed=3, init_seed=3, random_labels=True)]
    run_experiment(args["path"], "kill-test", task, model, OptimConfig(lr=3e-3), runs, args["steps"],
                   schedule=EvalSchedule(dense_every=5, dense_until=50, per_decade=20),
                   resume=True, progress=progress, snapshot_steps=args["snapshot_steps"],
                   checkpoint_every=args["checkpoint_every"])
    print("done", flush=True)
""")


def start_child(tmp_path, path, hooks=False, steps=400, checkpoint_every=20, snapshot_steps=(0, 100, 250),
                ack_file=None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = json.dumps({"path": str(path), "hooks": hooks, "steps": steps, "checkpoint_every": checkpoint_every,
                       "snapshot_steps": list(snapshot_steps), "ack_file": ack_file and str(ack_file)})
    return subprocess.Popen([sys.executable, str(script), args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return out


def assert_prefix_of(path, reference):
    """What a killed run left is a consistent prefix of the uninterrupted run."""
    data, ref = read_run(path), read_run(reference)
    E = len(data.steps)
    assert data.steps.tolist() == ref.steps[:E].tolist()
    assert data.state_step >= data.steps[-1]
    for name in data.metrics:
        np.testing.assert_array_equal(data.metrics[name], ref.metrics[name][:, :E], err_msg=name)


def test_sigkill_at_random_moments_and_inside_writes_then_resume_is_identical(tmp_path):
    reference = tmp_path / "reference.h5"
    finish(start_child(tmp_path, reference))

    rng = random.Random(20240607)
    plan = ["state", "snapshot", "metrics", "random", "replace", "random"]
    path, kills, done = tmp_path / "killed.h5", [], False
    while not done:
        proc = start_child(tmp_path, path, hooks=True)
        target = plan[len(kills)] if len(kills) < len(plan) else None
        # Let at least one write of this session finish first, so the run advances.
        nth, seen = rng.choice([2, 3]), 0
        for line in proc.stdout:
            if line.startswith("done"):
                done = True
                break
            if target == "random" and line.startswith("training") and path.exists():
                time.sleep(rng.uniform(0.0, 0.4))
                break
            if target and line.startswith(f"in-write {target}"):
                seen += 1
                if seen == nth:
                    break
        if done:
            finish(proc)
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(target)
        assert path.exists()
        assert_prefix_of(path, reference)       # the file opens and holds nothing wrong
    assert len(kills) >= 5 and {"state", "metrics", "snapshot", "replace"} <= set(kills), kills
    assert_same_run(path, reference)


def test_reader_polling_during_a_run_never_fails(tmp_path):
    """A reader polls while the writer trains and writes; the writer waits for the
    reader's acknowledgement of its first writes only (no timing assumption)."""
    path, ack = tmp_path / "run.h5", tmp_path / "ack"
    proc = start_child(tmp_path, path, steps=150, checkpoint_every=3, snapshot_steps=[0], ack_file=ack)
    reads, state_steps = 0, []
    while proc.poll() is None:
        if path.exists():
            data = read_run(path)
            frame = data.to_dataframe(["test_acc"])
            assert len(frame) == data.n_models * len(data.steps)
            state_steps.append(data.state_step)
            reads += 1
            ack.write_text(str(data.state_step))
        time.sleep(0.005)   # leave the writer a core
    finish(proc)
    assert {3, 6, 9} <= set(state_steps), sorted(set(state_steps))
    assert state_steps == sorted(state_steps)
    assert read_run(path).complete
