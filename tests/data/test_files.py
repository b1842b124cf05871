"""Files and folders mlfound writes: a full disk is said in those words and replaces nothing; a folder one
command fills is refused to a second writer, naming the holder; a killed holder's lock is taken over."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mlfound.data.files import DiskFullError, FolderInUseError, FolderLock, atomic_write, atomic_write_bytes

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real file system that fills up (mounting one needs root, as CI has)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave_bytes, 0))


def test_a_full_disk_names_path_and_bytes_and_keeps_the_old_file(small_disk):
    target = small_disk / "model.safetensors"
    atomic_write_bytes(target, b"old release")
    fill(small_disk, leave_bytes=8192)
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*model\.safetensors: it needs "
                                            r"200,000 bytes, [\d,]+ bytes are free"):
        atomic_write_bytes(target, b"x" * 200_000)
    assert target.read_bytes() == b"old release"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model.safetensors"]  # no temporary left


def test_a_full_disk_is_recognised_when_the_writer_loses_the_errno(small_disk):
    """torch.save reports ENOSPC as a RuntimeError without an errno; the free space tells."""
    import torch

    fill(small_disk, leave_bytes=4096)
    with pytest.raises(DiskFullError, match="no space left on device .*state.pt: it needs at least"):
        atomic_write(small_disk / "state.pt", lambda f: torch.save({"w": torch.zeros(100_000)}, f))


def test_a_second_writer_is_refused_with_the_holders_host_and_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mlfound.data.files import FolderLock; "
                               f"FolderLock({str(tmp_path)!r}, 'test run').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"is in use by another test run \(host .*, pid {holder.pid}, "):
            FolderLock(tmp_path, "shard run").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path, "shard run").acquire()  # the killed holder's lock went with it
    assert lock.stale_holder["pid"] == holder.pid
    assert f"pid {holder.pid}" in lock.stale_note() and "ended without releasing it" in lock.stale_note()
    lock.release()
    with FolderLock(tmp_path, "shard run") as clean:  # a clean release leaves nothing stale
        assert clean.stale_holder is None


def test_a_killed_holders_forked_workers_do_not_keep_its_lock(tmp_path):
    """A run's DataLoader workers are forked children that outlive a killed run for seconds; they must not hold
    its lock, or the next run on the folder is refused although its holder is dead."""
    holder = subprocess.Popen([sys.executable, "-c", "import os, time; from mlfound.data.files import FolderLock; "
                               f"FolderLock({str(tmp_path)!r}, 'test run').acquire()\n"
                               "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # the parent alone: its forked child lives on
        holder.wait()
        lock = FolderLock(tmp_path, "shard run").acquire()
        assert lock.stale_holder["pid"] == holder.pid
        lock.release()
    finally:
        subprocess.run(["pkill", "-f", str(tmp_path)], check=False)  # the orphaned child


def test_shard_dataset_refuses_a_shard_root_another_run_writes(demo_dir, tmp_path):
    out = tmp_path / "shards"
    with FolderLock(out, "mlfound shard run"):
        done = subprocess.run([sys.executable, "tools/shard_dataset.py", str(demo_dir / "gfn2_xtb.extxyz"),
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"pid {os.getpid()}" in done.stderr and "is in use by another mlfound shard run" in done.stderr
    assert not (out / "gfn2_xtb").exists()
    assert not (out / FolderLock.NAME).exists()  # released cleanly: nothing left behind
