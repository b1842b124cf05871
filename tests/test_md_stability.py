"""MD stability detector: the shipped model stays physical at 300 K; a bond that really breaks, atoms that
really collide and non-finite results are each reported with the right atoms, at the first check that saw
them. The breaking and colliding molecules use ASE's own ForceField with springs wrong on purpose."""
import math
import re
import warnings

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.ff import ForceField
from ase.io import read
from ase.utils.ff import Bond

from mlfound.calculator import MLFoundCalculator
from mlfound.md_stability import StabilityRun, bonded_pairs, first_unphysical_event, stability_summary

TIMESTEP_FS = 0.5
SPRING_EV_A2 = 10.0  # stiff enough that no held pair moves far at 600 K (kT = 0.05 eV)


@pytest.fixture(scope="module")
def ethanol(demo_dir):
    """C0 C1 O2 H3..H8 at GFN2-xTB; H3, H4, H5 sit on C0."""
    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":")
    atoms = next(a for a in frames if a.info["molecule"] == "ethanol")
    assert atoms.get_chemical_symbols() == ["C", "C", "O", "H", "H", "H", "H", "H", "H"]
    return atoms


@pytest.fixture(scope="module")
def boxed(ethanol):
    """ethanol in a (non-periodic) 50 Å cell: ASE's ForceField needs a cell for its minimum-image vectors."""
    atoms = ethanol.copy()
    atoms.cell = [50.0, 50.0, 50.0]
    return atoms


def elastic_network(atoms, springs: dict) -> ForceField:
    """ASE's ForceField: a spring holding every pair at its starting distance, except that ``springs`` maps a
    pair to ``(k_ev_a2, rest_length_a)`` or to None (no spring)."""
    bonds = []
    for i, j in zip(*np.triu_indices(len(atoms), k=1)):
        k_ev_a2, rest_a = springs.get((i, j), (SPRING_EV_A2, atoms.get_distance(i, j)))
        if k_ev_a2 is not None:
            bonds.append(Bond(int(i), int(j), k_ev_a2, rest_a))
    return ForceField(bonds=bonds)


def free_atom(atoms, atom: int) -> dict:
    return {(min(atom, j), max(atom, j)): (None, None) for j in range(len(atoms)) if j != atom}


def test_bonded_pairs_of_ethanol(ethanol):
    pairs, lengths_a = bonded_pairs(ethanol)
    assert pairs.tolist() == [[0, 1], [0, 3], [0, 4], [0, 5], [1, 2], [1, 6], [1, 7], [2, 8]]
    assert np.all((lengths_a > 0.9) & (lengths_a < 1.6))


def test_shipped_model_is_stable_at_300k(ethanol):
    calc = MLFoundCalculator("demo-reptile", head="gfn2_xtb")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # ASE 3.28 deprecates Langevin(fixcm=True): not used
        run = first_unphysical_event(ethanol, calc, temperature_k=300.0, steps=400, timestep_fs=TIMESTEP_FS)
    assert run == StabilityRun(time_fs=None, event=None, num_steps=400, length_fs=200.0, temperature_k=300.0, seed=0)


def test_a_breaking_bond_is_reported_with_its_pair_at_the_first_check(boxed):
    """H3 keeps one spring, to C0, resting at twice the C-H length: the bond stretches past 1.5x within fs."""
    springs = free_atom(boxed, 3) | {(0, 3): (SPRING_EV_A2, 2 * boxed.get_distance(0, 3))}
    runs = {check_every: first_unphysical_event(boxed, elastic_network(boxed, springs), temperature_k=600.0,
                                                steps=400, timestep_fs=TIMESTEP_FS, seed=1, check_every=check_every)
            for check_every in (1, 10)}
    every_step, every_10 = runs[1], runs[10]
    assert every_step.event.startswith("bond 0-3 (C-H) stretched to")
    assert every_10.event.startswith("bond 0-3 (C-H) stretched to")
    assert 0 < every_step.time_fs < 20.0  # ~5 fs for a 10 eV/Å pull on an H; thermal motion adds or takes a few
    # the same trajectory (same seed), seen every 10 steps: the first check at or after the event
    assert every_10.time_fs == math.ceil(every_step.time_fs / (10 * TIMESTEP_FS)) * 10 * TIMESTEP_FS
    assert every_10.num_steps == every_10.time_fs / TIMESTEP_FS


def test_colliding_atoms_are_reported_before_anything_else(boxed):
    """H3 stays bonded to C0 and is pulled onto H4 (start 1.7 Å apart), which the network holds in place."""
    springs = free_atom(boxed, 3) | {(0, 3): (SPRING_EV_A2, boxed.get_distance(0, 3)),
                                     (3, 4): (SPRING_EV_A2, 0.0)}
    run = first_unphysical_event(boxed, elastic_network(boxed, springs), temperature_k=300.0, steps=400,
                                 timestep_fs=TIMESTEP_FS, seed=2)
    assert run.event is not None and re.fullmatch(r"atoms 3 and 4 \(H-H\) at 0\.[0-4]\d Å", run.event), run
    assert run.time_fs > 0 and run.time_fs % (10 * TIMESTEP_FS) == 0


def test_a_physical_network_is_stable_at_600k(boxed):
    """The control of the two tests above: with every spring at its starting length nothing happens."""
    run = first_unphysical_event(boxed, elastic_network(boxed, {}), temperature_k=600.0, steps=400, seed=1)
    assert run.stable and run.num_steps == 400


class NaNAfter(Calculator):
    """Zero energy and forces for the first ``num_finite`` calculations, then ``property`` is NaN."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, num_finite: int, nan_property: str):
        super().__init__()
        self.num_finite, self.nan_property, self.num_calls = num_finite, nan_property, 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.num_calls += 1
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}
        if self.num_calls > self.num_finite:
            self.results[self.nan_property] = self.results[self.nan_property] * np.nan


@pytest.mark.parametrize("nan_property", ["energy", "forces"])
def test_non_finite_results_are_an_event(ethanol, nan_property):
    at_start = first_unphysical_event(ethanol, NaNAfter(0, nan_property), steps=100)
    assert (at_start.time_fs, at_start.event, at_start.num_steps) == (0.0, f"non-finite {nan_property}", 0)
    later = first_unphysical_event(ethanol, NaNAfter(25, nan_property), steps=100, timestep_fs=TIMESTEP_FS)
    assert later.event == f"non-finite {nan_property}"
    assert 0 < later.time_fs < 50.0 and later.time_fs % (10 * TIMESTEP_FS) == 0


class RaisesAfter(NaNAfter):
    """A calculator that refuses the geometry after ``num_finite`` calculations, as mlfound's refuses atoms
    closer than 0.5 Å."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.num_calls > self.num_finite:
            raise RuntimeError("geometry refused")


def test_a_calculator_error_during_the_run_is_an_event_at_the_next_check(ethanol):
    run = first_unphysical_event(ethanol, RaisesAfter(25, "energy"), steps=100, timestep_fs=TIMESTEP_FS)
    assert run.event == "calculator raised RuntimeError: geometry refused"
    assert 0 < run.time_fs < 50.0 and run.time_fs % (10 * TIMESTEP_FS) == 0
    with pytest.raises(RuntimeError, match="geometry refused"):  # on the starting structure: a broken setup
        first_unphysical_event(ethanol, RaisesAfter(0, "energy"), steps=100)


def test_summary_counts_stable_runs_at_their_full_length():
    stable = StabilityRun(None, None, 2000, 1000.0, 600.0, 0)
    runs = [stable, StabilityRun(250.0, "bond 0-3 ...", 500, 1000.0, 600.0, 1), stable,
            StabilityRun(40.0, "atoms 1 and 2 ...", 80, 1000.0, 600.0, 3)]
    summary = stability_summary(runs)
    assert summary == {"num_runs": 4, "num_stable": 2, "median_time_fs": 625.0, "min_time_fs": 40.0,
                       "length_fs": 1000.0, "temperature_k": 600.0,
                       "events": [None, "bond 0-3 ...", None, "atoms 1 and 2 ..."]}
    with pytest.raises(ValueError):
        stability_summary([])
