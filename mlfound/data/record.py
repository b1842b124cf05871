"""One labelled structure, in eV and Å, with the file and index it came from."""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_ATOMIC_NUMBER = 118
DEFAULT_MIN_DISTANCE_A = 0.5  # closer atoms are a broken geometry, not chemistry


class DataError(ValueError):
    """Bad input data; the message names the file, the record index and what is wrong."""


@dataclasses.dataclass
class Record:
    z: np.ndarray  # (num_atoms,) int64 atomic numbers
    pos_a: np.ndarray  # (num_atoms, 3) float64 Å
    energy_ev: float  # total energy, float64
    forces_ev_a: np.ndarray | None = None  # (num_atoms, 3) float64 eV/Å, None when the source has none
    cell_a: np.ndarray | None = None  # (3, 3) float64 Å, rows are lattice vectors
    pbc: np.ndarray | None = None  # (3,) bool
    task: str = ""  # level-of-theory task name
    source: str = ""  # file the record came from
    index: int = -1  # index of the record in that file

    @property
    def num_atoms(self) -> int:
        return len(self.z)

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index}"


def validate_record(rec: Record, min_distance_a: float = DEFAULT_MIN_DISTANCE_A) -> None:
    """Raise DataError naming the record if any field is malformed or unphysical."""
    n = rec.z.shape[0] if rec.z.ndim == 1 else -1
    if n <= 0:
        raise DataError(f"{rec.where}: atomic numbers must be a non-empty 1-D array, got shape {rec.z.shape}")
    if rec.z.min() < 1 or rec.z.max() > MAX_ATOMIC_NUMBER:
        raise DataError(f"{rec.where}: unknown element, atomic numbers {sorted(set(rec.z.tolist()))} "
                        f"must lie in 1..{MAX_ATOMIC_NUMBER}")
    _check_array(rec, "positions", rec.pos_a, (n, 3))
    if rec.energy_ev is None:
        raise DataError(f"{rec.where}: missing energy")
    if not np.isfinite(rec.energy_ev):
        raise DataError(f"{rec.where}: energy is {rec.energy_ev}")
    if rec.forces_ev_a is not None:
        _check_array(rec, "forces", rec.forces_ev_a, (n, 3))
    if rec.cell_a is not None:
        _check_array(rec, "cell", rec.cell_a, (3, 3))
    _check_distances(rec, min_distance_a)


def _check_array(rec: Record, name: str, array: np.ndarray, shape: tuple) -> None:
    if array.shape != shape:
        raise DataError(f"{rec.where}: {name} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{rec.where}: {name} contain NaN or inf")


def _check_distances(rec: Record, min_distance_a: float) -> None:
    """Non-periodic check of the closest pair; periodic images are checked by the neighbour list later."""
    if rec.num_atoms < 2:
        return
    diff = rec.pos_a[:, None, :] - rec.pos_a[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    if dist[i, j] < min_distance_a:
        raise DataError(f"{rec.where}: atoms {min(i, j)} and {max(i, j)} are {dist[i, j]:.3f} Å apart "
                        f"(< {min_distance_a} Å): overlapping atoms")
