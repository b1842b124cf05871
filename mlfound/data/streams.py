"""Per-task, per-rank, infinite record streams with exact resume.

Epoch plan (a pure function of seed, task, epoch, rank and world size):
  * shards are permuted with an RNG seeded by (seed, task, epoch), the same on every rank;
  * with at least as many shards as ranks, rank r reads shards ``order[r::world]``;
    with fewer, every rank reads every shard and keeps records ``i % world == r``;
  * inside each shard, the rank's records are permuted by (seed, task, epoch, rank, shard).
So ranks are disjoint and together cover the task once per epoch. Streams never end (the next
epoch follows), so no rank can run dry and hang a collective. The state (epoch, cursor, offset)
goes into checkpoints: ``load_state_dict`` resumes at exactly the next record.

Tasks too small to give every rank a record (fewer shards than ranks, each with fewer records than
ranks; e.g. a task of 1 record on 2 ranks) work on any world size:
  * training streams (``disjoint=False``) then give every rank the whole task, each in its own order:
    a rank without records would stall its collectives, a few repeated records cost nothing;
  * validation streams (``disjoint=True``) stay disjoint so every record counts exactly once over all
    ranks; a rank without a share gets an empty ``rest_of_epoch()`` and contributes nothing.
"""
from __future__ import annotations

import hashlib
import tarfile
import warnings
import zlib
from pathlib import Path

import msgpack
import numpy as np
import webdataset as wds

from mlfound.data import shard_format
from mlfound.data.record import DataError, Record
from mlfound.data.shards import MANIFEST_NAME, VALIDATION_DIR, load_manifest
from mlfound.data.urls import check_url_template, describe_exit, shard_url


class TaskStream:
    """Infinite stream of one task's records for one rank; ``peek()`` looks ahead without consuming."""

    def __init__(self, task_dir: Path, seed: int, rank: int = 0, world_size: int = 1,
                 shard_url_template: str | None = None, disjoint: bool = False):
        """``shard_url_template`` (e.g. ``"http://host/corpus/{task}/{name}"``, see mlfound/data/urls.py)
        streams shards from a mirror of the shard root instead of ``task_dir``; the manifest is always
        read from ``task_dir``, and every shard, local or remote, must match its sha256.
        ``disjoint`` keeps ranks disjoint even for a task too small to give every rank a record
        (validation); otherwise such a task is read whole by every rank (training), see the module doc."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shard_url_template is not None:
            check_url_template(shard_url_template)
        self.task_dir = Path(task_dir)
        self.manifest = load_manifest(self.task_dir)
        self.task = self.manifest["task"]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard_url_template = shard_url_template
        shard_sizes = [s["num_records"] for s in self.manifest["shards"]]
        if not shard_sizes:
            raise DataError(f"{self.task_dir}: the manifest lists no shards; re-run `mlfound shard`")
        few_shards = len(shard_sizes) < world_size  # then rank r keeps records i % world == r of every shard
        self.empty = disjoint and few_shards and max(shard_sizes) <= rank  # no shard has a record i == r
        self.whole_task = not disjoint and few_shards and max(shard_sizes) < world_size  # else the last rank gets none
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._parts: list[tuple[int, int]] | None = None  # (shard index, record stride) of this epoch
        self._buffer: list[Record] | None = None

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Record:
        rec = self.peek()
        self.offset += 1
        return rec

    def peek(self) -> Record:
        if self.empty:
            raise DataError(f"task {self.task!r} ({self.task_dir}): rank {self.rank} of {self.world_size} has no "
                            "records in a disjoint split; use rest_of_epoch(), which is empty then")
        while True:
            if self._buffer is None:
                self._buffer = self._load_part()
            if self.offset < len(self._buffer):
                return self._buffer[self.offset]
            self._advance_part()

    def rest_of_epoch(self) -> list[Record]:
        """This rank's remaining records of the current epoch (all of them on a fresh stream):
        what distributed validation needs to see every record exactly once."""
        if self.empty:
            return []
        epoch, records = self.epoch, []
        while True:
            self.peek()  # crosses into the next epoch once this one is exhausted
            if self.epoch != epoch:
                return records
            records.append(next(self))

    def _advance_part(self) -> None:
        self._buffer, self.offset = None, 0
        self.cursor += 1
        if self.cursor == len(self._epoch_parts()):
            self.epoch, self.cursor, self._parts = self.epoch + 1, 0, None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"task": self.task, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if (state["task"], state["seed"]) != (self.task, self.seed):
            raise ValueError(f"stream state is for task {state['task']!r} seed {state['seed']}, "
                             f"not task {self.task!r} seed {self.seed}")
        self._parts = self._buffer = None
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            warnings.warn(f"task {self.task!r}: resuming with rank {self.rank}/{self.world_size} from a state "
                          f"saved at {state['rank']}/{state['world_size']}; exact resume is impossible, "
                          f"restarting epoch {state['epoch']}", stacklevel=2)
            self.epoch, self.cursor, self.offset = state["epoch"], 0, 0
            return
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]

    # -- epoch plan and shard reading ------------------------------------------------------
    def _rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.task.encode()), self.epoch, *parts])

    def _epoch_parts(self) -> list[tuple[int, int]]:
        if self._parts is None:
            num_shards = len(self.manifest["shards"])
            order = self._rng().permutation(num_shards).tolist()
            if self.whole_task:
                self._parts = [(s, 1) for s in order]
            elif num_shards >= self.world_size:
                self._parts = [(s, 1) for s in order[self.rank::self.world_size]]
            else:
                self._parts = [(s, self.world_size) for s in order]
        return self._parts

    def _load_part(self) -> list[Record]:
        shard, stride = self._epoch_parts()[self.cursor]
        payloads = self._read_shard(shard)
        if stride > 1:
            payloads = payloads[self.rank::stride]  # decode only this rank's share
        permutation = self._rng(self.rank, shard).permutation(len(payloads))
        try:
            return [shard_format.decode(payloads[i], self.task) for i in permutation]
        except (ValueError, KeyError, TypeError, msgpack.exceptions.UnpackException) as err:
            raise DataError(f"shard {self._location(shard)}: cannot decode a record "
                            f"({type(err).__name__}: {err})") from err

    def verify(self) -> None:
        """Check every shard of the task against the manifest (sha256 and record count) now, not when first read
        in a loader worker: every rank reaches the same verdict before training, and the sampler's task weights
        rest on counts that hold."""
        for shard in range(len(self.manifest["shards"])):
            self._read_shard(shard)

    def _location(self, shard: int) -> str:
        """The shard's local path, or its URL under ``shard_url_template``."""
        name = self.manifest["shards"][shard]["name"]
        if self.shard_url_template is None:
            return str(self.task_dir / name)
        in_task_dir = f"{VALIDATION_DIR}/{name}" if self.manifest["split"] == "val" else name
        return shard_url(self.shard_url_template, self.task, in_task_dir)

    def _fetch(self, shard: int) -> bytes:
        """The shard's bytes, checked against the manifest's sha256 before any record of it is used."""
        info, location = self.manifest["shards"][shard], self._location(shard)
        if self.shard_url_template is None and not Path(location).exists():
            raise DataError(f"shard {location} listed in the manifest is missing")
        try:
            data = _read_all(location)
        except OSError as err:
            hint = ("" if self.shard_url_template is None
                    else "; check data.shard_url_template and that this node reaches the server")
            raise DataError(f"shard {location} (task {self.task!r}): cannot read it ({err}){hint}") from err
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            if self.shard_url_template is None:
                raise DataError(f"shard {location}: sha256 does not match the manifest; the file is corrupted or "
                                "was changed, re-run `mlfound shard`")
            raise DataError(f"shard {location}: sha256 does not match {self.task_dir / MANIFEST_NAME}; the remote "
                            "copy is corrupted or not the shard the manifest describes: copy the shard root there "
                            "again (after re-running `mlfound shard` if the local shards changed)")
        return data

    def _read_shard(self, shard: int) -> list[bytes]:
        """The shard's encoded records, as many as the manifest says."""
        info, location = self.manifest["shards"][shard], self._location(shard)
        data = self._fetch(shard)
        try:
            payloads = shard_format.payloads(data, location)
        except (tarfile.TarError, OSError, ValueError, KeyError) as err:
            raise DataError(f"shard {location}: cannot read ({type(err).__name__}: {err})") from err
        if len(payloads) != info["num_records"]:
            raise DataError(f"shard {location}: {len(payloads)} records, manifest says {info['num_records']}; "
                            "the shard is truncated or was changed")
        return payloads


def _read_all(location: str) -> bytes:
    """Every byte at a path or webdataset URL; a failed ``pipe:`` or curl command is an OSError saying why."""
    stream = wds.gopen(location)
    try:
        with stream:
            return stream.read()
    except OSError as err:
        status = getattr(stream, "status", None)  # a webdataset Pipe (curl or a pipe: command) that failed
        if status is None:
            raise
        raise OSError(describe_exit(location, status)) from err
