"""ASE calculator on the shipped demo release: equals `mlfound evaluate`'s batched predictions, forces
are -dE/dx and stress dE/dstrain / V by finite differences, unknown heads are an error, NVE conserves energy
and a short NPT run keeps its cell."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.verlet import VelocityVerlet

from mlfound.calculator import MLFoundCalculator, thermalize
from mlfound.predict import predict
from mlfound.release import ReleaseError, load

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo-reptile"  # models/registry.json: the release shipped with the repository
HEAD = "pbe0_631gs"


@pytest.fixture(scope="module")
def release():
    return load(MODEL)


def atoms_of(record) -> Atoms:
    return Atoms(numbers=record.z, positions=record.pos_a)


def test_calculator_equals_batched_evaluation(release, paracetamol):
    structures = paracetamol[:8]
    energies, forces = predict(release.model, structures, HEAD)  # one batch of 8 graphs, as evaluate does
    calc = MLFoundCalculator(release, head=HEAD, dtype="float32")
    for record, energy, force in zip(structures, energies, forces):
        atoms = atoms_of(record)
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=0, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), force, rtol=0, atol=1e-5)


def test_float64_forces_are_the_negative_energy_gradient(release, paracetamol):
    atoms = atoms_of(paracetamol[0])
    atoms.calc = MLFoundCalculator(release, head=HEAD, dtype="float64")
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), numerical, rtol=0, atol=1e-6)


def test_float32_and_float64_agree(release, paracetamol):
    results = {}
    for dtype in ("float32", "float64"):
        atoms = atoms_of(paracetamol[1])
        atoms.calc = MLFoundCalculator(MODEL, head=HEAD, dtype=dtype)
        results[dtype] = atoms.get_potential_energy(), atoms.get_forces()
    assert results["float32"][0] == pytest.approx(results["float64"][0], rel=0, abs=1e-4)
    np.testing.assert_allclose(results["float32"][1], results["float64"][1], rtol=0, atol=1e-4)


def test_unknown_head_is_an_error_listing_the_heads(release):
    with pytest.raises(ReleaseError, match=r"no head 'hf_631g'; available heads: \['gfn2_xtb', 'gfn1_xtb'"):
        MLFoundCalculator(release, head="hf_631g")


def test_stress_is_ases_finite_difference_stress_and_needs_a_cell(release, paracetamol):
    """The demo target in a tilted periodic box small enough for molecules to see their images, float64."""
    atoms = atoms_of(paracetamol[0])
    atoms.set_cell([[8.0, 0.0, 0.0], [1.5, 9.0, 0.0], [-1.0, 0.8, 7.5]])
    atoms.pbc = True
    atoms.calc = MLFoundCalculator(release, head=HEAD, dtype="float64")
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-4  # eV/Å³: not trivially zero
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), rtol=0, atol=1e-7)
    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[6, 6, 6], pbc=[True, True, False])
    water.calc = MLFoundCalculator(release, head=HEAD)
    with pytest.raises(PropertyNotImplementedError, match=r"periodic in all three directions.*\[True, True, False\]"):
        water.get_stress()
    water.pbc = False
    water.get_forces()  # a molecule still has energy and forces


def test_nve_conserves_energy(release, paracetamol):
    """400 velocity-Verlet steps of 0.25 fs (0.1 ps) of the demo target molecule at 300 K, float64."""
    atoms = atoms_of(paracetamol[0])
    atoms.calc = MLFoundCalculator(release, head=HEAD, dtype="float64")
    thermalize(atoms, temperature_K=300, rng=np.random.default_rng(0))
    total = []
    dynamics = VelocityVerlet(atoms, 0.25 * units.fs)
    dynamics.attach(lambda: total.append(atoms.get_total_energy()), interval=1)
    dynamics.run(400)
    total = np.array(total)
    drift_mev_atom = 1e3 * (total[-1] - total[0]) / len(atoms)
    fluctuation_mev_atom = 1e3 * total.std() / len(atoms)
    print(f"NVE 0.1 ps: drift {drift_mev_atom:+.4f} meV/atom, fluctuation {fluctuation_mev_atom:.4f} meV/atom, "
          f"final temperature {atoms.get_temperature():.0f} K")
    assert abs(drift_mev_atom) < 0.05 and fluctuation_mev_atom < 0.3


@pytest.mark.faults
def test_coincident_atoms_are_an_error_naming_them(release, paracetamol):
    """Two atoms at one position gave NaN energy and forces without a word."""
    atoms = atoms_of(paracetamol[0])
    atoms.positions[5] = atoms.positions[2]
    atoms.calc = MLFoundCalculator(release, head=HEAD)
    symbols = atoms.get_chemical_symbols()
    with pytest.raises(ValueError, match=f"atoms 2 \\({symbols[2]}\\) and 5 \\({symbols[5]}\\) are 0.000 Å apart"
                                         ".*min_distance_a"):
        atoms.get_potential_energy()


def test_the_distance_guard_sees_periodic_images_and_can_be_tuned(release):
    atoms = Atoms("CO", positions=[[0.2, 2.0, 2.0], [3.8, 2.0, 2.0]], cell=[4.0, 4.0, 4.0], pbc=True)
    atoms.calc = MLFoundCalculator(release, head=HEAD)  # 0.4 Å apart through the cell wall
    with pytest.raises(ValueError, match="atoms 0 \\(C\\) and 1 \\(O\\) are 0.400 Å apart"):
        atoms.get_potential_energy()
    atoms.calc = MLFoundCalculator(release, head=HEAD, min_distance_a=0.3)
    assert np.isfinite(atoms.get_potential_energy())


def test_a_short_npt_run_keeps_the_cell_stable(release):
    """The demo model's GFN1-xTB head refitted for 300 steps on the periodic demo boxes (stress labels
    included), then 0.2 ps of Berendsen NPT at 300 K and 1 bar on a water box. The box starts over-pressured
    (GFN1-xTB itself gives +0.66 GPa there, the model +0.55), so the barostat, driven by the calculator's
    stress, must expand it; stable means it does so without collapsing or blowing up (within 20%)."""
    from ase.io import read
    from ase.md.nptberendsen import NPTBerendsen

    from mlfound.data.sets import load_records
    from mlfound.finetune import FinetuneConfig, finetune

    boxes = ROOT / "data" / "demo-periodic" / "gfn1_xtb.extxyz"
    records = load_records(boxes, "gfn1_xtb")
    assert all(r.stress_ev_a3 is not None for r in records)
    torch.manual_seed(0)
    refitted = finetune(release, records[:30], records[30:], FinetuneConfig(head="gfn1_xtb", max_steps=300, lr=3e-3),
                        progress=False).release
    atoms = read(boxes, index=0)
    atoms.calc = MLFoundCalculator(refitted, head="gfn1_xtb", dtype="float64")
    start_a3, pressure_gpa = atoms.get_volume(), -atoms.get_stress()[:3].mean() / units.GPa
    assert pressure_gpa > 0.1
    thermalize(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = NPTBerendsen(atoms, timestep=0.5 * units.fs, temperature_K=300, pressure_au=1.01325 * units.bar,
                            taut=50 * units.fs, taup=500 * units.fs, compressibility_au=4.57e-5 / units.bar)
    volumes = []
    dynamics.attach(lambda: volumes.append(atoms.get_volume()), interval=10)
    dynamics.run(400)
    ratios = np.array(volumes) / start_a3
    assert np.isfinite(ratios).all() and ratios[-1] > 1.01  # the stress expanded the cell
    assert 0.8 < ratios.min() and ratios.max() < 1.2, (ratios.min(), ratios.max())
