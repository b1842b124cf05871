"""``mlfound deploy``: a TorchScript file of one head predicts what the release predicts (energy, forces,
stress), in float64 and float32, and runs in a process that never imports mlfound."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlfound.cli import main
from mlfound.data.batching import neighbour_list
from mlfound.deploy import METADATA_FILE, deploy
from mlfound.predict import predict_with_stress
from mlfound.release import Release, load
from tests.model.test_potential import TASKS, make_potential, periodic_record

HEAD = "pbe0_631gs"
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")
# the deployed module alone: torch and numpy, nothing of mlfound
RUN_WITHOUT_MLFOUND = """
import sys, numpy as np, torch
module = torch.jit.load(sys.argv[1])
inputs = np.load(sys.argv[2])
energy, forces, stress = module(*(torch.from_numpy(inputs[k]) for k in ("z", "pos", "edges", "shifts", "cell")))
assert not any(name.startswith("mlfound") for name in sys.modules), "mlfound was imported"
np.savez(sys.argv[3], energy=energy.numpy(), forces=forces.numpy(), stress=stress.numpy())
"""


def structures(paracetamol):
    """Two molecules, and the first of them in a tilted periodic box (images within the cutoff)."""
    crystal = copy.copy(paracetamol[2])  # a copy: the session's records are shared with other test files
    crystal.cell_a = np.array([[8.0, 0.0, 0.0], [1.5, 9.0, 0.0], [-1.0, 0.8, 7.5]])
    crystal.pbc = np.ones(3, bool)
    return [paracetamol[0], paracetamol[1], crystal]


def deployed_outputs(module, records, cutoff_a):
    outputs = []
    for rec in records:
        edges, shifts = neighbour_list(rec, cutoff_a)
        cell = rec.cell_a if rec.cell_a is not None else np.zeros((3, 3))
        energy, forces, stress = module(torch.from_numpy(rec.z), torch.from_numpy(rec.pos_a),
                                        torch.from_numpy(edges), torch.from_numpy(shifts), torch.from_numpy(cell))
        outputs.append((energy.item(), forces.detach().double().numpy(), stress.detach().numpy()))
    return outputs


def assert_same_predictions(outputs, release_model, records, head, atol_ev, atol_ev_a):
    energies, forces, stresses = predict_with_stress(release_model, records, head)
    for (energy, force, stress), e, f, s in zip(outputs, energies, forces, stresses):
        assert energy == pytest.approx(e, abs=atol_ev)
        np.testing.assert_allclose(force, f, rtol=0, atol=atol_ev_a)
        np.testing.assert_allclose(stress, s, rtol=0, atol=atol_ev_a * 1e-2)  # NaN where the record has no cell


@pytest.mark.parametrize("dtype, atol_ev, atol_ev_a", [("float64", 1e-6, 1e-9), ("float32", 1e-6, 1e-5)])
def test_the_deployed_head_predicts_what_the_release_predicts(paracetamol, tmp_path, dtype, atol_ev, atol_ev_a):
    release = load("demo-reptile")
    path = deploy(release, HEAD, tmp_path / "model.pt", dtype)
    module = torch.jit.load(str(path))
    records = structures(paracetamol)
    outputs = deployed_outputs(module, records, release.model.config.cutoff_a)
    release_model = release.model.to(torch.float64 if dtype == "float64" else torch.float32)
    assert_same_predictions(outputs, release_model, records, HEAD, atol_ev, atol_ev_a)
    assert np.isnan(outputs[0][2]).all() and np.abs(outputs[2][2]).max() > 1e-5
    files = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=files)
    metadata = json.loads(files[METADATA_FILE])
    assert metadata["head"] == HEAD and metadata["dtype"] == dtype
    assert metadata["cutoff_a"] == release.model.config.cutoff_a and metadata["elements"] == [1, 6, 7, 8]


def test_the_product_basis_trunk_deploys_and_runs_without_mlfound(paracetamol, tmp_path):
    """A many-body (correlation 3) model, run in a fresh Python that only has torch and numpy."""
    model = make_potential(torch.float64, correlation=3)
    release = Release(model, {"heads": {task: {"lot_method": task} for task in TASKS}})
    path = deploy(release, "hf_sto3g", tmp_path / "model.pt")
    records = structures(paracetamol)[1:]
    expected = deployed_outputs(torch.jit.load(str(path)), records, model.config.cutoff_a)
    assert_same_predictions(expected, model, records, "hf_sto3g", 1e-6, 1e-9)
    crystal = periodic_record()  # another cell: atoms that see their own images
    edges, shifts = neighbour_list(crystal, model.config.cutoff_a)
    np.savez(tmp_path / "inputs.npz", z=crystal.z, pos=crystal.pos_a, edges=edges, shifts=shifts, cell=crystal.cell_a)
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_MLFOUND, str(path), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "outputs.npz")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = np.load(tmp_path / "outputs.npz")
    assert_same_predictions([(float(result["energy"]), result["forces"], result["stress"])], model, [crystal],
                            "hf_sto3g", 1e-6, 1e-9)


def test_deploy_refuses_an_unknown_head_and_the_module_an_unknown_element(paracetamol, tmp_path, capsys):
    assert main(["deploy", "demo-reptile", "--head", "hf_631g", "--out", str(tmp_path / "m.pt")]) == 2
    assert "no head 'hf_631g'; available heads" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
    assert main(["deploy", "demo-reptile", "--head", HEAD, "--out", str(tmp_path / "m.pt")]) == 0
    assert f"deploy {HEAD}: 2/2 step (100%)" in capsys.readouterr().err  # its progress, in a log
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["m.pt"]  # no temporary left
    module = torch.jit.load(str(tmp_path / "m.pt"))
    rec = paracetamol[0]
    edges, shifts = neighbour_list(rec, 5.0)
    z = torch.from_numpy(rec.z).clone()
    z[0] = 9  # fluorine: the demo model never saw it
    with pytest.raises(Exception, match="no reference energy"):
        module(z, torch.from_numpy(rec.pos_a), torch.from_numpy(edges), torch.from_numpy(shifts), torch.zeros(3, 3))
