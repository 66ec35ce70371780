"""The command line: every bad input is one line naming the value, exit 2, no output."""
import io
import re

import h5py
import numpy as np
import pytest

from fastgrok.cli import main

TINY = ["--preset", "cpu", "--p", "7", "--steps", "20", "--quiet", "--backend", "torch"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, named", [
    (["sweep", "--preset", "cpu", "--sizes", "100:5000:3"], "STOP=5000 is outside 1..1849"),
    (["sweep", "--preset", "cpu", "--sizes", "0,10"], "0 is outside 1..1849"),
    (["sweep", "--preset", "cpu", "--sizes", "100:200:0"], "COUNT=0 must be >= 1"),
    (["sweep", "--preset", "cpu", "--sizes", "100:200"], "expected START:STOP:COUNT"),
    (["sweep", "--preset", "cpu", "--sizes", "geom:0:200:3"], "START and STOP > 0"),
    (["sweep", "--preset", "cpu", "--task", "x/y", "--p", "12"], "p=12: division needs a prime"),
    (["sweep", "--task", "x%y"], "unknown task 'x%y'; valid tasks"),
    (["sweep", "--preset", "huge"], "--preset 'huge': unknown; valid presets: paper, cpu"),
    (["sweep", "--preset", "cpu", "--seeds", "0"], "--seeds 0: must be >= 1"),
    (["sweep", "--preset", "cpu", "--wd", "-1"], "--wd -1: must be >= 0"),
    (["sweep", "--preset", "cpu", "--lr", "0"], "--lr 0: must be > 0"),
    (["grok", "--preset", "cpu", "--lr", "inf"], "--lr inf: must be a finite number"),
    (["grok", "--preset", "cpu", "--lr", "1e-3,nan"], "--lr nan: must be a finite number"),
    (["grok", "--preset", "cpu", "--wd", "inf"], "--wd inf: must be a finite number"),
    (["grok", "--preset", "cpu", "--wd=-inf"], "--wd -inf: must be a finite number"),
    (["efficiency", "--preset", "cpu", "--wd", "1,inf"], "--wd inf: must be a finite number"),
    (["ungrok", "--preset", "cpu", "--pretrain-wd", "inf"], "--pretrain-wd inf: must be a finite number"),
    (["grok", "--preset", "cpu", "--progress-every", "-1"], "--progress-every -1: must be a number of seconds"),
    (["grok", "--preset", "cpu", "--progress-every", "nan"], "--progress-every nan: must be a number of seconds"),
    (["sweep", "--preset", "cpu", "--steps", "0"], "--steps 0: must be >= 1"),
    (["sweep", "--preset", "cpu", "--fractions", "1.5"], "--fractions 1.5: a fraction of all pairs"),
    (["sweep", "--sizes", "100", "--fractions", "0.5"], "not allowed with argument --sizes"),
    (["sweep", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["ungrok", "--preset", "cpu", "--lr", "1e-3,2e-3"], "ungrok takes one learning rate"),
    (["efficiency", "--preset", "cpu", "--task", "x*y"], "defined for x+y only"),
    (["efficiency", "--preset", "cpu", "--mem-sizes", "5:1:0"], "COUNT=0"),
    (["toy", "--steps", "-5"], "--steps -5: must be >= 1"),
    (["grok", "--preset", "cpu", "--steps", "100", "--until-converged", "50"],
     "--until-converged 50: the step cap must be >= --steps (100)"),
    (["grok", "--preset", "cpu", "--until-converged", "500", "--shard", "0/2"], "shards would stop at different"),
    (["grok", "--preset", "cpu", "--precision", "fp16"], "invalid choice: 'fp16'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv + ["--out", str(tmp_path / "x.h5")] if argv[0] != "frobnicate" else argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgrok: error:"), err
    assert named in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be written on bad input"


def test_existing_output_needs_resume(tmp_path, capsys):
    out = tmp_path / "sweep.h5"
    out.write_bytes(b"precious")
    code, _, err = run(["sweep", *TINY, "--sizes", "20", "--out", str(out)], capsys)
    assert code == 2 and "exists; pass --resume" in err
    assert out.read_bytes() == b"precious"


def test_resume_refuses_corrupt_file_and_other_experiment(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x00not hdf5" * 100)
    code, _, err = run(["sweep", *TINY, "--sizes", "20", "--resume", "--out", str(corrupt)], capsys)
    assert code == 2 and "not a readable HDF5 file" in err and len(err.strip().splitlines()) == 1

    grok = tmp_path / "grok.h5"
    assert run(["grok", *TINY, "--seeds", "1", "--sizes", "30", "--no-plot", "--out", str(grok)], capsys)[0] == 0
    before = grok.read_bytes()
    code, _, err = run(["sweep", *TINY, "--sizes", "20", "--resume", "--out", str(grok)], capsys)
    assert code == 2 and "holds experiment 'grok', not 'sweep'" in err
    assert grok.read_bytes() == before


@pytest.mark.parametrize("command", ["plot", "info"])
def test_plot_and_info_refuse_bad_files(command, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"garbage" * 50)
    assert run([command, str(corrupt)], capsys)[0] == 2
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    code, _, err = run([command, str(foreign)], capsys)
    assert code == 2 and "not a fastgrok run file" in err
    code, _, err = run([command, str(tmp_path / "missing.h5")], capsys)
    assert code == 2 and "no such file" in err


def test_sweep_end_to_end_writes_file_figures_and_info(tmp_path, capsys):
    out = tmp_path / "s.h5"
    code, stdout, _ = run(["sweep", *TINY, "--sizes", "10:40:3", "--seeds", "2", "--wd", "0.5,1",
                           "--out", str(out)], capsys)
    assert code == 0, stdout
    assert (tmp_path / "s_fig5.png").stat().st_size > 0 and (tmp_path / "s_fig5.pdf").stat().st_size > 0
    from fastgrok.store import read_run

    data = read_run(out)
    assert data.n_models == 3 * 2 * 2 and data.complete and data.steps[-1] == 20
    assert sorted({r.train_size for r in data.header.runs}) == [10, 25, 40]
    code, stdout, _ = run(["info", str(out)], capsys)
    assert code == 0 and "experiment 'sweep'" in stdout and "20 of 20" in stdout


def test_toy_command_writes_and_plots(tmp_path, capsys):
    out = tmp_path / "toy.h5"
    code, stdout, _ = run(["toy", "--steps", "200", "--out", str(out)], capsys)
    assert code == 0 and out.exists() and (tmp_path / "toy_fig2.png").exists()
    code, stdout, _ = run(["info", str(out)], capsys)
    assert code == 0 and "toy" in stdout


# ----------------------------------------------------------------------- devices
def fake_cuda(monkeypatch, count: int | None):
    """This machine as one with ``count`` GPUs, or (None) a torch built without CUDA."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", None if count is None else "12.4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(count))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count or 0)


@pytest.mark.parametrize("gpus, device, named", [
    (None, "cuda", "--device cuda: this torch " ),
    (None, "cuda", "is built without CUDA; valid devices on this machine: cpu"),
    (None, "cuda:7", "--device cuda:7: this torch"),
    (0, "cuda", "no CUDA device is visible"),
    (2, "cuda:7", "--device cuda:7: this machine has 2 CUDA devices; valid devices on this machine: "
                  "cpu, cuda, cuda:0, cuda:1"),
    (1, "cuda:1", "this machine has 1 CUDA device;"),
    (2, "gpu", "--device 'gpu': not a device; valid devices on this machine: cpu, cuda, cuda:0, cuda:1"),
    (None, "cuda:x", "--device 'cuda:x': not a device; valid devices on this machine: cpu"),
    (None, "", "--device '': not a device"),
    (None, "meta", "--device meta: fastgrok trains on cpu, cuda[:N] or mps"),
    (None, "cpu:3", "--device cpu:3: fastgrok trains on"),
])
@pytest.mark.parametrize("command", ["grok", "ungrok", "efficiency"])
def test_unusable_device_is_one_line_exit_2(command, gpus, device, named, monkeypatch, tmp_path, capsys):
    fake_cuda(monkeypatch, gpus)
    monkeypatch.chdir(tmp_path)
    code, out, err = run([command, "--preset", "cpu", "--device", device, "--out", str(tmp_path / "x.h5")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_torchrun_local_rank_beyond_the_gpus_is_named(monkeypatch, tmp_path, capsys):
    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    code, _, err = run(["grok", "--preset", "cpu", "--device", "cuda", "--out", str(tmp_path / "x.h5")], capsys)
    assert code == 2 and "--device cuda (LOCAL_RANK=3 selects cuda:3): this machine has 2 CUDA devices" in err


# ---------------------------------------------------------------------- progress
LINE = re.compile(r"^(?P<label>\S+ \(\d+ models\)): step (?P<step>\d+)/(?P<total>\d+)  "
                  r"(?P<rate>[\d.e+]+|-) steps/s  (?P<mrate>[\d.e+]+|-) model-steps/s  ETA (?P<eta>\S+)  "
                  r"memorised (?P<mem>\d+) partial (\d+) grokked (?P<grok>\d+) failed (?P<failed>\d+)$")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_population(test_acc, train_acc, failed):
    from types import SimpleNamespace

    from fastgrok.metrics import Evaluation

    pop = SimpleNamespace(failed_step=np.array(failed))
    return pop, Evaluation(0, {"train_acc": np.array(train_acc), "test_acc": np.array(test_acc)})


def test_batch_progress_prints_a_line_at_start_every_interval_and_at_the_end():
    from fastgrok.cli import Progress

    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(1000, 4, "grok (4 models)", quiet=False, every=60, stream=stream, clock=clock)
    assert progress.mode == "lines"        # a StringIO is not a terminal
    pop, ev = fake_population([1.0, 0.7, 0.1, 0.0], [1.0, 1.0, 1.0, 0.2], [-1, -1, -1, 5])
    for step in range(1, 1001):
        clock.now += 0.25                  # 4 steps/s, 16 model-steps/s (exact in binary)
        progress(step, pop, ev)
    progress.close()
    lines = stream.getvalue().splitlines()
    # step 1, then every 240 steps (60 s at 0.25 s/step), then the last
    assert [int(LINE.match(x)["step"]) for x in lines] == [1, 241, 481, 721, 961, 1000], lines
    assert lines[0] == "grok (4 models): step 1/1000  - steps/s  - model-steps/s  ETA -  " \
                       "memorised 1 partial 1 grokked 1 failed 1"
    assert lines[1] == "grok (4 models): step 241/1000  4 steps/s  16 model-steps/s  ETA 3m10s  " \
                       "memorised 1 partial 1 grokked 1 failed 1"
    assert LINE.match(lines[-1])["eta"] == "0s"
    assert progress.counts == "memorised 1 · partial 1 · grokked 1 · failed 1"


def test_batch_progress_of_an_interrupted_run_ends_where_it_stopped():
    from fastgrok.cli import Progress

    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(10**7, 200, "sweep (200 models)", quiet=False, every=60, stream=stream, clock=clock)
    pop, ev = fake_population([0.0] * 200, [0.0] * 200, [-1] * 200)
    for step in range(5001, 5101):
        clock.now += 0.5
        progress(step, pop, ev)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [LINE.match(x)["step"] for x in lines] == ["5001", "5100"]
    # 2 steps/s: (1e7 - 5100) / 2 s
    assert " 2 steps/s  400 model-steps/s  ETA 57d20h  " in lines[-1]


def test_quiet_and_terminal_progress_print_no_lines():
    from fastgrok.cli import Progress

    stream = io.StringIO()
    progress = Progress(10, 1, "grok (1 models)", quiet=True, every=0, stream=stream)
    pop, ev = fake_population([1.0], [1.0], [-1])
    for step in range(1, 11):
        progress(step, pop, ev)
    progress.close()
    assert stream.getvalue() == "" and progress.counts == "memorised 0 · partial 0 · grokked 1 · failed 0"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (116, "1m56s"), (3 * 3600 + 7 * 60, "3h07m"),
                                           (2 * 86400 + 5 * 3600 + 59, "2d05h")])
def test_eta_format(seconds, text):
    from fastgrok.cli import _duration

    assert _duration(seconds) == text


def test_batch_run_prints_progress_lines_with_stdout_captured(tmp_path, capsys):
    out = tmp_path / "g.h5"
    argv = ["grok", *[a for a in TINY if a != "--quiet"], "--seeds", "2", "--sizes", "30", "--no-plot",
            "--progress-every", "0", "--out", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    lines = [x for x in stdout.splitlines() if LINE.match(x)]
    assert [int(LINE.match(x)["step"]) for x in lines] == list(range(1, 21)), stdout
    assert all(LINE.match(x)["label"] == "grok (2 models)" for x in lines)
    assert "\x1b" not in stdout, "no terminal control codes in a log"
    quiet = run([*argv[:-1], str(tmp_path / "q.h5"), "--quiet"], capsys)[1]
    assert not any(LINE.match(x) for x in quiet.splitlines())


def test_warnings_are_one_notice_line(tmp_path, capsys):
    """A fallback (here triton without a GPU) is one plain line on stderr, and the run goes on."""
    argv = ["grok", "--preset", "cpu", "--p", "5", "--sizes", "10", "--seeds", "1", "--steps", "2",
            "--backend", "triton", "--no-plot", "--quiet", "--out", str(tmp_path / "g.h5")]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgrok: notice: backend 'triton' unavailable"), err


def test_until_converged_doubles_the_steps_until_the_runs_hold_still(tmp_path, capsys):
    """p = 7 memorises and stays at its test accuracy within tens of steps; a cap far above
    shows the loop stops by convergence, and a cap at the first steps shows it stops there."""
    from fastgrok.analysis import converged
    from fastgrok.store import read_run

    out = tmp_path / "g.h5"
    code, stdout, err = run(["grok", *TINY, "--sizes", "30", "--seeds", "2", "--until-converged", "640",
                             "--out", str(out), "--no-plot"], capsys)
    assert code == 0, err
    data = read_run(out)
    done = converged(data.steps, data.metrics["test_acc"])
    assert data.complete and 20 <= data.target_steps <= 640
    assert done.all() or data.target_steps == 640, stdout
    assert f"converged by step {data.target_steps:,}" in stdout
    if data.target_steps > 20:       # each extension is a doubling, announced
        assert "still moving; continuing to step 40" in stdout


def test_dcrit_reads_an_ungrokking_file_and_draws_the_estimates(tmp_path, capsys):
    out = tmp_path / "u.h5"
    code, _, err = run(["ungrok", *TINY, "--sizes", "5,15,30", "--seeds", "2", "--wd", "1,2", "--pretrain-steps",
                        "40", "--out", str(out), "--no-plot"], capsys)
    assert code == 0, err
    code, stdout, err = run(["dcrit", str(out)], capsys)
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("ungrokking")]
    assert [line.split()[1:3] for line in lines] == [["wd", "1"], ["wd", "2"]]
    assert "converged" in lines[0] and (tmp_path / "u_dcrit.png").stat().st_size > 0
    code, _, err = run(["dcrit", str(tmp_path / "u.pretrain.h5")], capsys)
    assert code == 2 and "ungrok.pretrain" in err


def test_the_precision_is_recorded_and_a_resume_must_keep_it(tmp_path, capsys):
    from fastgrok.store import read_run

    out = tmp_path / "g.h5"
    assert run(["grok", *TINY, "--sizes", "20", "--seeds", "1", "--precision", "bf16", "--out", str(out),
                "--no-plot"], capsys)[0] == 0
    assert read_run(out).header.precision == "bf16"
    code, _, err = run(["grok", *TINY, "--steps", "30", "--sizes", "20", "--seeds", "1", "--precision", "tf32",
                        "--out", str(out), "--resume", "--no-plot"], capsys)
    assert code == 2 and "precision" in err and "bf16" in err


def test_precision_study_trains_each_precision_and_compares_them(tmp_path, capsys):
    code, stdout, err = run(["precision", "--preset", "cpu", "--p", "7", "--sizes", "30", "--steps", "30",
                             "--seeds", "4", "--precisions", "fp32,bf16", "--backend", "torch", "--quiet",
                             "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    from fastgrok.store import read_run

    assert [read_run(tmp_path / f"grok-{p}.h5").header.precision for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    table = (tmp_path / "study.txt").read_text().splitlines()
    rows = [line.split() for line in table if line.startswith("final test accuracy")]
    assert [r[3] for r in rows] == ["fp32", "bf16"] and int(rows[1][4]) == 4     # precision, seeds
    assert (tmp_path / "precision.png").stat().st_size > 0
    code, _, err = run(["precision", "--precisions", "tf32,bf16", "--out-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "include it" in err
