"""MD stability of any ASE calculator: Langevin MD until the first unphysical event, as peers report it
("time to the first unphysical event"; Fu et al., "Forces are not enough", TMLR 2023).

    from mlfound.md_stability import first_unphysical_event, stability_summary
    runs = [first_unphysical_event(atoms, calc, temperature_k=600.0, steps=4000, seed=seed) for seed in range(10)]
    stability_summary(runs)  # {"num_runs": 10, "num_stable": 9, "median_time_fs": 2000.0, ...}

An event is unphysical when, at a check (every ``check_every`` steps), any of these holds, tested in this order:

1. **non-finite** energy, forces or positions: the run has numerically blown up.
2. **close contact**: two atoms closer than ``min_distance_a`` (0.5 Å). No chemistry puts nuclei that close
   (H2 is 0.74 Å); a potential letting atoms run into each other has a hole in its repulsion.
3. **broken bond**: a bonded pair stretched beyond ``max_stretch`` (1.5) times its starting length. Bonded
   means closer than 1.2 x the sum of the covalent radii (``ase.data.covalent_radii``) in the starting
   structure. The molecules here are closed-shell, and at 600 K no bond breaks on ps time scales (a C-H
   bond stretched 1.5x costs about 2 eV, against kT = 0.05 eV), so a broken bond is the potential's fault.

Checking every ``check_every`` steps (default 10, 5 fs) keeps the cost of the checks small next to the
potential's, and reports an event at the first check that sees it; an event that undoes itself within
fewer steps (two atoms passing through each other) can go unseen. That is a bound on the time resolution,
not on correctness: a broken potential keeps producing events.

An exception raised by the calculator during the dynamics (e.g. mlfound's calculator refuses atoms closer
than 0.5 Å) is an event too: it is reported at the next check, by the geometry if the geometry shows one,
else by the exception, so calculators that raise and calculators that don't give comparable times. An error
on the starting structure is not caught: that is a broken setup, not an unstable potential.

Dynamics: ``ase.md.langevin.Langevin`` with friction ``friction_per_fs`` (default 0.01 fs^-1 = 10 ps^-1, a
common choice that thermalizes in ~100 fs without damping vibrations much), initial velocities from
Maxwell-Boltzmann (``thermalize_momenta``) at ``temperature_k``, and the centre of mass fixed by
``ase.constraints.FixCom`` (ASE's replacement for the deprecated ``fixcm=True``). One
``numpy.random.Generator`` seeded with ``seed`` draws both the velocities and the thermostat noise, so a run
is reproducible for a deterministic calculator.

Imports only numpy, ASE and the standard library, so a peer's venv (MACE, NequIP) can load this file by path.
"""
import dataclasses
import statistics

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.data import covalent_radii
from ase.md import velocitydistribution
from ase.md.langevin import Langevin

BOND_FACTOR = 1.2  # bonded: closer than this x the sum of covalent radii at the start
MAX_STRETCH = 1.5  # a bond longer than this x its starting length is broken
MIN_DISTANCE_A = 0.5  # atoms closer than this are a close contact

# ASE >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta and deprecated the old name
_thermalize = getattr(velocitydistribution, "thermalize_momenta", velocitydistribution.MaxwellBoltzmannDistribution)


@dataclasses.dataclass(frozen=True)
class StabilityRun:
    """One Langevin run: ``time_fs`` of the first unphysical event (None: stayed physical for the whole
    run), ``event`` naming it (None when stable), ``num_steps`` run, and the run's settings."""

    time_fs: float | None
    event: str | None
    num_steps: int
    length_fs: float  # the planned length, steps x timestep
    temperature_k: float
    seed: int

    @property
    def stable(self) -> bool:
        return self.time_fs is None


def bonded_pairs(atoms: Atoms, bond_factor: float = BOND_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, i < j, closer than ``bond_factor`` x the sum of their covalent radii, and their
    lengths in Å, shape (num_pairs, 2) and (num_pairs,).

    >>> from ase.build import molecule
    >>> pairs, lengths_a = bonded_pairs(molecule("H2O"))
    >>> pairs.tolist(), lengths_a.round(2).tolist()
    ([[0, 1], [0, 2]], [0.97, 0.97])
    """
    distances_a = _distances_a(atoms)
    radii_a = covalent_radii[atoms.numbers]
    i, j = np.triu_indices(len(atoms), k=1)
    bonded = distances_a[i, j] < bond_factor * (radii_a[i] + radii_a[j])
    return np.stack([i[bonded], j[bonded]], axis=1), distances_a[i[bonded], j[bonded]]


def find_event(atoms: Atoms, pairs: np.ndarray, start_lengths_a: np.ndarray, min_distance_a: float = MIN_DISTANCE_A,
               max_stretch: float = MAX_STRETCH) -> str | None:
    """The unphysical event in ``atoms``' current state (see the module docstring), or None."""
    energy_ev, forces = atoms.get_potential_energy(), atoms.get_forces()
    if not np.isfinite(energy_ev):
        return "non-finite energy"
    if not np.isfinite(forces).all():
        return "non-finite forces"
    if not np.isfinite(atoms.positions).all():
        return "non-finite positions"
    return geometry_event(atoms, pairs, start_lengths_a, min_distance_a, max_stretch)


def geometry_event(atoms: Atoms, pairs: np.ndarray, start_lengths_a: np.ndarray,
                   min_distance_a: float = MIN_DISTANCE_A, max_stretch: float = MAX_STRETCH) -> str | None:
    """A close contact (the closest pair) or a broken bond (the most stretched one) in ``atoms``, or None."""
    distances_a = _distances_a(atoms)
    symbols = atoms.get_chemical_symbols()
    i, j = np.triu_indices(len(atoms), k=1)
    if len(i) and distances_a[i, j].min() < min_distance_a:
        k = int(np.argmin(distances_a[i, j]))
        a, b = int(i[k]), int(j[k])
        return f"atoms {a} and {b} ({symbols[a]}-{symbols[b]}) at {distances_a[a, b]:.2f} Å"
    if len(pairs):
        stretch = distances_a[pairs[:, 0], pairs[:, 1]] / start_lengths_a
        k = int(np.argmax(stretch))
        if stretch[k] > max_stretch:
            a, b = (int(x) for x in pairs[k])
            return (f"bond {a}-{b} ({symbols[a]}-{symbols[b]}) stretched to {distances_a[a, b]:.2f} Å "
                    f"({stretch[k]:.2f}x its start {start_lengths_a[k]:.2f} Å)")
    return None


def first_unphysical_event(atoms: Atoms, calc, temperature_k: float = 600.0, steps: int = 4000,
                           timestep_fs: float = 0.5, friction_per_fs: float = 0.01, seed: int = 0,
                           check_every: int = 10, min_distance_a: float = MIN_DISTANCE_A,
                           max_stretch: float = MAX_STRETCH) -> StabilityRun:
    """Run Langevin MD of a copy of ``atoms`` with ``calc`` for ``steps`` steps; stop at the first
    unphysical event (module docstring). Checks run at step 0, every ``check_every`` steps and at the end,
    so an event's ``time_fs`` is that of the first check that saw it: a multiple of
    ``check_every * timestep_fs``, or the run's end."""
    if steps < 0 or check_every < 1:
        raise ValueError(f"need steps >= 0 and check_every >= 1, got steps={steps}, check_every={check_every}")
    atoms = atoms.copy()
    atoms.set_constraint([*atoms.constraints, FixCom()])
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    _thermalize(atoms, temperature_K=temperature_k, rng=rng)
    dynamics = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k,
                        friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    pairs, start_lengths_a = bonded_pairs(atoms)

    def result(step: int, event: str | None) -> StabilityRun:
        return StabilityRun(time_fs=None if event is None else step * timestep_fs, event=event, num_steps=step,
                            length_fs=steps * timestep_fs, temperature_k=temperature_k, seed=seed)

    event = find_event(atoms, pairs, start_lengths_a, min_distance_a, max_stretch)
    step = 0
    while event is None and step < steps:
        num_steps = min(check_every, steps - step)
        try:
            dynamics.run(num_steps)
        except Exception as err:  # the calculator gave up on the geometry the dynamics reached
            step += num_steps
            event = geometry_event(atoms, pairs, start_lengths_a, min_distance_a, max_stretch)
            event = event or f"calculator raised {type(err).__name__}: {err}"
            break
        step += num_steps
        event = find_event(atoms, pairs, start_lengths_a, min_distance_a, max_stretch)
    return result(step, event)


def stability_summary(runs: list[StabilityRun]) -> dict:
    """Counts and times of ``runs``: a stable run counts at its full length in ``median_time_fs`` and
    ``min_time_fs`` (censored: a lower bound on its true time to an event), so a longer run can only raise
    them; ``events`` lists each run's event (None: stable).

    >>> stable = StabilityRun(None, None, 100, 50.0, 600.0, 0)
    >>> broke = StabilityRun(20.0, "bond 0-1 ...", 40, 50.0, 600.0, 1)
    >>> s = stability_summary([stable, broke, stable])
    >>> s["num_runs"], s["num_stable"], s["median_time_fs"], s["min_time_fs"]
    (3, 2, 50.0, 20.0)
    """
    if not runs:
        raise ValueError("stability_summary needs at least one run")
    times_fs = [run.length_fs if run.stable else run.time_fs for run in runs]
    return {"num_runs": len(runs), "num_stable": sum(run.stable for run in runs),
            "median_time_fs": statistics.median(times_fs), "min_time_fs": min(times_fs),
            "length_fs": max(run.length_fs for run in runs), "temperature_k": runs[0].temperature_k,
            "events": [run.event for run in runs]}


def _distances_a(atoms: Atoms) -> np.ndarray:
    """All pair distances in Å, (num_atoms, num_atoms); minimum image along periodic directions."""
    return atoms.get_all_distances(mic=bool(atoms.pbc.any()))
