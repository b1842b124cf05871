"""Tasks and validation splits smaller than the world, and validation data checked before training:
the same validation table on 1 and 2 ranks, a 1-record task trained on 2 ranks, a corrupt validation
shard refused before the first step."""
import json
import shutil
from pathlib import Path

import pytest
from ase.io import read, write

from mlfound.train import checkpoint
from tests.data.helpers import demo_slice, shard
from tests.distributed.test_pretrain import run_one_process, torchrun, write_config


@pytest.fixture(scope="module")
def small_root(demo_dir, tmp_path_factory) -> Path:
    """gfn2_xtb: 1 training record and a validation split of 1 record; hf_sto3g: 40 records, 11 held out."""
    root = tmp_path_factory.mktemp("small")
    shard(demo_slice(demo_dir, "gfn2_xtb", 1, root), root)
    write(root / "held_out.extxyz", read(demo_dir / "gfn2_xtb.extxyz", index="5:6"), format="extxyz")
    shard(root / "held_out.extxyz", root / "held_out", task="gfn2_xtb")
    (root / "held_out" / "gfn2_xtb").rename(root / "gfn2_xtb" / "val")
    shard(demo_slice(demo_dir, "hf_sto3g", 40, root), root, val_fraction=0.2, records_per_shard=16)
    return root


def validation_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]


def test_validation_table_is_the_same_on_one_and_two_ranks(small_root, tmp_path):
    """Untrained weights (outer_steps=0): each record counts once however the split is shared out."""
    tables = []
    for name, run in (("one", run_one_process), ("two", torchrun)):
        (tmp_path / name).mkdir()
        done = run(write_config(tmp_path / name, small_root, train={"outer_steps": 0}))
        assert done.returncode == 0, done.stderr[-3000:]
        [line] = validation_log(tmp_path / name / "run")
        tables.append(line["tasks"])
    one, two = tables
    assert one["gfn2_xtb"]["num_records"] == 1 and one["hf_sto3g"]["num_records"] == 11
    for task, errors in one.items():
        for key, value in errors.items():
            assert two[task][key] == pytest.approx(value, rel=1e-6, nan_ok=True), (task, key)


def test_a_one_record_task_trains_on_two_ranks(small_root, tmp_path):
    config = write_config(tmp_path, small_root, meta={"method": "single", "single_task": "gfn2_xtb",
                                                      "outer": {"lr": 1e-3, "lr_final": 1e-3}},
                          train={"outer_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    done = torchrun(config)
    assert "mixture gfn2_xtb=1.00 hf_sto3g=0.00" in done.stdout
    assert checkpoint.latest_tag(tmp_path / "run") == "step00000002"
    final = validation_log(tmp_path / "run")[-1]
    assert final["step"] == 2 and final["tasks"]["gfn2_xtb"]["num_records"] == 1


@pytest.mark.faults
def test_corrupt_validation_shard_stops_the_run_before_training(small_root, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(small_root, root)
    corrupt = max((root / "hf_sto3g" / "val").glob("*.tar"))
    corrupt.write_bytes(corrupt.read_bytes()[:-700])
    config = write_config(tmp_path, root, train={"outer_steps": 4, "log_every": 1, "eval_every": 1, "save_every": 1})
    done = run_one_process(config)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (f"error: shard {corrupt}: sha256 does not match the manifest; the "
                                                    "file is corrupted or was changed, re-run `mlfound shard`")
    assert not (tmp_path / "run" / "metrics_rank0.jsonl").exists(), "no training step before the data is checked"
