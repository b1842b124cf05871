"""The QM corpus tool on a seconds-long recipe: real xTB MD, real tblite and PySCF labels."""
import dataclasses
import json

import numpy as np
import pytest
from ase.io import read

from mlfound.data import DataError
from mlfound.qmdata import levels
from mlfound.qmdata.corpus import make_corpus
from mlfound.qmdata.recipes import RECIPES, TaskRecipe


def counts(summary: dict) -> dict:
    """make_corpus's rows without the measured CPU time, elements and sizes."""
    return {task: {key: row[key] for key in ("structures", "rejected", "molecules", "forces")}
            for task, row in summary.items()}


def test_tiny_corpus_labels_resume_and_metadata(tmp_path):
    recipe = RECIPES["tiny"]
    summary = make_corpus("tiny", recipe, tmp_path, workers=1)
    assert counts(summary) == {"gfn2_xtb": {"structures": 4, "rejected": 0, "molecules": 2, "forces": True},
                               "hf_sto3g": {"structures": 2, "rejected": 0, "molecules": 1, "forces": True}}
    # the data README's table: water (3 atoms) and methanol (6), two frames each
    assert summary["gfn2_xtb"]["elements"] == {"C": 2, "H": 12, "O": 4} and summary["gfn2_xtb"]["atoms"] == {"1-10": 4}
    assert summary["hf_sto3g"]["label_cpu_hours"] > 0
    written = json.loads((tmp_path / "tiny.summary.json").read_text())
    assert written["tasks"] == summary and written["geometry_cpu_hours"] > 0
    frames = read(tmp_path / "hf_sto3g.extxyz", index=":")
    assert frames[0].info["lot_method"] == "HF" and frames[0].info["lot_basis"] == "STO-3G"
    assert frames[0].info["lot_code"] == "pyscf" and frames[0].info["energy_unit"] == "eV"
    energy, forces = levels.label(levels.LEVELS["hf_sto3g"], frames[0].get_chemical_symbols(), frames[0].positions)
    assert frames[0].get_potential_energy() == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(frames[0].get_forces(), forces, atol=1e-6)

    # a rerun computes nothing new: every unit file stays as it was
    work_files = sorted((tmp_path / ".work").rglob("*.*"))
    stamps = [p.stat().st_mtime_ns for p in work_files]
    assert make_corpus("tiny", recipe, tmp_path, workers=1) == summary
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / ".work").rglob("*.*"))] == stamps


def test_labels_are_written_only_onto_the_frames_they_were_computed_on(tmp_path):
    """Label chunks carried to another machine meet geometries made again there: a changed frame is an error
    naming the label file, never a label on the wrong structure; deleting that file relabels it."""
    recipe = RECIPES["tiny"].only_tasks({"hf_sto3g"})
    make_corpus("tiny", recipe, tmp_path, workers=1)
    geometry_path = tmp_path / ".work" / "tiny" / "geometries" / "water_T300.npz"
    with np.load(geometry_path) as geometry:
        arrays = dict(geometry)
    arrays["frames_a"][1, 0, 0] += 1e-6
    np.savez(geometry_path, **arrays)
    label_path = tmp_path / ".work" / "tiny" / "labels" / "hf_sto3g" / "water_T300_f0000_s1.json"
    with pytest.raises(DataError, match=f"{label_path} labels other frames than {geometry_path}"):
        make_corpus("tiny", recipe, tmp_path, workers=1)
    label_path.unlink()
    make_corpus("tiny", recipe, tmp_path, workers=1)
    assert label_path.exists()
    frames = read(tmp_path / "hf_sto3g.extxyz", index=":")
    np.testing.assert_allclose(frames[1].positions, arrays["frames_a"][1], atol=1e-7)  # extxyz keeps 8 decimals


def test_forces_are_minus_energy_gradient_in_ev_per_angstrom(tmp_path):
    """Units check: PySCF's Hartree/Bohr gradient converted to eV/Å equals a finite difference in eV/Å."""
    lot = levels.LEVELS["hf_sto3g"]
    symbols, pos = ["O", "H", "H"], np.array([[0.0, 0.0, 0.1], [0.0, 0.76, -0.47], [0.0, -0.76, -0.47]])
    _, forces = levels.label(lot, symbols, pos)
    step = 1e-3
    plus, minus = pos.copy(), pos.copy()
    plus[1, 1] += step
    minus[1, 1] -= step
    numeric = -(levels.label(lot, symbols, plus)[0] - levels.label(lot, symbols, minus)[0]) / (2 * step)
    assert forces[1, 1] == pytest.approx(numeric, rel=1e-4)


def test_unconverged_scf_goes_to_the_rejects_file(tmp_path, monkeypatch):
    starved = dataclasses.replace(levels.LEVELS["hf_sto3g"], name="hf_starved", max_scf_cycles=1)
    monkeypatch.setitem(levels.LEVELS, "hf_starved", starved)
    recipe = dataclasses.replace(RECIPES["tiny"], tasks=(TaskRecipe("hf_starved", ("water",)),))
    summary = make_corpus("starved", recipe, tmp_path, workers=1)
    assert summary["hf_starved"]["structures"] == 0 and summary["hf_starved"]["rejected"] == 2
    rejects = [json.loads(line) for line in (tmp_path / "hf_starved.rejects.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rejects] == [0, 1] and "not converged" in rejects[0]["reason"]


def test_a_task_labels_every_nth_frame_of_each_trajectory(tmp_path):
    recipe = dataclasses.replace(RECIPES["tiny"], frames_per_temperature=3,
                                 tasks=(TaskRecipe("gfn2_xtb", ("water",), frame_step=2),))
    make_corpus("stepped", recipe, tmp_path, workers=1)
    frames = read(tmp_path / "gfn2_xtb.extxyz", index=":")
    assert [a.info["md_frame"] for a in frames] == [0, 2]
    trajectory = np.load(tmp_path / ".work" / "stepped" / "geometries" / "water_T300.npz")["frames_a"]
    np.testing.assert_allclose(frames[1].positions, trajectory[2])


def test_periodic_boxes_have_cells_and_a_stress_that_is_the_energys_strain_derivative(tmp_path):
    """tblite's periodic labels through the corpus file and mlfound's reader: stress = dE/dstrain / V in eV/Å³
    (ASE's sign), checked by finite differences of tblite's own energy; PySCF LoTs refuse boxes."""
    from ase.data import chemical_symbols

    from mlfound.data.readers import SourceSpec, read_source
    from mlfound.data.record import validate_record

    recipe = RECIPES["tiny-periodic"]
    assert make_corpus("tiny-periodic", recipe, tmp_path, workers=1)["gfn1_xtb"]["structures"] == 2
    records = list(read_source(SourceSpec(tmp_path / "gfn1_xtb.extxyz", task="gfn1_xtb")))
    lot, rec = levels.LEVELS["gfn1_xtb"], records[1]
    for record in records:
        validate_record(record)
        assert record.pbc.all() and record.num_atoms == 6 and np.abs(record.stress_ev_a3).max() > 1e-3
    symbols = [chemical_symbols[z] for z in rec.z]
    step, volume = 1e-5, abs(np.linalg.det(rec.cell_a))
    for i, j in [(0, 0), (2, 2), (0, 1)]:
        direction = np.zeros((3, 3))
        direction[i, j] = direction[j, i] = 1.0 if i == j else 0.5
        energies = [levels.label_periodic(lot, symbols, rec.pos_a @ (np.eye(3) + s * direction).T,
                                          rec.cell_a @ (np.eye(3) + s * direction).T)[0] for s in (step, -step)]
        assert rec.stress_ev_a3[i, j] == pytest.approx((energies[0] - energies[1]) / (2 * step) / volume, abs=1e-6)
    with pytest.raises(ValueError, match="hf_sto3g \\(pyscf\\) labels molecules only; periodic boxes need a tblite"):
        levels.label_periodic(levels.LEVELS["hf_sto3g"], symbols, rec.pos_a, rec.cell_a)


def test_the_urea_crystal_is_urea_with_its_hydrogen_bonds():
    """The crystal the demo-periodic recipe labels: 4 whole urea molecules in the 1x1x2 cell, with urea's bond
    lengths and the N-H...O hydrogen bonds of its crystal (a mistyped coordinate breaks one or the other)."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from mlfound.qmdata.geometries import molecular_crystal

    symbols, pos_a, cell_a = molecular_crystal(RECIPES["demo-periodic"].boxes["urea_crystal"])
    atoms = Atoms(symbols, positions=pos_a, cell=cell_a, pbc=True)
    assert atoms.get_chemical_formula() == "C4H16N8O4"
    i, j, d = neighbor_list("ijd", atoms, 1.5)
    bonded = {}
    for a, b, distance in zip(i, j, d):
        bonded.setdefault("".join(sorted(symbols[a] + symbols[b])), []).append(distance)
    expected_a = {"CO": 1.26, "CN": 1.35, "HN": 1.00}
    assert set(bonded) == set(expected_a), "no bonds but C=O, C-N and N-H within 1.5 Å"
    for pair, length_a in expected_a.items():
        np.testing.assert_allclose(bonded[pair], length_a, atol=0.015, err_msg=pair)
    assert len(bonded["HN"]) == 2 * 16  # every H on an N, both directions
    i, j, d = neighbor_list("ijd", atoms, 2.2)
    hydrogen_bonds = [x for a, b, x in zip(i, j, d) if symbols[a] == "O" and symbols[b] == "H"]
    assert len(hydrogen_bonds) == 16 and min(hydrogen_bonds) > 1.9  # each O accepts 4 H-bonds, none too close


def test_a_malformed_recipe_is_named_with_its_file(tmp_path):
    from mlfound.qmdata.recipes import load_recipes

    path = tmp_path / "recipes.yaml"
    path.write_text("molecules: {few: {water: O}}\nrecipes:\n  broken: {molecules: few, temperatures_k: [300.0], "
                    "frames_per_temperature: 1, md_stride_steps: 5, tasks: [{lot: gfn2_xtb}]}\n")
    with pytest.raises(ValueError, match=r"recipes.yaml: recipe 'broken' is malformed \(KeyError: 'molecules'\)"):
        load_recipes(path)
