"""Fault injection on real 2-rank DeepSpeed runs: kill -9 of one rank mid-run, and during a checkpoint
save, then `--resume auto` must end bit-identical to an uninterrupted run (weights, optimizer state,
stream and RNG states): Reptile at ZeRO-1 (SGD outer step) and joint at ZeRO-2 (Adam state)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlfound.config import load_config
from mlfound.train import checkpoint
from tests.distributed.test_pretrain import ROOT, torchrun, write_config

pytestmark = pytest.mark.faults  # pytest -m faults: the fault-injection suite
MODES = {"reptile-zero1": ({}, 1),  # write_config's Reptile
         "joint-zero2": ({"method": "joint", "outer": {"lr": 1e-3, "lr_final": 1e-4}}, 2)}
STEPS = 24
SAVE_EVERY = 4


def fault_config(tmp_path: Path, shard_root: Path, mode: str, loader_workers: int = 0) -> Path:
    meta, stage = MODES[mode]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, shard_root, meta=meta, deepspeed={"zero_stage": stage},
                        data={"loader_workers": loader_workers},
                        train={"outer_steps": STEPS, "log_every": 2, "eval_every": 100, "save_every": SAVE_EVERY})


@pytest.fixture(scope="module")
def uninterrupted(shard_root, tmp_path_factory):
    """Each mode's final checkpoint state without faults, run once for all tests of the module."""
    states = {}
    for mode in MODES:
        config = fault_config(tmp_path_factory.mktemp(mode), shard_root, mode)
        torchrun(config)
        states[mode] = checkpoint_state(load_config(config).run_dir)
    return states


def checkpoint_state(run_dir: Path, steps: int = STEPS) -> dict[str, object]:
    """Every tensor and number in the latest checkpoint's files, keyed by file and path (strings such as
    folder names are left out): model, optimizer partitions, scheduler, streams, RNG states."""
    tag = checkpoint.latest_tag(run_dir)
    assert tag == f"step{steps:08d}", tag
    state = {}
    for path in sorted((checkpoint.checkpoint_dir(run_dir) / tag).glob("*.pt")):
        _flatten(torch.load(path, weights_only=False, map_location="cpu"), path.name, state)
    return state


def _flatten(value, key: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{key}/{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{key}/{i}", out)
    elif isinstance(value, (torch.Tensor, int, float, bool)):
        out[key] = value


def assert_identical(a: dict, b: dict, ignore: str = "\0") -> None:
    """Bit for bit (NaN references of absent elements included); keys containing ``ignore`` are left out."""
    a, b = ({k: v for k, v in x.items() if ignore not in k} for x in (a, b))

    def bits(value):
        return value.contiguous().reshape(-1).view(torch.uint8) if isinstance(value, torch.Tensor) else value

    assert a.keys() == b.keys()
    differ = [k for k in a if not (torch.equal(bits(a[k]), bits(b[k])) if isinstance(a[k], torch.Tensor)
                                   else a[k] == b[k])]
    assert not differ, differ[:10]


def start(config: Path, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "PYTHONPATH": str(ROOT),
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "pretrain.py"), "--config", str(config), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker that torchrun started as ``rank`` (read from /proc), or None before it exists."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def kill_rank_after(launcher: subprocess.Popen, run_dir: Path, rank: int, step: int) -> int:
    """SIGKILL ``rank`` once the run's latest complete checkpoint is at ``step`` or later; the step it was at."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:
        tag = checkpoint.latest_tag(run_dir)
        if tag is not None and int(tag.removeprefix("step")) >= step:
            pid = rank_pid(launcher, rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return int(tag.removeprefix("step"))
        time.sleep(0.005)
    pytest.fail(f"the run ended (or hung) before its checkpoint at step {step}:\n{launcher.communicate()[0][-3000:]}")


@pytest.mark.parametrize("mode, loader_workers", [(mode, 0) for mode in MODES] + [("reptile-zero1", 2)])
def test_kill_9_of_a_rank_mid_run_then_resume_equals_uninterrupted(shard_root, uninterrupted, tmp_path, mode,
                                                                   loader_workers):
    """With loader workers the killed rank had batches prefetched past its checkpoint, and the reference ran
    without workers: the end state is still bit-identical (but for the worker count in the saved config)."""
    config = fault_config(tmp_path, shard_root, mode, loader_workers)
    run_dir = load_config(config).run_dir
    launcher = start(config)
    killed_at = kill_rank_after(launcher, run_dir, rank=1, step=SAVE_EVERY)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0, output[-3000:]
    latest = int(checkpoint.latest_tag(run_dir).removeprefix("step"))
    assert killed_at <= latest < STEPS, f"the kill did not land mid-run (latest step {latest})"
    resumed = torchrun(config, "--resume", "auto")
    assert f"(step {latest})" in resumed.stdout, resumed.stdout[-2000:]
    assert_identical(checkpoint_state(run_dir), uninterrupted[mode], ignore="/config/data/loader_workers")


def test_kill_9_during_a_save_never_resumes_from_it(shard_root, uninterrupted, tmp_path):
    """Rank 1 dies after writing its part of the step-8 checkpoint, before it is marked complete: resume
    starts from step 4 and still ends bit-identical."""
    mode = "reptile-zero1"
    config = fault_config(tmp_path, shard_root, mode)
    run_dir = load_config(config).run_dir
    launcher = start(config, env_extra={checkpoint.FAILPOINT_ENV: f"save:{2 * SAVE_EVERY}:1"})
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0, output[-3000:]
    half_written = checkpoint.checkpoint_dir(run_dir) / f"step{2 * SAVE_EVERY:08d}"
    assert (half_written / "rank1.pt").exists() and not (half_written / "complete.json").exists()
    assert checkpoint.latest_tag(run_dir) == f"step{SAVE_EVERY:08d}"
    resumed = torchrun(config, "--resume", "auto")
    assert f"(step {SAVE_EVERY})" in resumed.stdout, resumed.stdout[-2000:]
    assert_identical(checkpoint_state(run_dir), uninterrupted[mode])
