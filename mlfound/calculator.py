"""ASE calculator for a released model, reading out one named head.

The head is never guessed: an unknown head is an error listing the heads the model has, because a
silent fallback to another head would give energies at another level of theory.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.md import velocitydistribution
from ase.stress import full_3x3_to_voigt_6_stress

from mlfound.committee import members, spread
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A, DataError, Record, closest_pair
from mlfound.predict import predict_with_stress
from mlfound.release import Release, load

# ASE >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta and deprecated the old name
thermalize = getattr(velocitydistribution, "thermalize_momenta", velocitydistribution.MaxwellBoltzmannDistribution)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MLFoundCalculator(Calculator):
    """``MLFoundCalculator("model.safetensors", head="hf_631g", dtype="float64")``: energy (eV), forces (eV/Å),
    and for cells periodic in all three directions stress (eV/Å³, ASE's Voigt order and sign).

    ``model`` is a release path, a registry name or a loaded ``Release``. float64 costs about twice the
    time of float32 and makes long NVE runs conserve energy to round-off of the model, not of float32.

    Atoms closer than ``min_distance_a`` (periodic images included) are an error naming them: two atoms
    at one position give NaN energies and forces, and an MD run would carry on with them silently.
    ``min_distance_a=0`` switches the guard off.

    ``committee=True`` (a head fine-tuned with ``--committee K``) also evaluates the head's K - 1 other members
    (K times the cost) and adds their spread to ``results``: ``committee_energy_std`` (eV/atom),
    ``committee_forces_deviation`` (per atom, eV/Å) and ``committee_max_forces_deviation`` (eV/Å), DeePMD's
    model deviation; energy and forces stay the head's own (mlfound/committee.py)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Release | str, head: str, dtype: str = "float32", device: str = "cpu",
                 min_distance_a: float = DEFAULT_MIN_DISTANCE_A, committee: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.min_distance_a = min_distance_a
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.release = model if isinstance(model, Release) else load(model)
        self.release.check_head(head)
        self.head = head
        self.members = members(self.release.metadata, head) if committee else [head]
        if committee and len(self.members) == 1:
            raise ValueError(f"head {head!r} has no committee: fine-tune it with `mlfound finetune --committee K`")
        self.model = copy.deepcopy(self.release.model).to(device=device, dtype=DTYPES[dtype]).eval()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.any())
        record = Record(z=self.atoms.numbers.astype(np.int64), pos_a=self.atoms.positions.astype(np.float64),
                        energy_ev=float("nan"), cell_a=np.asarray(self.atoms.cell[:], np.float64) if periodic else None,
                        pbc=self.atoms.pbc.copy() if periodic else None, task=self.head, source="ase.Atoms")
        pair = closest_pair(record, self.min_distance_a) if self.min_distance_a > 0 else None
        if pair is not None:
            i, j, distance = pair
            raise DataError(f"atoms {i} ({self.atoms.get_chemical_symbols()[i]}) and {j} "
                            f"({self.atoms.get_chemical_symbols()[j]}) are {distance:.3f} Å apart, closer than "
                            f"min_distance_a = {self.min_distance_a} Å: the model is meaningless there (coincident "
                            "atoms give NaN). Fix the structure, or pass MLFoundCalculator(..., min_distance_a=...)")
        compute_stress = "stress" in properties
        if compute_stress and not (self.atoms.pbc.all() and self.atoms.cell.rank == 3):
            raise PropertyNotImplementedError(f"stress needs a cell periodic in all three directions; these atoms "
                                              f"have pbc={self.atoms.pbc.tolist()} and a cell of rank "
                                              f"{self.atoms.cell.rank}")
        energy_ev, forces, stresses = predict_with_stress(self.model, [record], self.head, True, compute_stress)
        self.results = {"energy": float(energy_ev[0]), "free_energy": float(energy_ev[0]), "forces": forces[0]}
        if len(self.members) > 1:
            others = [predict_with_stress(self.model, [record], member, True, False) for member in self.members[1:]]
            committee = spread([float(energy_ev[0])] + [float(e[0]) for e, _, _ in others],
                               [forces[0]] + [f[0] for _, f, _ in others], len(record.z))
            self.results |= {"committee_energy_std": committee["energy_std_ev_atom"],
                             "committee_forces_deviation": committee["forces_deviation_ev_a"],
                             "committee_max_forces_deviation": committee["max_forces_deviation_ev_a"]}
        if compute_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(stresses[0])
