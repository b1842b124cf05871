"""Committees: K heads of one LoT on one fine-tuned trunk, whose disagreement says where the head should not be
trusted, as DeePMD's model deviation does with K models (the structures an active-learning loop labels next).

Member 0 is the fine-tuned head itself, so a committee never changes what the head predicts; members 1..K-1
(``<head>_committee<i>``) are heads drawn afresh and trained on bootstrap resamples of the training set with
the trunk frozen (``mlfound.finetune``). The spread of a structure is its largest per-atom force deviation
sqrt(mean_k |F_k - mean F|^2), in eV/Å, and the standard deviation of its energy per atom."""
from __future__ import annotations

import numpy as np

SUFFIX = "_committee"


def member_names(head: str, size: int) -> list[str]:
    """The heads of a committee of ``size`` for ``head``, the head itself first."""
    return [head] + [f"{head}{SUFFIX}{i}" for i in range(1, size)]


def members(metadata: dict, head: str) -> list[str]:
    """``head``'s committee as its release records it; a head without one is a committee of one."""
    return metadata["heads"][head].get("committee", [head])


def force_deviation(forces_KN3: np.ndarray) -> np.ndarray:
    """(N,) per-atom force deviation over the K members, eV/Å."""
    return np.sqrt(((forces_KN3 - forces_KN3.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))


def spread(energies_ev: list[float], forces: list[np.ndarray], num_atoms: int) -> dict:
    """One structure's committee spread from the members' energies (eV) and forces ((N, 3) eV/Å each)."""
    per_atom = force_deviation(np.stack(forces))
    return {"energy_std_ev_atom": float(np.std(energies_ev) / num_atoms), "forces_deviation_ev_a": per_atom,
            "max_forces_deviation_ev_a": float(per_atom.max(initial=0.0))}
