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
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)  # where in the file (HDF5 group, MPtrj
    # id) and what the file says of the structure (SPICE's smiles and subset); kept in the shards
    stress_ev_a3: np.ndarray | None = None  # (3, 3) float64 eV/Å³, ASE's sign (positive: tension); needs a 3-D cell

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
    if rec.pbc is not None and np.any(rec.pbc):
        _check_cell(rec)
    if rec.stress_ev_a3 is not None:
        _check_array(rec, "stress", rec.stress_ev_a3, (3, 3))
        periodic = rec.cell_a is not None and rec.pbc is not None and bool(np.all(rec.pbc))
        if not periodic or abs(np.linalg.det(rec.cell_a)) < 1e-6:
            raise DataError(f"{rec.where}: a stress label needs a cell periodic in all three directions with a "
                            f"volume (pbc {None if rec.pbc is None else rec.pbc.tolist()})")
    _check_distances(rec, min_distance_a)


def _check_cell(rec: Record) -> None:
    """A periodic direction needs a lattice vector, and the vectors must span a volume: a flat or missing cell
    would make every periodic image coincide (an ASE slab with vacuum still has a 3-D cell)."""
    if rec.cell_a is None:
        raise DataError(f"{rec.where}: periodic (pbc {rec.pbc.tolist()}) but has no cell")
    volume_a3 = abs(float(np.linalg.det(rec.cell_a)))
    if volume_a3 < 1e-6 * max(float(np.abs(rec.cell_a).max()), 1.0) ** 3:
        raise DataError(f"{rec.where}: the cell {rec.cell_a.tolist()} has volume {volume_a3:.2f} Å³: its lattice "
                        "vectors are linearly dependent or missing; give three independent vectors (a molecule: "
                        "pbc False)")


def _check_array(rec: Record, name: str, array: np.ndarray, shape: tuple) -> None:
    if array.shape != shape:
        raise DataError(f"{rec.where}: {name} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{rec.where}: {name} contain NaN or inf")


def close_pairs(rec: Record, within_a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of atoms nearer than ``within_a`` once (periodic images included), as arrays i, j and distance
    in Å. A neighbour list (vesin), so it costs O(num_atoms), not an N x N distance matrix."""
    import vesin

    periodic = rec.pbc if rec.pbc is not None else np.zeros(3, bool)
    box = rec.cell_a if rec.cell_a is not None and periodic.any() else np.zeros((3, 3))
    try:
        return vesin.NeighborList(cutoff=within_a, full_list=False).compute(
            points=rec.pos_a, box=box, periodic=periodic, quantities="ijd")
    except Exception as err:  # e.g. a degenerate periodic cell
        raise DataError(f"{rec.where}: cannot build a neighbour list ({err}); check the cell and positions") from err


def closest_pair(rec: Record, within_a: float) -> tuple[int, int, float] | None:
    """The closest pair of atoms nearer than ``within_a`` (periodic images included), as (i, j, distance Å)
    with i <= j (i == j: an atom and its own periodic image); None when no pair is that close."""
    i, j, d = close_pairs(rec, within_a)
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    return int(min(i[k], j[k])), int(max(i[k], j[k])), float(d[k])


def _check_distances(rec: Record, min_distance_a: float) -> None:
    pair = closest_pair(rec, min_distance_a) if min_distance_a > 0 else None
    if pair is not None:
        i, j, distance = pair
        raise DataError(f"{rec.where}: atoms {i} and {j} are {distance:.3f} Å apart "
                        f"(< {min_distance_a} Å): overlapping atoms")
