"""The bucket shuffle: key order whatever the buckets, writers or memory budget; split files removed."""
import random

import pytest

from mlfound.data.shuffle import KEY_RANGE, BucketFiles, part_edges, part_of, shuffle_key, sorted_payloads


def scatter(directory, frames, num_buckets):
    with BucketFiles(directory, num_buckets) as buckets:
        for key, ordinal, index, payload in frames:
            buckets.add("train", key, ordinal, index, payload)


@pytest.mark.parametrize("num_buckets, budget_bytes", [(1, 10**9), (1, 500), (7, 300), (256, 10**9)])
def test_payloads_come_out_in_key_order(tmp_path, num_buckets, budget_bytes):
    rng = random.Random(0)
    frames = [(shuffle_key(f"f{ordinal}", index), ordinal, index, rng.randbytes(rng.randrange(0, 80)))
              for ordinal in range(3) for index in range(200)]
    frames.append((frames[5][0], 7, 0, b"same key, later file"))  # ties go by source ordinal, then index
    scatter(tmp_path, frames, num_buckets)
    before = sorted(p.name for p in tmp_path.iterdir())
    got = list(sorted_payloads(tmp_path, "train", num_buckets, budget_bytes))
    assert got == [payload for *_, payload in sorted(frames)]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "split files are removed"


def test_key_ranges_partition_the_keys():
    rng = random.Random(1)
    for lo, hi, parts in ((0, KEY_RANGE, 7), (12345, 10**12, 256), (5, 9, 3)):
        edges = part_edges(lo, hi, parts)
        assert edges[0] == lo and edges[-1] == hi
        for key in [lo, hi - 1, *(rng.randrange(lo, hi) for _ in range(3)), *edges[1:-1]]:
            p = part_of(key, lo, hi, parts)
            assert edges[p] <= key < edges[p + 1]


def test_shuffle_key_is_stable():
    """The key is part of the shard format: the same (file name, index) gives the same place on any machine."""
    assert shuffle_key("gfn2_xtb.extxyz", 0) == shuffle_key("gfn2_xtb.extxyz", 0) != shuffle_key("gfn2_xtb.extxyz", 1)
    assert shuffle_key("a.extxyz", 3) == 0xC87D29F7B283E758
