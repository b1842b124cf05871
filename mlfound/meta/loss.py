"""Training loss in each task's natural units.

Energy per atom, forces and the virial per atom (stress x volume / atoms, an energy per atom like the first)
are divided by the task's scale σ so tasks with different label magnitudes weigh alike; graphs without force
or stress labels contribute what they have. The default energy weight is 10x the force weight: with the
forces weighted 10x the energy instead, energies ended worse than the references alone, and the 10:1 weighting
fixed that at +9% force error (the project's first measurements).
"""
from __future__ import annotations

import torch

from mlfound.config import LossConfig


def potential_loss(model, batch, weights: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MSE of energy per atom, forces and virial per atom, in σ units; also the unweighted parts for
    logging, as detached tensors on the batch's device (reading them is a host sync: do it on log steps only).
    Whether forces and stress count is known on the host (``batch.num_force_atoms``, ``num_stress_graphs``), so
    no step waits for the device, and a batch without stress labels costs no stress."""
    with_forces = weights.forces_weight > 0 and batch.num_force_atoms > 0
    with_stress = weights.stress_weight > 0 and batch.num_stress_graphs > 0
    energy_G, forces_N3, stress_G33 = model.energy_forces_stress(batch, with_forces, with_stress, training=True)
    scale_G = model.scales_ev[batch.task_index]
    energy_error_G = (energy_G - batch.energy_ev) / batch.num_atoms / scale_G
    energy_mse = (energy_error_G**2).mean()
    loss = weights.energy_weight * energy_mse.float()
    parts = {"energy_mse": energy_mse.detach()}
    if with_forces:
        scale_N = scale_G[batch.graph_index].unsqueeze(-1).float()
        force_error_N3 = (forces_N3 - batch.forces_ev_a) / scale_N
        has_forces_N1 = batch.has_forces[batch.graph_index].unsqueeze(-1)
        force_mse = (force_error_N3**2 * has_forces_N1).sum() / (3 * batch.num_force_atoms)
        loss = loss + weights.forces_weight * force_mse
        parts["forces_mse"] = force_mse.detach()
    if with_stress:
        to_virial_per_atom_G11 = (batch.volume_a3 / batch.num_atoms / scale_G)[:, None, None]
        has_stress_G11 = batch.has_stress[:, None, None]
        error_G33 = torch.where(has_stress_G11, (stress_G33 - batch.stress_ev_a3) * to_virial_per_atom_G11, 0.0)
        stress_mse = (error_G33**2).sum() / (9 * batch.num_stress_graphs)
        loss = loss + weights.stress_weight * stress_mse.float()
        parts["stress_mse"] = stress_mse.detach()
    return loss, parts


def validation_loss(errors: dict, sigma_ev: float, weights: LossConfig) -> float:
    """The training loss's form on validation RMSEs (``errors`` as mlfound.metrics writes them; σ in eV), so
    early stopping watches what is optimised. Stress is left out (validation reports its MAE, no RMSE)."""
    loss = weights.energy_weight * (errors["energy_rmse_mev_atom"] / 1e3 / sigma_ev) ** 2
    if errors["forces_rmse_mev_a"] == errors["forces_rmse_mev_a"]:  # not NaN: the split has forces
        loss += weights.forces_weight * (errors["forces_rmse_mev_a"] / 1e3 / sigma_ev) ** 2
    return loss
