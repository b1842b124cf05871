"""Which task each rank trains on at each outer step.

p_i ∝ n_i^(1/T): T = 1 is size-proportional, T → ∞ uniform, T = 2 is JMP's choice. A draw is a
pure function of (seed, step, rank), so the sampler has no state to save and resume is exact.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = ("uniform", "proportional", "temperature")


class TaskSampler:
    def __init__(self, task_sizes: dict[str, int], strategy: str = "temperature", temperature: float = 2.0,
                 seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "temperature" and temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        empty = [t for t, n in task_sizes.items() if n <= 0]
        if empty:
            raise ValueError(f"tasks {empty} have no records to sample from")
        self.task_names = list(task_sizes)
        sizes = np.array([task_sizes[t] for t in self.task_names], np.float64)
        exponent = {"uniform": 0.0, "proportional": 1.0, "temperature": 1.0 / temperature}[strategy]
        weights = sizes**exponent
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def draw(self, step: int, rank: int) -> str:
        rng = np.random.default_rng([self.seed, step, rank])
        return self.task_names[int(rng.choice(len(self.task_names), p=self.probabilities))]
