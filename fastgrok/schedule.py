"""When a run is evaluated: densely early, then logarithmically spaced.

Grokking happens anywhere between 10^3 and 10^7 steps, and the curves of the
paper are read on a log step axis, so points are spread evenly in log(step):
every ``dense_every`` steps up to ``dense_until``, then ``per_decade`` points
per factor of ten. A run of 10^7 steps with the defaults stores 501 points
(100 dense + 4 decades x 100), 3*10^7 steps 549; a fixed interval would
store millions or miss the early transition.

The points are a pure function of the schedule and the run's length, so a
resumed run evaluates at exactly the steps an uninterrupted one does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalSchedule:
    """Evaluation steps of a run.

    dense_every: spacing of the early, linear phase (steps).
    dense_until: last step of the linear phase; it is one of its points.
    per_decade:  points per factor of ten in steps after ``dense_until``.
    Step 0 (the initialisation) and the run's last step are always evaluated.
    """

    dense_every: int = 10
    dense_until: int = 1000
    per_decade: int = 100

    def __post_init__(self):
        for name in ("dense_every", "dense_until", "per_decade"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"EvalSchedule.{name}={value!r}: must be a positive integer")

    def points(self, total_steps: int) -> np.ndarray:
        """Sorted, distinct evaluation steps (int64) of a run of ``total_steps`` steps."""
        if not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
            raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 0")
        dense = np.arange(0, min(self.dense_until, total_steps) + 1, self.dense_every, dtype=np.int64)
        log_points = np.empty(0, dtype=np.int64)
        if total_steps > self.dense_until:
            decades = np.log10(total_steps / self.dense_until)
            exponents = np.arange(1, int(np.ceil(decades * self.per_decade)) + 1) / self.per_decade
            log_points = np.round(self.dense_until * 10.0 ** exponents).astype(np.int64)
            log_points = log_points[(log_points > self.dense_until) & (log_points < total_steps)]
        return np.unique(np.concatenate([dense, log_points, np.array([total_steps], dtype=np.int64)]))


__all__ = ["EvalSchedule"]
