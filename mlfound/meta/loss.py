"""Training loss in each task's natural units.

Energy per atom and forces are divided by the task's scale σ so tasks with different label
magnitudes weigh alike; graphs without force labels contribute energy only. DESIGN.md records
that an energy weight ~10x the force weight kept energies from degrading on small data.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LossWeights:
    energy: float = 10.0
    forces: float = 1.0


def potential_loss(model, batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted MSE of energy per atom and forces, in σ units; also the unweighted parts for logging."""
    energy_G, forces_N3 = model(batch, compute_forces=weights.forces > 0, training=True)
    scale_G = model.scales_ev[batch.task_index]
    energy_error_G = (energy_G - batch.energy_ev) / batch.num_atoms / scale_G
    energy_mse = (energy_error_G**2).mean()
    loss = weights.energy * energy_mse.float()
    parts = {"energy_mse": energy_mse.item()}
    atom_has_forces_N = batch.has_forces[batch.graph_index]
    if weights.forces > 0 and atom_has_forces_N.any():
        scale_N = scale_G[batch.graph_index].unsqueeze(-1).float()
        force_error_N3 = (forces_N3 - batch.forces_ev_a) / scale_N
        force_mse = (force_error_N3[atom_has_forces_N] ** 2).mean()
        loss = loss + weights.forces * force_mse
        parts["forces_mse"] = force_mse.item()
    return loss, parts
