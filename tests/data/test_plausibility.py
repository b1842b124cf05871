"""The unit guard on periodic data: between cells that differ, the strain's work is part of the energy change."""
import dataclasses

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT

from mlfound.data import DataError, Record
from mlfound.data.plausibility import check_units
from mlfound.data.units import energy_factor


def strained_copper(num: int = 10, max_strain: float = 0.01) -> list[Record]:
    """A perfect fcc cell under random small strains: forces vanish by symmetry, so every energy difference
    between two frames is the strain's work (EMT: consistent energies, forces and stress)."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(num):
        atoms = bulk("Cu", cubic=True)
        strain = rng.uniform(-max_strain, max_strain, (3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
        atoms.calc = EMT()
        records.append(Record(z=atoms.numbers, pos_a=atoms.positions, energy_ev=atoms.get_potential_energy(),
                              forces_ev_a=atoms.get_forces(), cell_a=atoms.cell[:], pbc=atoms.pbc,
                              stress_ev_a3=atoms.get_stress(voigt=False), source="cu.extxyz", index=index))
    assert np.abs(np.stack([r.forces_ev_a for r in records])).max() < 1e-9
    assert np.ptp([r.energy_ev for r in records]) > 1e-3
    return records


def test_strained_cells_pass_with_their_stress_and_energies_in_kcal_do_not():
    records = strained_copper()
    check_units(records, "cu")  # the strain work accounts for the energy differences
    in_kcal = [dataclasses.replace(r, energy_ev=r.energy_ev / energy_factor("kcal/mol")) for r in records]
    with pytest.raises(DataError, match=r"cu: energy differences between nearby structures are 23.\dx what their "
                                        r"forces imply .*likely in kcal/mol"):
        check_units(in_kcal, "cu")
    without_stress = [dataclasses.replace(r, stress_ev_a3=None, energy_ev=r.energy_ev * 1000) for r in records]
    check_units(without_stress, "cu")  # no stress: pairs across cells cannot be judged, so none are


def test_a_few_nearby_pairs_cannot_refuse_real_data_and_many_still_catch_a_wrong_unit(paracetamol):
    """25 real HF/6-31G MD frames (the E1 grid's N = 25, subset 1) hold only 3 pairs within 0.25 Å, all about
    0.2 Å apart; their slope, 0.15, once stopped the grid as a unit mistake. Their interval is wide enough to
    prove nothing, while a wrong energy unit shifts every pair alike and is caught from as many pairs."""
    from mlfound.data.sets import split_records, subset

    pool = split_records(paracetamol, {"test": 50, "val": 25, "pool": None}, seed=0)["pool"]
    few_apart = subset(pool, 25, seed=107)
    check_units(few_apart, "hf")
    in_kcal = [dataclasses.replace(r, energy_ev=r.energy_ev / energy_factor("kcal/mol")) for r in pool[:40]]
    refused = r"hf: energy differences between nearby structures are 2\d.\dx .* over \d+ pairs; .* e\.g\. " \
              r".*hf_631g\.extxyz record \d+ minus .*likely in kcal/mol"
    with pytest.raises(DataError, match=refused):
        check_units(in_kcal, "hf")


@pytest.mark.parametrize("forces_factor", [units.Bohr, 1 / units.Bohr])
def test_forces_per_bohr_read_as_per_angstrom_are_caught_from_50_real_frames(paracetamol, forces_factor):
    """The smallest unit mistake the slope sees (1.89x), from the first 50 demo frames (34 pairs)."""
    per_bohr = [dataclasses.replace(r, forces_ev_a=r.forces_ev_a / forces_factor) for r in paracetamol[:50]]
    with pytest.raises(DataError, match=r"hf: energy differences between nearby structures are (0\.5|1\.8)"):
        check_units(per_bohr, "hf")
