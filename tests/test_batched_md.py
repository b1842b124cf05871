"""A release head in torch-sim: many systems in one batch give what the ASE calculator gives one by one,
and torch-sim's velocity Verlet follows ASE's step for step."""
import numpy as np
import pytest
import torch
import torch_sim as ts
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa, fs, kB

from mlfound.batched_md import TorchSimModel
from mlfound.calculator import MLFoundCalculator
from mlfound.data.record import DataError
from mlfound.release import load

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def release():
    return load("demo-reptile")


def boxes():
    """Demo boxes of 24 and 32 atoms and one more: systems of different sizes in one state."""
    frames = read("data/demo-periodic/gfn1_xtb.extxyz", ":")
    by_size = {len(a): a for a in frames}
    assert len(by_size) >= 2, "the demo boxes should hold systems of different sizes"
    return [by_size[n] for n in sorted(by_size)] + [frames[1]]


def test_a_batch_equals_the_ase_calculator_system_by_system(release):
    calc = MLFoundCalculator(release, head="gfn1_xtb", dtype="float64")
    for systems, periodic in ((boxes(), True), (read("data/demo/gfn1_xtb.extxyz", ":4"), False)):
        model = TorchSimModel(release, head="gfn1_xtb", dtype=torch.float64, compute_stress=periodic)
        state = ts.io.atoms_to_state(systems, CPU, torch.float64)
        before = state.positions.clone()
        out = model(state)
        assert torch.equal(state.positions, before), "the model must not move the state's atoms"
        assert out["energy"].shape == (len(systems),) and out["forces"].shape == (state.n_atoms, 3)
        for g, atoms in enumerate(systems):
            atoms = atoms.copy()
            atoms.calc = calc
            assert out["energy"][g].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(out["forces"][state.system_idx == g].numpy(), atoms.get_forces(), atol=1e-10)
            if periodic:
                np.testing.assert_allclose(full_3x3_to_voigt_6_stress(out["stress"][g].numpy()), atoms.get_stress(),
                                           atol=1e-12)


def test_torch_sim_nve_follows_ase_velocity_verlet(release):
    """The same initial momenta, 20 steps of 0.5 fs: every system's potential energy at every step equals the
    ASE run's with the calculator (so units, forces and the integrator agree)."""
    systems = boxes()[:2]
    model = TorchSimModel(release, head="gfn1_xtb", dtype=torch.float64, compute_stress=False)
    dt = torch.tensor(0.5e-3 * ts.units.UnitSystem.metal.time, dtype=torch.float64)
    kT = torch.tensor(300 * ts.units.UnitSystem.metal.temperature, dtype=torch.float64)
    init, update = ts.nve(model=model, dt=dt, kT=kT, seed=3)
    state = init(ts.io.atoms_to_state(systems, CPU, torch.float64))
    runs = []
    for g, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = MLFoundCalculator(release, head="gfn1_xtb", dtype="float64")
        atoms.set_momenta(state.momenta[state.system_idx == g].numpy())
        runs.append((atoms, VelocityVerlet(atoms, timestep=0.5 * fs)))
    for _ in range(20):
        state = update(state)
        for g, (atoms, dyn) in enumerate(runs):
            dyn.run(1)
            assert state.energy[g].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-7)
    for g, (atoms, _) in enumerate(runs):
        np.testing.assert_allclose(state.momenta[state.system_idx == g].numpy(), atoms.get_momenta(), atol=1e-8)


def test_torch_sim_npt_moves_each_cell_the_way_its_pressure_says(release):
    """torch-sim's Langevin barostat driven by our stress. The boxes are first relaxed at fixed cell (so the
    pressure changes only with the cell), then each is given an external pressure 0.5 GPa below (even systems) or
    above (odd) its own at 1 K, taken from the ASE calculator, whose stress is checked against finite
    differences: in 20 steps the first expand and the second shrink (with the stress's sign flipped, all expand)."""
    model = TorchSimModel(release, head="gfn1_xtb", dtype=torch.float64)
    state = ts.io.atoms_to_state(read("data/demo-periodic/gfn1_xtb.extxyz", ":4"), CPU, torch.float64)
    relaxed = ts.optimize(state, model, optimizer=ts.optimizers.fire, max_steps=200,
                          convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=False))
    calc = MLFoundCalculator(release, head="gfn1_xtb", dtype="float64")
    pressure = []
    for atoms in ts.io.state_to_atoms(relaxed):
        atoms.calc = calc
        pressure.append(-atoms.get_stress()[:3].mean() + len(atoms) * 1.0 * kB / atoms.get_volume())
    below = np.array([1.0, -1.0] * 2)
    external = torch.tensor(np.array(pressure) - below * 0.5 * GPa)[:, None, None] * torch.eye(3, dtype=torch.float64)
    final = ts.integrate(relaxed, model, integrator=ts.npt_langevin, n_steps=20, temperature=1.0, timestep=0.0005,
                         external_pressure=external, seed=0)
    ratio = (final.cell.det() / relaxed.cell.det()).numpy()
    assert (np.sign(ratio - 1) == below).all(), ratio


def test_bad_states_are_refused_with_what_is_wrong(release):
    water = read("data/demo-periodic/gfn1_xtb.extxyz", 0)
    squeezed = water.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.3, 0.0, 0.0]
    model = TorchSimModel(release, head="gfn1_xtb", dtype=torch.float64)
    with pytest.raises(DataError, match=r"system 1: atoms 0 and 1 are 0.300 Å apart, closer than min_distance_a"):
        model(ts.io.atoms_to_state([water, squeezed], CPU, torch.float64))
    silicon = water.copy()
    silicon.numbers[0] = 14
    with pytest.raises(ValueError, match=r"elements \[14\] are unknown to this model"):
        model(ts.io.atoms_to_state([silicon], CPU, torch.float64))
    with pytest.raises(ValueError, match="stress needs systems periodic in 3-D"):
        model(ts.io.atoms_to_state(read("data/demo/gfn1_xtb.extxyz", ":1"), CPU, torch.float64))
    with pytest.raises(ValueError, match="no head 'nope'"):
        TorchSimModel(release, head="nope")
