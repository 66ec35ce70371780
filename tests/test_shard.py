"""Partitioning an experiment across launchers' processes."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from fastgrok.shard import Shard, local_device, partition, shard_from_env


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.integers(1, 10_000), min_size=1, max_size=40), count=st.integers(1, 7))
def test_partition_covers_every_model_once_and_is_balanced(costs, count):
    shards = partition(costs, count)
    assert sorted(itertools.chain(*shards)) == list(range(len(costs)))
    assert partition(costs, count) == shards  # deterministic
    loads = [sum(costs[m] for m in s) for s in shards]
    # LPT bound: the largest load is at most the mean load plus the largest single cost.
    assert max(loads) <= sum(costs) / count + max(costs)


def test_partition_balances_by_cost_not_count():
    # One model as expensive as the four others together gets a shard of its own.
    assert partition([4, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]


def test_groups_stay_together():
    groups = [0, 0, 1, 1, 2, 2]
    shards = partition([5, 1, 3, 3, 1, 1], 2, groups)
    assert sorted(itertools.chain(*shards)) == list(range(6))
    for s in shards:
        for m in s:
            assert all(other in s for other in range(6) if groups[other] == groups[m])


@pytest.mark.parametrize("text, message", [("3/3", "K=3 must be in 0..2"), ("0/0", "N=0 must be >= 1"),
                                           ("a/b", "expected K/N"), ("1", "expected K/N")])
def test_bad_shard_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        Shard.parse(text)


def test_launcher_environments():
    assert shard_from_env({}) is None
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == Shard(2, 4)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "6",
                           "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(4, 6)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(0, 3)
    assert local_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert local_device("cpu", {"LOCAL_RANK": "3"}) == "cpu"
    assert local_device("cuda:1", {"LOCAL_RANK": "3"}) == "cuda:1"
