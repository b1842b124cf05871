"""Experiment tracking: a run's scalars to TensorBoard (by default, when the package is installed) and to
Weights & Biases (when configured), from one process (rank 0). The JSONL logs stay the source of truth; a
tracker mirrors them for watching. A resumed run continues the same TensorBoard and W&B run and logs no step
twice: TensorBoard hides what a killed job logged past the restored step (``purge_step``), and W&B, whose steps
only grow, is not sent a step it already holds.

    tracker = open_tracker(run_dir, cfg.logging, metadata={"config": ...}, start_step=0)
    tracker.scalars(step, {"train/lr": 1e-3, "val/task/forces_mae_mev_a": 41.0})
    tracker.close()
"""
from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

from mlfound.config import ConfigError, LoggingConfig, WandbConfig
from mlfound.data.files import atomic_write_bytes

TENSORBOARD_DIR = "tensorboard"  # under the log folder: tensorboard --logdir RUN_DIR/tensorboard
WANDB_STATE = "wandb_run.json"  # the W&B run's id and last step, so a resume continues it


class Tracker:
    """The backends a run logs to (none: every call does nothing, as on ranks > 0)."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for backend in self.backends:
            backend.scalars(step, values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def open_tracker(log_dir: Path, cfg: LoggingConfig, metadata: dict, start_step: int) -> Tracker:
    """The backends ``cfg`` asks for, writing under ``log_dir``; ``metadata`` (the config, the data manifests)
    is recorded once per run. ``start_step``: the step the run starts from, a resumed checkpoint's (the same
    TensorBoard and W&B run goes on), else 0 (a new run: TensorBoard hides what an earlier one left there)."""
    tensorboard = cfg.tensorboard
    if tensorboard is None:
        tensorboard = importlib.util.find_spec("tensorboard") is not None
    elif tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard is true but the tensorboard package is missing: "
                          "pip install 'mlfound[tracking]', or set logging.tensorboard false")
    backends = [_TensorBoard(log_dir / TENSORBOARD_DIR, metadata, start_step)] if tensorboard else []
    if cfg.wandb is not None:
        backends.append(_WandB(log_dir, cfg.wandb, metadata, start_step))
    return Tracker(backends)


class _TensorBoard:
    def __init__(self, log_dir: Path, metadata: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # every reader hides the events an earlier job wrote past the resumed step (a killed job's), or all of
        # them in a new run (TensorBoard's purge)
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else 0)
        if start_step == 0:
            for key, value in metadata.items():
                self.writer.add_text(key, f"```\n{json.dumps(value, indent=1, default=str)}\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a tail -f view of the run, and nothing lost to a kill

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, log_dir: Path, cfg: WandbConfig, metadata: dict, start_step: int):
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb is set but the wandb package is missing: pip install 'mlfound[tracking]', "
                              "or remove logging.wandb")
        import wandb

        self.state_path = log_dir / WANDB_STATE
        resuming = start_step > 0 and self.state_path.exists()
        state = _read_state(self.state_path) if resuming else {"id": secrets.token_hex(4), "last_step": -1}
        self.run_id, self.last_step = state["id"], state["last_step"]
        self.held = self.last_step  # steps up to here reached W&B before this process (a killed job's)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode, dir=str(log_dir),
                              id=self.run_id, resume="allow", config=json.loads(json.dumps(metadata, default=str)))
        self._save_state()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step <= self.held:
            return
        self.run.log(values, step=step)
        if step > self.last_step:
            self.last_step = step
            self._save_state()

    def _save_state(self) -> None:
        atomic_write_bytes(self.state_path, json.dumps({"id": self.run_id, "last_step": self.last_step}).encode())

    def close(self) -> None:
        self.run.finish()


def _read_state(path: Path) -> dict:
    """The W&B run a resume continues; a file that is not the one this module writes is named, never guessed."""
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and isinstance(state.get("id"), str) and isinstance(state.get("last_step"), int):
            return state
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise ConfigError(f"{path} is not the W&B state mlfound writes ({{\"id\": ..., \"last_step\": ...}}): remove it "
                      "to log the resumed run to a new W&B run, or set logging.wandb to null")
