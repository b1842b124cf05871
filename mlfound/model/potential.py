"""Potential: E = Σ_atoms [e_Z(task) + σ_task · head_task(trunk(atoms))], F = -∂E/∂pos, stress = ∂E/∂ε / V.

The per-task references e_Z (float64, from the shard manifests) absorb the LoT's absolute energy
scale, so tasks that disagree by thousands of eV train together; σ_task puts the network's output
in the task's natural unit. Total energies are summed in float64. The strain and the stress are
``mlfound.model.physics``'s, which the deployed TorchScript head shares.
"""
from __future__ import annotations

import torch
from torch import nn

from mlfound.model import compiled, physics
from mlfound.model.config import ModelConfig
from mlfound.model.heads import TaskHeads
from mlfound.model.ops import COMPILED_CONSTANT
from mlfound.model.trunk import Trunk

NUM_Z = 119


def _drop_compiled_constants(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if COMPILED_CONSTANT in k]:
        del state_dict[key]


def _ignore_compiled_constants(module, incompatible_keys) -> None:
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if COMPILED_CONSTANT not in k]


class Potential(nn.Module):
    def __init__(self, config: ModelConfig, elements: list[int], task_names: list[str],
                 references_ev: dict[str, dict[int, float]], scales_ev: dict[str, float]):
        super().__init__()
        if config.avg_num_neighbors is None:
            raise ValueError("model.avg_num_neighbors is unset: give a number, or build the model from shard "
                             "manifests with mlfound.train.build.build_potential, which counts it from the data")
        self.config, self.elements, self.task_names = config, sorted(elements), list(task_names)
        species_of_z = torch.full((NUM_Z,), -1, dtype=torch.long)
        species_of_z[self.elements] = torch.arange(len(self.elements))
        self.register_buffer("species_of_z", species_of_z, persistent=False)
        # NaN marks an element a task's data never contained: its absolute energy there is undefined
        refs = torch.full((len(task_names), len(self.elements)), float("nan"), dtype=torch.float64)
        for t, task in enumerate(task_names):
            for z, e in references_ev[task].items():
                refs[t, self.elements.index(int(z))] = e
        self.register_buffer("references_ev", refs)  # (T, S) float64
        self.register_buffer("scales_ev", torch.tensor([scales_ev[t] for t in task_names], dtype=torch.float64))
        self.trunk = Trunk(config, len(self.elements))
        self.heads = TaskHeads(task_names, config.channels, config.head_hidden)
        # forces (and stress) from one traced graph that torch.compile fuses (mlfound.model.compiled): a runtime
        # choice, not part of the architecture or the release; batches without edges stay eager
        self.compiled_forces = False
        self.register_state_dict_post_hook(_drop_compiled_constants)
        self.register_load_state_dict_post_hook(_ignore_compiled_constants)

    def _apply(self, fn, recurse=True):
        """``.float()``, ``.to(torch.bfloat16)`` etc. cast the weights but never the float64 references and
        scales: absolute energies of thousands of eV need float64 (moving to a device still applies)."""
        kept = {name: getattr(self, name) for name in ("references_ev", "scales_ev")}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            setattr(self, name, value.to(getattr(self, name).device))
        return self

    @staticmethod
    def head_prefix(task: str) -> str:
        """How the names of ``task``'s head parameters begin (``named_parameters``, state dicts)."""
        return f"heads.heads.{task}."

    def missing_references(self, task: str, elements) -> list[int]:
        """Elements among ``elements`` for which ``task``'s head has no reference energy."""
        refs = self.references_ev[self.task_names.index(task)]
        return sorted(int(z) for z in set(elements) if int(z) in self.elements
                      and torch.isnan(refs[self.elements.index(int(z))]).item())

    def check_elements(self, elements) -> None:
        """A ValueError naming the elements among ``elements`` this model has no species for."""
        unknown = sorted({int(z) for z in elements} - set(self.elements))
        if unknown:
            raise ValueError(f"elements {unknown} are unknown to this model; it knows {self.elements}")

    def species(self, z_N: torch.Tensor) -> torch.Tensor:
        """Species indices. On an accelerator the unknown-element check is a device-side assert, since reading
        it on the host would stall every training step: callers check on the host first (``predict``,
        fine-tuning; in pretraining the model's elements are those of the shards)."""
        species_N = self.species_of_z[z_N]
        if z_N.device.type != "cpu":
            torch._assert_async((species_N >= 0).all(), f"an element unknown to this model; it knows {self.elements}")
        elif (species_N < 0).any():
            self.check_elements(z_N.tolist())
        return species_N

    def _energy_and_gradients(self, batch, pos_N3, compute_forces, compute_stress, training):
        """Eager autograd: the energy and its gradients wrt positions and strain (those asked for)."""
        wrt = []
        if compute_forces:
            pos_N3 = pos_N3.detach().requires_grad_(True)
            wrt.append(pos_N3)
        strain_G33 = None
        if compute_stress:
            strain_G33 = torch.zeros((batch.num_graphs, 3, 3), dtype=pos_N3.dtype, device=pos_N3.device,
                                     requires_grad=True)
            wrt.append(strain_G33)
        energy_G = self.energy(batch, pos_N3, strain_G33)
        return energy_G, list(torch.autograd.grad(energy_G.sum(), wrt, create_graph=training)) if wrt else []

    def energy(self, batch, pos_N3: torch.Tensor, strain_G33: torch.Tensor | None = None,
               species_N: torch.Tensor | None = None) -> torch.Tensor:
        """(G,) float64 total energies in eV; ``pos_N3`` (and ``strain_G33``, symmetrised here) are passed
        separately so forces (and stress) can differentiate them. ``species_N``: the species of ``batch.z`` when
        the caller has them (the compiled graph, which cannot read the unknown-element check on the host)."""
        species_N = self.species(batch.z) if species_N is None else species_N
        edge_graph_E = batch.graph_index[batch.edge_index[1]] if strain_G33 is not None else None
        vectors_E3 = physics.edge_vectors(pos_N3, batch.edge_index, batch.edge_shift_a, strain_G33, edge_graph_E)
        features_NC = self.trunk(species_N, vectors_E3, batch.edge_index)
        task_N = batch.task_index[batch.graph_index]
        out_N = self.heads(features_NC, task_N)
        atom_energy_N = self.references_ev[task_N, species_N] + self.scales_ev[task_N] * out_N.double()
        energy_G = torch.zeros(batch.num_graphs, dtype=torch.float64, device=pos_N3.device)
        return energy_G.index_add_(0, batch.graph_index, atom_energy_N)

    def forward(self, batch, compute_forces: bool = True, training: bool = False):
        """Energies (G,) float64 eV and forces (N, 3) eV/Å (None if not asked for)."""
        energy_G, forces_N3, _ = self.energy_forces_stress(batch, compute_forces, False, training)
        return energy_G, forces_N3

    def energy_forces_stress(self, batch, compute_forces: bool = True, compute_stress: bool = True,
                             training: bool = False):
        """Energies (G,) float64 eV, forces (N, 3) eV/Å and stress (G, 3, 3) eV/Å³, each None if not asked
        for, from one backward pass. A graph without a 3-D cell (``batch.volume_a3`` 0) has NaN stress."""
        # geometry in at least float32 even when the weights are bf16: bf16 positions would be off by ~0.02 Å
        pos_N3 = batch.pos_a.to(torch.promote_types(next(self.parameters()).dtype, torch.float32))
        if self.compiled_forces and compute_forces and batch.edge_index.shape[1] > 0:
            # in the caller's grad mode: an evaluation during training reuses the training graph, not another compile
            energy_G, *grads = compiled.energy_and_gradients(self, batch, pos_N3, compute_stress)
            grads = grads if training else [g.detach() for g in grads]  # as eager autograd without create_graph
        else:
            energy_G, grads = self._energy_and_gradients(batch, pos_N3, compute_forces, compute_stress, training)
        if not grads:
            return energy_G, None, None
        forces_N3 = -grads.pop(0) if compute_forces else None
        stress_G33 = physics.stress(grads[0], batch.volume_a3) if compute_stress else None
        return energy_G, forces_N3, stress_G33
