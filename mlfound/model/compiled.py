"""Energy and its gradients (forces, strain derivative) through one graph that torch.compile fuses.

Eager autograd runs a force step (energy, forces with create_graph, a loss backward through both) as
thousands of small kernels over edge-sized tensors; on CPU most of the step is their memory traffic and
dispatch. ``make_fx`` unfolds the force derivative into explicit operations (as NequIP's training compile
does), so Inductor sees one first-order graph of positions and weights, fuses it and derives the weights'
gradients itself. Atoms, edges and graphs are symbolic sizes: one compile serves every batch.

The graph takes the weights and buffers as inputs and keeps none, so copies of a model (the Reptile inner
copy, an EMA, a fine-tuning copy) and its updated weights share one compiled graph per architecture.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from mlfound.model.ops import COMPILED_CONSTANT

BACKEND = "inductor"  # torch.compile's; the tests check the traced graph through "aot_eager", minutes sooner
# relative to the largest force, the compiled and eager forces of the first batch must agree this well before the
# compiled graph is used: float32 reorderings give ~1e-6, a wrong graph gives O(1)
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


@dataclasses.dataclass
class GraphTensors:
    """The batch fields ``Potential.energy`` reads besides the species, each a tensor (``num_graphs`` from
    ``task_index``'s size)."""
    edge_index: torch.Tensor
    edge_shift_a: torch.Tensor
    graph_index: torch.Tensor
    task_index: torch.Tensor

    @property
    def num_graphs(self) -> int:
        return self.task_index.shape[0]


class _EnergyAndGradients(nn.Module):
    """What is traced: (energy (G,), dE/dpos (N, 3)[, dE/dstrain (G, 3, 3)]) as a function of tensors only."""

    def __init__(self, potential: nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, pos_N3, species_N, edge_index_2E, edge_shift_E3, graph_index_N, task_index_G, strain_G33):
        batch = GraphTensors(edge_index_2E, edge_shift_E3, graph_index_N, task_index_G)
        wrt = [pos_N3.requires_grad_(True)]
        if strain_G33 is not None:
            wrt.append(strain_G33.requires_grad_(True))
        energy_G = self.potential.energy(batch, pos_N3, strain_G33, species_N)
        return (energy_G, *torch.autograd.grad(energy_G.sum(), wrt, create_graph=True))


class CompiledGraphError(RuntimeError):
    """The compiled graph does not reproduce eager autograd: the run stops before a step uses it."""


_GRAPHS: dict[tuple, object] = {}  # architecture and call signature -> compiled graph


def energy_and_gradients(potential, batch, pos_N3: torch.Tensor, with_stress: bool):
    """``Potential.energy`` of ``batch`` at ``pos_N3`` and its gradients (positions, then strain if
    ``with_stress``), from the compiled graph; traced and compiled on the first call per architecture."""
    species_N = potential.species(batch.z)  # the host-side unknown-element check, outside the graph
    strain_G33 = (torch.zeros((batch.num_graphs, 3, 3), dtype=pos_N3.dtype, device=pos_N3.device)
                  if with_stress else None)
    inputs = (pos_N3.detach(), species_N, batch.edge_index, batch.edge_shift_a.to(pos_N3.dtype),
              batch.graph_index, batch.task_index, strain_G33)
    names, state = zip(*_state(potential))
    key = (type(potential), potential.config.model_dump_json(), tuple(potential.elements),
           tuple(potential.task_names), tuple((n, t.shape, t.dtype) for n, t in zip(names, state)),
           pos_N3.dtype, pos_N3.device.type, with_stress)
    if key not in _GRAPHS:
        _GRAPHS[key] = _compile(potential, names, inputs, state)
    return _GRAPHS[key](*inputs, *state)


def _state(potential):
    """Weights and buffers, the graph's inputs; e3nn's constants that a deepcopy made buffers stay constants, so a
    copy has the original's key."""
    return [(f"potential.{n}", t) for n, t in (*potential.named_parameters(), *potential.named_buffers())
            if COMPILED_CONSTANT not in n]


def _compile(potential, names, inputs, state):
    """Trace on the batch doubled (every size at least 2, so none is specialised to 0 or 1), compile with
    symbolic sizes, and refuse the graph unless it reproduces eager autograd on the real batch."""
    wrapper = _EnergyAndGradients(potential)

    def traced_function(*args):
        arguments, tensors = args[:len(inputs)], args[len(inputs):]
        return torch.func.functional_call(wrapper, dict(zip(names, tensors)), arguments)

    previous = torch.fx.experimental._config.use_duck_shape
    torch.fx.experimental._config.use_duck_shape = False  # equal sizes (atoms = 16 = channels) stay distinct
    try:
        graph = make_fx(traced_function, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                        _error_on_data_dependent_ops=True)(*_doubled(inputs), *[t.detach() for t in state])
    finally:
        torch.fx.experimental._config.use_duck_shape = previous
    compiled = torch.compile(graph, backend=BACKEND, dynamic=True, fullgraph=True)
    _check_against_eager(wrapper, compiled, inputs, state)
    return compiled


def _doubled(inputs):
    """The batch and a copy of it as one batch: indices of the copy shifted past the original's."""
    pos_N3, species_N, edge_index_2E, edge_shift_E3, graph_index_N, task_index_G, strain_G33 = inputs
    num_atoms, num_graphs = pos_N3.shape[0], task_index_G.shape[0]
    twice = (torch.cat([pos_N3, pos_N3]), torch.cat([species_N, species_N]),
             torch.cat([edge_index_2E, edge_index_2E + num_atoms], 1), torch.cat([edge_shift_E3, edge_shift_E3]),
             torch.cat([graph_index_N, graph_index_N + num_graphs]), torch.cat([task_index_G, task_index_G]),
             None if strain_G33 is None else torch.cat([strain_G33, strain_G33]))
    return [None if t is None else t.clone() for t in twice]


def _check_against_eager(wrapper, compiled, inputs, state):
    """In the caller's grad mode, so the graph checked is the one compiled for the call that follows."""
    got = compiled(*inputs, *state)
    expected = wrapper(*[None if t is None else t.detach().clone() for t in inputs])
    for name, a, b in zip(("energy", "position gradient", "strain gradient"), got, expected):
        scale = b.detach().abs().max().clamp_min(1e-12)
        error = ((a.detach() - b.detach()).abs().max() / scale).item()
        if not error <= CHECK_RTOL.get(inputs[0].dtype, 1e-4):
            raise CompiledGraphError(
                f"the compiled force graph's {name} differs from eager autograd's by {error:.2e} of its largest value "
                "on the first batch; run without compiled forces (train.compile_forces, --compile) and report this "
                "with the torch version")
