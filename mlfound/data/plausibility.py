"""Is this data really in eV and Å? A guard against labels in the wrong unit.

A file in Hartree read as eV trains without complaint (new-head references absorb any scale) and
gives a model that is wrong by a factor of 27. Three checks, each independent of the level of theory:

* **Below the atoms' all-electron energy.** No level of theory puts a molecule more than a few per
  cent below the sum of its free atoms' exact all-electron energies, so with ρ = E / Σ E_atom(Z)
  (E_atom in Hartree), ρ > ~30 is impossible in eV: ρ ≈ 627 is kcal/mol, ρ ≈ 2625 kJ/mol.
* **All-electron energies in Hartree.** All-electron data (HF, DFT) in eV has ρ ≈ 27.2; read from
  Hartree it has ρ ≈ 1.00, a window eV data does not hit.
* **Energies against forces.** For nearby structures of one molecule, ΔE ≈ -½ (F_a + F_b)·(x_b - x_a).
  Real data of any LoT gives a slope of 0.8-1.0 over many pairs (demo and E1 corpora, 0.1-0.25 Å apart),
  but single pairs scatter by 10-50%, so the data is refused only when the slope's 99.9% interval misses
  0.6-1.6; energies in Hartree with forces in eV/Å give 1/27, forces in Hartree/Bohr 51, and those shift
  every pair alike. Between periodic structures whose cells differ, the strain's work counts too:
  ΔE ≈ -½ (F_a + F_b)·Δx_non-affine + ½ (V_a σ_a + V_b σ_b):ε; without stress labels such pairs are skipped.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

from mlfound.data.record import DataError, Record
from mlfound.data.units import ENERGY_TO_EV

# Exact non-relativistic ground-state energies of the free atoms, Hartree (Chakravorty et al., Phys. Rev. A 47,
# 3649, 1993); relativistic corrections are below 0.1% up to Ar.
ATOM_ENERGY_HARTREE = {1: -0.5, 2: -2.9037, 3: -7.4781, 4: -14.6674, 5: -24.6539, 6: -37.8450, 7: -54.5892,
                       8: -75.0673, 9: -99.7339, 10: -128.9376, 11: -162.2546, 12: -200.053, 13: -242.346,
                       14: -289.359, 15: -341.259, 16: -398.110, 17: -460.148, 18: -527.540}
HARTREE_EV = ENERGY_TO_EV["hartree"]
MAX_RATIO_TO_ATOMS = 1.1 * HARTREE_EV  # correlation energy is ~1%; a 10% margin
HARTREE_WINDOW = (0.95, 1.05)  # ρ of all-electron energies in Hartree
SLOPE_WINDOW = (0.6, 1.6)  # ΔE / (force-implied ΔE) of consistent labels
SLOPE_CONFIDENCE = 0.9995  # refused only if the slope's two-sided 99.9% interval (Student t) misses the window
MAX_PAIR_DISPLACEMENT_A = 0.25  # RMS; the trapezoid rule is accurate to a few per cent below this
MIN_PAIRS = 5  # distinct pairs
MAX_RECORDS_PER_MOLECULE = 200  # nearest neighbours by brute force: bounded cost on large sets
OVERRIDE = "if the units are right, pass --no-unit-check (check_units=False in Python)"


def check_units(records: list[Record], what: str) -> None:
    """Raise DataError naming the likely unit when ``records`` cannot be in eV and Å."""
    _check_energy_force_slope(records, what)  # first: its factor names the unit whatever the LoT
    _check_ratio_to_atoms(records, what)


def _check_ratio_to_atoms(records: list[Record], what: str) -> None:
    covered = [r for r in records if all(int(z) in ATOM_ENERGY_HARTREE for z in r.z)]
    if not covered:
        return
    ratios = np.array([r.energy_ev / sum(ATOM_ENERGY_HARTREE[int(z)] for z in r.z) for r in covered])
    worst = int(np.argmax(ratios))
    if ratios[worst] > MAX_RATIO_TO_ATOMS:
        raise DataError(f"{what}: the energy of {covered[worst].where} is {ratios[worst] / HARTREE_EV:.1f}x the free "
                        "atoms' all-electron energies in eV, lower than any level of theory gives; "
                        f"{_likely_unit(ratios[worst] / HARTREE_EV, ratios[worst])}; {OVERRIDE}")
    median = float(np.median(ratios))
    if HARTREE_WINDOW[0] <= median <= HARTREE_WINDOW[1]:
        raise DataError(f"{what}: energies equal the free atoms' all-electron energies in Hartree "
                        f"(median ratio {median:.3f}): {_likely_unit(median / HARTREE_EV)}, or energy_unit=Hartree "
                        f"in the extxyz header; {OVERRIDE}")


def _check_energy_force_slope(records: list[Record], what: str) -> None:
    """Refuse only when the slope is decisively off: a few pairs far apart scatter widely (3 pairs 0.2 Å apart
    in 25 MD frames of real HF data gave 0.15), while a unit mistake moves the slope of every pair alike."""
    pairs = _nearby_pairs(records)
    if len(pairs) < MIN_PAIRS:
        return
    observed = np.array([b.energy_ev - a.energy_ev for a, b, _ in pairs])
    implied = np.array([work_ev for _, _, work_ev in pairs])
    slope = float((observed * implied).sum() / (implied**2).sum())
    slope_std = float(np.sqrt(((observed - slope * implied) ** 2).sum() / (len(pairs) - 1) / (implied**2).sum()))
    half_width = float(scipy.stats.t.ppf(SLOPE_CONFIDENCE, len(pairs) - 1)) * slope_std
    if slope + half_width < SLOPE_WINDOW[0] or slope - half_width > SLOPE_WINDOW[1]:
        a, b, work_ev = max(pairs, key=lambda pair: abs(pair[2]))
        raise DataError(f"{what}: energy differences between nearby structures are {slope:.3g}x what their forces "
                        f"imply ({slope - half_width:.3g}-{slope + half_width:.3g}x over {len(pairs)} pairs; "
                        f"consistent labels give 0.8-1.0; e.g. {b.where} minus {a.where}: "
                        f"{b.energy_ev - a.energy_ev:.4g} eV, forces imply {work_ev:.4g} eV): energies and forces "
                        "are not both in eV and eV/Å; "
                        f"{_likely_unit(slope)} (or the forces are off by a factor {1 / slope:.3g}); {OVERRIDE}")


def _nearby_pairs(records: list[Record]) -> list[tuple[Record, Record, float]]:
    """(a, b, E_b - E_a implied by the labels) for each structure and its nearest frame of the same molecule
    within MAX_PAIR_DISPLACEMENT_A, every pair once (two frames nearest to each other are one pair)."""
    pairs = {}
    for molecule, group in _same_molecule(records).items():
        positions = np.stack([r.pos_a for r in group])
        for a, rec in enumerate(group):
            rms = np.sqrt(((positions - rec.pos_a) ** 2).sum(-1).mean(-1))
            rms[rms == 0] = np.inf  # itself, and duplicates: no displacement to integrate along
            b = int(np.argmin(rms))
            key = (molecule, min(a, b), max(a, b))
            if rms[b] <= MAX_PAIR_DISPLACEMENT_A and key not in pairs:
                work_ev = _implied_energy_change(rec, group[b])
                if work_ev is not None:
                    pairs[key] = (rec, group[b], work_ev)
    return list(pairs.values())


def _implied_energy_change(a: Record, b: Record) -> float | None:
    """E_b - E_a from the labels' forces (and stress, between different cells) by the trapezoid rule; None for
    different cells without stress labels, whose strain work the forces cannot account for."""
    forces_sum = a.forces_ev_a + b.forces_ev_a
    if a.cell_a is None or b.cell_a is None or np.allclose(a.cell_a, b.cell_a, rtol=0, atol=1e-9):
        return -0.5 * float((forces_sum * (b.pos_a - a.pos_a)).sum())
    if a.stress_ev_a3 is None or b.stress_ev_a3 is None:
        return None
    deformation_t = np.linalg.solve(a.cell_a, b.cell_a)  # rows are lattice vectors: cell_b = cell_a F^T
    strain = (deformation_t + deformation_t.T) / 2 - np.eye(3)
    non_affine_a = b.pos_a - a.pos_a @ deformation_t
    virial_sum = abs(np.linalg.det(a.cell_a)) * a.stress_ev_a3 + abs(np.linalg.det(b.cell_a)) * b.stress_ev_a3
    return -0.5 * float((forces_sum * non_affine_a).sum()) + 0.5 * float((virial_sum * strain).sum())


def _same_molecule(records: list[Record]) -> dict[tuple, list[Record]]:
    """Records with forces grouped by their atomic numbers in order (frames of one molecule)."""
    groups: dict[tuple, list[Record]] = {}
    for rec in records:
        if rec.forces_ev_a is not None:
            group = groups.setdefault(tuple(rec.z.tolist()), [])
            if len(group) < MAX_RECORDS_PER_MOLECULE:
                group.append(rec)
    return {key: group for key, group in groups.items() if len(group) > 1}


def _likely_unit(factor: float, ratio_to_atoms: float | None = None) -> str:
    """The energy unit that explains values ``factor`` times their eV value (kcal/mol: 23), within 25%; failing
    that, the units in which ``ratio_to_atoms`` (energy / Σ E_atom in Hartree) would be possible."""
    others = {unit: ev for unit, ev in ENERGY_TO_EV.items() if unit != "ev"}
    units = [unit for unit, ev in others.items() if abs(np.log(factor * ev)) < np.log(1.25)]
    if not units and ratio_to_atoms is not None:
        units = [unit for unit, ev in others.items() if ratio_to_atoms * ev <= MAX_RATIO_TO_ATOMS]
    if not units:
        return "the energies are not in eV"
    return f"the energies are likely in {' or '.join(units)} (give --energy-unit {units[0]})"
