"""Task sampling and the Reptile update rule, checked by hand in one process (no DeepSpeed)."""
import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from mlfound.config import LossConfig
from mlfound.data.batching import collate
from mlfound.data.readers import SourceSpec, read_source
from mlfound.meta.loss import potential_loss
from mlfound.meta.outer_step import inner_loop, pseudo_gradient, scale_task_heads, surrogate_loss
from mlfound.meta.sampling import TaskSampler
from mlfound.model import Potential
from tests.model.test_potential import CONFIG, TASKS, make_potential


def test_sampler_probabilities_and_determinism():
    sizes = {"a": 100, "b": 400, "c": 1600}
    assert np.allclose(TaskSampler(sizes, "uniform").probabilities, 1 / 3)
    assert np.allclose(TaskSampler(sizes, "proportional").probabilities, [1 / 21, 4 / 21, 16 / 21])
    assert np.allclose(TaskSampler(sizes, "temperature", 2.0).probabilities, [1 / 7, 2 / 7, 4 / 7])
    sampler = TaskSampler(sizes, "temperature", 2.0, seed=5)
    draws = [sampler.draw(step, rank) for step in range(3000) for rank in range(2)]
    assert draws == [TaskSampler(sizes, "temperature", 2.0, seed=5).draw(s, r) for s in range(3000) for r in range(2)]
    realised = [draws.count(t) / len(draws) for t in sizes]
    assert np.allclose(realised, [1 / 7, 2 / 7, 4 / 7], atol=0.02)
    assert [sampler.draw(s, 0) for s in range(50)] != [sampler.draw(s, 1) for s in range(50)]


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "greedy"}, "unknown sampling strategy 'greedy'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_sampler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSampler({"a": 1}, **kwargs)


@pytest.fixture(scope="module")
def batches(demo_dir):
    recs = list(itertools.islice(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", "gfn2_xtb")), 12))
    return [collate(recs[i:i + 3], CONFIG.cutoff_a, TASKS) for i in range(0, 12, 3)]


def loss_fn(model, batch):
    return potential_loss(model, batch, LossConfig())[0]


def test_reptile_outer_step_moves_theta_toward_the_adapted_weights(batches):
    model = make_potential()
    work = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    inner_opt = torch.optim.Adam(work.parameters(), lr=1e-2, betas=(0.0, 0.999))
    delta = inner_loop(work, theta0, iter(batches), 3, inner_opt, loss_fn)
    theta_k = [p.detach().clone() for p in work.parameters()]
    epsilon = 0.3
    outer = torch.optim.SGD(model.parameters(), lr=epsilon)
    outer.zero_grad()
    surrogate_loss(list(model.parameters()), delta).backward()
    outer.step()
    for p, p0, pk in zip(model.parameters(), theta0, theta_k):
        torch.testing.assert_close(p.detach(), p0 + epsilon * (pk - p0), rtol=1e-6, atol=1e-6)
    assert any((pk - p0).abs().max() > 1e-4 for p0, pk in zip(theta0, theta_k)), "the inner loop moved"


def test_k1_sgd_reptile_equals_one_sgd_step(batches):
    model = make_potential()
    reference = copy.deepcopy(model)
    lr = 1e-3
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    opt.zero_grad()
    loss_fn(reference, batches[0]).backward()
    opt.step()
    work = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    delta = inner_loop(work, theta0, iter(batches), 1, torch.optim.SGD(work.parameters(), lr=lr), loss_fn)
    outer = torch.optim.SGD(model.parameters(), lr=1.0)
    outer.zero_grad()
    surrogate_loss(list(model.parameters()), delta).backward()
    outer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_one_plain_sgd_step_at_lr_1_hands_over_the_gradient_bit_for_bit(batches):
    """Joint training is the general outer step at k = 1 with inner SGD at lr 1: its pseudo-gradient must be
    the gradient itself, not θ0 − (θ0 − g) with θ's rounding in it."""
    model = make_potential()
    loss_fn(model, batches[0]).backward()
    gradient = [p.grad.clone() for p in model.parameters()]
    work = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    displacement = inner_loop(work, theta0, iter(batches), 1, torch.optim.SGD(work.parameters(), lr=1.0), loss_fn)
    for handed, g in zip(pseudo_gradient(displacement, 1.0, "adam"), gradient):
        assert torch.equal(handed, g)
    # k plain SGD steps at lr η: (θ0 − θk) / η, the sum of the k gradients along the way (by hand here)
    lr = 1e-3
    by_hand = copy.deepcopy(model)
    summed = [torch.zeros_like(p) for p in by_hand.parameters()]
    for batch in batches[:2]:
        by_hand.zero_grad()
        loss_fn(by_hand, batch).backward()
        with torch.no_grad():
            for total, p in zip(summed, by_hand.parameters()):
                total += p.grad
                p -= lr * p.grad
    displacement = inner_loop(work, theta0, iter(batches), 2, torch.optim.SGD(work.parameters(), lr=lr), loss_fn)
    for handed, total in zip(pseudo_gradient(displacement, lr, "sgd"), summed):
        torch.testing.assert_close(handed, total, rtol=1e-5, atol=1e-6)
    assert pseudo_gradient([torch.ones(2)], 0.5, "interpolation")[0].tolist() == [1.0, 1.0]  # θ0 − θk as it is


def test_head_rescaling_touches_only_that_head():
    model = make_potential()
    names = [n for n, _ in model.named_parameters()]
    grads = [torch.ones_like(p) for p in model.parameters()]
    scale_task_heads(grads, names, Potential.head_prefix("hf_sto3g"), 2.0)
    for name, g in zip(names, grads):
        assert g.max().item() == (2.0 if name.startswith("heads.heads.hf_sto3g.") else 1.0), name


def test_loss_counts_forces_only_where_a_graph_has_them(demo_dir):
    """A batch mixing graphs with and without forces: the force term is the mean over the atoms that have
    forces, energy-only graphs add energy only; the parts stay tensors (no host sync in the step)."""
    model = make_potential()
    recs = list(itertools.islice(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", "gfn2_xtb")), 3))
    energy_only = dataclasses.replace(recs[1], forces_ev_a=None)
    mixed = collate([recs[0], energy_only, recs[2]], CONFIG.cutoff_a, TASKS)
    assert mixed.num_force_atoms == recs[0].num_atoms + recs[2].num_atoms
    _, parts = potential_loss(model, mixed, LossConfig())
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in parts.values())
    _, forces_N3 = model(mixed)
    scale = model.scales_ev[TASKS.index("gfn2_xtb")].item()
    keep = mixed.has_forces[mixed.graph_index]
    expected = (((forces_N3 - mixed.forces_ev_a) / scale)[keep] ** 2).mean()
    torch.testing.assert_close(parts["forces_mse"], expected.detach(), rtol=1e-6, atol=0)
    no_forces = collate([energy_only], CONFIG.cutoff_a, TASKS)
    loss, parts = potential_loss(model, no_forces, LossConfig(energy_weight=2.0))
    assert no_forces.num_force_atoms == 0 and "forces_mse" not in parts
    assert loss.item() == pytest.approx(2.0 * parts["energy_mse"].item())


def test_loss_counts_stress_only_where_a_graph_has_it(molecule):
    """A batch of a periodic cell with a stress label and a molecule without: the stress term is the virial
    per atom in σ units over the labelled graphs only, and every gradient stays finite (the molecule's stress
    is NaN); batches without stress labels compute no stress."""
    from tests.model.test_potential import periodic_record

    model = make_potential(torch.float64, correlation=3)
    crystal = periodic_record()
    crystal.stress_ev_a3 = np.diag([0.01, -0.02, 0.005])
    batch = collate([molecule, crystal], CONFIG.cutoff_a, TASKS)
    assert batch.num_stress_graphs == 1 and batch.has_stress.tolist() == [False, True]
    loss, parts = potential_loss(model, batch, LossConfig(energy_weight=0.0, forces_weight=0.0, stress_weight=3.0))
    _, _, stress = model.energy_forces_stress(batch, compute_forces=False)
    scale = model.scales_ev[TASKS.index("gfn2_xtb")].item()
    volume = abs(np.linalg.det(crystal.cell_a))
    expected = (((stress[1].detach().numpy() - crystal.stress_ev_a3) * volume / crystal.num_atoms / scale) ** 2).mean()
    assert parts["stress_mse"].item() == pytest.approx(expected, rel=1e-10)
    assert loss.item() == pytest.approx(3.0 * expected, rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)
    _, parts = potential_loss(model, collate([molecule], CONFIG.cutoff_a, TASKS), LossConfig())
    assert "stress_mse" not in parts


@pytest.fixture
def molecule(demo_dir):
    return next(iter(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", "gfn2_xtb"))))
