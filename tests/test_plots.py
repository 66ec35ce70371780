"""Figure functions: files written from synthetic arrays, clear errors, hand-checked bucketing."""
import numpy as np
import pytest

from fastgrok import plots
from fastgrok.toy import simulate, TABLE_1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_figure_files(paths, out_prefix):
    png, pdf = paths
    assert png == out_prefix.with_name(out_prefix.name + ".png")
    assert pdf == out_prefix.with_name(out_prefix.name + ".pdf")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_training_curves(tmp_path):
    steps = np.array([0, 1, 10, 100, 1000, 10_000], dtype=float)  # step 0 is dropped on the log axis
    acc_train = np.array([0.0, 0.1, 0.9, 1.0, 1.0, 1.0])
    acc_test = np.array([0.0, 0.0, 0.01, np.nan, 0.5, 1.0])
    prefix = tmp_path / "deep" / "fig1"
    paths = plots.plot_training_curves(steps, acc_train, acc_test, prefix, train_loss=np.geomspace(5, 1e-8, 6),
                                       test_loss=np.geomspace(5, 1e-3, 6), param_norm=np.linspace(50, 30, 6))
    assert_figure_files(paths, prefix)


def test_trailing_extension_on_prefix_is_dropped(tmp_path):
    steps = np.array([1.0, 10.0])
    png, pdf = plots.plot_training_curves(steps, [0.0, 1.0], [0.0, 0.5], tmp_path / "fig.png")
    assert (png.name, pdf.name) == ("fig.png", "fig.pdf")


def test_training_curves_all_nan_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no finite point"):
        plots.plot_training_curves([1.0, 2.0], [np.nan, np.nan], [np.nan, np.nan], tmp_path / "x")
    with pytest.raises(ValueError, match="steps has 3 points but train accuracy has 2"):
        plots.plot_training_curves([1.0, 2.0, 3.0], [0.0, 1.0], [0.0, 1.0], tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_toy(tmp_path):
    result = dict(zip("abc", simulate([TABLE_1[n] for n in "abc"], 300)))
    prefix = tmp_path / "fig2"
    assert_figure_files(plots.plot_toy(result, prefix), prefix)


def test_toy_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty result"):
        plots.plot_toy({}, tmp_path / "x")
    column = simulate([TABLE_1["a"]], 5)[0]
    del column["w_mem"]
    with pytest.raises(ValueError, match=r"column 'a' lacks \['w_mem'\]"):
        plots.plot_toy({"a": column}, tmp_path / "x")


def test_geometric_buckets_by_hand():
    # 2 buckets over [1, 16]: edges 1, 4, 16; 4 belongs to the upper bucket, 16 (the maximum) too.
    buckets = plots.geometric_buckets(np.array([1.0, 2.0, 3.99, 4.0, 8.0, 16.0]), 2)
    np.testing.assert_allclose(buckets.edges, [1.0, 4.0, 16.0])
    np.testing.assert_array_equal(buckets.index, [0, 0, 0, 1, 1, 1])
    single = plots.geometric_buckets(np.array([3.0, 3.0]), 6)
    assert single.count == 1 and single.index.tolist() == [0, 0]
    with pytest.raises(ValueError, match="positive"):
        plots.geometric_buckets(np.array([1.0, -2.0]), 2)
    with pytest.raises(ValueError, match="n_buckets=0"):
        plots.geometric_buckets(np.array([1.0, 2.0]), 0)


def test_isologit_curves_by_hand():
    # Logits 1..27 in 3 geometric buckets: edges 1, 3, 9, 27.
    logit = np.array([1.0, 2.0, 2.5, 3.0, 5.0, 9.0, 27.0, -1.0, np.nan])
    norm = np.array([10.0, 20.0, 30.0, 40.0, 60.0, 70.0, 80.0, 99.0, 99.0])
    D = np.array([100, 100, 200, 100, 200, 300, 300, 100, 100])
    curves = plots.isologit_curves(logit, norm, D, n_buckets=3)
    # bucket [1, 3): logits 1, 2 (D 100) -> mean norm 15; 2.5 (D 200) -> 30
    # bucket [3, 9): 3 (D 100) -> 40; 5 (D 200) -> 60
    # bucket [9, 27]: 9 and 27 (D 300) -> 75. The logit -1 and the NaN row are left out.
    assert [(c.logit_low, c.logit_high) for c in curves] == [pytest.approx((1, 3)), pytest.approx((3, 9)),
                                                               pytest.approx((9, 27))]
    assert [c.D.tolist() for c in curves] == [[100, 200], [100, 200], [300]]
    assert [c.mean_param_norm.tolist() for c in curves] == [[15.0, 30.0], [40.0, 60.0], [75.0]]
    assert [c.n_runs.tolist() for c in curves] == [[2, 1], [1, 1], [2]]


def test_isologit_curves_need_a_positive_logit():
    with pytest.raises(ValueError, match="no positive correct logit"):
        plots.isologit_curves([-1.0, 0.0], [1.0, 2.0], [10, 20])


def test_efficiency(tmp_path, rng):
    n = 60
    D_mem = rng.choice([50, 200, 800, 3200], n).astype(float)
    norm_mem = rng.uniform(20, 60, n)
    mem = dict(logit=norm_mem**2 / D_mem, param_norm=norm_mem, D=D_mem)
    mem["logit"][:3] = [np.nan, -0.5, 0.0]  # failed runs and non-positive logits are left out
    norm_gen = rng.uniform(20, 40, n)
    gen = dict(logit=(norm_gen / 10) ** 2, param_norm=norm_gen, D=rng.choice([4000, 8000], n).astype(float))
    prefix = tmp_path / "fig3"
    assert_figure_files(plots.plot_efficiency(mem, gen, prefix), prefix)
    only_gen = tmp_path / "fig3_gen"
    assert_figure_files(plots.plot_efficiency(None, gen, only_gen), only_gen)


def test_efficiency_bad_input(tmp_path):
    with pytest.raises(ValueError, match="both mem and gen are None"):
        plots.plot_efficiency(None, None, tmp_path / "x")
    with pytest.raises(ValueError, match="'param_norm'"):
        plots.plot_efficiency(dict(logit=[1.0], D=[1.0]), None, tmp_path / "x")
    with pytest.raises(ValueError, match=r"differ in length \{'logit': 2, 'param_norm': 1, 'D': 1\}"):
        plots.plot_efficiency(dict(logit=[1.0, 2.0], param_norm=[1.0], D=[1.0]), None, tmp_path / "x")
    with pytest.raises(ValueError, match="no row with finite"):
        plots.plot_efficiency(dict(logit=[], param_norm=[], D=[]), None, tmp_path / "x")


def test_ungrokking(tmp_path, rng):
    d_prime = np.repeat([300.0, 600.0, 900.0, 1200.0], 6)
    wd = np.tile(np.repeat([0.3, 1.0, 3.0], 2), 4)
    acc = np.clip((d_prime - 500) / 500 + rng.normal(0, 0.05, d_prime.size), 0, 1)
    acc[0] = np.nan
    prefix = tmp_path / "fig4"
    assert_figure_files(plots.plot_ungrokking(d_prime, acc, wd, prefix), prefix)
    with pytest.raises(ValueError, match="no row with finite"):
        plots.plot_ungrokking([], [], [], tmp_path / "x")


def test_sweep(tmp_path, rng):
    steps = np.concatenate([[0.0], np.geomspace(1, 1e6, 50)])
    final = rng.uniform(0, 1, 12)
    acc = final[:, None] / (1 + np.exp(-(np.log(steps + 1)[None] - rng.uniform(5, 12, (12, 1)))))
    acc[3, 30:] = np.nan  # a run that stopped early
    acc[4] = np.nan  # a run with no evaluation at all is skipped
    prefix = tmp_path / "fig5"
    assert_figure_files(plots.plot_sweep(steps, acc, prefix), prefix)
    per_run = tmp_path / "fig5_per_run_steps"
    assert_figure_files(plots.plot_sweep(np.tile(steps, (12, 1)), acc, per_run, final_acc=final), per_run)


def test_sweep_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(0, 3\)"):
        plots.plot_sweep([1.0, 2.0, 3.0], np.empty((0, 3)), tmp_path / "x")
    with pytest.raises(ValueError, match="steps has shape"):
        plots.plot_sweep([1.0, 2.0], np.zeros((2, 3)), tmp_path / "x")
    with pytest.raises(ValueError, match="none of the 2 runs"):
        plots.plot_sweep([1.0, 2.0], np.full((2, 2), np.nan), tmp_path / "x")


@pytest.mark.parametrize("with_negative_ratio", [False, True])
def test_logit_ratio(tmp_path, rng, with_negative_ratio):
    D = np.repeat([400.0, 700.0, 1000.0, 1300.0], 8)
    norm = rng.uniform(20, 60, D.size)
    ratio = np.exp((D - 800) / 100) * norm / 40
    if with_negative_ratio:
        ratio[:4] = -ratio[:4]  # a negative C_mem correct logit (Appendix B)
    prefix = tmp_path / f"fig10_{with_negative_ratio}"
    paths = plots.plot_logit_ratio(D, ratio, np.clip(ratio / (1 + ratio), 0, 1), norm, prefix)
    assert_figure_files(paths, prefix)


def test_logit_ratio_bad_input(tmp_path):
    with pytest.raises(ValueError, match="parameter norms must be > 0"):
        plots.plot_logit_ratio([1.0], [1.0], [0.5], [0.0], tmp_path / "x")
    with pytest.raises(ValueError, match="no row with finite"):
        plots.plot_logit_ratio([1.0], [np.nan], [0.5], [1.0], tmp_path / "x")
