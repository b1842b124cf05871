"""The command-line tools as a user runs them: help, a table on success, exit 2 with the reason on bad data."""
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import read, write

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_shard_dataset_then_bench(demo_dir, tmp_path):
    assert "--skip-bad" in run("tools/shard_dataset.py", "--help").stdout
    source = tmp_path / "b3lyp_631g.extxyz"
    write(source, read(demo_dir / "b3lyp_631g.extxyz", index=":40"))
    done = run("tools/shard_dataset.py", source, "--out", tmp_path / "shards", "--records-per-shard", "15",
               "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "b3lyp_631g" in done.stdout and "B3LYP/6-31G" in done.stdout
    bench = run("tools/bench_data.py", tmp_path / "shards", "--records", "50")
    assert bench.returncode == 0, bench.stderr
    assert bench.stdout.count("+neighbour lists") == 2  # one row per simulated rank


def test_bench_shard_prints_one_table_and_cleans_up(tmp_path):
    done = run("tools/bench_shard.py", "--sizes", "60", "120", "--workers", "1", "2", "--files", "2",
               "--scratch", tmp_path / "scratch")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith(("6e+01", "1e+02"))]
    assert [(r[0], r[1]) for r in rows] == [("6e+01", "1"), ("6e+01", "2"), ("1e+02", "1"), ("1e+02", "2")]
    assert all(r[9] == "yes" for r in rows), "2 workers wrote the same bytes as 1"
    assert not (tmp_path / "scratch").exists()


@pytest.mark.faults
def test_shard_dataset_killed_stops_its_workers_and_removes_its_temporaries(demo_dir, tmp_path):
    import signal
    import time

    import psutil

    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":") * 8
    sources = [tmp_path / "a.extxyz", tmp_path / "b.extxyz"]
    for k, source in enumerate(sources):
        write(source, frames[k::2])
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "tools/shard_dataset.py", *map(str, sources), "--task", "xtb", "--out",
                             str(out), "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("xtb/.shuffle.tmp*/train-*.bin")):  # reading has begun
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3, "a forkserver and two workers (and a resource tracker)"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left running: {alive}"
    assert list((out / "xtb").iterdir()) == [], "no temporaries, no shards, no manifest"


def test_shard_dataset_bad_record_exit_code(demo_dir, tmp_path):
    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":5")
    frames[2].positions[3] = frames[2].positions[0]
    source = tmp_path / "bad.extxyz"
    write(source, frames)
    done = run("tools/shard_dataset.py", source, "--out", tmp_path / "shards")
    assert done.returncode == 2
    assert f"{source} record 2: atoms 0 and 3 are 0.000 Å apart" in done.stderr


@pytest.mark.faults
def test_shard_dataset_refuses_kcal_per_mol_read_as_ev(demo_dir, tmp_path):
    """Energies and forces in kcal/mol with no unit in the file: no manifest, the likely unit named."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import kcal, mol

    frames = read(demo_dir / "gfn2_xtb.extxyz", index=":60")
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() / (kcal / mol),
                                           forces=atoms.get_forces() / (kcal / mol))
        del atoms.info["energy_unit"], atoms.info["forces_unit"]
    source = tmp_path / "gfn2_kcal.extxyz"
    write(source, frames)
    done = run("tools/shard_dataset.py", source, "--out", tmp_path / "shards")
    assert done.returncode == 2 and "likely in kcal/mol" in done.stderr, done.stderr
    assert not (tmp_path / "shards" / "gfn2_kcal" / "manifest.json").exists()
    done = run("tools/shard_dataset.py", source, "--out", tmp_path / "shards", "--energy-unit", "kcal/mol")
    assert done.returncode == 0, done.stderr


def test_make_qm_dataset_writes_a_checksum_list_that_sha256sum_verifies(tmp_path):
    done = run("tools/make_qm_dataset.py", "--recipe", "tiny", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = (tmp_path / "SHA256SUMS").read_text().split()[1::2]
    assert listed == ["gfn2_xtb.extxyz", "hf_sto3g.extxyz"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    (tmp_path / "hf_sto3g.extxyz").write_text((tmp_path / "hf_sto3g.extxyz").read_text().replace("HF", "hf", 1))
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True).returncode != 0


def test_make_qm_dataset_labels_the_named_tasks_first_and_the_rest_later_reusing_their_units(tmp_path):
    done = run("tools/make_qm_dataset.py", "--recipe", "tiny", "--tasks", "hf_sto3g", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.glob("*.extxyz")) == ["hf_sto3g.extxyz"]
    first = {path: path.stat().st_mtime_ns for path in (tmp_path / ".work").rglob("*") if path.is_file()}
    hf_sto3g = (tmp_path / "hf_sto3g.extxyz").read_text()
    done = run("tools/make_qm_dataset.py", "--recipe", "tiny", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.glob("*.extxyz")) == ["gfn2_xtb.extxyz", "hf_sto3g.extxyz"]
    assert {path: path.stat().st_mtime_ns for path in first} == first  # every unit of the first run reused
    assert (tmp_path / "hf_sto3g.extxyz").read_text() == hf_sto3g
    done = run("tools/make_qm_dataset.py", "--recipe", "tiny", "--tasks", "b3lyp_631g", "--out", tmp_path)
    assert done.returncode == 2
    assert "--tasks b3lyp_631g: not a task of recipe tiny; its tasks are gfn2_xtb, hf_sto3g" in done.stderr
