"""Public dataset presets read files in their exact layouts (tests/data/public_layouts.py) into records in eV and
Å with the right force sign; ANI-1x's NaN labels are counted as unlabelled, Transition1x is not double counted,
one file yields several LoT tasks, and a missing key is an error naming file, group and key."""
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from mlfound import finetune_command
from mlfound.data import DataError
from mlfound.data import shard_command as shard_dataset
from mlfound.data.presets import PRESETS, preset_sources, reading_options
from mlfound.data.readers import BadRecord, Record, SourceSpec, Unlabelled, lot_metadata, read_entries, read_source
from mlfound.data.shards import load_manifest
from mlfound.data.streams import TaskStream
from tests.data.public_layouts import (
    MPTRJ_CORRECTION_EV_ATOM,
    SPICE_SUBSET,
    T1X_FORCES,
    demo_molecules,
    emt_crystals,
    write_ani1x,
    write_ani2x,
    write_aselmdb,
    write_mptrj,
    write_qm7x,
    write_rmd17,
    write_sgdml,
    write_spice2,
    write_transition1x,
)

COUNTS = {"methanol": 3, "water": 2}




@pytest.fixture
def pbe0(demo_dir):
    return demo_molecules(demo_dir, "pbe0_631gs", COUNTS)


def flat(molecules: dict) -> list:
    return [atoms for frames in molecules.values() for atoms in frames]


def read_preset(preset: str, path: Path, task: str | None = None) -> list:
    """Every entry (Record, BadRecord, Unlabelled) of one task of a preset."""
    ((specs, _),) = preset_sources(preset, [path], [task] if task else None).values()
    return list(read_entries(specs[0]))


def assert_same_structures(records: list[Record], frames: list, atol_a: float = 1e-5, atol_ev_a: float = 1e-5):
    """Each frame is exactly one record (matched by geometry, in any order) with its labels in eV and Å."""
    assert len(records) == len(frames)
    unmatched = list(records)
    for atoms in frames:
        matches = [r for r in unmatched if r.pos_a.shape == atoms.positions.shape
                   and np.abs(r.pos_a - atoms.positions).max() < atol_a]
        assert len(matches) == 1, f"{atoms.get_chemical_formula()}: {len(matches)} records with its geometry"
        rec = matches[0]
        unmatched = [r for r in unmatched if r is not rec]
        np.testing.assert_array_equal(rec.z, atoms.numbers)
        assert rec.energy_ev == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(rec.forces_ev_a, atoms.get_forces(), atol=atol_ev_a)
        assert (rec.cell_a is not None) == bool(atoms.pbc.any())
        if atoms.pbc.any():
            np.testing.assert_allclose(rec.cell_a, atoms.cell[:], atol=atol_a)
        if "stress" in atoms.calc.results:  # eV/Å³ in ASE's sign, and not trivially zero
            assert np.abs(atoms.get_stress()).max() > 1e-4
            np.testing.assert_allclose(rec.stress_ev_a3, atoms.get_stress(voigt=False), rtol=1e-10, atol=1e-12)
        else:
            assert rec.stress_ev_a3 is None


def test_spice2_bohr_hartree_and_the_gradient_is_minus_the_forces(pbe0, tmp_path):
    path = write_spice2(tmp_path / "SPICE-2.0.1.hdf5", pbe0)
    records = read_preset("spice2", path)
    assert_same_structures(records, flat(pbe0))
    assert [r.index for r in records] == list(range(5))
    assert records[0].provenance == {"group": "/methanol", "smiles": "CO", "subset": SPICE_SUBSET}
    unsigned = SourceSpec(path, "t", format="spice", energy_key="dft_total_energy", forces_key="dft_total_gradient",
                          energy_unit="hartree", length_unit="bohr")
    np.testing.assert_allclose(next(read_source(unsigned)).forces_ev_a, -records[0].forces_ev_a)


def ani1x_lots(demo_dir) -> dict:
    """wB97x/DZ labels every conformer; TZ only methanol; CCSD(T) some of each, energies only."""
    cc = demo_molecules(demo_dir, "b3lyp_631g", COUNTS)
    return {"wb97x_dz": demo_molecules(demo_dir, "pbe0_631gs", COUNTS),
            "wb97x_tz": {"methanol": demo_molecules(demo_dir, "hf_sto3g", {"methanol": 3})["methanol"],
                         "water": [None, None]},
            "ccsd(t)_cbs": {"methanol": [None, *cc["methanol"][1:]], "water": [cc["water"][0], None]}}


def test_ani1x_one_file_yields_a_task_per_lot_and_nan_is_unlabelled(demo_dir, tmp_path):
    lots = ani1x_lots(demo_dir)
    path = write_ani1x(tmp_path / "ani1x-release.h5", lots)
    sources = preset_sources("ani1x", [path])
    assert list(sources) == ["ani1x_wb97x_dz", "ani1x_wb97x_tz", "ani1x_ccsd_t_cbs"]
    assert sources["ani1x_wb97x_tz"][1] == {"lot_method": "wB97x", "lot_basis": "def2-TZVPP"}
    for task, lot in zip(sources, ("wb97x_dz", "wb97x_tz", "ccsd(t)_cbs")):
        entries = read_preset("ani1x", path, task)
        records = [e for e in entries if isinstance(e, Record)]
        unlabelled = [e for e in entries if isinstance(e, Unlabelled)]
        labelled = [a for a in flat(lots[lot]) if a is not None]
        assert len(records) == len(labelled) and len(records) + len(unlabelled) == 5
        assert sorted(e.index for e in entries) == list(range(5))
        for rec, atoms in zip(records, labelled):
            np.testing.assert_allclose(rec.pos_a, atoms.positions, atol=1e-5)
            assert rec.energy_ev == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
            if lot == "ccsd(t)_cbs":
                assert rec.forces_ev_a is None
            else:  # Hartree/Å, as the ANI-1x paper states
                np.testing.assert_allclose(rec.forces_ev_a, atoms.get_forces(), atol=1e-5)
    assert sorted(r.index for r in read_source(sources["ani1x_wb97x_tz"][0][0])) == [0, 1, 2]  # methanol only


def test_a_nan_label_where_nan_does_not_mean_unlabelled_is_a_bad_record(pbe0, tmp_path):
    path = write_spice2(tmp_path / "spice.hdf5", pbe0)
    with h5py.File(path, "r+") as f:
        f["water/dft_total_energy"][1] = np.nan
    with pytest.raises(DataError, match=f"{path} record 4: energy is nan"):
        shard_dataset_records(path, tmp_path)


def shard_dataset_records(path: Path, tmp_path: Path) -> None:
    from mlfound.data.shards import ShardOptions, shard_task

    ((task, (specs, lot)),) = preset_sources("spice2", [path]).items()
    shard_task(task, specs, tmp_path / "shards", ShardOptions(), lot=lot, progress=False)


def test_ani2x_species_per_conformer(pbe0, tmp_path):
    path = write_ani2x(tmp_path / "ANI-2x-wB97X-631Gd.h5", pbe0)
    records = read_preset("ani2x", path)
    assert_same_structures(records, flat(pbe0))
    assert [r.provenance["group"] for r in records] == ["/003"] * 2 + ["/006"] * 3


def test_qm7x_one_group_per_conformer(pbe0, tmp_path):
    path = write_qm7x(tmp_path / "1000.hdf5", pbe0)
    records = read_preset("qm7x", path)
    assert_same_structures(records, flat(pbe0), atol_a=1e-12, atol_ev_a=1e-12)
    assert records[0].provenance == {"group": "/1/Geom-m1-i1-c1-opt"}


def t1x_reactions(demo_dir) -> dict:
    frames = demo_molecules(demo_dir, "pbe0_631gs", {"methanol": 4, "water": 4})
    return {"rxn0001": ("train", frames["methanol"]), "rxn0002": ("test", frames["water"])}


def test_transition1x_counts_each_structure_once(demo_dir, tmp_path):
    """The data split repeats the others and a transition state repeats a path image: neither is read twice."""
    reactions = t1x_reactions(demo_dir)
    path = write_transition1x(tmp_path / "Transition1x.h5", reactions)
    records = read_preset("transition1x", path)
    assert_same_structures(records, [a for _, frames in reactions.values() for a in frames])
    groups = {r.provenance["group"] for r in records}
    assert groups == {f"/{split}/{formula}/{rxn}{part}" for rxn, split, formula in
                      (("rxn0001", "train", "CH4O"), ("rxn0002", "test", "H2O"))
                      for part in ("", "/reactant", "/product")}


def test_sgdml_npz_units_from_the_file_and_its_theory(pbe0, tmp_path):
    path = write_sgdml(tmp_path / "md17_methanol.npz", pbe0["methanol"])
    assert_same_structures(read_preset("md17", path), pbe0["methanol"])
    ((specs, _),) = preset_sources("md17", [path]).values()
    assert lot_metadata(specs[0])["lot_method"] == "PBE+TS"
    in_ev = write_sgdml(tmp_path / "in_ev.npz", pbe0["methanol"], e_unit="eV")
    with pytest.raises(DataError, match=f"{in_ev}: the energy unit was given as 'kcal/mol' but the file says "
                                        "energy_unit=eV"):
        read_preset("md17", in_ev)
    ((specs, _),) = preset_sources("md17", [in_ev], energy_unit="eV").values()
    assert_same_structures(list(read_source(specs[0])), pbe0["methanol"])


def test_rmd17_npz_in_kcal_per_mol(pbe0, tmp_path):
    path = write_rmd17(tmp_path / "rmd17_methanol.npz", pbe0["methanol"])
    assert_same_structures(read_preset("rmd17", path), pbe0["methanol"])


def test_mptrj_periodic_records_with_the_corrected_energy(tmp_path):
    crystals = emt_crystals({"Cu": 3, "Al": 2})
    path = write_mptrj(tmp_path / "MPtrj_2022.9_full.json", crystals)
    records = read_preset("mptrj", path)
    for frames in crystals.values():
        for atoms in frames:
            atoms.calc.results["energy"] += MPTRJ_CORRECTION_EV_ATOM * len(atoms)
    assert_same_structures(records, flat(crystals))
    assert all(r.pbc.all() for r in records)
    assert records[3].provenance == {"mp_id": "mp-102", "frame": "mp-102-0-0"}


def test_mptrj_frames_that_cannot_be_read_are_bad_records_naming_the_frame(tmp_path):
    path = write_mptrj(tmp_path / "mptrj.json", emt_crystals({"Cu": 4}))
    data = json.loads(path.read_text())
    frames = data["mp-101"]
    del frames["mp-101-1-0"]["force"]
    frames["mp-101-2-0"]["structure"]["sites"][0]["species"] = [{"element": "Cu", "occu": 0.5},
                                                                 {"element": "Au", "occu": 0.5}]
    frames["mp-101-3-0"]["corrected_total_energy"] = None
    path.write_text(json.dumps(data))
    entries = read_preset("mptrj", path)
    assert isinstance(entries[0], Record)
    assert isinstance(entries[1], BadRecord) and "frame mp-101/mp-101-1-0 lacks 'force'" in str(entries[1])
    assert isinstance(entries[2], BadRecord) and "disordered" in str(entries[2])
    assert isinstance(entries[3], BadRecord) and "mp-101-3-0: its labels are not numbers" in str(entries[3])
    path.write_text(path.read_text()[:-200])
    with pytest.raises(DataError, match="truncated or malformed"):
        read_preset("mptrj", path)


def test_ase_lmdb_is_read_read_only(tmp_path):
    crystals = emt_crystals({"Cu": 2, "Al": 2})
    path = write_aselmdb(tmp_path / "omat24.aselmdb", crystals)
    lock = tmp_path / "omat24.aselmdb-lock"
    lock.unlink()
    assert_same_structures(read_preset("omat24", path), flat(crystals))
    assert not lock.exists()


def test_a_missing_key_names_file_group_and_key(pbe0, demo_dir, tmp_path):
    path = write_spice2(tmp_path / "spice.hdf5", pbe0)
    with h5py.File(path, "r+") as f:
        del f["water/dft_total_gradient"]
    entries = read_preset("spice2", path)
    assert [type(e) for e in entries] == [Record] * 3 + [BadRecord] * 2
    with pytest.raises(DataError, match=f"{path} record 3: group '/water' lacks dataset 'dft_total_gradient'"):
        list(read_source(preset_sources("spice2", [path])["spice2"][0][0]))
    path = write_spice2(tmp_path / "spice_without_numbers.hdf5", pbe0)
    with h5py.File(path, "r+") as f:
        del f["water/atomic_numbers"]
    with pytest.raises(DataError, match=f"{path}: group '/water' lacks dataset 'atomic_numbers'"):
        read_preset("spice2", path)
    t1x = write_transition1x(tmp_path / "t1x.h5", t1x_reactions(demo_dir))
    with h5py.File(t1x, "r+") as f:
        del f[f"train/CH4O/rxn0001/product/{T1X_FORCES}"]
    with pytest.raises(DataError, match=re.escape(f"{t1x} record 6: group '/train/CH4O/rxn0001/product' lacks "
                                                  f"dataset '{T1X_FORCES}'")):
        list(read_source(preset_sources("transition1x", [t1x])["transition1x"][0][0]))
    with pytest.raises(DataError, match="npz lacks keys \\['R', 'z'\\]"):
        read_preset("md17", write_rmd17(tmp_path / "rmd17.npz", pbe0["methanol"]))


def test_task_selection_and_options_a_preset_fixes(tmp_path):
    assert list(preset_sources("ani1x", [tmp_path / "x.h5"], ["ani1x_ccsd_t_cbs"])) == ["ani1x_ccsd_t_cbs"]
    assert list(preset_sources("ani1x", [tmp_path / "x.h5"], ["ani1x_wb97x_dz"], rename="dz")) == ["dz"]
    with pytest.raises(DataError, match="preset 'ani1x' yields 3 .*pick one with --preset-task"):
        preset_sources("ani1x", [tmp_path / "x.h5"], rename="dz")
    with pytest.raises(DataError, match="preset 'ani1x' has no task ani1x_b3lyp; its tasks: ani1x_wb97x_dz"):
        preset_sources("ani1x", [tmp_path / "x.h5"], ["ani1x_b3lyp"])
    with pytest.raises(DataError, match="unknown preset 'spice3'; known: ani1x, ani2x"):
        reading_options("spice3")
    with pytest.raises(DataError, match="pick one with --preset-task"):
        reading_options("ani1x")
    how, lot = reading_options("ani1x", "ani1x_wb97x_tz")
    assert how["energy_key"] == "wb97x_tz.energy" and how["nan_is_unlabelled"] and lot["lot_basis"] == "def2-TZVPP"
    with pytest.raises(DataError, match="preset 'spice2' sets --energy-key"):
        reading_options("spice2", energy_key="formation_energy")
    assert reading_options(forces_key="none")[0]["forces_key"] is None
    assert set(PRESETS) >= {"spice2", "ani1x", "ani2x", "qm7x", "transition1x", "md17", "rmd17", "mptrj", "omat24"}


def public_file(preset: str, demo_dir: Path, tmp_path: Path) -> tuple[Path, list]:
    """A file in the preset's layout and the structures it holds (eV, Å)."""
    pbe0 = demo_molecules(demo_dir, "pbe0_631gs", COUNTS)
    if preset in ("mptrj", "omat24"):
        crystals = emt_crystals({"Cu": 3, "Al": 3})
        if preset == "omat24":
            return write_aselmdb(tmp_path / "rattled-300.aselmdb", crystals), flat(crystals)
        path = write_mptrj(tmp_path / "MPtrj_2022.9_full.json", crystals)
        for atoms in flat(crystals):
            atoms.calc.results["energy"] += MPTRJ_CORRECTION_EV_ATOM * len(atoms)
        return path, flat(crystals)
    if preset == "transition1x":
        reactions = t1x_reactions(demo_dir)
        return (write_transition1x(tmp_path / "Transition1x.h5", reactions),
                [a for _, frames in reactions.values() for a in frames])
    writers = {"spice2": write_spice2, "ani2x": write_ani2x, "qm7x": write_qm7x}
    if preset in writers:
        return writers[preset](tmp_path / f"{preset}.h5", pbe0), flat(pbe0)
    writer = {"md17": write_sgdml, "rmd17": write_rmd17}[preset]
    return writer(tmp_path / f"{preset}_methanol.npz", pbe0["methanol"]), pbe0["methanol"]


@pytest.mark.parametrize("preset", ["spice2", "ani2x", "qm7x", "transition1x", "md17", "rmd17", "mptrj", "omat24"])
def test_shard_dataset_preset_end_to_end(preset, demo_dir, tmp_path, capsys):
    path, structures = public_file(preset, demo_dir, tmp_path)
    assert shard_dataset.main([str(path), "--preset", preset, "--out", str(tmp_path / "shards")]) == 0
    manifest = load_manifest(tmp_path / "shards" / preset)
    assert manifest["num_records"] == len(structures) and manifest["num_unlabelled"] == 0
    assert manifest["lot"].get("lot_method") == ("PBE+TS" if preset == "md17" else
                                                 PRESETS[preset].tasks[preset].lot["lot_method"])
    assert_same_structures(TaskStream(tmp_path / "shards" / preset, seed=0).rest_of_epoch(), structures)
    assert preset in capsys.readouterr().out


@pytest.mark.parametrize("workers", [1, 2])  # 2: the counts come back from worker processes, a LoT per task
def test_shard_dataset_ani1x_kept_rejected_and_unlabelled_add_up(demo_dir, tmp_path, capsys, workers):
    path = write_ani1x(tmp_path / "ani1x-release.h5", ani1x_lots(demo_dir))
    with h5py.File(path, "r+") as f:  # methanol conformer 2: two atoms on top of each other
        f["methanol/coordinates"][2, 1] = f["methanol/coordinates"][2, 0]
    out = tmp_path / "shards"
    assert shard_dataset.main([str(path), "--preset", "ani1x", "--out", str(out), "--skip-bad",
                               "--workers", str(workers)]) == 0
    table = capsys.readouterr().out
    expected = {"ani1x_wb97x_dz": (4, 1, 0), "ani1x_wb97x_tz": (2, 1, 2), "ani1x_ccsd_t_cbs": (2, 1, 2)}
    for task, (kept, rejected, unlabelled) in expected.items():
        m = load_manifest(out / task)
        assert (m["num_records"], m["num_rejected"], m["num_unlabelled"]) == (kept, rejected, unlabelled)
        assert kept + rejected + unlabelled == 5
        assert [json.loads(line)["index"] for line in (out / task / "rejects.jsonl").read_text().splitlines()] == [2]
        assert table.count(task) >= 1
    assert "unlabelled" in table and "wB97x/def2-TZVPP" in table
    assert load_manifest(out / "ani1x_ccsd_t_cbs")["num_with_forces"] == 0
    assert shard_dataset.main([str(path), "--preset", "ani1x", "--task", "x", "--out", str(out)]) == 2
    assert "pick one with --preset-task" in capsys.readouterr().err
    assert shard_dataset.main([str(path), "--preset", "ani1x", "--energy-key", "e", "--out", str(out)]) == 2
    assert "sets --energy-key" in capsys.readouterr().err


def test_finetune_reads_one_task_of_a_preset(tiny_release_path, demo_dir, tmp_path, capsys):
    from mlfound.release import read_metadata

    path = write_spice2(tmp_path / "SPICE-2.0.1.hdf5", demo_molecules(demo_dir, "pbe0_631gs", {"methanol": 12}))
    out = tmp_path / "ft.safetensors"
    common = ["--model", str(tiny_release_path), "--max-steps", "0", "--out", str(out), "--train", str(path)]
    assert finetune_command.main([*common, "--head", "spice2", "--preset", "spice2"]) == 0
    assert read_metadata(out)["heads"]["spice2"]["lot"]["lot_method"] == "wB97M-D3(BJ)"
    assert finetune_command.main([*common, "--head", "x", "--preset", "ani1x"]) == 2
    assert "pick one with --preset-task" in capsys.readouterr().err


def test_mlfound_split_reads_a_preset_and_writes_its_lot(pbe0, tmp_path):
    from ase.io import read

    from mlfound.cli import main as mlfound

    path = write_spice2(tmp_path / "SPICE-2.0.1.hdf5", pbe0)
    assert mlfound(["split", str(path), "--out", str(tmp_path / "split"), "--sizes", "a=2", "b=rest",
                    "--preset", "spice2"]) == 0
    frames = read(tmp_path / "split" / "b.extxyz", index=":")
    assert len(frames) == 3 and frames[0].info["lot_method"] == "wB97M-D3(BJ)"
    written = [rec for name in "ab" for rec in read_source(SourceSpec(tmp_path / "split" / f"{name}.extxyz", "t"))]
    assert_same_structures(written, flat(pbe0))
