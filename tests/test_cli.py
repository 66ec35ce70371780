"""The command line: every bad input is one line naming the value, exit 2, no output."""
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
    (["sweep", "--preset", "cpu", "--steps", "0"], "--steps 0: must be >= 1"),
    (["sweep", "--preset", "cpu", "--fractions", "1.5"], "--fractions 1.5: a fraction of all pairs"),
    (["sweep", "--sizes", "100", "--fractions", "0.5"], "not allowed with argument --sizes"),
    (["sweep", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["ungrok", "--preset", "cpu", "--lr", "1e-3,2e-3"], "ungrok takes one learning rate"),
    (["efficiency", "--preset", "cpu", "--task", "x*y"], "defined for x+y only"),
    (["efficiency", "--preset", "cpu", "--mem-sizes", "5:1:0"], "COUNT=0"),
    (["toy", "--steps", "-5"], "--steps -5: must be >= 1"),
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
