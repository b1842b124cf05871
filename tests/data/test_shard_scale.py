"""Sharding at scale: worker processes and the shuffle buffer change nothing in the output, shards are a global
shuffle, statistics come from bounded accumulators yet equal the per-record computation, temporaries go."""
import filecmp
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

from mlfound.data import DataError, shard_format
from mlfound.data.readers import SourceSpec, read_source
from mlfound.data.references import reference_energy
from mlfound.data.shards import TMP_PREFIX, VALIDATION_DIR, ShardOptions, is_validation, shard_task, shard_tasks
from mlfound.data.shuffle import shuffle_key
from tests.data.helpers import demo_slice, shard

OPTIONS = ShardOptions(records_per_shard=7, val_fraction=0.2, skip_bad=True)


def two_sources(demo_dir, tmp_path, bad_index: int | None = None) -> list[Path]:
    """Records 0-29 and 30-54 of the GFN2-xTB demo task as two files (the second in another folder, same name
    as the first); with ``bad_index``, that record of the second file has overlapping atoms."""
    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":55")
    if bad_index is not None:
        frames[30 + bad_index].positions[1] = frames[30 + bad_index].positions[0]
    (tmp_path / "more").mkdir()
    paths = [tmp_path / "gfn2_xtb.extxyz", tmp_path / "more" / "gfn2_xtb.extxyz"]
    write(paths[0], frames[:30], format="extxyz")
    write(paths[1], frames[30:], format="extxyz")
    return paths


def shard_records(split_dir: Path, manifest: dict) -> list:
    """The records of a split in shard order, as written (no stream permutation)."""
    records = []
    for entry in manifest["shards"]:
        with tarfile.open(split_dir / entry["name"]) as tar:
            records += [shard_format.decode(tar.extractfile(m).read(), manifest["task"]) for m in tar.getmembers()]
    return records


def files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_workers_and_shuffle_buffer_do_not_change_a_byte(demo_dir, tmp_path):
    paths = two_sources(demo_dir, tmp_path, bad_index=4)
    sources = {"xtb": [SourceSpec(p, "xtb") for p in paths],
               "hf": [SourceSpec(demo_slice(demo_dir, "hf_sto3g", 25, tmp_path), "hf")]}
    one = dict(shard_tasks(sources, tmp_path / "one", OPTIONS, progress=False))
    # 2 worker processes, and a 4 kB buffer: many buckets, and buckets split again on disk
    two = dict(shard_tasks(sources, tmp_path / "two", OPTIONS, progress=False, workers=2, shuffle_buffer_mb=0.004))
    assert one == two and list(two) == ["xtb", "hf"]
    assert one["xtb"]["num_records"] + one["xtb"]["num_validation_records"] == 54
    assert one["xtb"]["num_rejected"] == 1 and len(one["xtb"]["shards"]) > 3
    assert files_under(tmp_path / "one") == files_under(tmp_path / "two")
    for rel in files_under(tmp_path / "one"):
        if (tmp_path / "one" / rel).is_file():
            assert filecmp.cmp(tmp_path / "one" / rel, tmp_path / "two" / rel, shallow=False), rel
    assert not [p for p in (tmp_path / "two").rglob("*") if p.name.startswith((".", TMP_PREFIX))], "temporaries left"


def test_shards_are_a_global_shuffle_of_the_task(demo_dir, tmp_path):
    paths = two_sources(demo_dir, tmp_path)
    manifest = shard_task("xtb", [SourceSpec(p, "xtb") for p in paths], tmp_path / "s", OPTIONS, progress=False)
    records = shard_records(tmp_path / "s" / "xtb", manifest)
    keys = [(shuffle_key(Path(r.source).name, r.index), paths.index(Path(r.source)), r.index) for r in records]
    assert keys == sorted(keys), "records in the order of their shuffle keys"
    assert not any(is_validation(r, OPTIONS.val_fraction) for r in records)
    first_shard = records[:OPTIONS.records_per_shard]
    assert {r.source for r in first_shard} == {str(p) for p in paths}, "a shard mixes the files"
    assert max(r.index for r in first_shard) - min(r.index for r in first_shard) > 2 * OPTIONS.records_per_shard


def test_statistics_equal_the_per_record_computation(demo_dir, tmp_path):
    paths = two_sources(demo_dir, tmp_path)
    train = shard_task("xtb", [SourceSpec(p, "xtb") for p in paths], tmp_path / "s", OPTIONS, progress=False)
    val = json.loads((tmp_path / "s" / "xtb" / VALIDATION_DIR / "manifest.json").read_text())
    everything = [r for p in paths for r in read_source(SourceSpec(p, "xtb"))]
    for manifest, held_out in ((train, False), (val, True)):
        recs = [r for r in everything if is_validation(r, OPTIONS.val_fraction) == held_out]
        refs = {int(z): e for z, e in manifest["references_ev"].items()}
        energies = np.array([r.energy_ev for r in recs])
        residual = np.array([r.energy_ev - reference_energy(r.z, refs) for r in recs])
        per_atom = residual / np.array([r.num_atoms for r in recs])
        forces = np.concatenate([r.forces_ev_a for r in recs])
        expected = {"energy_mean_ev": energies.mean(), "energy_std_ev": energies.std(),
                    "residual_rms_ev": np.sqrt((residual**2).mean()), "residual_per_atom_std_ev": per_atom.std(),
                    "forces_rms_ev_a": np.sqrt((forces**2).mean())}
        assert manifest["num_records"] == len(recs) and len(manifest["shards"]) > 1
        for key, value in expected.items():
            assert manifest["stats"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert manifest["num_atoms_total"] == sum(r.num_atoms for r in recs)
        counts = np.bincount(np.concatenate([r.z for r in recs]))
        assert manifest["element_counts"] == {str(z): int(c) for z, c in enumerate(counts) if c}


@pytest.mark.parametrize("workers", [1, 2])
def test_first_bad_record_in_file_order_stops_the_run_and_temporaries_go(demo_dir, tmp_path, workers):
    """Both files hold a bad record; the first file's is named whichever worker finishes first."""
    paths = two_sources(demo_dir, tmp_path, bad_index=2)
    frames = read(paths[0], index=":")
    frames[20].positions[2] = frames[20].positions[0]
    write(paths[0], frames, format="extxyz")
    with pytest.raises(DataError, match=f"{paths[0]} record 20: atoms 0 and 2 are 0.000 Å apart"):
        shard_task("xtb", [SourceSpec(p, "xtb") for p in paths], tmp_path / "s", ShardOptions(), progress=False,
                   workers=workers)
    assert not (tmp_path / "s" / "xtb" / "manifest.json").exists()
    assert files_under(tmp_path / "s" / "xtb") == [], "no shard and no temporary of a failed run"


def test_temporaries_of_a_killed_run_are_removed(demo_dir, tmp_path):
    source = demo_slice(demo_dir, "gfn2_xtb", 10, tmp_path)
    leftover = tmp_path / "s" / "gfn2_xtb" / f"{TMP_PREFIX}12345"
    leftover.mkdir(parents=True)
    (leftover / "train-00000.12345.bin").write_bytes(b"half a record")
    shard(source, tmp_path / "s")
    assert not leftover.exists()


def test_bad_worker_count_is_refused(demo_dir, tmp_path):
    source = demo_slice(demo_dir, "gfn2_xtb", 3, tmp_path)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        shard_task("gfn2_xtb", [SourceSpec(source, "gfn2_xtb")], tmp_path / "s", ShardOptions(), workers=0)


def test_record_source_and_bytes_survive_the_shuffle(demo_dir, tmp_path):
    """Every record comes out of the buckets bit for bit as encoded from its source."""
    source = demo_slice(demo_dir, "b3lyp_631g", 20, tmp_path)  # energy only
    manifest = shard(source, tmp_path / "s", records_per_shard=6)
    written = {r.index: r for r in shard_records(tmp_path / "s" / "b3lyp_631g", manifest)}
    expected = {r.index: r for r in read_source(SourceSpec(source, "b3lyp_631g"))}
    assert sorted(written) == sorted(expected)
    for index, rec in expected.items():
        assert shard_format.encode(written[index]) == shard_format.encode(rec)
