"""Tasks against direct Python definitions; splits and labels per SPEC."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastgrok.config import TaskConfig
from fastgrok.tasks import MODULAR_OPS, S5, Task

# Each operation written the obvious way on Python ints, independently of
# fastgrok.tasks (which works on numpy arrays).
DIRECT = {
    "x+y": lambda x, y, p: (x + y) % p,
    "x-y": lambda x, y, p: (x - y) % p,
    "x*y": lambda x, y, p: (x * y) % p,
    "x/y": lambda x, y, p: next(c for c in range(p) if (c * y) % p == x),
    "x^2+y^2": lambda x, y, p: (x**2 + y**2) % p,
    "x^2+xy+y^2": lambda x, y, p: (x**2 + x * y + y**2) % p,
    "x^2+xy+y^2+x": lambda x, y, p: (x**2 + x * y + y**2 + x) % p,
    "x^3+xy": lambda x, y, p: (x**3 + x * y) % p,
    "x^3+xy^2+y": lambda x, y, p: (x**3 + x * y**2 + y) % p,
}


@pytest.mark.parametrize("op", list(MODULAR_OPS))
@pytest.mark.parametrize("p", [7, 11])
def test_modular_tasks_match_direct_definition(op, p):
    task = Task(TaskConfig(op, p))
    pairs = [(x, y) for x in range(p) for y in range(p) if not (op == "x/y" and y == 0)]
    assert task.n_pairs == len(pairs) == TaskConfig(op, p).n_pairs
    for i, (x, y) in enumerate(pairs):
        assert (task.x[i], task.y[i]) == (x, y)
        assert task.labels[i] == DIRECT[op](x, y, p), (op, x, y)
        assert list(task.tokens[i]) == [x, p, y, p + 1]


def test_large_p_does_not_overflow():
    p = 2003
    task = Task(TaskConfig("x^3+xy^2+y", p))
    i = task.n_pairs - 1  # x = y = p - 1
    assert task.labels[i] == ((p - 1) ** 3 + (p - 1) ** 3 + (p - 1)) % p


def test_division_needs_prime_and_skips_zero():
    with pytest.raises(ValueError, match="p=12.*prime"):
        TaskConfig("x/y", 12)
    task = Task(TaskConfig("x/y", 13))
    assert (task.y != 0).all() and task.n_pairs == 13 * 12
    assert ((task.labels * task.y) % 13 == task.x).all()


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="'x%y'.*valid tasks"):
        TaskConfig("x%y", 7)


def _perm_compose(a, b):
    return tuple(a[b[i]] for i in range(5))


def _perm_inverse(a):
    inv = [0] * 5
    for i, ai in enumerate(a):
        inv[ai] = i
    return tuple(inv)


@pytest.mark.parametrize("op", ["S5:x*y", "S5:x*y*x^-1", "S5:x*y*x"])
def test_s5_tasks(op):
    task = Task(TaskConfig(op))
    perms = list(itertools.permutations(range(5)))
    assert task.cfg.n == 120 and task.cfg.d_vocab == 122 and task.n_pairs == 14400
    index = {p: i for i, p in enumerate(perms)}
    rng = np.random.default_rng(0)
    for i in rng.choice(task.n_pairs, 300, replace=False):
        a, b = perms[task.x[i]], perms[task.y[i]]
        expected = {
            "S5:x*y": _perm_compose(a, b),
            "S5:x*y*x^-1": _perm_compose(_perm_compose(a, b), _perm_inverse(a)),
            "S5:x*y*x": _perm_compose(_perm_compose(a, b), a),
        }[op]
        assert task.labels[i] == index[expected]


def test_s5_is_a_group():
    c = S5.compose
    assert len({tuple(e) for e in S5.elements}) == 120
    a, b, d = np.meshgrid(np.arange(120), np.arange(120), np.arange(0, 120, 7), indexing="ij")
    assert (c[c[a, b], d] == c[a, c[b, d]]).all()  # associativity
    assert (c[np.arange(120), S5.inverse] == 0).all() and (c[0] == np.arange(120)).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d_small=st.integers(1, 120), extra=st.integers(0, 48))
def test_splits_are_deterministic_and_nested(seed, d_small, extra):
    task = Task(TaskConfig("x-y", 13))
    small, large = task.split(seed, d_small), task.split(seed, d_small + extra)
    again = task.split(seed, d_small)
    assert np.array_equal(small.train_idx, again.train_idx)
    assert np.array_equal(large.train_idx[:d_small], small.train_idx)
    assert len(np.intersect1d(small.train_idx, small.test_idx)) == 0
    assert len(small.train_idx) + len(small.test_idx) == task.n_pairs
    assert np.array_equal(small.train_labels, task.labels[small.train_idx])
    assert np.array_equal(small.test_labels, task.labels[small.test_idx])


def test_different_seeds_give_different_splits():
    task = Task(TaskConfig("x+y", 13))
    assert not np.array_equal(task.split(0, 50).train_idx, task.split(1, 50).train_idx)


def test_random_labels_are_seeded_nested_and_only_on_train():
    task = Task(TaskConfig("x+y", 31))
    a, b = task.split(3, 200, random_labels=True), task.split(3, 300, random_labels=True)
    assert np.array_equal(b.train_labels[:200], a.train_labels)
    assert np.array_equal(a.test_labels, task.labels[a.test_idx])
    assert (a.train_labels != task.labels[a.train_idx]).mean() > 0.9  # ~1 - 1/31
    counts = np.bincount(task.split(4, task.n_pairs, random_labels=True).train_labels, minlength=31)
    assert counts.min() > 0.5 * task.n_pairs / 31  # roughly uniform over the 31 classes


@pytest.mark.parametrize("bad", [0, -3, 170, 1.5])
def test_bad_training_size_is_named(bad):
    task = Task(TaskConfig("x+y", 13))
    with pytest.raises(ValueError, match=f"{bad!r}.*1..169"):
        task.split(0, bad)
