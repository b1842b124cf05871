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
