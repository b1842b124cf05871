"""Energy and force errors of a model on batches of labelled structures, and their table.

One definition for pretraining validation, fine-tuning early stopping and ``mlfound evaluate``:
energies per atom in meV/atom, forces per component in meV/Å, stress per component in meV/Å³;
structures without forces (or stress) count for what they have.
"""
from __future__ import annotations

import torch

from mlfound.data.batching import GraphBatch


def error_table(model, batches_by_task: dict[str, list[GraphBatch]],
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Per task (or head): energy MAE/RMSE (meV/atom), force MAE/RMSE (meV/Å), stress MAE (meV/Å³; NaN
    without stress labels), record counts. In a
    distributed run each rank passes its disjoint share and the sums are all-reduced, one all-reduce per
    task in the order of ``batches_by_task``: every rank must pass the same tasks in the same order, a
    task without batches on this rank (a split smaller than the world) included."""
    results = {}
    for task, batches in batches_by_task.items():
        # graphs, |dE|, dE², force comps, |dF|, dF², stress comps, |dσ|
        sums = torch.zeros(8, dtype=torch.float64, device=device)
        for batch in batches:
            batch = batch.to(device)
            with_stress = batch.num_stress_graphs > 0
            energy, forces, stress = model.energy_forces_stress(batch, True, with_stress, training=False)
            error_per_atom = (energy.detach() - batch.energy_ev) / batch.num_atoms
            sums[0] += batch.num_graphs
            sums[1] += error_per_atom.abs().sum()
            sums[2] += (error_per_atom**2).sum()
            has_forces = batch.has_forces[batch.graph_index]
            if has_forces.any():
                df = (forces.detach() - batch.forces_ev_a)[has_forces].double()
                sums[3] += df.numel()
                sums[4] += df.abs().sum()
                sums[5] += (df**2).sum()
            if with_stress:
                ds = (stress.detach() - batch.stress_ev_a3)[batch.has_stress].double()
                sums[6] += ds.numel()
                sums[7] += ds.abs().sum()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        n, nf = sums[0].item(), max(sums[3].item(), 1.0)
        results[task] = {
            "num_records": int(n),
            "energy_mae_mev_atom": 1e3 * sums[1].item() / n, "energy_rmse_mev_atom": 1e3 * (sums[2].item() / n) ** 0.5,
            "forces_mae_mev_a": 1e3 * sums[4].item() / nf if sums[3] else float("nan"),
            "forces_rmse_mev_a": 1e3 * (sums[5].item() / nf) ** 0.5 if sums[3] else float("nan"),
            "stress_mae_mev_a3": 1e3 * sums[7].item() / sums[6].item() if sums[6] else float("nan"),
        }
    return results


def format_error_table(results: dict[str, dict[str, float]]) -> str:
    """The table, with a stress column where any task has stress labels."""
    stress = any(r.get("stress_mae_mev_a3", float("nan")) == r.get("stress_mae_mev_a3") for r in results.values())
    lines = [f"{'task':<14}{'records':>8}{'E MAE':>9}{'E RMSE':>9}{'F MAE':>9}{'F RMSE':>9}" + f"{'S MAE':>9}" * stress,
             f"{'':<14}{'':>8}{'meV/atom':>18}{'meV/Å':>18}" + f"{'meV/Å³':>9}" * stress]
    for task, r in results.items():
        lines.append(f"{task:<14}{r['num_records']:>8}{r['energy_mae_mev_atom']:>9.1f}{r['energy_rmse_mev_atom']:>9.1f}"
                     f"{r['forces_mae_mev_a']:>9.1f}{r['forces_rmse_mev_a']:>9.1f}"
                     + (f"{r.get('stress_mae_mev_a3', float('nan')):>9.2f}" * stress))
    return "\n".join(lines)
