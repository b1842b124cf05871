"""Measure the input pipeline stage by stage: read+decode, + atom-budget batching, + neighbour lists.

Used by the data benchmark and the demo job. Stages run on fresh streams with the same seed, so
each sees the same records and the ratios between stages say where the time goes.
"""
from __future__ import annotations

import time
from pathlib import Path

from mlfound.data.batching import AtomBudgetBatcher, collate
from mlfound.data.streams import TaskStream

STAGES = ("read+decode", "+batching", "+neighbour lists")


def measure(task_dir: Path, rank: int, world_size: int, num_records: int, max_atoms: int,
            cutoff_a: float, seed: int = 0) -> dict[str, dict]:
    """Records/s and atoms/s of one rank's stream for each stage, over ``num_records`` records."""
    results = {}
    for stage in STAGES:
        stream = TaskStream(task_dir, seed=seed, rank=rank, world_size=world_size)
        batcher = AtomBudgetBatcher(stream, max_atoms, cutoff_a, [stream.task])
        records = atoms = edges = batches = 0
        start = time.perf_counter()
        while records < num_records:
            if stage == "read+decode":
                chunk = [next(stream)]
            else:
                chunk = batcher.next_records()
                batches += 1
                if stage == "+neighbour lists":
                    edges += collate(chunk, cutoff_a, [stream.task]).edge_index.shape[1]
            records += len(chunk)
            atoms += sum(r.num_atoms for r in chunk)
        seconds = time.perf_counter() - start
        results[stage] = {"records_per_s": records / seconds, "atoms_per_s": atoms / seconds,
                          "atoms_per_batch": atoms / batches if batches else None,
                          "edges_per_batch": edges / batches if edges else None}
    return results


def format_table(rows: list[tuple[str, int, dict[str, dict]]]) -> str:
    """rows: (task, rank, measure() result) -> a fixed-width table with stage ratios."""
    lines = [f"{'task':<12}{'rank':>5}  {'stage':<17}{'records/s':>10}{'atoms/s':>10}{'vs read':>8}"
             f"{'atoms/batch':>12}{'edges/batch':>12}"]
    for task, rank, result in rows:
        base = result[STAGES[0]]["records_per_s"]
        for stage, r in result.items():
            per_batch = "" if r["atoms_per_batch"] is None else f"{r['atoms_per_batch']:.0f}"
            edges = "" if r["edges_per_batch"] is None else f"{r['edges_per_batch']:.0f}"
            lines.append(f"{task:<12}{rank:>5}  {stage:<17}{r['records_per_s']:>10.0f}{r['atoms_per_s']:>10.0f}"
                         f"{r['records_per_s'] / base:>8.2f}{per_batch:>12}{edges:>12}")
    return "\n".join(lines)


def loader_pace(loader, task_of_step, batches_per_step: int, consumer_s: float, num_steps: int,
                warmup_steps: int = 2) -> dict[str, float]:
    """Batches/s a StepLoader delivers to a consumer that spends ``consumer_s`` per batch (sleeping, as a host
    does while an accelerator runs the step; 0 measures the loader alone) and the fraction of the time the
    consumer waited for data. The first steps (workers starting, first shard reads) are not timed."""
    def take(step: int) -> float:
        task, waited = task_of_step(step), 0.0
        for _ in range(batches_per_step):
            start = time.perf_counter()
            loader.next_batch(step, task)
            waited += time.perf_counter() - start
            time.sleep(consumer_s)
        return waited

    for step in range(warmup_steps):
        take(step)
    start = time.perf_counter()
    waited = sum(take(step) for step in range(warmup_steps, warmup_steps + num_steps))
    seconds = time.perf_counter() - start
    return {"batches_per_s": num_steps * batches_per_step / seconds, "data_wait": waited / seconds}
