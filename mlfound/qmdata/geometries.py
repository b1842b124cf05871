"""Geometries: an RDKit conformer per molecule, then GFN2-xTB Langevin MD or normal-mode sampling at a
temperature.

MD at several temperatures gives the near-equilibrium and distorted structures that real MLIP
datasets (rMD17, ANI-1x, SPICE) contain; normal-mode sampling (ANI-1's) gives them for one Hessian per
molecule. Every draw is seeded, so a rerun is identical.
"""
from __future__ import annotations

import dataclasses

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


SOFTEST_CURVATURE = 0.05  # eV/Å²/amu: ω² of a ~116 cm⁻¹ vibration


@dataclasses.dataclass(frozen=True)
class NormalModes:
    """A molecule's GFN2-xTB minimum and its vibrations: what normal-mode sampling displaces along."""
    minimum_a: np.ndarray  # (N, 3) Å
    inv_sqrt_mass: np.ndarray  # (3N,) amu^-1/2, per Cartesian coordinate
    curvature: np.ndarray  # (M,) ω² in eV/Å²/amu, the vibrations only
    modes: np.ndarray  # (3N, M) mass-weighted unit vectors


def normal_modes(symbols: list[str], pos_a: np.ndarray, fmax_ev_a: float = 0.01, step_a: float = 0.005
                 ) -> NormalModes:
    """The GFN2-xTB minimum near ``pos_a`` (LBFGS) and its normal modes from a Hessian of central differences of
    xTB forces (6N force calls). The 6 lowest modes (5 for a linear molecule), translations and rotations, are
    dropped; a vibration softer than ``SOFTEST_CURVATURE`` is kept at that curvature, so that a floppy torsion
    is not swung by Ångströms (its energy share then moves it as a ~116 cm⁻¹ mode would)."""
    from ase import Atoms
    from ase.optimize import LBFGS
    from tblite.ase import TBLite

    atoms = Atoms(symbols, positions=pos_a)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    LBFGS(atoms, logfile=None).run(fmax=fmax_ev_a, steps=500)
    minimum_a = atoms.get_positions().copy()
    hessian = np.zeros((3 * len(atoms), 3 * len(atoms)))
    for coordinate in range(3 * len(atoms)):
        forces = []
        for sign in (1, -1):
            displaced = minimum_a.copy()
            displaced.flat[coordinate] += sign * step_a
            atoms.set_positions(displaced)
            forces.append(atoms.get_forces().ravel())
        hessian[coordinate] = -(forces[0] - forces[1]) / (2 * step_a)
    inv_sqrt_mass = np.repeat(1 / np.sqrt(atoms.get_masses()), 3)
    mass_weighted = (hessian + hessian.T) / 2 * inv_sqrt_mass[:, None] * inv_sqrt_mass[None, :]
    curvature, modes = np.linalg.eigh(mass_weighted)  # ascending
    linear = np.sum(atoms.get_moments_of_inertia() < 1e-3 * atoms.get_moments_of_inertia().max()) > 0
    external = 5 if linear else 6
    return NormalModes(minimum_a, inv_sqrt_mass, np.maximum(curvature[external:], SOFTEST_CURVATURE),
                       modes[:, external:])


def normal_mode_frames(modes: NormalModes, temperature_k: float, num_frames: int, seed: int,
                       min_distance_a: float = 0.7) -> np.ndarray:
    """``num_frames`` positions (num_frames, N, 3) Å by normal-mode sampling (as the ANI-1 data, Smith et al.,
    Sci. Data 4, 170193, 2017): each frame puts a random share c_i of 3/2 N_a k T into mode i as harmonic energy,
    with a random sign (c_i uniform, scaled so that their sum is uniform in [0, 1]). A frame with two atoms closer
    than ``min_distance_a`` is drawn again."""
    from ase import units

    rng = np.random.default_rng(seed)
    num_atoms = len(modes.minimum_a)
    total_ev = 1.5 * num_atoms * units.kB * temperature_k
    frames = []
    while len(frames) < num_frames:
        shares = rng.uniform(size=len(modes.curvature))
        shares *= rng.uniform() / shares.sum()
        amplitudes = rng.choice([-1.0, 1.0], size=len(shares)) * np.sqrt(2 * shares * total_ev / modes.curvature)
        frame = modes.minimum_a + (modes.inv_sqrt_mass * (modes.modes @ amplitudes)).reshape(num_atoms, 3)
        distances = np.linalg.norm(frame[:, None] - frame[None], axis=-1)[np.triu_indices(num_atoms, 1)]
        if distances.min() >= min_distance_a:
            frames.append(frame)
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
