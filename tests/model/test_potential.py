"""Model symmetries and consistency on real demo molecules: rotation, translation, permutation,
forces = -dE/dpos by finite differences, and one head per graph in mixed-task batches."""
import copy

import numpy as np
import pytest
import torch
from ase.io import read
from e3nn import o3

from mlfound.data.batching import collate
from mlfound.data.readers import SourceSpec, read_source
from mlfound.data.record import Record
from mlfound.model import ModelConfig, Potential
from mlfound.model.potential import COMPILED_CONSTANT

TASKS = ["gfn2_xtb", "hf_sto3g"]
CONFIG = ModelConfig(channels=8, l_max=2, num_layers=2, cutoff_a=4.0, radial_hidden=16, head_hidden=8,
                     avg_num_neighbors=10.0)


@pytest.fixture(scope="module")
def records(demo_dir):
    recs = list(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", task="gfn2_xtb")))
    by_molecule = {}
    for rec, atoms in zip(recs, read(demo_dir / "gfn2_xtb.extxyz", index=":")):
        by_molecule.setdefault(atoms.info["molecule"], rec)
    return [by_molecule[m] for m in ("glycine", "furan", "acetamide")]


# two-body messages, MACE's many-body product basis, and that basis on features above l_max (MACE's max_ell)
VARIANTS = {"two-body": {"correlation": 1}, "many-body": {"correlation": 3},
            "many-body, product_l_max": {"correlation": 3, "product_l_max": CONFIG.l_max + 1}}


def make_potential(dtype=torch.float32, seed=0, correlation: int = 1, product_l_max: int | None = None):
    torch.manual_seed(seed)
    refs = {"gfn2_xtb": {1: -10.0, 6: -48.0, 7: -71.0, 8: -103.0}, "hf_sto3g": {1: -13.0, 6: -1020.0, 7: -1470.0,
                                                                                 8: -2030.0}}
    config = CONFIG.model_copy(update={"correlation": correlation, "product_l_max": product_l_max})
    model = Potential(config, [1, 6, 7, 8], TASKS, refs, {"gfn2_xtb": 0.5, "hf_sto3g": 2.0})
    return model.to(dtype)


def batch_of(records, tasks=None):
    for rec, task in zip(records, tasks or ["gfn2_xtb"] * len(records)):
        rec.task = task
    return collate(records, CONFIG.cutoff_a, TASKS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_invariant_energy_and_equivariant_forces(records, variant):
    model = make_potential(dtype=torch.float64, **VARIANTS[variant])
    batch = batch_of(records)
    energy, forces = model(batch)
    torch.manual_seed(3)
    rotation = o3.rand_matrix(dtype=torch.float64)
    batch.pos_a = batch.pos_a.double() @ rotation.T
    energy_rot, forces_rot = model(batch)
    torch.testing.assert_close(energy_rot, energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(forces_rot, forces @ rotation.T, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_translation_and_permutation_invariance(records, variant):
    model = make_potential(dtype=torch.float64, **VARIANTS[variant])
    rec = records[0]
    energy, forces = model(batch_of([rec]))
    shifted = batch_of([rec])
    shifted.pos_a = shifted.pos_a.double() + torch.tensor([3.0, -1.5, 7.0], dtype=torch.float64)
    torch.testing.assert_close(model(shifted)[0], energy, rtol=0, atol=1e-9)
    perm = np.random.default_rng(0).permutation(rec.num_atoms)
    rec_perm = type(rec)(z=rec.z[perm], pos_a=rec.pos_a[perm], energy_ev=rec.energy_ev, task=rec.task)
    energy_perm, forces_perm = model(batch_of([rec_perm]))
    torch.testing.assert_close(energy_perm, energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(forces_perm, forces[perm], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forces_are_minus_energy_gradient_by_finite_differences(records, variant):
    model = make_potential(dtype=torch.float64, **VARIANTS[variant])
    batch = batch_of(records[:1])
    batch.pos_a = batch.pos_a.double()
    _, forces = model(batch)
    step = 1e-5
    for atom, axis in [(0, 0), (2, 1), (5, 2)]:
        plus, minus = batch_of(records[:1]), batch_of(records[:1])
        plus.pos_a, minus.pos_a = batch.pos_a.clone(), batch.pos_a.clone()
        plus.pos_a[atom, axis] += step
        minus.pos_a[atom, axis] -= step
        numeric = -(model(plus, compute_forces=False)[0] - model(minus, compute_forces=False)[0]) / (2 * step)
        assert forces[atom, axis].item() == pytest.approx(numeric.item(), abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_graph_in_a_mixed_task_batch_gets_its_own_head(records, variant):
    model = make_potential(**VARIANTS[variant])
    mixed = batch_of(records, ["gfn2_xtb", "hf_sto3g", "gfn2_xtb"])
    energy_mixed, forces_mixed = model(mixed)
    for g, (rec, task) in enumerate(zip(records, ["gfn2_xtb", "hf_sto3g", "gfn2_xtb"])):
        energy_alone, _ = model(batch_of([rec], [task]))
        torch.testing.assert_close(energy_mixed[g], energy_alone[0], rtol=1e-6, atol=1e-4)
    # perturbing the hf_sto3g head changes only the hf_sto3g graph
    with torch.no_grad():
        model.heads.heads["hf_sto3g"][2].bias += 1.0
    energy_after, _ = model(mixed)
    assert (energy_after[1] - energy_mixed[1]).item() == pytest.approx(2.0 * records[1].num_atoms, rel=1e-6)
    torch.testing.assert_close(energy_after[[0, 2]], energy_mixed[[0, 2]])


def test_unknown_element_is_an_error(records):
    model = make_potential()
    batch = batch_of(records[:1])
    batch.z[0] = 9
    with pytest.raises(ValueError, match=r"elements \[9\] are unknown to this model; it knows \[1, 6, 7, 8\]"):
        model(batch)


def test_casting_the_model_keeps_float64_references():
    model = make_potential(torch.float64)
    with torch.no_grad():
        model.references_ev[0, 0] = -10.123456789012345
    for dtype in (torch.float32, torch.bfloat16):
        cast = make_potential(torch.float64)
        cast.load_state_dict(model.state_dict())
        cast.to(dtype)
        assert next(cast.parameters()).dtype == dtype
        assert cast.references_ev.dtype == cast.scales_ev.dtype == torch.float64
        assert cast.references_ev[0, 0].item() == -10.123456789012345


@pytest.mark.parametrize("all_l", [False, True])
def test_the_product_basis_sees_bond_angles_only_when_its_messages_keep_vectors(all_l):
    """One layer (scalars out) with the product basis: O-H 1.0 Å twice, H-H beyond the 1.5 Å cutoff at every
    angle, so the energy can depend on the angle only through products of the messages' vectors (|A_1o|^2, as in
    MACE). Format-3 releases had messages of scalars only there (product_messages_all_l False): angle-blind."""
    torch.manual_seed(0)
    config = CONFIG.model_copy(update={"correlation": 3, "num_layers": 1, "cutoff_a": 1.5,
                                       "product_messages_all_l": all_l})
    model = Potential(config, [1, 8], ["gfn2_xtb"], {"gfn2_xtb": {1: 0.0, 8: 0.0}}, {"gfn2_xtb": 1.0}).double()
    energies = []
    for angle_deg in (100.0, 150.0):
        angle = np.radians(angle_deg)
        pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [np.cos(angle), np.sin(angle), 0.0]])
        assert np.linalg.norm(pos[1] - pos[2]) > config.cutoff_a
        rec = Record(z=np.array([8, 1, 1]), pos_a=pos, energy_ev=0.0, forces_ev_a=None, task="gfn2_xtb")
        energies.append(model(collate([rec], config.cutoff_a, ["gfn2_xtb"]), compute_forces=False)[0].item())
    assert (abs(energies[0] - energies[1]) > 1e-6) == all_l


def periodic_record(rotation: np.ndarray | None = None) -> Record:
    """A rattled 2-atom diamond cell (triclinic lattice vectors) with hydrogen and oxygen in it: short enough
    for a 4 Å cutoff to reach periodic images of every atom, including itself."""
    from ase.build import bulk

    atoms = bulk("C", "diamond", a=3.6) * (1, 2, 1)
    atoms.numbers[[1, 2]] = [1, 8]
    atoms.rattle(0.05, seed=1)
    pos, cell = atoms.positions, np.asarray(atoms.cell[:])
    if rotation is not None:
        pos, cell = pos @ rotation.T, cell @ rotation.T
    return Record(z=atoms.numbers.astype(np.int64), pos_a=pos, energy_ev=0.0, cell_a=cell, pbc=np.ones(3, bool),
                  task="gfn2_xtb")


def strained(rec: Record, strain: np.ndarray) -> Record:
    deformation = np.eye(3) + strain
    return Record(z=rec.z, pos_a=rec.pos_a @ deformation.T, energy_ev=0.0, cell_a=rec.cell_a @ deformation.T,
                  pbc=rec.pbc, task=rec.task)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stress_is_the_energy_derivative_under_strain_over_the_volume(variant):
    model = make_potential(dtype=torch.float64, **VARIANTS[variant])
    rec = periodic_record()
    _, _, stress = model.energy_forces_stress(collate([rec], CONFIG.cutoff_a, TASKS))
    volume, step = abs(np.linalg.det(rec.cell_a)), 1e-5
    assert np.abs(stress.detach().numpy()).max() > 1e-3  # not trivially zero
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        direction = np.zeros((3, 3))
        direction[i, j] = direction[j, i] = 1.0 if i == j else 0.5  # symmetric: d/dh gives V * stress_ij
        energy = [model(collate([strained(rec, sign * step * direction)], CONFIG.cutoff_a, TASKS),
                        compute_forces=False)[0].item() for sign in (1, -1)]
        numeric = (energy[0] - energy[1]) / (2 * step) / volume
        assert stress[0, i, j].item() == pytest.approx(numeric, abs=1e-7), (i, j)
    torch.testing.assert_close(stress[0], stress[0].T, rtol=0, atol=1e-12)


def test_stress_rotates_as_a_tensor_and_is_nan_without_a_cell(records):
    model = make_potential(correlation=3, dtype=torch.float64)
    torch.manual_seed(5)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    _, _, stress = model.energy_forces_stress(collate([periodic_record()], CONFIG.cutoff_a, TASKS))
    _, _, stress_rot = model.energy_forces_stress(collate([periodic_record(rotation)], CONFIG.cutoff_a, TASKS))
    torch.testing.assert_close(stress_rot[0], torch.from_numpy(rotation) @ stress[0] @ torch.from_numpy(rotation).T,
                               rtol=0, atol=1e-10)
    energy, forces, stress_mixed = model.energy_forces_stress(batch_of([records[0]] + [periodic_record()]))
    assert torch.isnan(stress_mixed[0]).all()
    torch.testing.assert_close(stress_mixed[1], stress[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(energy, model(batch_of([records[0], periodic_record()]))[0], rtol=0, atol=0)


def test_product_l_max_below_l_max_is_refused_naming_both():
    with pytest.raises(ValueError, match="product_l_max 1 is below l_max 2"):
        ModelConfig(l_max=2, product_l_max=1)


def test_product_l_max_without_a_product_basis_is_refused_not_ignored():
    with pytest.raises(ValueError, match="product_l_max 3 needs a product basis"):
        ModelConfig(l_max=1, product_l_max=3, correlation=1)
    assert ModelConfig(l_max=1, product_l_max=1, correlation=1).product_l_max == 1


def test_product_l_max_widens_only_what_the_product_basis_multiplies():
    """Spherical harmonics and the product basis go to product_l_max; the features between layers stay at l_max."""
    model = make_potential(correlation=3, product_l_max=CONFIG.l_max + 1)
    layer = model.trunk.layers[0]
    assert model.trunk.irreps_sh.lmax == CONFIG.l_max + 1
    assert layer.product_basis.linears[0].irreps_in.lmax == CONFIG.l_max + 1
    assert layer.irreps_out.lmax == CONFIG.l_max


def test_a_copied_model_has_the_state_dict_of_a_fresh_one(records):
    """e3nn's compiled constants (l >= 2 paths) become buffers in a deepcopy (as ema-pytorch and fine-tuning make);
    they are neither written nor expected, so a copy's weights load into a fresh model and back."""
    model = make_potential(dtype=torch.float64, **VARIANTS["many-body, product_l_max"])
    copied = copy.deepcopy(model)
    assert any(COMPILED_CONSTANT in name for name, _ in copied.named_buffers())  # the trap this guards against
    for state in (model.state_dict(), copied.state_dict()):
        assert not any(COMPILED_CONSTANT in key for key in state)
    assert copied.state_dict().keys() == model.state_dict().keys()
    fresh = make_potential(dtype=torch.float64, seed=1, **VARIANTS["many-body, product_l_max"])
    fresh.load_state_dict(copied.state_dict())
    copied.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(fresh(batch_of(records))[1], model(batch_of(records))[1], rtol=0, atol=0)
