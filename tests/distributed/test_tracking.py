"""Experiment tracking on real DeepSpeed runs: TensorBoard's event files, read back with TensorBoard's own
reader, hold the JSONL logs' values at the same steps, each step once after a resume over a killed job's
events; a W&B offline run continues under the same id on resume."""
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from mlfound.config import load_config
from mlfound.tracking import TENSORBOARD_DIR, WANDB_STATE
from tests.distributed.conftest import TASKS
from tests.distributed.test_pretrain import run_one_process, torchrun, write_config


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_log_to_tensorboard_and_a_resume_logs_each_step_once(shard_root, tmp_path):
    """ZeRO 0 (the gradient norm computed from the gradients every rank holds). The job stops at step 2 and a
    killed job's event at step 3 (a loss of 1e9) is left behind; the resumed run's values replace it."""
    config = write_config(tmp_path, shard_root, deepspeed={"zero_stage": 0},
                          train={"outer_steps": 4, "log_every": 1, "eval_every": 2, "save_every": 2})
    run_dir = load_config(config).run_dir
    torchrun(config, "train.stop_after_steps=2")
    with SummaryWriter(str(run_dir / TENSORBOARD_DIR)) as killed:
        killed.add_scalar("train/lr", 1e9, 3)
    torchrun(config, "--resume", "auto")
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = jsonl(run_dir / "metrics_rank0.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("lr", "seconds_per_step", "atoms_per_s", "data_wait_fraction", "grad_norm"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [step for step, _ in logged] == [1, 2, 3, 4], key
        assert all(math.isclose(value, m[key], rel_tol=1e-6) for (_, value), m in zip(logged, metrics)), key
    assert all(m["grad_norm"] > 0 and math.isfinite(m["grad_norm"]) for m in metrics)
    for task in TASKS:
        assert [e.step for e in events.Scalars(f"train/mixture/{task}")] == [1, 2, 3, 4]
        tables = {v["step"]: v["tasks"][task] for v in jsonl(run_dir / "validation.jsonl")}
        logged = {e.step: e.value for e in events.Scalars(f"val/{task}/forces_mae_mev_a")}
        assert logged.keys() == tables.keys() == {2, 4}
        assert all(math.isclose(logged[step], tables[step]["forces_mae_mev_a"], rel_tol=1e-6) for step in logged)
    assert {"config/text_summary", "data/text_summary"} <= set(events.Tags()["tensors"])


def test_wandb_offline_run_continues_under_its_id_on_resume(shard_root, tmp_path):
    """One process at ZeRO 2 (the gradient norm from DeepSpeed's optimizer), W&B offline, TensorBoard off."""
    config = write_config(tmp_path, shard_root, deepspeed={"zero_stage": 2}, train={"outer_steps": 2, "log_every": 1},
                          logging={"tensorboard": False, "wandb": {"project": "mlfound-test", "mode": "offline"}})
    run_dir = load_config(config).run_dir
    first = run_one_process(config)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((run_dir / WANDB_STATE).read_text())
    assert state["last_step"] == 2 and not (run_dir / TENSORBOARD_DIR).exists()
    resumed = run_one_process(config, "--resume", "auto", "train.outer_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / WANDB_STATE).read_text()) == {"id": state["id"], "last_step": 3}
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(runs) == 2  # the first job and the resumed one, one W&B run (`wandb sync` merges them)
    for run in runs:
        held = (run / f"run-{state['id']}.wandb").read_bytes()
        assert all(key in held for key in (b"train/grad_norm", b"train/loss/", b"val/hf_sto3g/forces_mae_mev_a"))
    assert all(m["grad_norm"] > 0 and math.isfinite(m["grad_norm"]) for m in jsonl(run_dir / "metrics_rank0.jsonl"))
