"""Shards shared by the multi-rank tests: 40 demo records of two tasks, 20% held out, 16 per shard."""
import pytest

from tests.data.helpers import demo_slice, shard

TASKS = ["gfn2_xtb", "hf_sto3g"]


@pytest.fixture(scope="module")
def shard_root(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for task in TASKS:
        shard(demo_slice(demo_dir, task, 40, root), root, val_fraction=0.2, records_per_shard=16)
    return root
