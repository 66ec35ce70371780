"""A sweep run as shards by launcher-style processes and merged equals the whole run."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fastgrok.cli import main
from fastgrok.store import read_params, read_run

ARGS = ["--preset", "cpu", "--p", "7", "--steps", "30", "--quiet", "--no-plot",
        "--sizes", "6:40:3", "--seeds", "2", "--wd", "0.5,1"]


# The torch backend's bound across populations (README, "Reproducibility"):
# float32 rounding of batched products, grown over the 30 steps of ARGS.
TORCH_RTOL = 1e-5


def launch(command, out, env_extra, backend, threads):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")}
    env.update(env_extra, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "fastgrok.cli", command, *ARGS, "--backend", backend,
                             "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)


def assert_same_run(whole, merged, bitwise):
    """Every metric, the final parameters and the failed steps: equal, or within TORCH_RTOL."""
    def check(got, want, what):
        if bitwise:
            np.testing.assert_array_equal(got, want, err_msg=what)
        else:
            scale = np.abs(want[np.isfinite(want)]).max(initial=0.0)
            np.testing.assert_allclose(got, want, rtol=TORCH_RTOL, atol=TORCH_RTOL * scale,
                                       err_msg=what)

    a, b = read_run(whole), read_run(merged)
    assert a.header.runs == b.header.runs and a.header.task == b.header.task
    assert np.array_equal(a.steps, b.steps)
    for name in a.metrics:
        check(b.metrics[name], a.metrics[name], f"{merged.name} {name}")
    check(read_params(merged)[1], read_params(whole)[1], f"{merged.name} parameters")
    np.testing.assert_array_equal(a.failed_step, b.failed_step)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_three_shards_merged_equal_the_whole_sweep(tmp_path, backend, capsys):
    """On the C++ engine (auto, here) bit for bit, with shards on 1 and 2 threads
    beside a whole run on this process's one; on torch within its stated bound."""
    whole = tmp_path / "whole.h5"
    assert main(["sweep", *ARGS, "--backend", backend, "--out", str(whole)]) == 0
    out = tmp_path / "sharded.h5"
    # Shard 0 as torchrun rank 0, shards 1 and 2 as a Slurm array with ids 1..3.
    procs = [launch("sweep", out, {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, backend, threads=2),
             launch("sweep", out, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
                                   "SLURM_ARRAY_TASK_MIN": "1"}, backend, threads=1),
             launch("sweep", out, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3",
                                   "SLURM_ARRAY_TASK_MIN": "1"}, backend, threads=2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    shards = sorted(tmp_path.glob("sharded.shard*-of-3.h5"))
    assert len(shards) == 3
    merged = tmp_path / "merged.h5"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    assert_same_run(whole, merged, bitwise=backend != "torch")
    b = read_run(merged)
    assert b.header.shard is None and b.complete


def shard_files(tmp_path, count=3):
    out = tmp_path / "s.h5"
    for k in range(count):
        assert main(["sweep", *ARGS, "--backend", "torch", "--shard", f"{k}/{count}", "--out", str(out)]) == 0
    return sorted(tmp_path.glob("s.shard*.h5"))


def test_merge_rejects_missing_duplicated_and_mismatched_shards(tmp_path, capsys):
    shards = shard_files(tmp_path)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m1.h5"), str(shards[0]), str(shards[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are in no shard" in err[0]
    assert main(["merge", str(tmp_path / "m2.h5"), *map(str, shards), str(shards[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in both" in err[0]
    other = tmp_path / "other"
    other.mkdir()
    out = other / "s.h5"
    assert main(["sweep", *ARGS[:-1], "0.3,1", "--backend", "torch", "--shard", "0/3", "--out", str(out)]) == 0
    capsys.readouterr()
    foreign = sorted(other.glob("s.shard*.h5"))[0]
    assert main(["merge", str(tmp_path / "m3.h5"), str(foreign), *map(str, shards[1:])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different run list" in err[0]
    assert not any((tmp_path / f"m{i}.h5").exists() for i in (1, 2, 3))


def test_merge_rejects_an_unfinished_shard(tmp_path, capsys):
    shards = shard_files(tmp_path)
    with h5py.File(shards[1], "a") as f:
        f.attrs["complete"] = False
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m.h5"), *map(str, shards)]) == 2
    assert "finish it (rerun it with --resume)" in capsys.readouterr().err


def test_a_dead_shard_is_rerun_alone_with_resume(tmp_path, capsys):
    shards = shard_files(tmp_path)
    with h5py.File(shards[2], "a") as f:  # as if killed before its last write
        f.attrs["complete"] = False
    before = [s.read_bytes() for s in shards[:2]]
    assert main(["sweep", *ARGS, "--backend", "torch", "--shard", "2/3", "--resume",
                 "--out", str(tmp_path / "s.h5")]) == 0
    assert [s.read_bytes() for s in shards[:2]] == before
    assert main(["merge", str(tmp_path / "m.h5"), *map(str, shards)]) == 0


def test_too_many_shards_is_an_error(tmp_path, capsys):
    assert main(["sweep", *ARGS, "--shard", "12/13", "--out", str(tmp_path / "s.h5")]) == 2
    assert "gets no models" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sharded_ungrokking_merges_to_the_whole_run(tmp_path, capsys, backend):
    args = ["ungrok", "--preset", "cpu", "--p", "7", "--pretrain-steps", "15", "--steps", "10", "--quiet",
            "--no-plot", "--sizes", "10,20", "--seeds", "3", "--wd", "0.5,1", "--backend", backend]
    assert main([*args, "--out", str(tmp_path / "whole.h5")]) == 0
    for k in range(2):
        assert main([*args, "--shard", f"{k}/2", "--out", str(tmp_path / "u.h5")]) == 0
    shards = sorted(tmp_path.glob("u.shard*-of-2.h5"))
    assert main(["merge", str(tmp_path / "merged.h5"), *map(str, shards)]) == 0
    for whole, merged in (("whole.h5", "merged.h5"), ("whole.pretrain.h5", "merged.pretrain.h5")):
        assert_same_run(tmp_path / whole, tmp_path / merged, bitwise=backend == "cpu")
    a, b = read_run(tmp_path / "whole.h5").header.init_from, read_run(tmp_path / "merged.h5").header.init_from
    assert a["models"] == b["models"]
    if backend == "cpu":  # the continuations start from the pre-trained parameters, bit for bit
        assert a["sha256"] == b["sha256"]
