"""Energies, forces and stress of a model for a list of records under one head, batched by an atom budget.

The single path from structures to predictions: fine-tuning's head scores, ``mlfound evaluate`` and
the ASE calculator all go through ``predict``, so they cannot disagree about what a head predicts; the
TorchScript head ``mlfound deploy`` writes shares the model's geometry and stress (``mlfound.model.physics``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mlfound.data.batching import GraphBatch, atom_budget_batches, collate
from mlfound.data.record import DataError, Record

DEFAULT_MAX_ATOMS = 512


def head_batches(records: list[Record], head: str, task_names: list[str], cutoff_a: float,
                 max_atoms: int = DEFAULT_MAX_ATOMS) -> list[GraphBatch]:
    """Batches in which every structure is read out by ``head`` (whatever LoT its labels are at)."""
    if head not in task_names:
        raise ValueError(f"no head {head!r}; available heads: {task_names}")
    as_head = [dataclasses.replace(rec, task=head) for rec in records]
    return [collate(chunk, cutoff_a, task_names) for chunk in atom_budget_batches(as_head, max_atoms)]


def predict(model, records: list[Record], head: str, compute_forces: bool = True,
            max_atoms: int = DEFAULT_MAX_ATOMS) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Total energies (G,) float64 eV and, if asked, per-structure forces (N_i, 3) eV/Å."""
    energies, forces, _ = predict_with_stress(model, records, head, compute_forces, False, max_atoms)
    return energies, forces


def check_head_elements(model, head: str, elements: set[int]) -> None:
    """A DataError unless the model knows every element and ``head`` has a reference energy for each. Checked
    on the host: on an accelerator the model can only assert. Every consumer (calculator, evaluate, MD) calls it."""
    try:
        model.check_elements(elements)
    except ValueError as err:
        raise DataError(str(err)) from None
    missing = model.missing_references(head, elements) if head in model.task_names else []
    if missing:
        raise DataError(f"head {head!r} has no reference energy for elements {missing}: its training data contained "
                         "none, so its absolute energies are undefined there. Use another head, or fine-tune this one "
                         "on data containing them")


def predict_with_stress(model, records: list[Record], head: str, compute_forces: bool = True,
                        compute_stress: bool = True, max_atoms: int = DEFAULT_MAX_ATOMS):
    """``predict``, plus per-structure stress (3, 3) eV/Å³ in ASE's sign (NaN without a 3-D periodic cell)
    when asked: (energies, forces or None, stresses or None), from one backward pass per batch."""
    check_head_elements(model, head, {int(z) for rec in records for z in rec.z})
    device = next(model.parameters()).device
    energies, forces, stresses = [], [], []
    for batch in head_batches(records, head, model.task_names, model.config.cutoff_a, max_atoms):
        batch = batch.to(device)
        with torch.set_grad_enabled(compute_forces or compute_stress):  # derivatives need autograd
            energy_G, forces_N3, stress_G33 = model.energy_forces_stress(batch, compute_forces, compute_stress)
        energies.append(energy_G.detach().cpu().numpy())
        if compute_forces:
            split = torch.split(forces_N3.detach().cpu().double(), batch.num_atoms.tolist())
            forces.extend(f.numpy() for f in split)
        if compute_stress:
            stresses.extend(stress_G33.detach().cpu().double().numpy())
    return (np.concatenate(energies), forces if compute_forces else None,
            stresses if compute_stress else None)


def network_energy(model, records: list[Record], head: str, energy_ev: np.ndarray | None = None) -> np.ndarray:
    """The network's part of each energy under ``head``: total (predicted here unless given) minus the
    head's reference energies."""
    if energy_ev is None:
        energy_ev, _ = predict(model, records, head, compute_forces=False)
    t = model.task_names.index(head)
    refs = dict(zip(model.elements, model.references_ev[t].tolist()))
    return energy_ev - np.array([sum(refs[int(z)] for z in rec.z) for rec in records])
