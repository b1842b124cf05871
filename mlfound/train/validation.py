"""Distributed validation: each rank evaluates its disjoint share of every task's validation split
once; ``mlfound.metrics.error_table`` all-reduces the sums, so every record counts exactly once. A
split smaller than the world leaves some ranks without a share: they evaluate nothing but still take
part in the all-reduce."""
from __future__ import annotations

from pathlib import Path

from mlfound.data.batching import GraphBatch, atom_budget_batches, collate
from mlfound.data.streams import TaskStream


def validation_batches(val_dirs: dict[str, Path], task_names: list[str], cutoff_a: float, max_atoms: int,
                       rank: int, world_size: int, shard_url_template: str | None = None
                       ) -> dict[str, list[GraphBatch]]:
    """This rank's disjoint share of every task's validation split, batched with neighbour lists.
    Built once, before training: the validation set does not change between evaluations, and a corrupt
    shard (checked on every rank, so all ranks stop alike) is a DataError before any training step."""
    batches = {}
    for task, val_dir in val_dirs.items():
        stream = TaskStream(val_dir, seed=0, rank=rank, world_size=world_size,
                            shard_url_template=shard_url_template, disjoint=True)
        stream.verify()
        records = stream.rest_of_epoch()
        batches[task] = [collate(chunk, cutoff_a, task_names) for chunk in atom_budget_batches(records, max_atoms)]
    return batches
