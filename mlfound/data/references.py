"""Per-element linear reference energies, E ≈ Σ_atoms e_Z, by least squares in float64.

The normal equations (CᵀC) e = Cᵀ E over element-count rows C are accumulated in one streaming
pass, so a corpus of any size needs memory only for the (num_elements)² matrix; accumulators of
parts of a corpus (one per source file, in worker processes) are merged. These references
make levels of theory with wildly different absolute energies trainable together.
"""
from __future__ import annotations

import numpy as np

from mlfound.data.record import DataError

NUM_Z = 119
MIN_STRUCTURES_PER_ELEMENT = 3


class ReferenceFit:
    """Streaming accumulator of the normal equations; ``solve()`` gives {Z: e_Z in eV}."""

    def __init__(self) -> None:
        self.ctc = np.zeros((NUM_Z, NUM_Z), np.float64)
        self.cte = np.zeros(NUM_Z, np.float64)
        self.structures_with = np.zeros(NUM_Z, np.int64)
        self.num_structures = 0

    def add(self, z: np.ndarray, energy_ev: float) -> None:
        counts = np.bincount(z, minlength=NUM_Z).astype(np.float64)
        present = np.nonzero(counts)[0]
        self.ctc[np.ix_(present, present)] += np.outer(counts[present], counts[present])
        self.cte[present] += counts[present] * energy_ev
        self.structures_with[present] += 1
        self.num_structures += 1

    def merge(self, other: ReferenceFit) -> None:
        """Add the sums of another part of the corpus (merge parts in a fixed order: float sums depend on it)."""
        self.ctc += other.ctc
        self.cte += other.cte
        self.structures_with += other.structures_with
        self.num_structures += other.num_structures

    def __getstate__(self) -> dict:
        """Pickled with the elements present only: a few numbers, not 119², per result of a worker process."""
        present = np.nonzero(self.structures_with)[0]
        return {"present": present, "ctc": self.ctc[np.ix_(present, present)], "cte": self.cte[present],
                "structures_with": self.structures_with[present], "num_structures": self.num_structures}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        present = state["present"]
        self.ctc[np.ix_(present, present)] = state["ctc"]
        self.cte[present] = state["cte"]
        self.structures_with[present] = state["structures_with"]
        self.num_structures = state["num_structures"]

    def solve(self) -> tuple[dict[int, float], list[str]]:
        """Minimum-norm least-squares references and notes (rank deficiency, rare elements) to show the user."""
        elements = np.nonzero(self.structures_with)[0]
        if len(elements) == 0:
            raise DataError("no structures were added: cannot fit reference energies")
        ctc = self.ctc[np.ix_(elements, elements)]
        rank = np.linalg.matrix_rank(ctc)
        refs, *_ = np.linalg.lstsq(ctc, self.cte[elements], rcond=None)
        notes = []
        if rank < len(elements):
            notes.append(f"reference fit is rank-deficient (rank {rank} < {len(elements)} elements): the "
                         "compositions do not determine every element's energy; the minimum-norm solution "
                         "is used, which still fits these compositions")
        for z in elements:
            if self.structures_with[z] < MIN_STRUCTURES_PER_ELEMENT:
                notes.append(f"element Z={z} appears in only {self.structures_with[z]} structure(s); "
                             "its reference energy is poorly determined")
        return {int(z): float(e) for z, e in zip(elements, refs)}, notes


def reference_energy(z: np.ndarray, refs_ev: dict[int, float]) -> float:
    """Σ_atoms e_Z for one structure (eV); unknown elements are an error, never zero."""
    missing = sorted(set(z.tolist()) - set(refs_ev))
    if missing:
        raise KeyError(f"no reference energy for elements {missing}; known: {sorted(refs_ev)}")
    return float(sum(refs_ev[int(zi)] for zi in z))
