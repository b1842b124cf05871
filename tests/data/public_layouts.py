"""Small files in the exact layouts of public datasets (keys, nesting, dtypes, units, signs), written from real
labels (the demo corpus; EMT for crystals), so that what a reader returns can be checked in eV and Å.

Each writer takes ``{molecule: [Atoms, ...]}`` in eV and Å and converts to the dataset's own units on the way out.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read
from ase.units import Bohr, Hartree, kcal, mol

KCAL_MOL = kcal / mol
SPICE_SUBSET = "SPICE PubChem Set 1 Single Points Dataset v1.3"


def demo_molecules(demo_dir: Path, task: str, counts: dict[str, int]) -> dict[str, list[Atoms]]:
    """The first ``counts[name]`` frames of each molecule of a demo task (the demo's LoTs share geometries)."""
    frames = read(demo_dir / f"{task}.extxyz", index=":")
    return {name: [a for a in frames if a.info["molecule"] == name][:num] for name, num in counts.items()}


def stack(frames: list[Atoms], what: str) -> np.ndarray:
    return np.stack([a.positions if what == "positions" else a.get_forces() for a in frames])


def energies(frames: list[Atoms]) -> np.ndarray:
    return np.array([a.get_potential_energy() for a in frames])


def write_spice2(path: Path, molecules: dict[str, list[Atoms]]) -> Path:
    """SPICE 2: a group per molecule; conformations in bohr, energies in Hartree, the gradient (= -forces)."""
    with h5py.File(path, "w") as f:
        for name, frames in molecules.items():
            g = f.create_group(name)
            g.create_dataset("atomic_numbers", data=frames[0].numbers.astype(np.int16))
            g.create_dataset("conformations", data=(stack(frames, "positions") / Bohr).astype(np.float32))
            g.create_dataset("dft_total_energy", data=energies(frames) / Hartree)
            gradient = -stack(frames, "forces") / (Hartree / Bohr)
            g.create_dataset("dft_total_gradient", data=gradient.astype(np.float32))
            g.create_dataset("formation_energy", data=energies(frames) / Hartree + 1.0)
            g.create_dataset("smiles", data=[frames[0].info["smiles"]], dtype=h5py.string_dtype())
            g.create_dataset("subset", data=[SPICE_SUBSET], dtype=h5py.string_dtype())
    return path


def write_ani1x(path: Path, lots: dict[str, dict[str, list[Atoms | None]]]) -> Path:
    """ANI-1x: a group per formula, ``<lot>.energy`` (Hartree) and ``<lot>.forces`` (Hartree/Å) per LoT; a
    conformer a LoT did not label is NaN there. ``lots``: {"wb97x_dz": {molecule: [Atoms or None, ...]}, ...};
    the first LoT must label every conformer (its geometries are written)."""
    first = next(iter(lots.values()))
    with h5py.File(path, "w") as f:
        for name, frames in first.items():
            g = f.create_group(name)
            g.create_dataset("atomic_numbers", data=frames[0].numbers.astype(np.uint8))
            g.create_dataset("coordinates", data=stack(frames, "positions").astype(np.float32))
            for lot, by_molecule in lots.items():
                labelled = by_molecule[name]
                e = np.array([np.nan if a is None else a.get_potential_energy() / Hartree for a in labelled])
                g.create_dataset(f"{lot}.energy", data=e)
                if all(a is None or "forces" in a.calc.results for a in labelled):
                    forces = np.stack([np.full((len(frames[0]), 3), np.nan) if a is None else a.get_forces()
                                       for a in labelled]) / Hartree
                    g.create_dataset(f"{lot}.forces", data=forces.astype(np.float32))
    return path


def write_ani2x(path: Path, molecules: dict[str, list[Atoms]]) -> Path:
    """ANI-2x: a group per atom count, ``species`` per conformer (M, N); Hartree, Å, Hartree/Å."""
    by_size: dict[int, list[Atoms]] = {}
    for frames in molecules.values():
        by_size.setdefault(len(frames[0]), []).extend(frames)
    with h5py.File(path, "w") as f:
        for size, frames in sorted(by_size.items()):
            g = f.create_group(f"{size:03d}")
            g.create_dataset("species", data=np.stack([a.numbers for a in frames]).astype(np.int64))
            g.create_dataset("coordinates", data=stack(frames, "positions").astype(np.float32))
            g.create_dataset("energies", data=energies(frames) / Hartree)
            g.create_dataset("forces", data=(stack(frames, "forces") / Hartree).astype(np.float32))
    return path


def write_qm7x(path: Path, molecules: dict[str, list[Atoms]]) -> Path:
    """QM7-X: ``f[molecule][conformer]``, each conformer its own group; eV, Å, ``ePBE0+MBD`` of shape (1,)."""
    with h5py.File(path, "w") as f:
        for m, frames in enumerate(molecules.values(), start=1):
            mol_group = f.create_group(str(m))
            for c, atoms in enumerate(frames, start=1):
                g = mol_group.create_group(f"Geom-m{m}-i1-c{c}-{'opt' if c == 1 else f'd{c}'}")
                g.create_dataset("atNUM", data=atoms.numbers.astype(np.int32))
                g.create_dataset("atXYZ", data=atoms.positions)
                g.create_dataset("ePBE0+MBD", data=[atoms.get_potential_energy()])
                g.create_dataset("eAT", data=[atoms.get_potential_energy() / 10])
                g.create_dataset("totFOR", data=atoms.get_forces())
    return path


T1X_ENERGY, T1X_FORCES = "wB97x_6-31G(d).energy", "wB97x_6-31G(d).forces"


def write_transition1x(path: Path, reactions: dict[str, tuple[str, list[Atoms]]]) -> Path:
    """Transition1x: ``split/formula/reaction`` groups with the path's images, ``reactant``, ``product`` and
    ``transition_state`` subgroups of one image each (the transition state is also a path image), and the
    ``data`` split holding every reaction again. ``reactions``: {reaction: (split, [reactant, *path, product])};
    the last path image is the transition state."""

    def put(g, frames):
        g.create_dataset("atomic_numbers", data=frames[0].numbers.astype(np.int64))
        g.create_dataset("positions", data=stack(frames, "positions").astype(np.float32))
        g.create_dataset(T1X_ENERGY, data=energies(frames))
        g.create_dataset(T1X_FORCES, data=stack(frames, "forces").astype(np.float32))

    with h5py.File(path, "w") as f:
        for split in ("data", "train", "val", "test"):
            f.create_group(split)
        for reaction, (split, frames) in reactions.items():
            reactant, *images, product = frames
            formula = frames[0].get_chemical_formula()
            for where in (split, "data"):
                g = f.require_group(f"{where}/{formula}").create_group(reaction)
                put(g, images)
                for part, atoms in (("reactant", reactant), ("product", product), ("transition_state", images[-1])):
                    put(g.create_group(part), [atoms])
    return path


def write_sgdml(path: Path, frames: list[Atoms], theory: str = "PBE+TS", e_unit: str = "kcal/mol") -> Path:
    """sGDML/MD17 npz: ``z``, ``R`` (Å), ``E`` (M, 1) and ``F`` in ``e_unit``, with the file's own unit keys."""
    factor = {"kcal/mol": KCAL_MOL, "eV": 1.0}[e_unit]
    np.savez(path, type="d", name=frames[0].info["molecule"], theory=theory, r_unit="Ang", e_unit=e_unit,
             z=frames[0].numbers.astype(np.uint8), R=stack(frames, "positions"),
             E=(energies(frames) / factor)[:, None], F=stack(frames, "forces") / factor, md5="0" * 32)
    return path


def write_rmd17(path: Path, frames: list[Atoms]) -> Path:
    """rMD17 npz: ``nuclear_charges``, ``coords`` (Å), ``energies`` and ``forces`` in kcal/mol (and kcal/mol/Å)."""
    np.savez(path, nuclear_charges=frames[0].numbers.astype(np.int64), coords=stack(frames, "positions"),
             energies=energies(frames) / KCAL_MOL, forces=stack(frames, "forces") / KCAL_MOL,
             old_indices=np.arange(len(frames)), old_energies=energies(frames) / KCAL_MOL)
    return path


def emt_crystals(counts: dict[str, int], seed: int = 0) -> dict[str, list[Atoms]]:
    """Rattled fcc cells labelled by EMT (consistent energies, forces and stress), by element."""
    rng = np.random.default_rng(seed)
    crystals = {}
    for element, num in counts.items():
        frames = []
        for _ in range(num):
            atoms = bulk(element, cubic=True)
            atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
            atoms.calc = EMT()
            atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                               stress=atoms.get_stress())
            frames.append(atoms)
        crystals[element] = frames
    return crystals


MPTRJ_CORRECTION_EV_ATOM = -0.25  # corrected_total_energy = uncorrected + this x atoms, to tell them apart


def write_mptrj(path: Path, crystals: dict[str, list[Atoms]]) -> Path:
    """MPtrj JSON: ``{mp_id: {frame_id: {"structure": pymatgen dict, "corrected_total_energy", "force", ...}}}``."""
    from pymatgen.io.ase import AseAtomsAdaptor

    data = {}
    for m, frames in enumerate(crystals.values(), start=1):
        mp_id = f"mp-{100 + m}"
        data[mp_id] = {}
        for k, atoms in enumerate(frames):
            energy = atoms.get_potential_energy()
            data[mp_id][f"{mp_id}-{k}-0"] = {
                "structure": AseAtomsAdaptor.get_structure(atoms).as_dict(),
                "uncorrected_total_energy": energy,
                "corrected_total_energy": energy + MPTRJ_CORRECTION_EV_ATOM * len(atoms),
                "energy_per_atom": energy / len(atoms), "ef_per_atom": 0.1, "e_per_atom_relaxed": -1.0,
                "ef_per_atom_relaxed": 0.0, "force": atoms.get_forces().tolist(),
                # kBar in VASP's sign (positive: compression), as MPtrj has it from VASP's OUTCAR
                "stress": (-10 * atoms.get_stress(voigt=False) / units.GPa).tolist(),
                "magmom": None, "bandgap": 0.0, "mp_id": mp_id}
    path.write_text(json.dumps(data))
    return path


def write_aselmdb(path: Path, crystals: dict[str, list[Atoms]]) -> Path:
    """ASE LMDB (OMat24's layout): one row per structure, labels in the row's calculator results."""
    from ase.db import connect

    with connect(path, type="aselmdb") as db:
        for frames in crystals.values():
            for atoms in frames:
                db.write(atoms)
    return path
