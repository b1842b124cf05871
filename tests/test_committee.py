"""Committees: K heads of one LoT on one fine-tuned trunk. The head itself stays what a fine-tune without a
committee makes; the members disagree; the calculator's model deviation is the numpy formula on the members'
forces; `mlfound evaluate --committee` ranks the spread against the error; each member deploys."""
import copy
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.stats import spearmanr

from mlfound.calculator import MLFoundCalculator
from mlfound.cli import main as mlfound
from mlfound.data.sets import subset, write_extxyz
from mlfound.deploy import deploy
from mlfound.finetune import FinetuneConfig, finetune
from mlfound.predict import predict
from mlfound.release import load, save_release
from tests.test_deploy import assert_same_predictions, deployed_outputs

HEAD, MEMBERS = "hf_631g", ["hf_631g", "hf_631g_committee1", "hf_631g_committee2"]


@pytest.fixture(scope="module")
def fine_tuned(tiny_release_path, paracetamol, tmp_path_factory):
    """The same fine-tune without and with a committee of 3, and 12 test structures."""
    base, train, val = load(tiny_release_path), subset(paracetamol[:150], 10, 0), subset(paracetamol[150:200], 5, 1)
    cfg = FinetuneConfig(head=HEAD, max_steps=6, eval_every=2)
    single = finetune(base, train, val, cfg, progress=False).release
    result = finetune(base, train, val, cfg.model_copy(update={"committee": 3}), progress=False)
    path = save_release(result.release.model, result.release.metadata, tmp_path_factory.mktemp("c") / "c.safetensors")
    return single, load(path), paracetamol[200:212]


def test_the_head_stays_as_fine_tuned_and_the_members_disagree(fine_tuned):
    single, committee, test = fine_tuned
    assert committee.metadata["heads"][HEAD]["committee"] == MEMBERS
    assert all(committee.metadata["heads"][m]["committee_of"] == HEAD for m in MEMBERS[1:])
    energy, forces = predict(committee.model, test, HEAD)
    energy_single, forces_single = predict(single.model, test, HEAD)
    np.testing.assert_array_equal(energy, energy_single)
    assert all(np.array_equal(a, b) for a, b in zip(forces, forces_single))
    for member in MEMBERS[1:]:
        assert np.abs(predict(committee.model, test, member)[1][0] - forces[0]).max() > 1e-4


def test_the_calculator_reports_the_model_deviation(fine_tuned):
    _, committee, test = fine_tuned
    atoms = Atoms(numbers=test[0].z, positions=test[0].pos_a)
    atoms.calc = MLFoundCalculator(committee, head=HEAD, dtype="float64", committee=True)
    model = copy.deepcopy(committee.model).double()
    forces_KN3 = np.stack([predict(model, [test[0]], m)[1][0] for m in MEMBERS])
    expected = np.sqrt(np.mean(np.sum((forces_KN3 - forces_KN3.mean(0)) ** 2, axis=2), axis=0))
    np.testing.assert_allclose(atoms.get_forces(), forces_KN3[0], atol=1e-10)
    np.testing.assert_allclose(atoms.calc.results["committee_forces_deviation"], expected, atol=1e-10)
    assert atoms.calc.results["committee_max_forces_deviation"] == pytest.approx(expected.max())
    with pytest.raises(ValueError, match="head 'gfn2_xtb' has no committee: fine-tune it with"):
        MLFoundCalculator(committee, head="gfn2_xtb", committee=True)


def test_evaluate_ranks_the_spread_against_the_error(fine_tuned, tmp_path, capsys):
    _, committee, test = fine_tuned
    write_extxyz(test, tmp_path / "test.extxyz")
    out = tmp_path / "errors.json"
    assert mlfound(["evaluate", str(committee.path), str(tmp_path / "test.extxyz"), "--head", HEAD, "--committee",
                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())["committee"]
    assert "Spearman rank correlation" in capsys.readouterr().out
    deviations, errors = [], []  # through the calculator: another path to the same numbers
    for record in test:
        atoms = Atoms(numbers=record.z, positions=record.pos_a)
        atoms.calc = MLFoundCalculator(committee, head=HEAD, committee=True)
        forces = atoms.get_forces()
        deviations.append(atoms.calc.results["committee_forces_deviation"])
        errors.append(np.linalg.norm(forces - record.forces_ev_a, axis=1))
    expected = spearmanr([d.max() for d in deviations], [e.max() for e in errors]).statistic
    assert report["members"] == MEMBERS and report["num_structures"] == len(test)
    assert report["spearman_per_structure"] == pytest.approx(expected, abs=1e-6)
    assert mlfound(["evaluate", str(committee.path), str(tmp_path / "test.extxyz"), "--head", "gfn2_xtb",
                    "--committee"]) == 2
    assert "has no committee" in capsys.readouterr().err


def test_every_member_deploys(fine_tuned, tmp_path):
    _, committee, test = fine_tuned
    for member in (HEAD, MEMBERS[2]):
        module = torch.jit.load(str(deploy(committee, member, tmp_path / f"{member}.pt")))
        outputs = deployed_outputs(module, test[:2], committee.model.config.cutoff_a)
        assert_same_predictions(outputs, copy.deepcopy(committee.model).double(), test[:2], member, 1e-6, 1e-9)
