"""Atom-budget batching of records into graph batches with neighbour lists (vesin).

A batch holds as many whole structures as fit in ``max_atoms`` (fairchem-style), so cost per step
is steady whatever the molecule sizes. A structure larger than the budget gets a batch of its own
rather than being dropped. Neighbour lists are built here on the host (vesin), or left to the batch's
device (``with_neighbours=False``, then ``device_neighbour_lists`` with vesin-torch after the copy).
Batch keys and shapes (N atoms, E edges, G graphs):
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import vesin

from mlfound.data.record import Record
from mlfound.data.streams import TaskStream


@dataclasses.dataclass
class GraphBatch:
    z: torch.Tensor  # (N,) int64 atomic numbers
    pos_a: torch.Tensor  # (N, 3) float64 Å; the model computes in its weights' precision (at least float32)
    graph_index: torch.Tensor  # (N,) int64 graph of each atom
    edge_index: torch.Tensor  # (2, E) int64 [sender, receiver]
    edge_shift_a: torch.Tensor  # (E, 3) float64 Å; edge vector = pos[j] - pos[i] + shift
    energy_ev: torch.Tensor  # (G,) float64 total energies
    forces_ev_a: torch.Tensor  # (N, 3) float32; zeros where a graph has no forces
    has_forces: torch.Tensor  # (G,) bool
    task_index: torch.Tensor  # (G,) int64 position of the graph's task in the task list
    num_atoms: torch.Tensor  # (G,) int64
    num_force_atoms: int  # atoms of graphs with forces, known on the host: the loss needs no device sync
    volume_a3: torch.Tensor  # (G,) float64 cell volume Å³ for stress; 0 without a 3-D periodic cell
    stress_ev_a3: torch.Tensor  # (G, 3, 3) float64 eV/Å³ (ASE's sign); zeros where a graph has no stress
    has_stress: torch.Tensor  # (G,) bool
    num_stress_graphs: int  # graphs with stress, known on the host like num_force_atoms
    cell_a: torch.Tensor | None = None  # (G, 3, 3) float64 Å; only while the neighbour lists are still to build
    pbc: torch.Tensor | None = None  # (G, 3) bool; likewise

    @property
    def num_graphs(self) -> int:
        return len(self.energy_ev)

    def to(self, device, non_blocking: bool = False) -> "GraphBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "GraphBatch":
        """Page-locked copies, so ``to(cuda, non_blocking=True)`` overlaps the copy with compute."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "GraphBatch":
        return GraphBatch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                             for f in dataclasses.fields(self)})


def neighbour_list(rec: Record, cutoff_a: float) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list of one structure: (2, E) indices and (E, 3) Cartesian cell shifts in Å."""
    periodic = rec.pbc if rec.pbc is not None else np.zeros(3, bool)
    box = rec.cell_a if rec.cell_a is not None else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=cutoff_a, full_list=True)
    i, j, shifts = calculator.compute(points=rec.pos_a, box=box, periodic=periodic, quantities="ijS")
    return np.stack([i, j]).astype(np.int64), shifts.astype(np.float64) @ box


def collate(records: Sequence[Record], cutoff_a: float, task_names: Sequence[str],
            with_neighbours: bool = True) -> GraphBatch:
    """One GraphBatch from records; tasks are indexed by their position in ``task_names``. Without
    neighbours the edges are empty and the batch carries cells and pbc for ``device_neighbour_lists``."""
    task_position = {name: i for i, name in enumerate(task_names)}
    edges, shifts, atom_offset = [np.zeros((2, 0), np.int64)], [np.zeros((0, 3))], 0
    for rec in records if with_neighbours else ():
        edge_index, shift_a = neighbour_list(rec, cutoff_a)
        edges.append(edge_index + atom_offset)
        shifts.append(shift_a)
        atom_offset += rec.num_atoms
    num_atoms = np.array([r.num_atoms for r in records])
    forces = [r.forces_ev_a if r.forces_ev_a is not None else np.zeros((r.num_atoms, 3)) for r in records]
    try:
        task_index = [task_position[r.task] for r in records]
    except KeyError as err:
        raise KeyError(f"record task {err} is not among the model's tasks {list(task_names)}") from None
    return GraphBatch(
        z=torch.from_numpy(np.concatenate([r.z for r in records])),
        pos_a=torch.from_numpy(np.concatenate([r.pos_a for r in records])).double(),
        graph_index=torch.from_numpy(np.repeat(np.arange(len(records)), num_atoms)),
        edge_index=torch.from_numpy(np.concatenate(edges, axis=1)),
        edge_shift_a=torch.from_numpy(np.concatenate(shifts)),
        energy_ev=torch.tensor([r.energy_ev for r in records], dtype=torch.float64),
        forces_ev_a=torch.from_numpy(np.concatenate(forces)).float(),
        has_forces=torch.tensor([r.forces_ev_a is not None for r in records]),
        task_index=torch.tensor(task_index, dtype=torch.int64),
        num_atoms=torch.from_numpy(num_atoms).long(),
        num_force_atoms=sum(r.num_atoms for r in records if r.forces_ev_a is not None),
        volume_a3=torch.tensor([_volume(r) for r in records], dtype=torch.float64),
        stress_ev_a3=torch.from_numpy(np.stack([r.stress_ev_a3 if r.stress_ev_a3 is not None else np.zeros((3, 3))
                                                for r in records])).double(),
        has_stress=torch.tensor([r.stress_ev_a3 is not None for r in records]),
        num_stress_graphs=sum(r.stress_ev_a3 is not None for r in records),
        cell_a=None if with_neighbours else torch.from_numpy(np.stack([_box(r) for r in records])),
        pbc=None if with_neighbours else torch.from_numpy(np.stack([_periodic(r) for r in records])),
    )


def _box(rec: Record) -> np.ndarray:
    return rec.cell_a.astype(np.float64) if rec.cell_a is not None else np.zeros((3, 3))


def _volume(rec: Record) -> float:
    """The cell's volume where it is periodic in all three directions; else 0 (no stress is defined)."""
    if rec.cell_a is None or rec.pbc is None or not rec.pbc.all():
        return 0.0
    return abs(float(np.linalg.det(rec.cell_a)))


def _periodic(rec: Record) -> np.ndarray:
    return rec.pbc.astype(bool) if rec.pbc is not None else np.zeros(3, bool)


def device_neighbour_lists(batch: GraphBatch, atoms_per_graph: Sequence[int], cutoff_a: float) -> GraphBatch:
    """``batch`` (from ``collate(..., with_neighbours=False)``) with the full neighbour lists built by
    vesin-torch on the batch's own device. ``atoms_per_graph`` comes from the host copy of ``num_atoms``, so
    slicing the graphs needs no device sync; vesin-torch itself syncs once per graph to size its output."""
    try:
        from vesin_torch import NeighborList
    except ImportError as err:
        hint = "data.neighbours_on_device needs vesin-torch: pip install 'mlfound[device-neighbours]'"
        raise ImportError(hint) from err
    calculator = NeighborList(cutoff=cutoff_a, full_list=True)
    edges, shifts, start = [], [], 0
    for graph, num_atoms in enumerate(atoms_per_graph):
        box = batch.cell_a[graph]
        i, j, shift = calculator.compute(points=batch.pos_a[start:start + num_atoms], box=box,
                                         periodic=batch.pbc[graph], quantities="ijS")
        edges.append(torch.stack([i, j]).long() + start)
        shifts.append(shift.to(box.dtype) @ box)
        start += num_atoms
    return dataclasses.replace(batch, edge_index=torch.cat(edges, dim=1), edge_shift_a=torch.cat(shifts),
                               cell_a=None, pbc=None)


def admits(batch: list[Record], batch_atoms: int, upcoming: Record, max_atoms: int,
           max_graphs: int | None) -> bool:
    """The packing rule: an empty batch takes any record (so none is dropped for size); otherwise the
    upcoming record must fit in the atom budget and the graph limit."""
    if not batch:
        return True
    return batch_atoms + upcoming.num_atoms <= max_atoms and (max_graphs is None or len(batch) < max_graphs)


def atom_budget_batches(records: Sequence[Record], max_atoms: int,
                        max_graphs: int | None = None) -> list[list[Record]]:
    """A finite sequence split by the same rule AtomBudgetBatcher applies to a stream."""
    batches, batch, batch_atoms = [], [], 0
    for rec in records:
        if not admits(batch, batch_atoms, rec, max_atoms, max_graphs):
            batches.append(batch)
            batch, batch_atoms = [], 0
        batch.append(rec)
        batch_atoms += rec.num_atoms
    return batches + [batch] if batch else batches


class AtomBudgetBatcher:
    """Infinite GraphBatches from one TaskStream; its state is the stream's state."""

    def __init__(self, stream: TaskStream, max_atoms: int, cutoff_a: float, task_names: Sequence[str],
                 max_graphs: int | None = None, with_neighbours: bool = True):
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
        self.stream, self.max_atoms, self.cutoff_a = stream, max_atoms, cutoff_a
        self.task_names, self.max_graphs, self.with_neighbours = list(task_names), max_graphs, with_neighbours

    def __iter__(self):
        return self

    def __next__(self) -> GraphBatch:
        return collate(self.next_records(), self.cutoff_a, self.task_names, self.with_neighbours)

    def next_records(self) -> list[Record]:
        """Records are taken only once admitted (peek first), so the stream state stays exact for resume."""
        records, num_atoms = [], 0
        while admits(records, num_atoms, self.stream.peek(), self.max_atoms, self.max_graphs):
            records.append(next(self.stream))
            num_atoms += records[-1].num_atoms
        return records

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
