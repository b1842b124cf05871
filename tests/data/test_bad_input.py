"""Every kind of bad input stops with an error naming file and record, or with skip_bad is listed."""
import json

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from mlfound.data import DataError
from mlfound.data.readers import SourceSpec
from mlfound.data.shards import ShardOptions, shard_task
from mlfound.data.streams import TaskStream
from tests.data.helpers import demo_slice, shard

pytestmark = pytest.mark.faults  # pytest -m faults: the fault-injection suite
BAD_INDEX = 4


def _nan_energy(atoms):
    atoms.calc = SinglePointCalculator(atoms, energy=float("nan"), forces=atoms.get_forces())


def _unknown_element(atoms):
    atoms.numbers[0] = 0  # ASE's "X" dummy atom


def _missing_energy(atoms):
    atoms.calc = None


def _overlapping_atoms(atoms):
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]


def _nan_forces(atoms):
    forces = atoms.get_forces()
    forces[0, 0] = np.inf
    atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=forces)


CORRUPTIONS = {
    "energy is nan": _nan_energy,
    "unknown element": _unknown_element,
    "missing energy": _missing_energy,
    "overlapping atoms": _overlapping_atoms,
    "forces contain NaN or inf": _nan_forces,
}


def write_bad_extxyz(demo_dir, tmp_path, corrupt):
    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":10")
    corrupt(frames[BAD_INDEX])
    path = tmp_path / "bad.extxyz"
    write(path, frames, format="extxyz")
    return path


@pytest.mark.parametrize("message", list(CORRUPTIONS))
def test_bad_record_raises_naming_file_and_index(demo_dir, tmp_path, message):
    path = write_bad_extxyz(demo_dir, tmp_path, CORRUPTIONS[message])
    with pytest.raises(DataError) as info:
        shard(path, tmp_path / "shards")
    text = str(info.value)
    assert f"{path} record {BAD_INDEX}" in text and message in text, text
    assert not (tmp_path / "shards" / "bad" / "manifest.json").exists(), "no manifest for a failed run"


@pytest.mark.parametrize("message", list(CORRUPTIONS))
def test_skip_bad_counts_and_lists_the_record(demo_dir, tmp_path, message):
    path = write_bad_extxyz(demo_dir, tmp_path, CORRUPTIONS[message])
    manifest = shard(path, tmp_path / "shards", skip_bad=True)
    assert manifest["num_records"] == 9 and manifest["num_rejected"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "shards" / "bad" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": str(path), "index": BAD_INDEX, "reason": rejects[0]["reason"]}]
    assert message in rejects[0]["reason"]


def test_truncated_file(demo_dir, tmp_path):
    """The frame cut in the middle is the one bad record; the five whole frames before it are kept."""
    path = demo_slice(demo_dir, "gfn2_xtb", 10, tmp_path)
    text = path.read_text()
    path.write_text(text[: int(len(text) * 0.55)])
    with pytest.raises(DataError, match=f"{path} record 5: .*truncated"):
        shard(path, tmp_path / "shards")
    manifest = shard(path, tmp_path / "kept", skip_bad=True)
    assert manifest["num_rejected"] == 1 and manifest["num_records"] == 5


def test_wrong_shape_in_npz(demo_dir, tmp_path):
    frames = read(demo_dir / "hf_sto3g.extxyz", index=":3")
    frames = [a for a in read(demo_dir / "gfn2_xtb.extxyz", index=":") if a.info["molecule"] == "methanol"][:3]
    forces = np.stack([a.get_forces() for a in frames])
    path = tmp_path / "bad.npz"
    np.savez(path, nuclear_charges=frames[0].numbers, coords=np.stack([a.positions for a in frames]),
             energies=np.array([a.get_potential_energy() for a in frames]), forces=forces[:, :, :2])
    with pytest.raises(DataError, match=r"bad.npz record 0: forces has shape \(6, 2\), expected \(6, 3\)"):
        shard(path, tmp_path / "shards")


def test_missing_source_and_mixed_lot(demo_dir, tmp_path):
    with pytest.raises(DataError, match="nope.extxyz: no such file"):
        shard(tmp_path / "nope.extxyz", tmp_path / "shards")
    sources = [SourceSpec(demo_slice(demo_dir, t, 5, tmp_path), task="mixed") for t in ("gfn2_xtb", "hf_sto3g")]
    with pytest.raises(DataError, match="disagree on level-of-theory"):
        shard_task("mixed", sources, tmp_path / "shards", ShardOptions(), progress=False)


def test_corrupted_shard_is_named(demo_dir, tmp_path):
    shard(demo_slice(demo_dir, "gfn2_xtb", 20, tmp_path), tmp_path / "shards", records_per_shard=10)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    victim = task_dir / "gfn2_xtb-00001.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    stream = TaskStream(task_dir, seed=0)
    with pytest.raises(DataError, match=f"shard {victim}: sha256 does not match"):
        for _ in range(20):
            next(stream)


def test_truncated_shard_from_url_is_named(demo_dir, tmp_path):
    """A shard read through a URL (here a pipe: command) is checked against the local manifest too."""
    shard(demo_slice(demo_dir, "gfn2_xtb", 20, tmp_path), tmp_path / "shards", records_per_shard=10)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    victim = task_dir / "gfn2_xtb-00000.tar"
    victim.write_bytes(victim.read_bytes()[:9000])
    stream = TaskStream(task_dir, seed=0, shard_url_template=f"pipe:cat {task_dir}/{{name}}")
    with pytest.raises(DataError, match=f"shard pipe:cat {victim}: sha256 does not match"):
        for _ in range(20):
            next(stream)
