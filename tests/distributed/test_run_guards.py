"""A run is right or it stops, on real 2-rank DeepSpeed runs: a non-finite step stops every rank and keeps the
last good checkpoint; export refuses weights no step moved; a resume is checked against the checkpoint (the
task order may change, the model may not); a run owns its run_dir; a full disk during a save is named."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlfound.config import load_config
from mlfound.data.files import FolderLock
from mlfound.train import checkpoint
from mlfound.train.guards import TrainingError
from tests.data.helpers import demo_slice, shard
from tests.data.test_files import fill, small_disk  # noqa: F401  (a fixture)
from tests.distributed.conftest import TASKS
from tests.distributed.test_pretrain import ROOT, assert_same_parameters, final_parameters, torchrun, write_config

pytestmark = pytest.mark.faults
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "PYTHONPATH": str(ROOT)}


def launch(config: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """A run that may fail: its exit code and output, not an assertion."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(ROOT / "launch" / "pretrain.py"), "--config", str(config), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The ranks' one-line errors; no traceback through mlfound's code (torchrun adds its own ChildFailedError
    report for any rank that exits non-zero)."""
    assert not any(f'File "{ROOT / part}' in done.stderr for part in ("mlfound", "launch")), done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # each rank's own code, in torchrun's report
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


def test_a_non_finite_step_stops_every_rank_and_keeps_the_last_good_checkpoint(shard_root, tmp_path):
    config = write_config(tmp_path, shard_root, deepspeed={"zero_stage": 1},
                          train={"outer_steps": 4, "save_every": 2, "log_every": 1})
    run_dir = load_config(config).run_dir
    torchrun(config)
    done = launch(config, "--resume", "auto", "train.outer_steps=8", "meta.inner.lr=1e12")
    assert done.returncode != 0
    errors = error_lines(done)
    assert len(errors) == 2, done.stderr[-3000:]  # one line from each rank, the same step
    assert all(line.startswith("error: step 5: non-finite loss or gradient on rank ") for line in errors), errors
    assert "nothing saved past the last good checkpoint (step00000004)" in errors[0]
    assert checkpoint.latest_tag(run_dir) == "step00000004"
    assert sorted(p.name for p in checkpoint.checkpoint_dir(run_dir).glob("step*")) == ["step00000002", "step00000004"]
    exported = subprocess.run([sys.executable, "-m", "mlfound.cli", "export", str(run_dir), "--out",
                               str(tmp_path / "good.safetensors")], capture_output=True, text=True, env=ENV)
    assert exported.returncode == 0, exported.stderr[-2000:]  # the last good state is still a release


@pytest.mark.parametrize("meta", [{"inner": {"lr": 1e12}},
                                  {"method": "joint", "outer": {"lr": 1e12, "lr_final": 1e12}}])
def test_a_diverging_run_saves_nothing_past_its_last_finite_step(shard_root, tmp_path, meta):
    """Reptile with a huge inner lr is non-finite at step 1; joint with a huge outer lr takes one finite (huge)
    Adam step and is non-finite at step 2. Saving every step, no checkpoint holds the failing step."""
    config = write_config(tmp_path, shard_root, meta=meta, deepspeed={"zero_stage": 2},
                          train={"outer_steps": 6, "save_every": 1})
    done = launch(config)
    assert done.returncode != 0
    errors = error_lines(done)
    failed_at = {int(re.match(r"error: step (\d+): ", line).group(1)) for line in errors}
    assert len(failed_at) == 1 and all("not finite" in line or "non-finite" in line for line in errors), errors
    run_dir = load_config(config).run_dir
    tag = checkpoint.latest_tag(run_dir)
    if "method" not in meta:  # the default, Reptile
        assert failed_at == {1} and tag is None
    elif tag is not None:  # joint: a first huge but finite Adam step may have been saved
        assert int(tag.removeprefix("step")) < failed_at.pop()
        saved = final_parameters(run_dir)  # references may be NaN by design (an element a task never had)
        assert all(value.isfinite().all() for name, value in saved.items() if name != "references_ev")


def test_export_refuses_weights_no_step_moved_unless_asked(shard_root, tmp_path):
    """An outer lr far below the weights' float32 resolution: every step runs, none moves a weight."""
    config = write_config(tmp_path, shard_root, meta={"outer": {"lr": 1e-30, "lr_final": 1e-30}},
                          train={"outer_steps": 2})
    run_dir = load_config(config).run_dir
    torchrun(config)
    export = [sys.executable, "-m", "mlfound.cli", "export", str(run_dir), "--out", str(tmp_path / "m.safetensors")]
    refused = subprocess.run(export, capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and "its weights are still the initial ones" in refused.stderr, refused.stderr
    assert not (tmp_path / "m.safetensors").exists()
    allowed = subprocess.run([*export, "--allow-untrained"], capture_output=True, text=True, env=ENV)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_resume_with_the_tasks_in_another_order_equals_an_uninterrupted_run(shard_root, tmp_path):
    """State belongs to task names: heads, references, scales, streams and the sampler keep the checkpoint's
    order, and the change is listed."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = write_config(tmp_path / "whole", shard_root, deepspeed={"zero_stage": 1}, train={"outer_steps": 6})
    split = write_config(tmp_path / "split", shard_root, deepspeed={"zero_stage": 1}, train={"outer_steps": 6})
    torchrun(whole)
    torchrun(split, "train.stop_after_steps=3")
    reordered = f"data.tasks=[{','.join(reversed(TASKS))}]"
    done = torchrun(split, "--resume", "auto", reordered, "meta.outer.lr_final=0.2")
    assert (f"resume: changed since checkpoint step00000003: data.tasks order {list(reversed(TASKS))} "
            f"(the checkpoint's {TASKS} is kept)") in done.stdout
    run_dir = load_config(split).run_dir
    assert_same_parameters(final_parameters(run_dir), final_parameters(load_config(whole).run_dir))
    for change, named in (("model.channels=16", "model.channels 8 -> 16"),
                          (f"data.tasks=[{TASKS[0]}]", f"data.tasks drops ['{TASKS[1]}']"),
                          ("seed=5", "seed 4 -> 5")):
        refused = launch(split, "--resume", "auto", change, ranks=1)  # refused before any state loads
        assert refused.returncode != 0
        errors = error_lines(refused)
        assert errors and all(line.startswith("error: cannot resume from checkpoint step00000006: the config "
                                              "changes what it was trained as: ") and named in line
                              for line in errors), refused.stderr[-2000:]


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_holder(shard_root, tmp_path):
    config = write_config(tmp_path, shard_root, train={"outer_steps": 100000, "save_every": 100000})
    run_dir = load_config(config).run_dir
    first = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(config)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while '"pid"' not in _lock_record(run_dir):
            assert time.monotonic() < deadline and first.poll() is None, "the first run never took its lock"
            time.sleep(0.05)
        second = launch(config, "seed=7")
        assert second.returncode != 0
        errors = error_lines(second)
        assert any(f"is in use by another pretraining run (host {os.uname().nodename}, pid {first.pid}," in line
                   for line in errors), second.stderr[-2000:]
        assert not (run_dir / "metrics_rank1.jsonl").exists()  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = torchrun(config, "train.outer_steps=1")  # the killed run's lock went with it, and is named
    assert f"pid {first.pid}" in third.stdout and "ended without releasing it" in third.stdout
    assert _lock_record(run_dir) == ""


def _lock_record(run_dir: Path) -> str:
    path = run_dir / FolderLock.NAME
    return path.read_text() if path.exists() else ""


def test_a_full_disk_during_a_save_is_named_and_the_run_resumes_after(shard_root, tmp_path, small_disk):  # noqa: F811
    """The save at step 4 runs out of space: every rank stops naming the checkpoint, what it needs and "no space
    left"; the partial checkpoint is removed and the step-2 one stays the latest; with space freed, resume ends."""
    config = write_config(tmp_path, shard_root, train={"outer_steps": 4, "save_every": 2}, run_dir=str(small_disk))
    torchrun(config, "train.stop_after_steps=2")
    step2 = checkpoint.checkpoint_dir(small_disk) / "step00000002"
    size = sum(f.stat().st_size for f in step2.rglob("*") if f.is_file())
    fill(small_disk, leave_bytes=size // 2)
    done = launch(config, "--resume", "auto")
    assert done.returncode != 0
    errors = error_lines(done)
    assert any(f"no space left on device writing {checkpoint.checkpoint_dir(small_disk) / 'step00000004'}: it needs "
               f"{size:,} bytes" in line for line in errors), done.stderr[-3000:]
    assert checkpoint.latest_tag(small_disk) == "step00000002"
    assert not (checkpoint.checkpoint_dir(small_disk) / "step00000004").exists()
    (small_disk / "filler").unlink()
    torchrun(config, "--resume", "auto")
    assert checkpoint.latest_tag(small_disk) == "step00000004"
    shutil.rmtree(checkpoint.checkpoint_dir(small_disk))


@pytest.fixture(scope="module")
def two_step_run(shard_root, tmp_path_factory):
    """One rank, 2 steps, checkpointed at step 2, over a private copy of the shards: each test below damages
    a copy of it."""
    root = tmp_path_factory.mktemp("two_step")
    shutil.copytree(shard_root, root / "shards")
    config = write_config(root, root / "shards", train={"outer_steps": 2, "save_every": 2})
    done = launch(config, ranks=1)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_config(config).run_dir, root / "shards"


def copy_of(run: tuple[Path, Path], tmp_path: Path) -> Path:
    """A config over a copy of ``run``'s run_dir (and its shards)."""
    run_dir, shards = run
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(shards, tmp_path / "shards")
    return write_config(tmp_path, tmp_path / "shards", train={"outer_steps": 4, "save_every": 2})


@pytest.mark.parametrize("damage, how", [("mp_rank_00_model_states.pt", "truncated"), ("rank0.pt", "truncated"),
                                         ("model_info.json", "truncated"), ("model_info.json", "missing")])
def test_a_damaged_checkpoint_is_named_not_resumed(two_step_run, tmp_path, damage, how):
    """A damaged file, or a checkpoint of an older mlfound (no model_info.json: its config cannot be checked)."""
    config = copy_of(two_step_run, tmp_path)
    path = checkpoint.checkpoint_dir(tmp_path / "run") / "step00000002" / damage
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    resumed = launch(config, "--resume", "auto", ranks=1)
    assert resumed.returncode != 0
    errors = error_lines(resumed)
    said = "written by an older mlfound" if how == "missing" else "is unreadable"
    assert len(errors) == 1 and "step00000002" in errors[0] and said in errors[0], resumed.stderr[-2000:]


def test_resume_from_other_shards_is_refused(two_step_run, demo_dir, tmp_path):
    """The same task names over re-sharded data: the checkpoint's streams and references mean nothing there."""
    config = copy_of(two_step_run, tmp_path)
    shutil.rmtree(tmp_path / "shards" / TASKS[0])
    shard(demo_slice(demo_dir, TASKS[0], 40, tmp_path), tmp_path / "shards", val_fraction=0.2, records_per_shard=8)
    resumed = launch(config, "--resume", "auto", ranks=1)
    assert resumed.returncode != 0
    errors = error_lines(resumed)
    assert errors == [f"error: the shards of tasks ['{TASKS[0]}'] changed since checkpoint step00000002; exact "
                      "resume is impossible. Re-shard the original sources or start a new run_dir"], errors


def test_all_finite_sees_one_nan_or_inf_anywhere():
    import torch

    from mlfound.train.guards import all_finite

    finite = [torch.ones(3), torch.full((2, 2), 3e38)]  # float32 sums that overflow are summed in float64
    assert all_finite(finite).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([*finite, torch.tensor([1.0, bad])]).item()
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])]).item()


def test_compiled_forces_may_change_on_resume_and_a_checkpoint_from_before_it_resumes():
    """A runtime choice, not what the run was trained as: toggling it is logged, and a checkpoint whose config
    predates the key (another version) resumes instead of stopping."""
    from mlfound.config import RunConfig
    from mlfound.train.guards import resume_changes

    current = RunConfig.model_validate({"run_dir": "r", "data": {"shard_root": "s", "tasks": ["a"]},
                                        "train": {"compile_forces": True}}).model_dump(mode="json")
    saved = {**current, "train": {k: v for k, v in current["train"].items() if k != "compile_forces"}}
    assert resume_changes(saved, current, "step_1") == ["train.compile_forces (unset) -> True"]
    toggled = {**current, "train": {**current["train"], "compile_forces": False}}
    assert resume_changes(toggled, current, "step_1") == ["train.compile_forces False -> True"]


def test_a_checkpoint_of_an_older_mlfound_resumes_as_the_run_it_was(tmp_path):
    """A checkpoint written before the methods table holds meta.mode and flat learning rates, and lacks the
    fields added since: it compares as the point it ran with those fields at their defaults, so the same run
    resumes under today's form and a lower outer lr is a listed change, while another method stops the run."""
    from mlfound.config import RunConfig
    from mlfound.train.guards import resume_changes

    base = {"run_dir": "r", "data": {"shard_root": "s", "tasks": ["a"]}}
    current = RunConfig.model_validate({**base, "meta": {"method": "reptile_k5", "inner_steps": 2, "inner": {
        "lr": 1e-2, "name": "adam"}, "outer": {"lr": 0.8, "lr_final": 0.2}}}).model_dump(mode="json")
    older = {**current, "meta": {"mode": "reptile", "inner_steps": 2, "inner_lr": 1e-2, "outer_lr": 0.5,
                                 "outer_lr_final": 0.2, "sampling": current["meta"]["sampling"]},
             # and fields added since (at their defaults now): absent from an older checkpoint, not a change
             "model": {k: v for k, v in current["model"].items() if k != "product_l_max"}}
    del older["logging"]
    ckpt = checkpoint.checkpoint_dir(tmp_path) / "step00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text("{}")
    (ckpt / checkpoint.MODEL_INFO).write_text(json.dumps({"config": older}))
    saved = checkpoint.saved_config(tmp_path, "step00000002")
    assert resume_changes(saved, current, "step00000002") == ["meta.outer.lr 0.5 -> 0.8"]
    joint = RunConfig.model_validate({**base, "meta": {"method": "joint"}}).model_dump(mode="json")
    with pytest.raises(TrainingError, match="meta.method"):
        resume_changes(saved, joint, "step00000002")
