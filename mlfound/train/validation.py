"""Distributed validation: each rank evaluates its disjoint share of every task's validation split
once; ``mlfound.metrics.error_table`` all-reduces the sums, so every record counts exactly once."""
from __future__ import annotations

from pathlib import Path

from mlfound.data.batching import GraphBatch, atom_budget_batches, collate
from mlfound.data.streams import TaskStream


def validation_batches(val_dirs: dict[str, Path], task_names: list[str], cutoff_a: float, max_atoms: int,
                       rank: int, world_size: int) -> dict[str, list[GraphBatch]]:
    """This rank's disjoint share of every task's validation split, batched with neighbour lists.
    Built once per run: the validation set does not change between evaluations."""
    batches = {}
    for task, val_dir in val_dirs.items():
        records = TaskStream(val_dir, seed=0, rank=rank, world_size=world_size).rest_of_epoch()
        batches[task] = [collate(chunk, cutoff_a, task_names) for chunk in atom_budget_batches(records, max_atoms)]
    return batches
