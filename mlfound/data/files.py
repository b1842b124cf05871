"""Files written atomically, files hashed, and folders owned by one writer: every artefact mlfound writes
goes through here.

A file is written to a temporary name in its folder and renamed, so a reader (or a crash) never
sees half of it: shards, manifests, checkpoints' side files, releases, plots, trajectories. A write that
fails leaves no temporary behind and the old file as it was; a full disk is said in those words.
A folder that a command fills (a run directory, a shard root) is locked while it does (``FolderLock``).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

# below this many free bytes after a failed write, the disk is taken to be full: torch.save reports ENOSPC as a
# RuntimeError ("basic_ios::clear: iostream error", "file write failed") that carries no errno
FULL_DISK_FREE_BYTES = 1 << 20


class DiskFullError(OSError):
    """No space left for a file: the message names the file, the bytes it needed and the bytes free."""

    def __init__(self, path: Path | str, needed_bytes: int | None, free_bytes: int, at_least: bool = False):
        need = "an unknown number of bytes" if needed_bytes is None else (
            f"{'at least ' if at_least else ''}{needed_bytes:,} bytes")
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}: it needs {need}, "
                         f"{free_bytes:,} bytes are free there; nothing was replaced. Free some space or write "
                         "elsewhere, then run the command again")

    def __str__(self) -> str:
        return self.strerror


def free_bytes(path: Path | str) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(err: BaseException, folder: Path | str) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or (for writers that lose the errno) a full disk now."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, (OSError, RuntimeError)) and free_bytes(folder) < FULL_DISK_FREE_BYTES


def atomic_write(path: Path | str, write: Callable, text: bool = False, size_bytes: int | None = None) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``. On failure the
    temporary is removed and ``path`` is untouched; a full disk raises DiskFullError (``size_bytes``, when the
    caller knows it, is what the message says the file needs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w" if text else "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        full = is_disk_full(err, path.parent)  # judged before the temporary's space is given back
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path, size_bytes or written, free_bytes(path.parent), size_bytes is None) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), size_bytes=len(data))


def refuse_overwriting_inputs(outputs: dict[str, Path | str | None], inputs: dict[str, Path | str | None]) -> None:
    """A FileExistsError if an output (``{"--out": path}``) is one of the command's inputs (resolved, so links and
    ``./`` spellings count): a command never replaces what it reads. Checked before any work is done."""
    for out_label, out in outputs.items():
        if out is None:
            continue
        for in_label, source in inputs.items():
            if source is not None and Path(out).resolve() == Path(source).resolve():
                raise FileExistsError(f"{out_label} {out} is the input {in_label} ({Path(source).resolve()}); "
                                      "refusing to overwrite it: write to a new file")


class FolderInUseError(OSError):
    """Another live process holds the folder's lock; the message names its host and pid."""

    def __str__(self) -> str:
        return self.args[0]


# Lock files this process holds. A forked child (a DataLoader worker) shares the parent's open lock, and a killed
# parent's workers outlive it for seconds: the child closes its copies, so the lock ends with its holder.
_HELD_LOCK_FDS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCK_FDS:
        os.close(fd)  # the child's copy only: the parent's lock stays held
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class FolderLock:
    """An exclusive lock on a folder that one command fills: ``<folder>/.mlfound.lock``, an ``flock`` held for the
    command's life, with the holder's host, pid, command and start time written in it, removed at release. The
    operating system drops the lock when the holder dies, so a killed run never blocks the next one; its leftover
    record is reported as stale (``stale_holder``). A second writer gets FolderInUseError naming the holder.

        with FolderLock(run_dir, "pretraining run"):
            ...
    """
    NAME = ".mlfound.lock"

    def __init__(self, folder: Path | str, what: str):
        self.folder, self.what = Path(folder), what
        self.stale_holder: dict | None = None  # the record a killed holder left, if any
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUseError(
                    f"{self.folder} is in use by another {holder.get('what', self.what)} "
                    f"(host {holder.get('host', '?')}, pid "
                    f"{holder.get('pid', '?')}, started {holder.get('started', '?')}): wait for it to end, or use "
                    "another folder") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # a holder released (and removed) the file between our open and our lock: again
        self.stale_holder = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock: a clean exit leaves nothing behind (a killed holder leaves its
        record, which the next holder reports)."""
        if self._fd is not None:
            (self.folder / self.NAME).unlink(missing_ok=True)
            _HELD_LOCK_FDS.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def stale_note(self) -> str | None:
        """One line about a holder that died without releasing the lock, or None."""
        if not self.stale_holder:
            return None
        h = self.stale_holder
        return (f"note: {self.folder} was held by a {h.get('what', 'process')} (host {h.get('host', '?')}, pid "
                f"{h.get('pid', '?')}, started {h.get('started', '?')}) that ended without releasing it (killed?); "
                "taking it over")

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except json.JSONDecodeError:
        return {"host": "?", "pid": "? (unreadable lock record)"}


def json_text(value, indent: int | None = 1) -> str:
    """Standard JSON: NaN (e.g. force errors of an energy-only set) becomes null, which every parser reads."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
