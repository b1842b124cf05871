"""Write one task's records into webdataset shards plus a ``manifest.json``.

Layout: ``<out>/<task>/<task>-00000.tar ...`` and ``<out>/<task>/manifest.json``; with a
validation fraction, the held-out records get the same layout in ``<out>/<task>/val/``. Every file is
written to a temporary name and renamed, the manifest last, so a crash never leaves a manifest
pointing at half-written shards. Tar headers carry fixed times and owners, so the same sources
give byte-identical shards, and a rerun whose sources and options are unchanged does nothing.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from mlfound.data import shard_format
from mlfound.data.files import atomic_write_bytes, sha256_file
from mlfound.data.plausibility import check_units
from mlfound.data.readers import BadRecord, SourceSpec, Unlabelled, lot_metadata, read_entries
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A, DataError, Record, validate_record
from mlfound.data.references import ReferenceFit, reference_energy

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"  # one {"source", "index", "reason"} per line, written with skip_bad
VALIDATION_DIR = "val"
MANIFEST_VERSION = 1
UNIT_CHECK_RECORDS = 2000
TOOL_VERSION = "mlfound-shard 0.2"


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    records_per_shard: int = 1000
    min_distance_a: float = DEFAULT_MIN_DISTANCE_A
    skip_bad: bool = False
    val_fraction: float = 0.0  # held-out validation records, in <task>/val/
    check_units: bool = True  # refuse a task whose labels cannot be in eV and Å (mlfound.data.plausibility)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def shard_task(task: str, sources: list[SourceSpec], out_dir: Path, options: ShardOptions,
               lot: dict | None = None, progress: bool = True) -> dict:
    """Shard every record of ``sources`` into ``out_dir/task`` (and the held-out validation records
    into ``out_dir/task/val``); return the training manifest."""
    task_dir = Path(out_dir) / task
    for spec in sources:
        if not Path(spec.path).is_file():
            raise DataError(f"{spec.path}: no such file")
    described = [_describe_source(s) for s in sources]  # hashes each source file once
    fingerprint = _fingerprint(described, options, lot)
    manifest_path = task_dir / MANIFEST_NAME
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint and _shards_intact(task_dir, old):
            return old  # idempotent: same inputs, same outputs, already on disk
    splits = {"train": _Split(task_dir, task, options.records_per_shard)}
    if options.val_fraction > 0:
        splits["val"] = _Split(task_dir / VALIDATION_DIR, task, options.records_per_shard)
    rejects: list[dict] = []
    unlabelled: collections.Counter = collections.Counter()  # per source: structures without a label at this LoT
    unit_sample: list[Record] = []  # the first records, bounded: enough to tell Hartree from eV
    try:
        for rec in tqdm(_valid_records(sources, options, rejects, unlabelled), desc=f"shard {task}", unit="rec",
                        disable=not progress):
            splits["val" if is_validation(rec, options.val_fraction) else "train"].add(rec)
            if len(unit_sample) < UNIT_CHECK_RECORDS:
                unit_sample.append(rec)
    except BaseException:
        for split in splits.values():
            split.writer.abort()
        raise
    _write_rejects(task_dir, rejects)
    if splits["train"].stats.num_records == 0:
        listed = f"; {len(rejects)} rejected, listed in {task_dir / REJECTS_NAME}" if rejects else ""
        listed += f"; {unlabelled.total()} without a label at this LoT" if unlabelled else ""
        raise DataError(f"task {task!r}: no valid training records in {[str(s.path) for s in sources]}{listed}")
    if options.check_units:  # before any manifest: shards without one are never read
        check_units(unit_sample, f"task {task!r} ({', '.join(str(s.path) for s in sources)})")
    common = {"format_version": MANIFEST_VERSION, "tool": TOOL_VERSION, "task": task,
              "lot": {**_lot_from_sources(sources), **(lot or {})}, "fingerprint": fingerprint,
              "sources": described, "options": dataclasses.asdict(options),
              "num_rejected": len(rejects), "num_unlabelled": unlabelled.total()}
    if "val" in splits:
        splits["val"].finish({**common, "split": "val"})
    elif (task_dir / VALIDATION_DIR).exists():
        shutil.rmtree(task_dir / VALIDATION_DIR)
    num_val = splits["val"].stats.num_records if "val" in splits else 0
    return splits["train"].finish({**common, "split": "train", "num_validation_records": num_val})


def is_validation(rec: Record, val_fraction: float) -> bool:
    """Held out by a hash of (source file name, index): stable across reruns, orders and machines."""
    return zlib.crc32(f"{Path(rec.source).name}:{rec.index}".encode()) < val_fraction * 2**32


class _Split:
    """Shards, statistics and manifest of one split (training or validation) of a task."""

    def __init__(self, split_dir: Path, task: str, records_per_shard: int):
        split_dir.mkdir(parents=True, exist_ok=True)
        self.dir = split_dir
        self.writer = _ShardWriter(split_dir, task, records_per_shard)
        self.stats = _TaskStats()

    def add(self, rec: Record) -> None:
        self.writer.add(rec)
        self.stats.add(rec)

    def finish(self, header: dict) -> dict:
        shards = self.writer.close()
        if self.stats.num_records == 0:
            raise DataError(f"task {header['task']!r}: the {header['split']} split is empty; "
                            "lower or raise --val-fraction")
        manifest = {**header, "num_records": self.stats.num_records, "shards": shards, **self.stats.summary()}
        _remove_stale_shards(self.dir, {s["name"] for s in shards})
        atomic_write_bytes(self.dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        return manifest


def load_manifest(task_dir: Path) -> dict:
    path = Path(task_dir) / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{path}: no manifest; run tools/shard_dataset.py to create the shards for this task")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest format {manifest.get('format_version')} is not {MANIFEST_VERSION}; "
                        "re-shard the sources with this version of tools/shard_dataset.py")
    manifest["references_ev"] = {int(z): e for z, e in manifest["references_ev"].items()}
    return manifest


def _valid_records(sources: list[SourceSpec], options: ShardOptions, rejects: list[dict],
                   unlabelled: collections.Counter) -> Iterable[Record]:
    """Every record that reads and validates. A bad one raises, or with ``skip_bad`` goes to ``rejects`` under its
    index in its file; a structure without a label at the task's LoT is counted in ``unlabelled``; so the
    structures read are exactly those kept plus those rejected plus those unlabelled."""
    for spec in sources:
        for entry in _read_to_end(spec):
            if isinstance(entry, Unlabelled):
                unlabelled[str(spec.path)] += 1
                continue
            error = entry if isinstance(entry, BadRecord) else _validation_error(entry, options.min_distance_a)
            if error is None:
                yield entry
            elif options.skip_bad:
                rejects.append({"source": str(spec.path), "index": entry.index, "reason": str(error)})
            else:
                raise DataError(f"{error} (pass --skip-bad to reject such records to a list instead)") from None


def _read_to_end(spec: SourceSpec) -> Iterable[Record | BadRecord | Unlabelled]:
    """A source's records; a reader that cannot read on (a file broken mid-way in a format without frame
    boundaries) ends with one BadRecord standing for the rest of the file, whose records cannot be counted."""
    entries = read_entries(spec)
    next_index = 0
    while True:
        try:
            entry = next(entries)
        except StopIteration:
            return
        except DataError as err:
            yield BadRecord(spec.path, next_index, f"{err} (it and the rest of the file are unread)")
            return
        next_index = entry.index + 1
        yield entry


def _validation_error(rec: Record, min_distance_a: float) -> DataError | None:
    try:
        validate_record(rec, min_distance_a)
    except DataError as err:
        return err
    return None


class _ShardWriter:
    """Deterministic tar shards of at most ``records_per_shard`` records, each renamed into place."""

    def __init__(self, task_dir: Path, task: str, records_per_shard: int):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.task_dir, self.task, self.records_per_shard = task_dir, task, records_per_shard
        self.shards: list[dict] = []
        self._tar = self._file = None
        self._count = 0
        self._num_written = 0

    def add(self, rec: Record) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.task}-{self._num_written:09d}"
        self._tar.write({"__key__": key, shard_format.MEMBER_EXT: shard_format.encode(rec)})
        self._count += 1
        self._num_written += 1
        if self._count == self.records_per_shard:
            self._finish()

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written; shards already renamed stay (the old manifest ignores them)."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._file = None

    def _name(self) -> str:
        return f"{self.task}-{len(self.shards):05d}.tar"

    def _open(self) -> None:
        self._tmp = self.task_dir / f".{self._name()}.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, user="mlfound", group="mlfound", mtime=0.0)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()  # TarWriter leaves a file object it did not open to its owner
        name = self._name()
        os.replace(self._tmp, self.task_dir / name)
        self.shards.append({"name": name, "sha256": sha256_file(self.task_dir / name), "num_records": self._count})
        self._tar = self._file = None


class _TaskStats:
    """Everything the manifest says about a task, gathered in the same single pass."""

    def __init__(self) -> None:
        self.refs = ReferenceFit()
        self.num_records = 0
        self.atom_hist: collections.Counter = collections.Counter()
        self.element_atoms: collections.Counter = collections.Counter()
        self.energies_ev: list[float] = []
        self.compositions: list[np.ndarray] = []
        self.force_sq_sum = 0.0
        self.num_force_components = 0
        self.num_with_forces = 0

    def add(self, rec: Record) -> None:
        self.num_records += 1
        self.refs.add(rec.z, rec.energy_ev)
        self.atom_hist[rec.num_atoms] += 1
        self.element_atoms.update(rec.z.tolist())
        self.energies_ev.append(rec.energy_ev)
        self.compositions.append(rec.z)
        if rec.forces_ev_a is not None:
            self.num_with_forces += 1
            self.force_sq_sum += float((rec.forces_ev_a**2).sum())
            self.num_force_components += rec.forces_ev_a.size

    def summary(self) -> dict:
        refs, notes = self.refs.solve()
        residual_ev = np.array([e - reference_energy(z, refs) for e, z in zip(self.energies_ev, self.compositions)])
        num_atoms = np.array([len(z) for z in self.compositions], np.float64)
        energies = np.array(self.energies_ev)
        return {
            "num_atoms_total": int(num_atoms.sum()),
            "atom_count_histogram": {str(k): v for k, v in sorted(self.atom_hist.items())},
            "element_counts": {str(k): v for k, v in sorted(self.element_atoms.items())},
            "element_structure_counts": {str(z): int(self.refs.structures_with[z]) for z in refs},
            "references_ev": {str(z): e for z, e in refs.items()},
            "reference_notes": notes,
            "num_with_forces": self.num_with_forces,
            "stats": {
                "energy_mean_ev": float(energies.mean()), "energy_std_ev": float(energies.std()),
                "residual_rms_ev": float(np.sqrt((residual_ev**2).mean())),
                "residual_per_atom_std_ev": float((residual_ev / num_atoms).std()),
                "forces_rms_ev_a": (float(np.sqrt(self.force_sq_sum / self.num_force_components))
                                    if self.num_force_components else None),
            },
        }


def _fingerprint(described_sources: list[dict], options: ShardOptions, lot: dict | None) -> str:
    parts = [json.dumps(d, sort_keys=True) for d in described_sources]
    parts += [json.dumps(dataclasses.asdict(options), sort_keys=True), json.dumps(lot or {}, sort_keys=True),
              TOOL_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _describe_source(spec: SourceSpec) -> dict:
    """The file's hash and every way of reading it (format, keys, units, signs), so that changing any re-shards."""
    how = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("path", "task")}
    return {"path": str(spec.path), "sha256": sha256_file(Path(spec.path)), **how}


def _lot_from_sources(sources: list[SourceSpec]) -> dict:
    """The sources' common LoT metadata; a source without any (npz, or no frame readable) does not disagree."""
    metas = [meta for meta in map(lot_metadata, sources) if meta]
    if any(m != metas[0] for m in metas):
        raise DataError(f"sources disagree on level-of-theory metadata: {metas}; one task needs one LoT")
    return metas[0] if metas else {}


def _shards_intact(task_dir: Path, manifest: dict) -> bool:
    intact = all((task_dir / s["name"]).exists() and sha256_file(task_dir / s["name"]) == s["sha256"]
                 for s in manifest["shards"])
    if intact and manifest.get("num_validation_records"):
        val_manifest = task_dir / VALIDATION_DIR / MANIFEST_NAME
        return val_manifest.exists() and _shards_intact(task_dir / VALIDATION_DIR, json.loads(val_manifest.read_text()))
    return intact


def _write_rejects(task_dir: Path, rejects: list[dict]) -> None:
    path = task_dir / REJECTS_NAME
    if rejects:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rejects).encode())
    elif path.exists():
        path.unlink()


def _remove_stale_shards(task_dir: Path, keep: set[str]) -> None:
    for path in task_dir.glob("*.tar"):
        if path.name not in keep:
            path.unlink()
