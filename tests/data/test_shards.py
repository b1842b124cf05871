"""Shard writing: manifest contents, determinism, idempotent re-runs, periodic neighbour lists."""
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.neighborlist import neighbor_list

from mlfound.config import RunConfig
from mlfound.data import DataError, shard_format
from mlfound.data.batching import collate, neighbour_list
from mlfound.data.files import sha256_file
from mlfound.data.readers import SourceSpec, read_source
from mlfound.data.references import reference_energy
from mlfound.data.shard_stats import mean_neighbours
from mlfound.data.shards import ShardOptions, load_manifest, shard_task
from mlfound.data.streams import TaskStream
from mlfound.train.build import with_data_normalisers
from tests.data.helpers import demo_slice, shard


def test_manifest_describes_the_task(demo_dir, tmp_path):
    source = demo_slice(demo_dir, "pbe0_631gs", 50, tmp_path)
    manifest = shard(source, tmp_path / "shards", records_per_shard=20)
    frames = read(source, index=":")
    assert manifest["lot"]["lot_method"] == "PBE0" and manifest["lot"]["lot_basis"] == "6-31G*"
    assert manifest["num_records"] == 50 and [s["num_records"] for s in manifest["shards"]] == [20, 20, 10]
    for s in manifest["shards"]:
        assert sha256_file(tmp_path / "shards" / "pbe0_631gs" / s["name"]) == s["sha256"]
    assert sum(manifest["atom_count_histogram"].values()) == 50
    assert manifest["num_atoms_total"] == sum(len(a) for a in frames)
    element_counts = np.bincount(np.concatenate([a.numbers for a in frames]))
    assert manifest["element_counts"] == {str(z): int(c) for z, c in enumerate(element_counts) if c}
    refs = load_manifest(tmp_path / "shards" / "pbe0_631gs")["references_ev"]
    residual = [a.get_potential_energy() - reference_energy(a.numbers, refs) for a in frames]
    assert np.isclose(manifest["stats"]["residual_rms_ev"], np.sqrt(np.mean(np.square(residual))), rtol=1e-12, atol=0)
    forces = np.concatenate([a.get_forces() for a in frames])
    assert np.isclose(manifest["stats"]["forces_rms_ev_a"], np.sqrt((forces**2).mean()))


def test_same_sources_give_identical_bytes_and_reruns_do_nothing(demo_dir, tmp_path):
    source = demo_slice(demo_dir, "gfn2_xtb", 30, tmp_path)
    first = shard(source, tmp_path / "a", records_per_shard=10)
    second = shard(source, tmp_path / "b", records_per_shard=10)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    manifest_path = tmp_path / "a" / "gfn2_xtb" / "manifest.json"
    stamp = manifest_path.stat().st_mtime_ns
    assert shard(source, tmp_path / "a", records_per_shard=10) == json.loads(manifest_path.read_text())
    assert manifest_path.stat().st_mtime_ns == stamp, "unchanged inputs: nothing rewritten"
    # changed options rewrite, and shards no longer listed are removed
    third = shard(source, tmp_path / "a", records_per_shard=30)
    assert len(third["shards"]) == 1
    assert sorted(p.name for p in (tmp_path / "a" / "gfn2_xtb").glob("*.tar")) == ["gfn2_xtb-00000.tar"]


def test_shard_members_are_read_as_tarfile_reads_them_pax_headers_included(demo_dir, tmp_path):
    """The ustar fast path gives tarfile's members; shards with PAX headers (written before tool 0.3) and
    truncated ones go the tarfile way."""
    manifest = shard(demo_slice(demo_dir, "gfn2_xtb", 12, tmp_path), tmp_path / "shards")
    data = (tmp_path / "shards" / "gfn2_xtb" / manifest["shards"][0]["name"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [tar.extractfile(m).read() for m in tar.getmembers()]
    assert len(members) == 12 and shard_format._ustar_payloads(data) == members
    assert shard_format.payloads(data, "plain.tar") == members
    old = io.BytesIO()
    with wds.TarWriter(old, mtime=0.0) as writer:  # a float mtime: a PAX header per member
        for i, payload in enumerate(members):
            writer.write({"__key__": f"gfn2_xtb-{i:09d}", shard_format.MEMBER_EXT: payload})
    assert shard_format._ustar_payloads(old.getvalue()) is None
    assert shard_format.payloads(old.getvalue(), "pax.tar") == members
    truncated = data[:len(data) // 2]
    assert shard_format._ustar_payloads(truncated) is None
    got = shard_format.payloads(truncated, "truncated.tar")
    assert len(got) < 12 and got == members[:len(got)]  # TaskStream names the shortfall


def test_periodic_cells_match_ase_neighbour_list(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=0)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    path = tmp_path / "cu.extxyz"
    write(path, atoms)
    shard(path, tmp_path / "shards")
    rec = next(TaskStream(tmp_path / "shards" / "cu", seed=0))
    assert rec.pbc.all() and np.allclose(rec.cell_a, atoms.cell[:])
    edges, shift_a = neighbour_list(rec, cutoff_a=4.0)
    i, j, d = neighbor_list("ijd", atoms, 4.0)
    ours = np.linalg.norm(rec.pos_a[edges[1]] - rec.pos_a[edges[0]] + shift_a, axis=1)
    ours_sorted = sorted(zip(edges[0], edges[1], ours))
    ase_sorted = sorted(zip(i, j, d))
    assert [(a, b) for a, b, _ in ours_sorted] == [(a, b) for a, b, _ in ase_sorted]
    np.testing.assert_allclose([x for *_, x in ours_sorted], [x for *_, x in ase_sorted], atol=1e-9)
    batch = collate([rec, rec], cutoff_a=4.0, task_names=["cu"])
    assert batch.edge_index.shape[1] == 2 * len(i)


def test_stress_goes_through_shards_and_version_1_manifests_still_read(tmp_path):
    from ase.calculators.emt import EMT

    frames = []
    for seed in range(3):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
        frames.append(atoms)
    write(tmp_path / "cu.extxyz", frames)
    manifest = shard(tmp_path / "cu.extxyz", tmp_path / "shards")
    assert manifest["format_version"] == 3 and manifest["num_with_stress"] == 3
    stream = TaskStream(tmp_path / "shards" / "cu", seed=0)
    by_index = {rec.index: rec for rec in (next(stream) for _ in range(3))}
    for index, atoms in enumerate(frames):
        np.testing.assert_array_equal(by_index[index].stress_ev_a3, atoms.get_stress(voigt=False))
    batch = collate(list(by_index.values()), 4.0, ["cu"])
    np.testing.assert_allclose(batch.volume_a3.numpy(), [a.get_volume() for a in frames])
    # a manifest written before stress existed (format 1) reads as stress-free; a newer one is refused
    path = tmp_path / "shards" / "cu" / "manifest.json"
    old = json.loads(path.read_text())
    del old["num_with_stress"]
    path.write_text(json.dumps({**old, "format_version": 1}))
    assert load_manifest(path.parent)["num_with_stress"] == 0
    path.write_text(json.dumps({**old, "format_version": 4}))
    with pytest.raises(DataError, match=r"manifest format 4 is not one this version reads \(1, 2, 3\)"):
        load_manifest(path.parent)


def test_manifests_count_neighbours_for_any_cutoff(demo_dir, tmp_path):
    """avg_num_neighbors from the manifests equals a brute-force count over the records, molecules and
    periodic images alike, at any cutoff; the config's own number wins; old manifests get a clear error."""
    molecules = demo_slice(demo_dir, "gfn2_xtb", 30, tmp_path)
    crystals = []
    for seed in range(2):
        atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))  # a small cell: most neighbours are images
        atoms.rattle(0.05, seed=seed)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - seed, forces=np.zeros((len(atoms), 3)))
        crystals.append(atoms)
    write(tmp_path / "cu.extxyz", crystals)
    manifests = {"gfn2_xtb": shard(molecules, tmp_path / "shards"),
                 "cu": shard(tmp_path / "cu.extxyz", tmp_path / "shards", check_units=False)}
    frames = read(molecules, index=":") + crystals

    def brute_force(cutoff_a):
        return sum(len(neighbor_list("i", a, cutoff_a)) for a in frames) / sum(len(a) for a in frames)

    for cutoff_a in (2.5, 4.0, 5.0, 6.0):
        assert mean_neighbours(manifests, cutoff_a) == pytest.approx(brute_force(cutoff_a), rel=1e-12)
    between = mean_neighbours(manifests, 4.02)  # within a bin: between the counts at its edges
    assert brute_force(4.0) <= between <= brute_force(4.05)
    cfg = RunConfig(run_dir=tmp_path / "run", data={"shard_root": tmp_path / "shards", "tasks": ["gfn2_xtb", "cu"]})
    assert with_data_normalisers(cfg, manifests).model.avg_num_neighbors == pytest.approx(brute_force(5.0))
    given = cfg.model_copy(update={"model": cfg.model.model_copy(update={"avg_num_neighbors": 12.0})})
    assert with_data_normalisers(given, {}).model.avg_num_neighbors == 12.0
    with pytest.raises(DataError, match=r"tasks \['cu'\] have no neighbour counts .* re-run `mlfound shard`"):
        mean_neighbours({**manifests, "cu": {k: v for k, v in manifests["cu"].items() if k != "neighbour_pairs"}}, 5.0)
    with pytest.raises(DataError, match="counts neighbours up to 8.0 Å, not to the model's cutoff 9.0 Å"):
        mean_neighbours(manifests, 9.0)


def test_sources_of_one_task_are_merged(demo_dir, tmp_path):
    (tmp_path / "x").mkdir()
    a = demo_slice(demo_dir, "gfn2_xtb", 5, tmp_path / "x")
    b = demo_slice(demo_dir, "gfn2_xtb", 7, tmp_path)
    manifest = shard_task("xtb", [SourceSpec(a, "xtb"), SourceSpec(b, "xtb")], tmp_path / "s", ShardOptions(),
                          progress=False)
    assert manifest["num_records"] == 12 and len(manifest["sources"]) == 2
    assert len(list(read_source(SourceSpec(a, "xtb")))) == 5


def test_validation_split_is_disjoint_stable_and_complete(demo_dir, tmp_path):
    source = demo_slice(demo_dir, "gfn2_xtb", 100, tmp_path)
    manifest = shard(source, tmp_path / "shards", val_fraction=0.2, records_per_shard=30)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    val_manifest = load_manifest(task_dir / "val")
    assert manifest["num_records"] + val_manifest["num_records"] == 100
    assert manifest["num_validation_records"] == val_manifest["num_records"]
    assert 10 <= val_manifest["num_records"] <= 30
    train_ids = {next(s).index for s in [TaskStream(task_dir, seed=0)] for _ in range(manifest["num_records"])}
    val_stream = TaskStream(task_dir / "val", seed=0)
    val_ids = {next(val_stream).index for _ in range(val_manifest["num_records"])}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 100
    again = shard(source, tmp_path / "other", val_fraction=0.2, records_per_shard=30)
    assert again["num_validation_records"] == manifest["num_validation_records"]
    shard(source, tmp_path / "shards", records_per_shard=30)
    assert not (task_dir / "val").exists(), "a split no longer asked for is removed"


@pytest.mark.faults
@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_records=m["num_records"] * 1000),
     r"field 'num_records' is \d+, but its shards list \d+ records"),
    (lambda m: [m.update(num_records=m["num_records"] * 1000), m["shards"][0].update(num_records=m["num_records"])],
     r"shard .*gfn2_xtb-00000.tar: 30 records, manifest says 30000"),
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\] field 'sha256' is missing"),
    (lambda m: m.update(task="hf_sto3g"), "the manifest is task 'hf_sto3g', but its folder names task 'gfn2_xtb'"),
])
def test_a_manifest_that_disagrees_with_its_shards_stops_the_run_in_the_main_process(demo_dir, tmp_path, edit,
                                                                                     message):
    """The task mixture is drawn from verified counts: a hand-edited manifest fails when the run's manifests
    are loaded, in the training process, naming the file, the shard and the field."""
    from mlfound.config import RunConfig
    from mlfound.train.build import load_manifests

    shard(demo_slice(demo_dir, "gfn2_xtb", 30, tmp_path), tmp_path / "shards")
    path = tmp_path / "shards" / "gfn2_xtb" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    cfg = RunConfig(run_dir=tmp_path / "run", data={"shard_root": tmp_path / "shards", "tasks": ["gfn2_xtb"]})
    with pytest.raises(DataError, match=message):
        load_manifests(cfg)


@pytest.mark.faults
def test_a_truncated_manifest_is_named(demo_dir, tmp_path):
    shard(demo_slice(demo_dir, "gfn2_xtb", 10, tmp_path), tmp_path / "shards")
    path = tmp_path / "shards" / "gfn2_xtb" / "manifest.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(DataError, match=r"manifest.json: not readable JSON .* truncated or corrupted"):
        load_manifest(path.parent)
