"""Finite record sets for fine-tuning and evaluation: read a whole file or shard folder, split it, save it.

Unlike pretraining streams these are small and held in memory. Every record is validated, and a bad
record is an error naming its file and index: a fine-tuning set of 50 structures cannot afford to lose one.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from mlfound.data.files import atomic_write_bytes
from mlfound.data.readers import BadRecord, SourceSpec, Unlabelled, read_entries
from mlfound.data.record import DataError, Record, validate_record
from mlfound.data.shards import MANIFEST_NAME
from mlfound.data.streams import TaskStream


def load_records(path: Path | str, task: str, **source_options) -> list[Record]:
    """Every record of a source file (any reader; ``source_options`` are SourceSpec fields such as
    ``energy_key``) or of a shard folder, validated, with ``task`` set to the head it is for. Structures the
    file has no label for at this LoT (NaN energies of an ANI-1x LoT) are not records of it: a warning counts them."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).exists():
            raise DataError(f"{path}: a folder without {MANIFEST_NAME}; give a data file or a task's shard folder")
        records = TaskStream(path, seed=0).rest_of_epoch()
    else:
        records, num_unlabelled = [], 0
        for entry in read_entries(SourceSpec(path=path, task=task, **source_options)):
            if isinstance(entry, BadRecord):
                raise entry
            num_unlabelled += isinstance(entry, Unlabelled)
            if isinstance(entry, Record):
                records.append(entry)
        if num_unlabelled:
            warnings.warn(f"{path}: {num_unlabelled} structures have no label at the LoT read for {task!r} "
                          f"(NaN energy) and are not part of it; {len(records)} records are", stacklevel=2)
    for rec in records:
        validate_record(rec)
        rec.task = task
    if not records:
        raise DataError(f"{path}: no records")
    return records


def split_records(records: list[Record], sizes: dict[str, int | None], seed: int) -> dict[str, list[Record]]:
    """Disjoint random subsets by name; one size may be None for "the rest". Same seed, same split."""
    rest = [name for name, size in sizes.items() if size is None]
    if len(rest) > 1:
        raise DataError(f"only one split can take the rest, got {rest}")
    fixed = sum(size for size in sizes.values() if size is not None)
    if fixed > len(records) or (rest and fixed == len(records)):
        raise DataError(f"{records[0].source}: {len(records)} records cannot fill the splits {sizes}")
    order = np.random.default_rng(seed).permutation(len(records))
    splits, start = {}, 0
    for name, size in sizes.items():
        size = len(records) - fixed if size is None else size
        splits[name] = [records[i] for i in order[start:start + size]]
        start += size
    return splits


def subset(records: list[Record], num: int, seed: int) -> list[Record]:
    """``num`` records drawn without replacement (a different seed gives a different subset)."""
    if num > len(records):
        raise DataError(f"asked for {num} records but {records[0].source} has only {len(records)}")
    return [records[i] for i in np.sort(np.random.default_rng(seed).permutation(len(records))[:num])]


def write_extxyz(records: list[Record], path: Path, info: dict | None = None) -> Path:
    """Records as one extxyz file (energies/forces in eV, eV/Å), each keeping its origin; atomic write."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for rec in records:
        atoms = Atoms(numbers=rec.z, positions=rec.pos_a, cell=rec.cell_a,
                      pbc=rec.pbc if rec.pbc is not None else False)
        atoms.info.update(info or {})
        atoms.info.update(origin_file=Path(rec.source).name, origin_index=rec.index)
        atoms.calc = SinglePointCalculator(atoms, energy=rec.energy_ev, forces=rec.forces_ev_a)
        frames.append(atoms)
    text = io.StringIO()
    write(text, frames, format="extxyz")
    return atomic_write_bytes(path, text.getvalue().encode())
