"""Torsion scans: rigid rotations about one bond, labelled at one LoT, ordered by angle.

A scan probes what random MD frames do not: a smooth, physically ordered path through conformations.
``mlfound evaluate --scan`` compares a model's curve with it (second differences, spurious extrema).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
from pathlib import Path

import numpy as np

from mlfound.data.files import atomic_write_bytes
from mlfound.progress import progress
from mlfound.qmdata import geometries, levels
from mlfound.qmdata.corpus import single_thread
from mlfound.qmdata.recipes import MOLECULE_SETS


@dataclasses.dataclass(frozen=True)
class TorsionScan:
    molecule: str
    smiles: str
    torsion_smarts: str  # four atoms; the dihedral set along the scan
    lot: str  # key of levels.LEVELS
    step_deg: float = 10.0
    seed: int = 0

    @property
    def angles_deg(self) -> np.ndarray:
        return np.arange(0.0, 360.0, self.step_deg)


SCANS: dict[str, TorsionScan] = {
    # Paracetamol's ring-amide torsion at the fine-tuning target's LoT.
    "paracetamol-amide": TorsionScan("paracetamol", MOLECULE_SETS["target"]["paracetamol"], "c:c-[NX3]-[CX3;$(C=O)]",
                                     "hf_631g"),
}


def make_scan(name: str, scan: TorsionScan, out_dir: Path, workers: int) -> Path:
    """Label every angle of ``scan`` and write ``<out_dir>/<lot>_<name>_scan.extxyz`` (atomically)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    lot = levels.LEVELS[scan.lot]
    symbols, frames_a = geometries.torsion_scan(scan.smiles, scan.torsion_smarts, scan.angles_deg, scan.seed)
    with cf.ProcessPoolExecutor(workers, initializer=single_thread) as pool:
        labels = list(progress(pool.map(levels.label, [lot] * len(frames_a), [symbols] * len(frames_a), frames_a),
                               total=len(frames_a), desc=f"scan {name}", unit="point"))
    atoms_list = []
    for angle, pos_a, (energy_ev, forces) in zip(scan.angles_deg, frames_a, labels):
        atoms = Atoms(symbols, positions=pos_a)
        atoms.info.update(lot.metadata())
        atoms.info.update(molecule=scan.molecule, smiles=scan.smiles, torsion_smarts=scan.torsion_smarts,
                          scan_angle_deg=float(angle))
        atoms.calc = SinglePointCalculator(atoms, energy=energy_ev, forces=forces)
        atoms_list.append(atoms)
    text = io.StringIO()
    write(text, atoms_list, format="extxyz")
    return atomic_write_bytes(Path(out_dir) / f"{scan.lot}_{name}_scan.extxyz", text.getvalue().encode())
