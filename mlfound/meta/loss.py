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


def potential_loss(model, batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MSE of energy per atom and forces, in σ units; also the unweighted parts for logging, as
    detached tensors on the batch's device (reading them is a host sync: do it on log steps only). Whether
    forces count is known on the host (``batch.num_force_atoms``), so no step waits for the device."""
    with_forces = weights.forces > 0 and batch.num_force_atoms > 0
    energy_G, forces_N3 = model(batch, compute_forces=with_forces, training=True)
    scale_G = model.scales_ev[batch.task_index]
    energy_error_G = (energy_G - batch.energy_ev) / batch.num_atoms / scale_G
    energy_mse = (energy_error_G**2).mean()
    loss = weights.energy * energy_mse.float()
    parts = {"energy_mse": energy_mse.detach()}
    if with_forces:
        scale_N = scale_G[batch.graph_index].unsqueeze(-1).float()
        force_error_N3 = (forces_N3 - batch.forces_ev_a) / scale_N
        has_forces_N1 = batch.has_forces[batch.graph_index].unsqueeze(-1)
        force_mse = (force_error_N3**2 * has_forces_N1).sum() / (3 * batch.num_force_atoms)
        loss = loss + weights.forces * force_mse
        parts["forces_mse"] = force_mse.detach()
    return loss, parts
