"""Readers convert units at the door: rMD17 npz (kcal/mol), ANI-1x HDF5 (Hartree), ASE db (eV), extxyz (the
units its frames declare)."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect
from ase.io import read, write

from mlfound.data import DataError
from mlfound.data.readers import SourceSpec, lot_metadata, read_source
from tests.data.helpers import demo_slice

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def methanol_frames(demo_dir):
    return [a for a in read(demo_dir / "gfn2_xtb.extxyz", index=":") if a.info["molecule"] == "methanol"]


def assert_records_match(records, frames, atol_e=1e-9, atol_f=1e-9):
    assert len(records) == len(frames)
    for rec, atoms in zip(records, frames):
        np.testing.assert_array_equal(rec.z, atoms.numbers)
        np.testing.assert_allclose(rec.pos_a, atoms.positions, atol=1e-9)
        assert rec.energy_ev == pytest.approx(atoms.get_potential_energy(), abs=atol_e)
        np.testing.assert_allclose(rec.forces_ev_a, atoms.get_forces(), atol=atol_f)


def test_rmd17_npz_in_kcal_per_mol(methanol_frames, tmp_path):
    kcal = units.kcal / units.mol
    path = tmp_path / "rmd17_methanol.npz"
    np.savez(path, nuclear_charges=methanol_frames[0].numbers,
             coords=np.stack([a.positions for a in methanol_frames]),
             energies=np.array([a.get_potential_energy() / kcal for a in methanol_frames]),
             forces=np.stack([a.get_forces() / kcal for a in methanol_frames]))
    records = list(read_source(SourceSpec(path, task="t", energy_key="energies", energy_unit="kcal/mol")))
    assert_records_match(records, methanol_frames)
    assert [r.index for r in records] == list(range(len(methanol_frames)))


def test_ani1x_hdf5_in_hartree_and_bohr_free(methanol_frames, demo_dir, tmp_path):
    water = [a for a in read(demo_dir / "gfn2_xtb.extxyz", index=":") if a.info["molecule"] == "water"]
    path = tmp_path / "ani.h5"
    with h5py.File(path, "w") as f:
        for name, frames in (("CH4O", methanol_frames), ("H2O", water)):
            g = f.create_group(name)
            g["atomic_numbers"] = frames[0].numbers
            g["coordinates"] = np.stack([a.positions for a in frames])
            g["wb97x_dz.energy"] = np.array([a.get_potential_energy() / units.Hartree for a in frames])
            g["wb97x_dz.forces"] = np.stack([a.get_forces() / units.Hartree for a in frames])
    spec = SourceSpec(path, task="t", energy_key="wb97x_dz.energy", forces_key="wb97x_dz.forces",
                      energy_unit="hartree")
    records = list(read_source(spec))
    assert_records_match(records, methanol_frames + water)
    assert [r.index for r in records] == list(range(len(records)))


def test_ase_db_and_bohr_positions(methanol_frames, tmp_path):
    path = tmp_path / "frames.db"
    with connect(path) as db:
        for atoms in methanol_frames:
            db.write(atoms)
    assert_records_match(list(read_source(SourceSpec(path, task="t"))), methanol_frames)
    spec = SourceSpec(path, task="t", length_unit="bohr")
    rec = next(read_source(spec))
    np.testing.assert_allclose(rec.pos_a, methanol_frames[0].positions * units.Bohr)


def test_unknown_unit_is_an_error(methanol_frames, tmp_path):
    path = tmp_path / "x.db"
    with connect(path) as db:
        db.write(methanol_frames[0])
    with pytest.raises(ValueError, match="unknown energy unit 'rydberg'"):
        list(read_source(SourceSpec(path, task="t", energy_unit="rydberg")))


def test_extxyz_in_the_units_its_frames_declare(methanol_frames, tmp_path):
    """energy_unit=Hartree and length_unit=Bohr info keys: read into eV and Å with no unit given."""
    hartree_per_bohr = units.Hartree / units.Bohr
    frames = []
    for atoms in methanol_frames:
        frame = atoms.copy()
        frame.positions = atoms.positions / units.Bohr
        frame.info.update(energy_unit="Hartree", length_unit="Bohr", forces_unit="Hartree/Bohr")
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy() / units.Hartree,
                                           forces=atoms.get_forces() / hartree_per_bohr)
        frames.append(frame)
    path = tmp_path / "hartree.extxyz"
    write(path, frames, format="extxyz")
    records = list(read_source(SourceSpec(path, task="t")))
    assert len(records) == len(methanol_frames)
    for rec, atoms in zip(records, methanol_frames):
        assert rec.energy_ev == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(rec.pos_a, atoms.positions, atol=1e-7)
        np.testing.assert_allclose(rec.forces_ev_a, atoms.get_forces(), atol=1e-6)
    assert lot_metadata(SourceSpec(path, task="t"))["energy_unit"] == "eV"  # the records', written next to them


def test_a_given_unit_must_agree_with_the_file(demo_dir, tmp_path):
    path = demo_slice(demo_dir, "gfn2_xtb", 3, tmp_path)  # its frames say energy_unit=eV
    with pytest.raises(DataError, match=f"{path} record 0: .*'kcal/mol'.*energy_unit=eV"):
        list(read_source(SourceSpec(path, task="t", energy_unit="kcal/mol")))
    same = list(read_source(SourceSpec(path, task="t", energy_unit="EV", length_unit="angstrom")))
    assert [r.energy_ev for r in same] == [r.energy_ev for r in read_source(SourceSpec(path, task="t"))]
    done = subprocess.run([sys.executable, "tools/shard_dataset.py", str(path), "--out", str(tmp_path / "shards"),
                           "--energy-unit", "kcal/mol"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and f"{path} record 0: the energy unit was given as 'kcal/mol'" in done.stderr


def test_extxyz_stress_and_virial_in_ev_per_cubic_angstrom(tmp_path):
    """ASE's stress (Voigt, eV/Å³, positive = tension), a virial info key (W = -stress x V), and both in the
    frame's declared units; a stress on a structure without a 3-D cell is a bad record, not a silent label."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlfound.data.record import validate_record

    atoms = bulk("Cu", cubic=True)
    atoms.rattle(0.05, seed=0)
    atoms.set_cell(atoms.cell[:] * 1.02, scale_atoms=True)  # strained: a stress well away from zero
    atoms.calc = EMT()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-3
    as_stress = atoms.copy()
    as_stress.calc = SinglePointCalculator(as_stress, energy=energy, forces=forces, stress=atoms.get_stress())
    as_virial = atoms.copy()
    as_virial.info["virial"] = -stress * atoms.get_volume()
    as_virial.calc = SinglePointCalculator(as_virial, energy=energy, forces=forces)
    in_kcal_bohr = atoms.copy()  # every label in kcal/mol and bohr, declared in the frame
    in_kcal_bohr.positions /= units.Bohr
    in_kcal_bohr.set_cell(atoms.cell[:] / units.Bohr)
    in_kcal_bohr.info.update(energy_unit="kcal/mol", length_unit="bohr")
    kcal = units.kcal / units.mol
    in_kcal_bohr.calc = SinglePointCalculator(in_kcal_bohr, energy=energy / kcal, forces=forces / kcal * units.Bohr,
                                              stress=atoms.get_stress() / kcal * units.Bohr**3)
    path = tmp_path / "cu.extxyz"
    write(path, [as_stress, as_virial, in_kcal_bohr])
    records = list(read_source(SourceSpec(path, task="t")))
    for rec in records:
        np.testing.assert_allclose(rec.stress_ev_a3, stress, rtol=1e-8, atol=1e-12)
        validate_record(rec)
    assert all(r.stress_ev_a3 is None for r in read_source(SourceSpec(path, task="t", stress_key=None)))
    molecule = records[0]
    molecule.pbc = np.array([True, True, False])
    with pytest.raises(DataError, match="record 0: a stress label needs a cell periodic in all three directions"):
        validate_record(molecule)
