"""A release head as a torch-sim model: many systems integrated at once, one forward pass per step.

torch-sim (``pip install -e '.[batched-md]'``) keeps every system of a simulation in one state: positions
(N, 3), cells (G, 3, 3) as column vectors, ``system_idx`` (N,) and one ``pbc`` flag for all. ``TorchSimModel``
turns that state into one GraphBatch read out by the chosen head, with vesin-torch neighbour lists built on the
state's device, and returns what torch-sim's integrators and optimisers read: energy (G,) eV, forces (N, 3) eV/Å
and stress (G, 3, 3) eV/Å³ in ASE's sign (as torch-sim's MACE model), all from one backward pass.
"""
from __future__ import annotations

import copy

import torch
from torch_sim.models.interface import ModelInterface

from mlfound.data.batching import GraphBatch, device_neighbour_lists
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A, DataError
from mlfound.predict import check_head_elements
from mlfound.release import Release, load


class TorchSimModel(ModelInterface):
    """``TorchSimModel("model.safetensors", head="hf_631g", dtype=torch.float64)`` for ``torch_sim.integrate``,
    ``torch_sim.optimize`` and ``torch_sim.static``.

    As the ASE calculator, it refuses a step where two atoms of a system come closer than ``min_distance_a``
    (the model is meaningless there and would give NaN), naming the system and the atoms; ``0`` switches the
    guard off. Stress needs 3-D periodic systems (``pbc=True``); without it, ``compute_stress=False``."""

    def __init__(self, model: Release | str, head: str, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", compute_stress: bool = True,
                 min_distance_a: float = DEFAULT_MIN_DISTANCE_A):
        super().__init__()
        release = model if isinstance(model, Release) else load(model)
        release.check_head(head)
        self.model = copy.deepcopy(release.model).to(device=device, dtype=dtype).eval()
        self.head_index = self.model.task_names.index(head)
        self.head, self.min_distance_a = head, min_distance_a
        self._device, self._dtype = torch.device(device), dtype
        self._compute_stress, self._compute_forces = compute_stress, True
        self._checked_z: torch.Tensor | None = None  # the atomic numbers whose elements and references passed

    def forward(self, state, **_) -> dict[str, torch.Tensor]:
        if self._compute_stress and not state.pbc:
            raise ValueError("stress needs systems periodic in 3-D (pbc=True); for molecules build "
                             "TorchSimModel(..., compute_stress=False)")
        self._check_elements(state.atomic_numbers)
        batch = device_neighbour_lists(self._graph_batch(state), state.n_atoms_per_system.tolist(),
                                       self.model.config.cutoff_a)
        self._check_distances(batch)
        with torch.enable_grad():
            energy_G, forces_N3, stress_G33 = self.model.energy_forces_stress(batch, True, self._compute_stress)
        out = {"energy": energy_G.detach().to(self._dtype), "forces": forces_N3.detach().to(self._dtype)}
        if self._compute_stress:
            out["stress"] = stress_G33.detach().to(self._dtype)
        return out

    def _graph_batch(self, state) -> GraphBatch:
        """The state's systems, all read out by this head, without labels and (yet) without edges."""
        num_graphs, device = state.n_systems, state.positions.device
        cell_G33 = state.row_vector_cell.double()  # rows are lattice vectors, as in mlfound and ASE
        volume_G = cell_G33.det().abs() if state.pbc else torch.zeros(num_graphs, dtype=torch.float64, device=device)
        no_labels_G = torch.zeros(num_graphs, dtype=torch.bool, device=device)
        return GraphBatch(
            z=state.atomic_numbers, pos_a=state.positions.double(), graph_index=state.system_idx,
            edge_index=torch.zeros((2, 0), dtype=torch.long, device=device),
            edge_shift_a=torch.zeros((0, 3), dtype=torch.float64, device=device),
            energy_ev=torch.zeros(num_graphs, dtype=torch.float64, device=device),
            forces_ev_a=torch.zeros_like(state.positions), has_forces=no_labels_G,
            task_index=torch.full((num_graphs,), self.head_index, device=device),
            num_atoms=state.n_atoms_per_system, num_force_atoms=0, volume_a3=volume_G,
            stress_ev_a3=torch.zeros_like(cell_G33), has_stress=no_labels_G, num_stress_graphs=0,
            cell_a=cell_G33, pbc=torch.full((num_graphs, 3), bool(state.pbc), device=device))

    def _check_elements(self, z_N: torch.Tensor) -> None:
        """Elements the model has no species or this head no reference for are an error naming them (checked
        again only when the atoms change, so a run pays one comparison per step)."""
        if self._checked_z is not None and self._checked_z.shape == z_N.shape and torch.equal(self._checked_z, z_N):
            return
        check_head_elements(self.model, self.head, set(z_N.unique().tolist()))
        self._checked_z = z_N.clone()

    def _check_distances(self, batch: GraphBatch) -> None:
        if self.min_distance_a <= 0 or batch.edge_index.shape[1] == 0:
            return
        sender, receiver = batch.edge_index
        length_E = torch.linalg.vector_norm(batch.pos_a[receiver] - batch.pos_a[sender] + batch.edge_shift_a, dim=1)
        closest = int(torch.argmin(length_E))
        if length_E[closest] < self.min_distance_a:
            i, j = int(sender[closest]), int(receiver[closest])
            system = int(batch.graph_index[i])
            first = int((batch.graph_index < system).sum())
            raise DataError(f"system {system}: atoms {i - first} and {j - first} are {float(length_E[closest]):.3f} Å "
                            f"apart, closer than min_distance_a = {self.min_distance_a} Å: the model is meaningless "
                            "there. Fix the structure or shorten the time step, or pass TorchSimModel(..., "
                            "min_distance_a=...)")
