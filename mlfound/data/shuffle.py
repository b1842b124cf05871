"""A deterministic global shuffle in bounded memory: scatter records to bucket files, sort one bucket at a time.

Every record gets a 64-bit key, a hash of (source file name, index in that file). The read pass appends
each record to the file of its bucket (a range of keys; one file per bucket and writing process); the
write pass reads the buckets in key order and sorts each in memory. Records come out sorted by key over
the whole corpus: a random permutation that is a pure function of the records' names, whatever the
number of buckets or of processes, and adding a file to a task keeps the others' relative order. Memory
holds one bucket; a bucket larger than the budget (the records took more bytes than their source files
suggested) is split again by key range on disk before it is sorted.
"""
from __future__ import annotations

import array
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

KEY_RANGE = 2**64
FRAME = struct.Struct("<QIQI")  # key, source ordinal, record index, payload bytes; then the payload
MAX_PARTS = 256  # bucket files open at once per process: far below the usual limit of 1024


def shuffle_key(name: str, index: int) -> int:
    """The record's place in the shuffled order: a hash of its source file name and index."""
    return int.from_bytes(hashlib.blake2b(f"{name}:{index}".encode(), digest_size=8).digest(), "little")


def part_of(key: int, lo: int, hi: int, num_parts: int) -> int:
    """Which of ``num_parts`` equal ranges of keys [lo, hi) holds ``key``; monotone in the key."""
    return (key - lo) * num_parts // (hi - lo)


def part_edges(lo: int, hi: int, num_parts: int) -> list[int]:
    """The bounds of the ranges ``part_of`` cuts: part p holds keys in [edges[p], edges[p + 1])."""
    return [lo + -(-p * (hi - lo) // num_parts) for p in range(num_parts + 1)]


class BucketFiles:
    """Appends records to ``<dir>/<group>-<bucket>.<pid>.bin``, each file opened on first use; one
    writing process per file, so worker processes never share one."""

    def __init__(self, directory: Path, num_buckets: int):
        if not 1 <= num_buckets <= MAX_PARTS:
            raise ValueError(f"num_buckets must be in 1..{MAX_PARTS}, got {num_buckets}")
        self.directory, self.num_buckets = Path(directory), num_buckets
        self._files: dict[tuple[str, int], object] = {}

    def add(self, group: str, key: int, ordinal: int, index: int, payload: bytes) -> None:
        bucket = part_of(key, 0, KEY_RANGE, self.num_buckets)
        file = self._files.get((group, bucket))
        if file is None:
            file = self._files[group, bucket] = open(self.directory / f"{group}-{bucket:05d}.{os.getpid()}.bin", "ab")
        file.write(FRAME.pack(key, ordinal, index, len(payload)))
        file.write(payload)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> BucketFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sorted_payloads(directory: Path, group: str, num_buckets: int, budget_bytes: int) -> Iterator[bytes]:
    """Every payload of ``group`` in key order (ties by source ordinal, then index), holding at most about
    ``budget_bytes`` of records in memory."""
    edges = part_edges(0, KEY_RANGE, num_buckets)
    for bucket in range(num_buckets):
        stem = Path(directory) / f"{group}-{bucket:05d}"
        paths = sorted(stem.parent.glob(f"{stem.name}.*.bin"))
        yield from _sorted(paths, edges[bucket], edges[bucket + 1], budget_bytes, stem)


def _sorted(paths: list[Path], lo: int, hi: int, budget_bytes: int, scratch: Path) -> Iterator[bytes]:
    """The payloads of ``paths`` (keys in [lo, hi)) in key order; split on disk while over the budget."""
    size = sum(p.stat().st_size for p in paths)
    if size <= budget_bytes or hi - lo < 2:
        yield from _sort_in_memory(paths, size)
        return
    num_parts = min(MAX_PARTS, max(2, -(-size // budget_bytes)))
    parts = [scratch.with_name(f"{scratch.name}.{p}.split") for p in range(num_parts)]
    files = [open(p, "wb") for p in parts]
    try:
        for path in paths:
            for header, payload in _frames(path):
                files[part_of(header[0], lo, hi, num_parts)].write(FRAME.pack(*header) + payload)
    finally:
        for file in files:
            file.close()
    edges = part_edges(lo, hi, num_parts)
    for p, part in enumerate(parts):
        yield from _sorted([part], edges[p], edges[p + 1], budget_bytes, part)
        part.unlink()


def _frames(path: Path) -> Iterator[tuple[tuple[int, int, int, int], bytes]]:
    with open(path, "rb") as file:
        while header := file.read(FRAME.size):
            fields = FRAME.unpack(header)
            yield fields, file.read(fields[3])


def _sort_in_memory(paths: list[Path], size: int) -> Iterator[bytes]:
    blob = bytearray(size)
    view, start = memoryview(blob), 0
    for path in paths:
        with open(path, "rb") as file:
            start += file.readinto(view[start:])
    assert start == size, f"bucket files changed while read: {paths}"
    keys, ordinals, indices = array.array("Q"), array.array("Q"), array.array("Q")
    starts, lengths = array.array("Q"), array.array("Q")
    pos = 0
    while pos < size:
        key, ordinal, index, length = FRAME.unpack_from(blob, pos)
        for column, value in ((keys, key), (ordinals, ordinal), (indices, index), (starts, pos + FRAME.size),
                              (lengths, length)):
            column.append(value)
        pos += FRAME.size + length
    order = np.lexsort((np.frombuffer(indices, np.uint64), np.frombuffer(ordinals, np.uint64),
                        np.frombuffer(keys, np.uint64)))
    for i in order.tolist():
        yield bytes(view[starts[i]:starts[i] + lengths[i]])
