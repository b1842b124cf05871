"""Levels of theory (LoT): one registry entry per method, each labelling one geometry.

Every labeller returns energy in eV and forces in eV/Å (or None for an energy-only LoT) and
raises ``NotConvergedError`` when the SCF does not converge, so the caller can reject the
record instead of writing a wrong label.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from ase import units

HARTREE_EV = units.Hartree
BOHR_A = units.Bohr


class NotConvergedError(RuntimeError):
    """The SCF of a QM code did not converge for this geometry."""


@dataclasses.dataclass(frozen=True)
class LevelOfTheory:
    name: str  # task name used everywhere downstream, e.g. "pbe0_631gs"
    method: str  # e.g. "PBE0", "GFN2-xTB", "HF"
    basis: str  # "" for tight-binding methods
    code: str  # "tblite" or "pyscf"
    with_forces: bool = True
    dft_grid_level: int = 0  # PySCF grid level; 0 is coarse but smooth enough for small basis sets
    max_scf_cycles: int = 100

    def metadata(self) -> dict:
        meta = {"lot_name": self.name, "lot_method": self.method, "lot_basis": self.basis,
                "lot_code": self.code, "energy_unit": "eV", "forces_unit": "eV/Ang"}
        return {k: v for k, v in meta.items() if v}  # extxyz cannot hold an empty value


LEVELS: dict[str, LevelOfTheory] = {lot.name: lot for lot in [
    LevelOfTheory("gfn2_xtb", "GFN2-xTB", "", "tblite"),
    LevelOfTheory("gfn1_xtb", "GFN1-xTB", "", "tblite"),
    LevelOfTheory("hf_sto3g", "HF", "STO-3G", "pyscf"),
    LevelOfTheory("pbe0_631gs", "PBE0", "6-31G*", "pyscf"),
    LevelOfTheory("b3lyp_631g", "B3LYP", "6-31G", "pyscf", with_forces=False),
    LevelOfTheory("hf_631g", "HF", "6-31G", "pyscf"),
    # a range-separated hybrid no corpus uses: the LoT of a held-out fine-tuning target
    LevelOfTheory("wb97x_631gs", "wB97X", "6-31G*", "pyscf"),
]}


def label(lot: LevelOfTheory, symbols: list[str], pos_a: np.ndarray) -> tuple[float, np.ndarray | None]:
    """Energy (eV) and forces (eV/Å, or None) of one neutral closed-shell geometry at ``lot``."""
    if lot.code == "tblite":
        return _label_tblite(lot, symbols, pos_a)
    return _label_pyscf(lot, symbols, pos_a)


def label_periodic(lot: LevelOfTheory, symbols: list[str], pos_a: np.ndarray, cell_a: np.ndarray
                   ) -> tuple[float, np.ndarray | None, np.ndarray]:
    """Energy (eV), forces (eV/Å, or None) and stress (3, 3) eV/Å³ in ASE's sign (positive: tension) of one cell
    periodic in all three directions (rows of ``cell_a`` are the lattice vectors). tblite LoTs only: the PySCF
    labellers here are molecular."""
    if lot.code != "tblite":
        raise ValueError(f"{lot.name} ({lot.code}) labels molecules only; periodic boxes need a tblite LoT "
                         f"({sorted(n for n, lv in LEVELS.items() if lv.code == 'tblite')})")
    result = _tblite_singlepoint(lot, symbols, pos_a, cell_a)
    # tblite's "virial" is dE/dstrain in Hartree (checked against finite differences in the tests): stress = it / V
    stress = np.asarray(result.get("virial")) * HARTREE_EV / abs(np.linalg.det(cell_a))
    return _tblite_energy_forces(lot, result) + (stress,)


def _label_tblite(lot, symbols, pos_a):
    return _tblite_energy_forces(lot, _tblite_singlepoint(lot, symbols, pos_a))


def _tblite_singlepoint(lot, symbols, pos_a, cell_a=None):
    from tblite.interface import Calculator

    numbers = np.array([_atomic_number(s) for s in symbols])
    periodic = {} if cell_a is None else {"lattice": np.asarray(cell_a) / BOHR_A, "periodic": np.ones(3, bool)}
    calc = Calculator(lot.method, numbers, pos_a / BOHR_A, **periodic)
    calc.set("verbosity", 0)
    calc.set("max-iter", lot.max_scf_cycles)
    try:
        return calc.singlepoint()
    except RuntimeError as err:  # tblite raises on SCF failure
        raise NotConvergedError(str(err)) from err


def _tblite_energy_forces(lot, result):
    energy_ev = float(result.get("energy")) * HARTREE_EV
    forces = -np.asarray(result.get("gradient")) * HARTREE_EV / BOHR_A
    return energy_ev, (forces if lot.with_forces else None)


def _label_pyscf(lot, symbols, pos_a):
    from pyscf import dft, gto, scf

    mol = gto.M(atom=list(zip(symbols, pos_a.tolist())), basis=lot.basis, unit="Angstrom",
                charge=0, spin=0, verbose=0)
    if lot.method == "HF":
        mf = scf.RHF(mol)
    else:
        mf = dft.RKS(mol, xc=lot.method)
        mf.grids.level = lot.dft_grid_level
    mf = mf.density_fit()
    mf.max_cycle = lot.max_scf_cycles
    energy_ha = mf.kernel()
    if not mf.converged:
        raise NotConvergedError(f"{lot.method}/{lot.basis} SCF not converged after {mf.max_cycle} cycles")
    forces = None
    if lot.with_forces:
        forces = -np.asarray(mf.nuc_grad_method().kernel()) * HARTREE_EV / BOHR_A
    return float(energy_ha) * HARTREE_EV, forces


def _atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]
