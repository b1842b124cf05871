"""Write tasks' records into webdataset shards plus a ``manifest.json`` each: in parallel, in bounded memory,
globally shuffled.

Layout: ``<out>/<task>/<task>-00000.tar ...`` and ``<out>/<task>/manifest.json``; with a
validation fraction, the held-out records get the same layout in ``<out>/<task>/val/``.

Two passes, with the work spread over ``workers`` processes:
  1. read: the source files of all tasks are read and validated, one file per job; each job fits its
     part of the references and appends every record to a bucket file by its shuffle key
     (``mlfound.data.shuffle``, a hash of source file name and index), and counts the rejected and the
     unlabelled (no label at the task's LoT) structures;
  2. write: bucket by bucket in key order, consecutive records form the shards; each shard is written and
     summarised by one job (``mlfound.data.shard_stats``).
So every shard is a random sample of its task (not a run of consecutive MD frames or one formula), memory
holds one bucket and a few shards whatever the corpus size, and the output is a pure function of the
sources and options, byte for byte, with 1 worker or 16. Temporaries live in ``<out>/<task>/.shuffle.tmp*``
and are removed on success and on error; every file is renamed into place, the manifest last, so a crash
never leaves a manifest pointing at half-written shards. A rerun whose sources and options are unchanged
does nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import webdataset as wds

from mlfound.data import shard_format
from mlfound.data.files import FolderLock, atomic_write, atomic_write_bytes, sha256_file
from mlfound.data.plausibility import check_units
from mlfound.data.readers import BadRecord, SourceSpec, Unlabelled, lot_metadata, read_entries
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A, DataError, Record, validate_record
from mlfound.data.references import ReferenceFit
from mlfound.data.shard_stats import SplitStats
from mlfound.data.shuffle import MAX_PARTS, BucketFiles, shuffle_key, sorted_payloads
from mlfound.progress import progress

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"  # one {"source", "index", "reason"} per line, written with skip_bad
VALIDATION_DIR = "val"
MANIFEST_VERSION = 3  # 2: records may hold stress (num_with_stress); version-1 manifests read as stress-free
# 3: neighbour counts per distance (neighbour_pairs); without them a model's avg_num_neighbors must be given
READABLE_MANIFEST_VERSIONS = (1, 2, 3)
UNIT_CHECK_RECORDS = 2000
TOOL_VERSION = "mlfound-shard 0.5"  # 0.3: records globally shuffled; 0.4: stress; 0.5: neighbour counts
RECORD_ORDER = "sorted by blake2b(source file name:index), a global shuffle"
TMP_PREFIX = ".shuffle.tmp"
DEFAULT_SHUFFLE_BUFFER_MB = 64  # per bucket; 256 buckets (shuffle.MAX_PARTS) cover ~20 GB of extxyz in one pass
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    records_per_shard: int = 1000
    min_distance_a: float = DEFAULT_MIN_DISTANCE_A
    skip_bad: bool = False
    val_fraction: float = 0.0  # held-out validation records, in <task>/val/
    check_units: bool = True  # refuse a task whose labels cannot be in eV and Å (mlfound.data.plausibility)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.records_per_shard < 1:
            raise DataError(f"records_per_shard must be >= 1, got {self.records_per_shard}")


def shard_task(task: str, sources: list[SourceSpec], out_dir: Path, options: ShardOptions,
               lot: dict | None = None, progress: bool = True, workers: int = 1,
               shuffle_buffer_mb: float = DEFAULT_SHUFFLE_BUFFER_MB) -> dict:
    """Shard every record of ``sources`` into ``out_dir/task`` (and the held-out validation records
    into ``out_dir/task/val``); return the training manifest."""
    return dict(shard_tasks({task: sources}, out_dir, options, {task: lot or {}}, progress, workers,
                            shuffle_buffer_mb))[task]


def shard_tasks(sources_by_task: dict[str, list[SourceSpec]], out_dir: Path, options: ShardOptions,
                lots_by_task: dict[str, dict] | None = None, progress: bool = True, workers: int = 1,
                shuffle_buffer_mb: float = DEFAULT_SHUFFLE_BUFFER_MB) -> Iterator[tuple[str, dict]]:
    """Shard several tasks at once, their files read in parallel by ``workers`` processes; yields each task's
    training manifest in the order given, as it is written. ``lots_by_task`` gives a task's LoT metadata (a
    preset's, the user's), over what its sources say. A bad record (without ``skip_bad``) or a failed
    unit check stops the run before any shard is written. ``shuffle_buffer_mb`` bounds the records held in
    memory while shuffling; it changes neither the output nor the fingerprint. ``out_dir`` is locked while this
    runs: a second writer gets FolderInUseError. With ``workers > 1`` call
    this under ``if __name__ == "__main__":``, as for any multiprocessing: workers import the main module."""
    if workers < 1 or shuffle_buffer_mb <= 0:
        raise ValueError(f"workers must be >= 1 and shuffle_buffer_mb > 0, got {workers} and {shuffle_buffer_mb}")
    for task, specs in sources_by_task.items():
        if not specs:
            raise DataError(f"task {task!r}: no source files given")
        for spec in specs:
            if not Path(spec.path).is_file():
                raise DataError(f"{spec.path}: no such file")
    todo: list[_Plan] = []
    lock = FolderLock(out_dir, "mlfound shard run").acquire()  # one writer per shard root
    try:
        with _worker_pool(workers) as pool:  # stopped before the temporaries it writes to are removed
            run = _Execution(pool, workers, int(shuffle_buffer_mb * 2**20), progress)
            plans = _plan(sources_by_task, Path(out_dir), options, lots_by_task or {}, run)
            todo = [plan for plan in plans if plan.done is None]
            _read_pass(todo, options, run)
            for plan in plans:
                yield plan.task, plan.done or _write_pass(plan, options, run)
    finally:
        for plan in todo:
            shutil.rmtree(plan.tmp_dir, ignore_errors=True)
        lock.release()


def is_validation(rec: Record, val_fraction: float) -> bool:
    """Held out by a hash of (source file name, index): stable across reruns, orders and machines."""
    return zlib.crc32(f"{Path(rec.source).name}:{rec.index}".encode()) < val_fraction * 2**32


def load_manifest(task_dir: Path) -> dict:
    """A task's manifest, checked for what can be checked without its shards: readable, of a known version, the
    fields the loader uses present, the task its folder names, and its record count the sum of its shards'
    (the shards themselves: ``TaskStream.verify``)."""
    task_dir = Path(task_dir)
    path = task_dir / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{path}: no manifest; run `mlfound shard` to create the shards for this task")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); the manifest is truncated or corrupted, "
                        "re-run `mlfound shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_MANIFEST_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: manifest format {version} is not one this version reads "
                        f"{READABLE_MANIFEST_VERSIONS}; re-shard the sources with this version of "
                        "`mlfound shard`, or update mlfound")
    _check_manifest(path, manifest, task_dir.parent.name if task_dir.name == VALIDATION_DIR else task_dir.name)
    manifest.setdefault("num_with_stress", 0)  # version 1 had no stress
    manifest["references_ev"] = {int(z): e for z, e in manifest["references_ev"].items()}
    return manifest


_MANIFEST_FIELDS = {"task": str, "fingerprint": str, "num_records": int, "shards": list, "references_ev": dict,
                    "stats": dict, "lot": dict, "sources": list}
_SHARD_FIELDS = {"name": str, "sha256": str, "num_records": int}


def _check_manifest(path: Path, manifest: dict, task: str) -> None:
    """A manifest edited by hand, or one of another task, fails here naming the field, not deep in a loader."""
    advice = "the manifest was edited or corrupted: re-run `mlfound shard`"
    for key, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise DataError(f"{path}: field {key!r} is missing or not a {kind.__name__}; {advice}")
    for i, shard in enumerate(manifest["shards"]):
        for key, kind in _SHARD_FIELDS.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                raise DataError(f"{path}: shards[{i}] field {key!r} is missing or not a {kind.__name__}; {advice}")
    if manifest["task"] != task:
        raise DataError(f"{path}: the manifest is task {manifest['task']!r}, but its folder names task {task!r}; "
                        "a task's shards must stay in the folder `mlfound shard` wrote them to")
    listed = sum(shard["num_records"] for shard in manifest["shards"])
    if manifest["num_records"] != listed:
        raise DataError(f"{path}: field 'num_records' is {manifest['num_records']}, but its shards list {listed} "
                        f"records; {advice}")


# -- planning --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Execution:
    """How the work runs; nothing here changes the output."""
    pool: object  # a multiprocessing pool, or None: every job runs in this process
    workers: int
    budget_bytes: int  # records held in memory while shuffling
    progress: bool


@dataclasses.dataclass
class _Plan:
    """One task: where it goes, what is known before reading, and what the read pass found."""
    task: str
    sources: list[SourceSpec]
    task_dir: Path
    header: dict  # manifest fields known before reading
    done: dict | None  # the manifest on disk when it is up to date: nothing to do
    tmp_dir: Path
    num_buckets: int
    fits: dict[str, ReferenceFit] = dataclasses.field(default_factory=lambda: {s: ReferenceFit() for s in SPLITS})
    num_rejected: int = 0
    num_unlabelled: int = 0  # structures without a label at the task's LoT: neither kept nor rejected


def _plan(sources_by_task: dict[str, list[SourceSpec]], out_dir: Path, options: ShardOptions,
          lots_by_task: dict[str, dict], run: _Execution) -> list[_Plan]:
    surveys = iter(_ordered_map(run.pool, _survey, [s for specs in sources_by_task.values() for s in specs]))
    plans = []
    for task, specs in sources_by_task.items():
        described, lots = zip(*[next(surveys) for _ in specs])
        lot = lots_by_task.get(task, {})
        fingerprint = _fingerprint(described, options, lot)
        task_dir = out_dir / task
        header = {"format_version": MANIFEST_VERSION, "tool": TOOL_VERSION, "task": task,
                  "lot": {**_common_lot(lots), **lot}, "fingerprint": fingerprint,
                  "sources": list(described), "options": dataclasses.asdict(options), "record_order": RECORD_ORDER}
        source_bytes = sum(Path(s.path).stat().st_size for s in specs)
        plans.append(_Plan(task, specs, task_dir, header, _up_to_date(task_dir, fingerprint),
                           task_dir / f"{TMP_PREFIX}{os.getpid()}",
                           num_buckets=min(MAX_PARTS, max(1, -(-source_bytes // run.budget_bytes)))))
    for plan in plans:
        if plan.done is None:
            for leftover in plan.task_dir.glob(f"{TMP_PREFIX}*"):  # of a killed run: one sharder per folder
                shutil.rmtree(leftover)
            plan.tmp_dir.mkdir(parents=True)
    return plans


def _survey(spec: SourceSpec) -> tuple[dict, dict]:
    return _describe_source(spec), lot_metadata(spec)


def _up_to_date(task_dir: Path, fingerprint: str) -> dict | None:
    manifest_path = task_dir / MANIFEST_NAME
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint and _shards_intact(task_dir, old):
            return old  # idempotent: same inputs, same outputs, already on disk
    return None


# -- pass 1: read, validate, fit references, scatter to buckets -----------------------------

def _read_pass(plans: list[_Plan], options: ShardOptions, run: _Execution) -> None:
    """Unit checks first (a task in the wrong unit fails in seconds), then every source file; results in this
    order, so the error raised is the first in task and file order, whatever the number of workers."""
    jobs: list = [_UnitCheck(p.task, p.sources, options.min_distance_a) for p in plans if options.check_units]
    jobs += [_ReadSource(p.task, ordinal, spec, p.tmp_dir, p.num_buckets, options)
             for p in plans for ordinal, spec in enumerate(p.sources)]
    by_task = {plan.task: plan for plan in plans}
    for result in progress(_ordered_map(run.pool, _run, jobs), total=len(jobs), desc="read", unit="file",
                           enabled=run.progress and bool(jobs)):
        if result is not None:
            plan = by_task[result.task]
            for split, fit in result.fits.items():
                plan.fits[split].merge(fit)
            plan.num_rejected += result.num_rejected
            plan.num_unlabelled += result.num_unlabelled


@dataclasses.dataclass(frozen=True)
class _UnitCheck:
    """Refuse a task whose first valid records cannot be in eV and Å (bad records are the read pass's)."""
    task: str
    sources: list[SourceSpec]
    min_distance_a: float

    def run(self) -> None:
        valid = (e for spec in self.sources for e in _read_to_end(spec)
                 if isinstance(e, Record) and _validation_error(e, self.min_distance_a) is None)
        sample = list(itertools.islice(valid, UNIT_CHECK_RECORDS))
        check_units(sample, f"task {self.task!r} ({', '.join(str(s.path) for s in self.sources)})")


@dataclasses.dataclass
class _ReadResult:
    task: str
    fits: dict[str, ReferenceFit]
    num_rejected: int
    num_unlabelled: int


@dataclasses.dataclass(frozen=True)
class _ReadSource:
    """One source file: every record that reads and validates goes to the buckets of its split; a bad one
    raises, or with ``skip_bad`` is listed under its index in its file; a structure without a label at the
    task's LoT is counted; so the structures read are exactly those kept plus those rejected plus those
    unlabelled."""
    task: str
    ordinal: int  # the file's place among its task's sources
    spec: SourceSpec
    tmp_dir: Path
    num_buckets: int
    options: ShardOptions

    def run(self) -> _ReadResult:
        fits = {split: ReferenceFit() for split in SPLITS}
        name, num_rejected, num_unlabelled = Path(self.spec.path).name, 0, 0
        with BucketFiles(self.tmp_dir, self.num_buckets) as buckets, \
                _LazyFile(_rejects_part(self.tmp_dir, self.ordinal)) as rejects:
            for entry in _read_to_end(self.spec):
                if isinstance(entry, Unlabelled):
                    num_unlabelled += 1
                    continue
                error = entry if isinstance(entry, BadRecord) else _validation_error(entry, self.options.min_distance_a)
                if error is None:
                    split = "val" if is_validation(entry, self.options.val_fraction) else "train"
                    buckets.add(split, shuffle_key(name, entry.index), self.ordinal, entry.index,
                                shard_format.encode(entry))
                    fits[split].add(entry.z, entry.energy_ev)
                elif self.options.skip_bad:
                    rejects.write(json.dumps({"source": str(self.spec.path), "index": entry.index,
                                              "reason": str(error)}) + "\n")
                    num_rejected += 1
                else:
                    raise DataError(f"{error} (pass --skip-bad to reject such records to a list instead)") from None
        return _ReadResult(self.task, fits, num_rejected, num_unlabelled)


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


class _LazyFile:
    """A text file created on the first write only (no empty reject lists)."""

    def __init__(self, path: Path):
        self.path, self._file = path, None

    def write(self, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "w")
        self._file.write(text)

    def __enter__(self) -> _LazyFile:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def _rejects_part(tmp_dir: Path, ordinal: int) -> Path:
    return tmp_dir / f"rejects-{ordinal:06d}.jsonl"


# -- pass 2: shuffled shards, statistics, manifests -------------------------------------------

def _write_pass(plan: _Plan, options: ShardOptions, run: _Execution) -> dict:
    _write_rejects(plan)
    if plan.fits["train"].num_structures == 0:
        rejected = f"; {plan.num_rejected} rejected, listed in {plan.task_dir / REJECTS_NAME}"
        unlabelled = f"; {plan.num_unlabelled} without a label at this LoT"
        raise DataError(f"task {plan.task!r}: no valid training records in {[str(s.path) for s in plan.sources]}"
                        f"{rejected if plan.num_rejected else ''}{unlabelled if plan.num_unlabelled else ''}")
    if options.val_fraction > 0 and plan.fits["val"].num_structures == 0:
        raise DataError(f"task {plan.task!r}: the val split is empty; lower or raise --val-fraction")
    common = {**plan.header, "num_rejected": plan.num_rejected, "num_unlabelled": plan.num_unlabelled}
    if options.val_fraction > 0:
        _write_split(plan, "val", {**common, "split": "val"}, options, run)
    elif (plan.task_dir / VALIDATION_DIR).exists():
        shutil.rmtree(plan.task_dir / VALIDATION_DIR)
    header = {**common, "split": "train", "num_validation_records": plan.fits["val"].num_structures}
    return _write_split(plan, "train", header, options, run)


def _write_split(plan: _Plan, split: str, header: dict, options: ShardOptions, run: _Execution) -> dict:
    split_dir = plan.task_dir / VALIDATION_DIR if split == "val" else plan.task_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    fit = plan.fits[split]
    refs_ev, notes = fit.solve()
    payloads = sorted_payloads(plan.tmp_dir, split, plan.num_buckets, run.budget_bytes)
    jobs = (_WriteShard(plan.task, split, split_dir, plan.tmp_dir, number, number * options.records_per_shard, batch,
                        refs_ev)
            for number, batch in enumerate(_batched(payloads, options.records_per_shard)))
    shards, stats = [], SplitStats()
    results = _ordered_map(run.pool, _run, jobs, window=2 * run.workers)
    for entry, shard_stats in progress(results, desc=f"write {plan.task}", unit="shard", enabled=run.progress,
                                       total=-(-fit.num_structures // options.records_per_shard)):
        shards.append(entry)
        stats.merge(shard_stats)
    assert stats.num_records == fit.num_structures, "every record read is written once"
    manifest = {**header, "num_records": stats.num_records, "shards": shards, **stats.summary(fit, refs_ev, notes)}
    _remove_stale_shards(split_dir, {s["name"] for s in shards})
    atomic_write_bytes(split_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return manifest


@dataclasses.dataclass(frozen=True)
class _WriteShard:
    """One shard: a deterministic tar (fixed times and owners), renamed into place, and its statistics."""
    task: str
    split: str
    split_dir: Path
    tmp_dir: Path
    number: int
    first_record: int  # the number of its first record in the split, for the member keys
    payloads: list[bytes]  # encoded records (mlfound.data.shard_format), in order
    refs_ev: dict[int, float]

    def run(self) -> tuple[dict, SplitStats]:
        name = f"{self.task}-{self.number:05d}.tar"
        tmp = self.tmp_dir / f"{self.split}-{name}"
        stats = SplitStats()
        with open(tmp, "wb") as file:
            tar = wds.TarWriter(file, user="mlfound", group="mlfound", mtime=0)  # an int: no PAX header per member
            for offset, payload in enumerate(self.payloads):
                key = f"{self.task}-{self.first_record + offset:09d}"
                tar.write({"__key__": key, shard_format.MEMBER_EXT: payload})
                stats.add(shard_format.decode(payload, self.task), self.refs_ev)
            tar.close()  # leaves the file it did not open to its owner
        os.replace(tmp, self.split_dir / name)
        return {"name": name, "sha256": sha256_file(self.split_dir / name), "num_records": len(self.payloads)}, stats


def _batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _write_rejects(plan: _Plan) -> None:
    path = plan.task_dir / REJECTS_NAME
    if plan.num_rejected:
        def concatenate(out):
            for ordinal in range(len(plan.sources)):
                if _rejects_part(plan.tmp_dir, ordinal).exists():
                    with open(_rejects_part(plan.tmp_dir, ordinal), "rb") as part:
                        shutil.copyfileobj(part, out)
        atomic_write(path, concatenate)
    elif path.exists():
        path.unlink()


def _remove_stale_shards(task_dir: Path, keep: set[str]) -> None:
    for path in task_dir.glob("*.tar"):
        if path.name not in keep:
            path.unlink()


# -- worker processes ---------------------------------------------------------------------------

@contextlib.contextmanager
def _worker_pool(workers: int):
    """None for one worker (every job runs in this process), else a pool of processes forked from a fresh
    server process that imported this module and ASE's readers once: no state copied from a parent that may
    hold threads, and no import per worker."""
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "ase.io"])
    pool = context.Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _run(job):
    return job.run()


def _ordered_map(pool, fn: Callable, jobs: Iterable, window: int | None = None) -> Iterator:
    """``fn`` over ``jobs``, results in job order; with ``window``, at most that many jobs are taken from the
    iterable ahead of the results consumed (bounded memory for jobs that carry data)."""
    if pool is None:
        yield from map(fn, jobs)
    elif window is None:
        yield from pool.imap(fn, jobs)
    else:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- fingerprints and checks --------------------------------------------------------------------

def _fingerprint(described_sources: Iterable[dict], options: ShardOptions, lot: dict | None) -> str:
    parts = [json.dumps(d, sort_keys=True) for d in described_sources]
    parts += [json.dumps(dataclasses.asdict(options), sort_keys=True), json.dumps(lot or {}, sort_keys=True),
              TOOL_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _describe_source(spec: SourceSpec) -> dict:
    """The file's hash and every way of reading it (format, keys, units, signs), so that changing any re-shards."""
    how = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("path", "task")}
    return {"path": str(spec.path), "sha256": sha256_file(Path(spec.path)), **how}


def _common_lot(metas: Iterable[dict]) -> dict:
    """The sources' common LoT metadata; a source without any (npz, or no frame readable) does not disagree."""
    metas = [meta for meta in metas if meta]
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
