"""What a split's manifest says about its records: sums and moments, never per-record lists.

Gathered per shard while it is written (the references are fitted by then, so residuals are exact, not
a difference of large sums) and merged in shard order, so memory does not grow with the corpus and every
number is a pure function of the sources and options, whatever the number of worker processes.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from mlfound.data.record import DataError, Record, close_pairs
from mlfound.data.references import ReferenceFit, reference_energy

# Neighbour counts per distance bin, so a model's ``avg_num_neighbors`` can be counted for any cutoff up to
# NEIGHBOUR_RADIUS_A from the manifests alone (MACE and NequIP count it from the training data at the cutoff).
NEIGHBOUR_BIN_A = 0.05
NEIGHBOUR_RADIUS_A = 8.0
NUM_NEIGHBOUR_BINS = round(NEIGHBOUR_RADIUS_A / NEIGHBOUR_BIN_A)


@dataclasses.dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of numbers (Welford; merged as Chan et al.)."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def merge(self, other: Moments) -> None:
        if other.count == 0:
            return
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / count
        self.m2 += other.m2 + delta**2 * self.count * other.count / count
        self.count = count

    @property
    def std(self) -> float:
        """Population standard deviation, as ``numpy.std``."""
        return float(np.sqrt(self.m2 / self.count))


class SplitStats:
    """The manifest's statistics of one split (or one shard of it), given the split's fitted references."""

    def __init__(self) -> None:
        self.num_records = 0
        self.num_atoms_total = 0
        self.atom_hist: collections.Counter = collections.Counter()
        self.element_atoms: collections.Counter = collections.Counter()
        self.num_with_forces = 0
        self.num_with_stress = 0
        self.force_sq_sum = 0.0
        self.num_force_components = 0
        self.energy_ev = Moments()
        self.residual_sq_sum = 0.0  # residual: energy minus the sum of the atoms' reference energies
        self.residual_per_atom_ev = Moments()
        # ordered pairs (i sees j, j sees i) per distance bin [k·bin, (k+1)·bin), periodic images included
        self.neighbour_pairs = np.zeros(NUM_NEIGHBOUR_BINS, np.int64)

    def add(self, rec: Record, refs_ev: dict[int, float]) -> None:
        self.num_records += 1
        self.num_atoms_total += rec.num_atoms
        self.atom_hist[rec.num_atoms] += 1
        self.element_atoms.update(rec.z.tolist())
        if rec.forces_ev_a is not None:
            self.num_with_forces += 1
            self.force_sq_sum += float((rec.forces_ev_a**2).sum())
            self.num_force_components += rec.forces_ev_a.size
        self.num_with_stress += rec.stress_ev_a3 is not None
        self.energy_ev.add(rec.energy_ev)
        residual_ev = rec.energy_ev - reference_energy(rec.z, refs_ev)
        self.residual_sq_sum += residual_ev**2
        self.residual_per_atom_ev.add(residual_ev / rec.num_atoms)
        distance_a = close_pairs(rec, NEIGHBOUR_RADIUS_A)[2]
        bins = np.minimum((distance_a / NEIGHBOUR_BIN_A).astype(np.int64), NUM_NEIGHBOUR_BINS - 1)
        self.neighbour_pairs += 2 * np.bincount(bins, minlength=NUM_NEIGHBOUR_BINS)

    def merge(self, other: SplitStats) -> None:
        self.num_records += other.num_records
        self.num_atoms_total += other.num_atoms_total
        self.atom_hist.update(other.atom_hist)
        self.element_atoms.update(other.element_atoms)
        self.num_with_forces += other.num_with_forces
        self.num_with_stress += other.num_with_stress
        self.force_sq_sum += other.force_sq_sum
        self.num_force_components += other.num_force_components
        self.energy_ev.merge(other.energy_ev)
        self.residual_sq_sum += other.residual_sq_sum
        self.residual_per_atom_ev.merge(other.residual_per_atom_ev)
        self.neighbour_pairs += other.neighbour_pairs

    def summary(self, fit: ReferenceFit, refs_ev: dict[int, float], notes: list[str]) -> dict:
        return {
            "num_atoms_total": self.num_atoms_total,
            "atom_count_histogram": {str(k): v for k, v in sorted(self.atom_hist.items())},
            "element_counts": {str(k): v for k, v in sorted(self.element_atoms.items())},
            "element_structure_counts": {str(z): int(fit.structures_with[z]) for z in refs_ev},
            "references_ev": {str(z): e for z, e in refs_ev.items()},
            "reference_notes": notes,
            "num_with_forces": self.num_with_forces,
            "num_with_stress": self.num_with_stress,
            "neighbour_pairs": {"bin_a": NEIGHBOUR_BIN_A, "counts": self.neighbour_pairs.tolist()},
            "stats": {
                "energy_mean_ev": self.energy_ev.mean, "energy_std_ev": self.energy_ev.std,
                "residual_rms_ev": float(np.sqrt(self.residual_sq_sum / self.num_records)),
                "residual_per_atom_std_ev": self.residual_per_atom_ev.std,
                "forces_rms_ev_a": (float(np.sqrt(self.force_sq_sum / self.num_force_components))
                                    if self.num_force_components else None),
            },
        }


def mean_neighbours(manifests: dict[str, dict], cutoff_a: float) -> float:
    """Neighbours per atom within ``cutoff_a``, over every atom of the manifests' records: the sum a
    message-passing layer adds up, so its ``1/sqrt`` keeps the layer's output of order one on this data.
    Linear within the distance bin that holds the cutoff (exact when the cutoff is a multiple of the bin)."""
    missing = [task for task, m in manifests.items() if "neighbour_pairs" not in m]
    if missing:
        raise DataError(f"the manifests of tasks {missing} have no neighbour counts (written by mlfound-shard 0.4 "
                        "or older): re-run `mlfound shard` on their sources, or set model.avg_num_neighbors")
    if cutoff_a > NEIGHBOUR_RADIUS_A:
        raise DataError(f"a manifest counts neighbours up to {NEIGHBOUR_RADIUS_A} Å, not to the model's cutoff "
                        f"{cutoff_a} Å: set model.avg_num_neighbors")
    pairs, atoms = 0.0, 0
    for manifest in manifests.values():
        counts = np.asarray(manifest["neighbour_pairs"]["counts"], dtype=np.float64)
        edge = cutoff_a / manifest["neighbour_pairs"]["bin_a"]
        whole = min(int(edge), len(counts))
        pairs += counts[:whole].sum() + (edge - whole) * (counts[whole] if whole < len(counts) else 0.0)
        atoms += manifest["num_atoms_total"]
    if pairs == 0:
        raise DataError(f"no atom of tasks {list(manifests)} has a neighbour within {cutoff_a} Å: the cutoff is "
                        "too small for this data")
    return pairs / atoms
