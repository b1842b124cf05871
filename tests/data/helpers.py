"""Shared helpers for data tests: shard a slice of the real demo corpus."""
from pathlib import Path

from ase.io import read, write

from mlfound.data.readers import SourceSpec
from mlfound.data.shards import ShardOptions, shard_task


def demo_slice(demo_dir: Path, task: str, num: int, out: Path) -> Path:
    """First ``num`` records of a demo task as a new extxyz file."""
    path = out / f"{task}.extxyz"
    write(path, read(demo_dir / f"{task}.extxyz", index=f":{num}"), format="extxyz")
    return path


def shard(path: Path, out: Path, task: str | None = None, **options) -> dict:
    task = task or path.stem
    return shard_task(task, [SourceSpec(path=path, task=task)], out, ShardOptions(**options), progress=False)
