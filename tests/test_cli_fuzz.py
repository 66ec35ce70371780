"""Random command lines: the CLI either runs (exit 0) or refuses in one line
(exit 2); never a traceback.

Arguments are the parser's own option names with edge values (0, -1, inf,
nan, malformed lists, unknown devices and tasks, ...), on top of a base that
keeps every run tiny (p = 5, 2 steps, no figures). Counts that scale the work
(--seeds, --steps, --p, sizes) are drawn small only: this test is about
refusals, not about how large a run the machine takes.
"""
import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from fastgrok.cli import build_parser, main

TINY = ["--preset", "cpu", "--p", "5", "--steps", "2", "--no-plot"]
BASE = {
    "grok": TINY, "sweep": TINY,
    "ungrok": TINY + ["--pretrain-steps", "2"],
    "efficiency": TINY + ["--mem-sizes", "5", "--gen-sizes", "10"],
    "toy": ["--steps", "5", "--no-plot"],
}
SIZES = [["--sizes", "10"], ["--fractions", "0.4"], []]
TRAINING = ("grok", "sweep", "ungrok", "efficiency")
# Values that run, per option (sizes fit p = 5's 25 pairs); any option may instead get an edge value.
GOOD = {
    "--preset": ["cpu", "paper"], "--task": ["x+y", "x-y", "x*y", "x/y", "x^2+y^2", "S5:x*y"],
    "--p": ["3", "5", "7"], "--steps": ["1", "3"], "--seeds": ["1", "2"], "--lr": ["1e-3", "0.01,1e-3"],
    "--wd": ["0", "1", "0.5,2"], "--backend": ["auto", "torch", "cpu", "triton"], "--device": ["cpu"],
    "--precision": ["ieee", "tf32x3", "tf32", "bf16"], "--shard": ["0/1", "0/2", "1/2"],
    "--progress-every": ["0", "1", "60"], "--sizes": ["10", "5:20:2", "geom:3:20:2", "1"],
    "--fractions": ["0.4", "0.2,0.6", "1"], "--pretrain-steps": ["1", "2"], "--pretrain-wd": ["0", "1"],
    "--mem-sizes": ["5", "3:6:2"], "--gen-sizes": ["10", "25"],
}
EDGE = ["0", "-1", "1", "2", "3", "0.5", "1e-3", "inf", "nan", "-inf", "1e308", "1e-308", "abc", "", " ",
        "1,2", "2,0", "1,,2", "1:3:2", "geom:1:3:2", "geom:0:3:2", "5:1:0", "3:1:2", "0/2", "1/2", "2/2", "1/0",
        "x+y", "x*y", "x/y", "x^3+xy", "S5:x*y", "x%y", "cpu", "cuda", "cuda:7", "cuda:-1", "gpu", "meta",
        "paper", "huge", "torch", "triton", "auto", "bf16", "ieee"]


def options(command: str) -> dict[str, bool]:
    """The subcommand's option strings -> whether each takes a value (--out and --help left out)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {name: action.nargs != 0 for action in sub._actions for name in action.option_strings
            if name not in ("-h", "--help", "--out")}


COMMANDS = ["grok", "sweep", "ungrok", "efficiency", "toy", "plot", "info", "merge"]
OPTIONS = {c: options(c) for c in COMMANDS}
ALL_OPTIONS = sorted({o for c in COMMANDS for o in OPTIONS[c]}) + ["--frobnicate"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for plot/info/merge: missing, garbage, foreign HDF5, a real run file."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "garbage.h5").write_bytes(b"\x00garbage" * 64)
    with h5py.File(root / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["grok", *TINY, "--quiet", "--seeds", "1", "--sizes", "10", "--out", str(root / "run.h5")]) == 0
    return [str(root / name) for name in ("missing.h5", "garbage.h5", "foreign.h5", "run.h5")]


@st.composite
def argvs(draw, files, out_dir: Path):
    command = draw(st.sampled_from(COMMANDS))
    argv = [command]
    if command in ("plot", "info"):
        argv.append(draw(st.sampled_from(files)))
    elif command == "merge":
        argv += [str(out_dir / "merged.h5"), *draw(st.lists(st.sampled_from(files), min_size=1, max_size=3))]
    else:
        argv += BASE[command]
        if command in TRAINING:
            if command != "efficiency":
                argv += draw(st.sampled_from(SIZES))
            if draw(st.booleans()):
                argv.append("--quiet")
    own = sorted(OPTIONS[command])
    for _ in range(draw(st.integers(0, 4 if own else 1))):
        name = draw(st.sampled_from(own) if own and draw(st.integers(0, 9)) else st.sampled_from(ALL_OPTIONS))
        argv.append(name)
        if OPTIONS[command].get(name, True):
            good = GOOD.get(name, [])
            argv.append(draw(st.sampled_from(good) if good and draw(st.integers(0, 3)) else st.sampled_from(EDGE)))
    if command not in ("info", "merge"):
        argv += ["--out", str(out_dir / ("fig" if command == "plot" else "x.h5"))]
    return argv


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_command_lines_run_or_refuse_in_one_line(files, data):
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        argv = data.draw(argvs(files, out_dir), label="argv")
        stdout, stderr = io.StringIO(), io.StringIO()
        environ = dict(os.environ)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(argv)
            except SystemExit as exc:   # argparse's own exits
                code = exc.code
        assert dict(os.environ) == environ, "the CLI changed the process environment"
        err = stderr.getvalue()
        event(f"{argv[0]} exit {code}")
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fastgrok: error: "), (argv, err)
            assert list(out_dir.iterdir()) == [], (argv, "a refused command wrote", list(out_dir.iterdir()))
