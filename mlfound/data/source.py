"""What a reader is asked to read (SourceSpec) and what it yields besides Records (BadRecord, Unlabelled).

Its own module so that the ASE readers (readers.py) and the public array layouts (layouts.py) share it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mlfound.data.record import DataError


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where one source file is and how to read its labels."""
    path: Path
    task: str
    format: str = "auto"  # a key of readers.READERS ("extxyz", "ase", "npz", "hdf5", "spice", ...) or "auto"
    energy_key: str = "energy"
    forces_key: str | None = "forces"  # None: energy-only data
    energy_unit: str | None = None  # None: each frame's energy_unit info key (extxyz), else eV
    length_unit: str | None = None  # None: each frame's length_unit info key (extxyz), else Å
    forces_are_gradient: bool = False  # the forces key holds dE/dx (SPICE's dft_total_gradient): forces are minus it
    nan_is_unlabelled: bool = False  # a NaN energy means "no label at this LoT" (ANI-1x), not a broken record
    stress_key: str | None = "stress"  # None: ignore stress; ASE sources fall back to the "virial" info key
    stress_unit: str | None = None  # GPa or kBar; None: energy unit / length unit³
    stress_positive_is_compression: bool = False  # VASP's sign (MPtrj): the stress read is minus the file's


class BadRecord(DataError):
    """A record that cannot be read, yielded in its place so that reading goes on with the next one."""

    def __init__(self, source, index: int, reason: str):
        super().__init__(f"{source} record {index}: {reason}")
        self.index = index


@dataclasses.dataclass(frozen=True)
class Unlabelled:
    """A structure the file has no label for at the task's LoT (a NaN energy in a ``nan_is_unlabelled`` source):
    not a record of the task and not a bad record. Yielded in its place so that it is counted, never lost."""
    source: str
    index: int
