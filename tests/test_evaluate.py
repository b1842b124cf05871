"""Evaluation: smoothness metrics against hand-made profiles, the error table against numpy on the
same predictions, and the evaluate / split / learning-curve commands end to end."""
import json

import numpy as np
import pytest

from mlfound.cli import main as mlfound
from mlfound.data.readers import SourceSpec, read_source
from mlfound.evaluate import evaluate, extrema, parity_values, scan_smoothness
from mlfound.predict import predict
from mlfound.release import load

SCAN = "scans/hf_631g_paracetamol-amide_scan.extxyz"


def test_extrema_of_a_periodic_and_an_open_profile():
    angles = np.radians(np.arange(0, 360, 10))
    threefold = np.cos(3 * angles)
    assert [kind for _, kind in extrema(threefold, periodic=True)] == ["max", "min"] * 3
    assert extrema(threefold, periodic=False) == [(i, k) for i, k in extrema(threefold, True) if 0 < i < 35]


def test_smoothness_of_a_perfect_and_of_a_wiggly_model():
    angles = np.radians(np.arange(0, 360, 10))
    reference = 0.1 * np.cos(2 * angles)
    perfect = scan_smoothness(reference + 3.0, reference, periodic=True)
    assert perfect["second_difference_rms_error_mev"] == pytest.approx(0, abs=1e-9)
    assert perfect["relative_energy_rmse_mev"] == pytest.approx(0, abs=1e-9)
    assert perfect["spurious_extrema"] == perfect["missed_extrema"] == 0
    wiggle = np.zeros_like(reference)
    wiggle[9] = 0.01  # a 10 meV bump on the minimum at 90 degrees: a max between two minima at 80 and 100
    wiggly = scan_smoothness(reference + wiggle, reference, periodic=True)
    d2 = np.roll(wiggle, -1) - 2 * wiggle + np.roll(wiggle, 1)
    assert wiggly["second_difference_rms_error_mev"] == pytest.approx(1e3 * np.sqrt((d2**2).mean()))
    assert wiggly["num_model_extrema"] == wiggly["num_reference_extrema"] + 2 == 6
    assert wiggly["spurious_extrema"] == 1 and wiggly["missed_extrema"] == 0  # both minima lie within one point


def test_stress_errors_of_periodic_data_equal_numpy_and_show_in_the_table(demo_dir, capsys):
    """The periodic demo boxes mixed with molecules: the stress MAE counts the boxes only."""
    from mlfound.predict import predict_with_stress

    release = load("demo-reptile")
    boxes = list(read_source(SourceSpec(demo_dir.parent / "demo-periodic" / "gfn1_xtb.extxyz", task="gfn1_xtb")))
    records = boxes[:6] + list(read_source(SourceSpec(demo_dir / "gfn1_xtb.extxyz", task="gfn1_xtb")))[:4]
    _, _, stresses = predict_with_stress(release.model, records, "gfn1_xtb")
    expected = np.abs(np.stack([s - r.stress_ev_a3 for s, r in zip(stresses, records[:6])])).mean()
    errors = evaluate(release, records, "gfn1_xtb")
    assert errors["stress_mae_mev_a3"] == pytest.approx(1e3 * expected, rel=1e-9)
    assert np.isnan(evaluate(release, records[6:], "gfn1_xtb")["stress_mae_mev_a3"])
    assert mlfound(["evaluate", "demo-reptile", str(demo_dir.parent / "demo-periodic" / "gfn1_xtb.extxyz"),
                    "--head", "gfn1_xtb"]) == 0
    table = capsys.readouterr().out
    assert "S MAE" in table and "meV/Å³" in table


def test_error_table_equals_numpy_on_the_same_predictions(tiny_release_path, demo_dir):
    release = load(tiny_release_path)
    records = list(read_source(SourceSpec(demo_dir / "hf_sto3g.extxyz", task="hf_sto3g")))[:15]
    energies, forces = predict(release.model, records, "hf_sto3g")
    per_atom = np.array([(e - r.energy_ev) / r.num_atoms for e, r in zip(energies, records)])
    force_errors = np.concatenate([(f - r.forces_ev_a).ravel() for f, r in zip(forces, records)])
    errors = evaluate(release, records, "hf_sto3g")
    assert errors["num_records"] == 15
    assert errors["energy_mae_mev_atom"] == pytest.approx(1e3 * np.abs(per_atom).mean(), rel=1e-9)
    assert errors["energy_rmse_mev_atom"] == pytest.approx(1e3 * np.sqrt((per_atom**2).mean()), rel=1e-9)
    assert errors["forces_mae_mev_a"] == pytest.approx(1e3 * np.abs(force_errors).mean(), rel=1e-6)
    assert errors["forces_rmse_mev_a"] == pytest.approx(1e3 * np.sqrt((force_errors**2).mean()), rel=1e-6)


def test_evaluate_command_with_a_torsion_scan(demo_dir, tmp_path, capsys):
    out = tmp_path / "scan.json"
    plot = tmp_path / "scan.png"
    assert mlfound(["evaluate", "demo-reptile", str(demo_dir / SCAN), "--head", "hf_sto3g", "--scan",
                    "--plot", str(plot), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "E MAE" in text and "spurious" in text
    result = json.loads(out.read_text())
    assert result["scan"]["num_points"] == 36 and result["scan"]["periodic"]
    assert result["scan"]["num_reference_extrema"] == 6  # the HF/6-31G profile: three minima, three maxima
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mlfound(["evaluate", "demo-reptile", str(demo_dir / SCAN), "--head", "hf_631g"]) == 2
    assert "available heads" in capsys.readouterr().err


def test_evaluate_draws_a_parity_plot_beside_the_json_whose_values_give_the_error_table(demo_dir, tmp_path,
                                                                                          capsys):
    records = list(read_source(SourceSpec(path=demo_dir / "hf_sto3g.extxyz", task="hf_sto3g")))[:20]
    release = load("demo-reptile")
    values = parity_values(release, records, "hf_sto3g")
    table = evaluate(release, records, "hf_sto3g")
    assert 1e3 * np.abs(np.subtract(*values["energy"])).mean() == pytest.approx(table["energy_mae_mev_atom"], 1e-6)
    assert 1e3 * np.abs(np.subtract(*values["forces"])).mean() == pytest.approx(table["forces_mae_mev_a"], 1e-6)
    out = tmp_path / "errors.json"
    assert mlfound(["evaluate", "demo-reptile", str(demo_dir / "hf_sto3g.extxyz"), "--head", "hf_sto3g",
                    "--json", str(out)]) == 0
    assert (tmp_path / "errors.parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["parity_plot"] == str(tmp_path / "errors.parity.png")
    assert "parity plot" in capsys.readouterr().out


def test_split_then_learning_curve(tiny_release_path, demo_dir, tmp_path, capsys):
    from mlfound.data.sets import load_records
    from mlfound.finetune import FinetuneConfig, finetune
    from mlfound.release import save_release

    assert mlfound(["split", str(demo_dir / "hf_631g.extxyz"), "--out", str(tmp_path), "--sizes", "train=40",
                    "test=rest", "--seed", "3"]) == 0
    train = load_records(tmp_path / "train.extxyz", "hf_631g")
    test = load_records(tmp_path / "test.extxyz", "hf_631g")
    assert len(train) == 40 and len(test) == 260
    original = load_records(demo_dir / "hf_631g.extxyz", "hf_631g")
    assert sorted(r.energy_ev for r in train + test) == sorted(r.energy_ev for r in original)  # disjoint, complete
    base = load(tiny_release_path)
    models = []
    for n in (5, 10):
        for seed in (0, 1):
            result = finetune(base, train[:n] if seed == 0 else train[-n:], None,
                              FinetuneConfig(head="hf_631g", max_steps=2, seed=seed), progress=False)
            path = save_release(result.release.model, result.release.metadata, tmp_path / f"ft{n}_{seed}.st")
            models.append(f"tiny={path}")
    assert mlfound(["learning-curve", *models, "--data", str(tmp_path / "test.extxyz"), "--head", "hf_631g",
                    "--out", str(tmp_path / "lc.png"), "--json", str(tmp_path / "lc.json")]) == 0
    curve = json.loads((tmp_path / "lc.json").read_text())
    assert sorted(curve["tiny"]) == ["10", "5"] and all(len(runs) == 2 for runs in curve["tiny"].values())
    assert (tmp_path / "lc.png").read_bytes()[:4] == b"\x89PNG"
    too_many = ["a=200", "b=200"]
    assert mlfound(["split", str(demo_dir / "hf_631g.extxyz"), "--out", str(tmp_path), "--sizes", *too_many]) == 2
    capsys.readouterr()
    twice = ["train=5", "test=10", "train=20"]  # the last would silently replace the first
    assert mlfound(["split", str(demo_dir / "hf_631g.extxyz"), "--out", str(tmp_path), "--sizes", *twice]) == 2
    assert "--sizes train: given twice" in capsys.readouterr().err


@pytest.mark.faults
def test_evaluate_refuses_hartree_labels_unless_told_the_unit(demo_dir, tmp_path, capsys):
    """Test labels in Hartree read as eV would report errors of hundreds of eV per atom as if real."""
    from tests.test_finetune import write_in_hartree

    data = write_in_hartree(demo_dir, tmp_path / "test.extxyz", None)
    assert mlfound(["evaluate", "demo-reptile", str(data), "--head", "hf_sto3g"]) == 2
    assert "likely in hartree" in capsys.readouterr().err
    assert mlfound(["evaluate", "demo-reptile", str(data), "--head", "hf_sto3g", "--energy-unit", "hartree"]) == 0


@pytest.mark.faults
def test_an_element_the_model_does_not_know_is_one_line(tiny_release_path, tmp_path, capsys):
    """Sulfur for an H/C/N/O model: the same one-line error as the calculator, from evaluate and learning-curve."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    atoms = molecule("CH3SH")
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=np.zeros((len(atoms), 3)))
    data = tmp_path / "with_sulfur.extxyz"
    write(data, [atoms], format="extxyz")
    expected = "elements [16] are unknown to this model; it knows [1, 6, 7, 8]"
    assert mlfound(["evaluate", str(tiny_release_path), str(data), "--head", "gfn2_xtb", "--no-unit-check"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    from mlfound.calculator import MLFoundCalculator

    atoms.calc = MLFoundCalculator(tiny_release_path, head="gfn2_xtb")
    with pytest.raises(ValueError) as calculator_error:
        atoms.get_potential_energy()
    assert str(calculator_error.value) == expected
