"""The compiled force graph (mlfound.model.compiled) against eager autograd: energies, forces, stress and the
weights' gradients of a force loss, on a batch of another size than the one it was traced on (its sizes are
symbolic), mixed tasks and a periodic cell included; and a graph that disagrees with eager is refused.

The graph runs through torch.compile's "aot_eager" backend: it checks what mlfound builds (the traced force
derivative, its symbolic sizes, the weights as inputs, the gradients AOTAutograd derives) in seconds, where
Inductor's code generation takes minutes on 2 cores; Inductor's output is checked against eager autograd at
every first batch of a run (the second test), and tools/bench_peers.py runs it."""
import copy

import pytest
import torch

from mlfound.data.batching import collate
from mlfound.model import ModelConfig, Potential, compiled
from tests.model.test_potential import TASKS, periodic_record, records  # noqa: F401 (fixture)


def make_potential():
    """The releases' trunk (l_max 1, correlation 3) with features to l = 2 in the product basis, so e3nn's l >= 2
    constants are in the graph; small, since compiling costs time in proportion to the graph."""
    torch.manual_seed(0)
    config = ModelConfig(channels=4, l_max=1, num_layers=2, cutoff_a=4.0, radial_hidden=8, head_hidden=4,
                         avg_num_neighbors=10.0, correlation=3, product_l_max=2)
    refs = {"gfn2_xtb": {1: -10.0, 6: -48.0, 7: -71.0, 8: -103.0}, "hf_sto3g": {1: -13.0, 6: -1020.0, 7: -1470.0,
                                                                                 8: -2030.0}}
    return Potential(config, [1, 6, 7, 8], TASKS, refs, {"gfn2_xtb": 0.5, "hf_sto3g": 2.0}).double()


def force_loss_outputs(model, batch):
    energy, forces, stress = model.energy_forces_stress(batch, True, True, training=True)
    loss = (energy**2).mean() + (forces**2).mean() + (stress[batch.volume_a3 > 0] ** 2).mean()  # NaN: no cell
    return energy, forces, stress, torch.autograd.grad(loss, list(model.parameters()))


def test_compiled_forces_equal_eager_autograd_on_a_batch_of_another_size(records, monkeypatch):  # noqa: F811
    monkeypatch.setattr(compiled, "_GRAPHS", {})
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    model = make_potential()
    for rec, task in zip(records, ["gfn2_xtb", "hf_sto3g", "gfn2_xtb"]):
        rec.task = task
    traced_on = collate([records[0], records[1], periodic_record()], 4.0, TASKS)
    checked_on = collate([records[2], periodic_record(), records[1]], 4.0, TASKS)
    assert (len(checked_on.z), checked_on.edge_index.shape[1]) != (len(traced_on.z), traced_on.edge_index.shape[1])
    model.compiled_forces = True
    force_loss_outputs(model, traced_on)
    copied = copy.deepcopy(model)  # a copy (Reptile's inner model, an EMA) shares the graph
    got = force_loss_outputs(copied, checked_on)
    assert len(compiled._GRAPHS) == 1
    copied.compiled_forces = False
    expected = force_loss_outputs(copied, checked_on)
    for name, a, b in zip(("energy", "forces", "stress"), got[:3], expected[:3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)
    for a, b in zip(got[3], expected[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # sums over edges in another order


@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_a_compiled_graph_that_disagrees_with_eager_autograd_is_refused(records, error):  # noqa: F811
    """The check every compiled graph passes before its first use, with a stand-in for the graph: eager's own
    outputs, exact or off by ``error`` of their size (float64 allows 1e-9)."""
    model = make_potential()
    batch = collate(records[:2], 4.0, TASKS)
    wrapper = compiled._EnergyAndGradients(model)
    state = [t for _, t in compiled._state(model)]
    inputs = (batch.pos_a.double(), model.species(batch.z), batch.edge_index, batch.edge_shift_a.double(),
              batch.graph_index, batch.task_index, None)

    def stand_in(*args):
        energy, gradient = wrapper(*[None if t is None else t.clone() for t in args[:len(inputs)]])
        return energy, gradient * (1 + error)

    if error == 0.0:
        compiled._check_against_eager(wrapper, stand_in, inputs, state)
    else:
        with pytest.raises(compiled.CompiledGraphError, match="position gradient differs from eager autograd's by 1.00e-03"):
            compiled._check_against_eager(wrapper, stand_in, inputs, state)
