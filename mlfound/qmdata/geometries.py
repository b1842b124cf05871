"""Geometries: an RDKit conformer per molecule, then GFN2-xTB Langevin MD at a temperature.

MD at several temperatures gives the near-equilibrium and distorted structures that real MLIP
datasets (rMD17, ANI-1x, SPICE) contain. Every trajectory is seeded, so a rerun is identical.
"""
from __future__ import annotations

import numpy as np


def embedded_molecule(smiles: str, seed: int):
    """An RDKit molecule with explicit hydrogens and one MMFF-relaxed 3D conformer."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise ValueError(f"RDKit could not embed a conformer for {smiles!r} (seed {seed})")
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


def rdkit_conformer(smiles: str, seed: int) -> tuple[list[str], np.ndarray]:
    """Symbols and positions (Å) of an MMFF-relaxed 3D conformer with explicit hydrogens."""
    mol = embedded_molecule(smiles, seed)
    return [atom.GetSymbol() for atom in mol.GetAtoms()], mol.GetConformer().GetPositions()


def torsion_scan(smiles: str, torsion_smarts: str, angles_deg: np.ndarray, seed: int
                 ) -> tuple[list[str], np.ndarray]:
    """Rigid torsion scan: symbols and (A, N, 3) positions with the dihedral of the first match of
    ``torsion_smarts`` (four atoms) set to each angle; all other internal coordinates stay fixed."""
    from rdkit import Chem
    from rdkit.Chem import rdMolTransforms

    mol = embedded_molecule(smiles, seed)
    matches = mol.GetSubstructMatches(Chem.MolFromSmarts(torsion_smarts))
    if not matches or len(matches[0]) != 4:
        raise ValueError(f"torsion SMARTS {torsion_smarts!r} does not match four atoms of {smiles!r}")
    conformer = mol.GetConformer()
    frames = []
    for angle in angles_deg:
        rdMolTransforms.SetDihedralDeg(conformer, *matches[0], float(angle))
        frames.append(conformer.GetPositions().copy())
    return [atom.GetSymbol() for atom in mol.GetAtoms()], np.stack(frames)


def xtb_md_frames(symbols: list[str], pos_a: np.ndarray, temperature_k: float, num_frames: int,
                  seed: int, stride: int = 10, equilibration_steps: int = 100,
                  timestep_fs: float = 0.5) -> np.ndarray:
    """``num_frames`` positions (num_frames, N, 3) Å sampled every ``stride`` steps of GFN2-xTB MD."""
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tblite.ase import TBLite

    atoms = Atoms(symbols, positions=pos_a)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    md = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=0.02, rng=rng)
    md.run(equilibration_steps)
    frames = []
    for _ in range(num_frames):
        md.run(stride)
        frames.append(atoms.get_positions().copy())
    return np.stack(frames)


def molecular_box(symbols: list[str], pos_a: np.ndarray, copies: int, density_g_cm3: float, seed: int,
                  min_distance_a: float = 1.6, tries: int = 500) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``copies`` randomly placed and rotated copies of one molecule in a cubic cell at ``density_g_cm3``:
    (symbols, positions (N, 3) Å, cell (3, 3) Å). Copies are inserted one by one, each redrawn until none of
    its atoms is within ``min_distance_a`` of another copy's (periodic images included); a box that cannot
    be packed so is an error."""
    from ase import Atoms, units
    from ase.geometry import get_distances

    mass_g = Atoms(symbols).get_masses().sum() * copies / units.mol
    cell = np.eye(3) * (mass_g / density_g_cm3) ** (1 / 3) * 1e8  # cm -> Å
    centred = pos_a - pos_a.mean(axis=0)
    rng = np.random.default_rng(seed)
    placed = np.zeros((0, 3))
    for copy in range(copies):
        for _ in range(tries):
            rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            candidate = centred @ rotation.T + rng.uniform(0, 1, 3) @ cell
            if not len(placed) or get_distances(candidate, placed, cell=cell, pbc=True)[1].min() >= min_distance_a:
                placed = np.concatenate([placed, candidate])
                break
        else:
            raise ValueError(f"cannot pack copy {copy + 1} of {copies} of {''.join(symbols)} at {density_g_cm3} "
                             f"g/cm³ without atoms of different copies within {min_distance_a} Å after {tries} "
                             "tries; lower the density or the copies")
    return list(symbols) * copies, placed, cell


def molecular_crystal(crystal) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A ``recipes.Crystal`` as (symbols, positions (N, 3) Å, cell (3, 3) Å): the space group's images of its
    asymmetric unit, repeated."""
    from ase.spacegroup import crystal as build

    atoms = build(list(crystal.basis_symbols), basis=list(crystal.basis_fractional), spacegroup=crystal.spacegroup,
                  cellpar=list(crystal.cellpar)).repeat(crystal.repeat)
    return atoms.get_chemical_symbols(), atoms.positions, atoms.cell[:]


def periodic_md_frames(symbols: list[str], pos_a: np.ndarray, cell_a: np.ndarray, temperature_k: float,
                       num_frames: int, seed: int, stride: int = 10, equilibration_steps: int = 50,
                       timestep_fs: float = 0.5, max_strain: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``num_frames`` positions (F, N, 3) Å and cells (F, 3, 3) Å from GFN1-xTB Langevin MD at a fixed cell
    (GFN2-xTB costs ~8x more under periodic boundaries), each frame then deformed by a random symmetric strain
    with components up to ``max_strain``, so that the labels' stress varies as in an NPT ensemble."""
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from tblite.ase import TBLite

    from mlfound.calculator import thermalize

    atoms = Atoms(symbols, positions=pos_a, cell=cell_a, pbc=True)
    atoms.calc = TBLite(method="GFN1-xTB", verbosity=0)
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature_K=temperature_k, rng=rng)
    md = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=0.02, fixcm=False, rng=rng)
    md.run(equilibration_steps)
    frames, cells = [], []
    for _ in range(num_frames):
        md.run(stride)
        strain = rng.uniform(-max_strain, max_strain, (3, 3))
        deformation = np.eye(3) + (strain + strain.T) / 2
        frames.append(atoms.get_positions() @ deformation.T)
        cells.append(atoms.cell[:] @ deformation.T)
    return np.stack(frames), np.stack(cells)
