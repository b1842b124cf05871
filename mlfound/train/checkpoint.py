"""Training checkpoints: DeepSpeed state (sharded optimizer) plus our per-rank state.

``<run_dir>/checkpoints/step00000100/`` holds DeepSpeed's files, ``rank{r}.pt`` (stream states and
RNG states, loadable with ``weights_only=True``), ``model_info.json`` (what ``mlfound export`` needs
besides the weights: elements, heads with LoT metadata and data hashes, the run config) and, written
last, ``complete.json``. The file
``<run_dir>/checkpoints/latest`` names the newest complete checkpoint and is replaced atomically
after every rank has finished writing, so an interrupted save never replaces the last good one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

from mlfound.config import RunConfig
from mlfound.data.files import DiskFullError, atomic_write, free_bytes, is_disk_full
from mlfound.train.guards import TrainingError

LATEST = "latest"
MODEL_INFO = "model_info.json"
# Fault injection for the test suite: "save:<step>:<rank>" SIGKILLs that rank in the middle of that save,
# after its DeepSpeed and rank files are written and before the checkpoint is marked complete.
FAILPOINT_ENV = "MLFOUND_FAILPOINT"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(engine, run_dir: Path, step: int, client_state: dict, rank_state: dict, rank: int,
         model_info: dict) -> Path:
    root = checkpoint_dir(run_dir)
    tag = f"step{step:08d}"
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        atomic_write(root / tag / f"rank{rank}.pt", lambda f: torch.save(rank_state, f))
        if os.environ.get(FAILPOINT_ENV) == f"save:{step}:{rank}":
            os.kill(os.getpid(), signal.SIGKILL)
        torch.distributed.barrier()
        if rank == 0:
            atomic_write(root / tag / MODEL_INFO, lambda f: f.write(json.dumps(model_info, indent=1).encode()))
            atomic_write(root / tag / "complete.json", lambda f: f.write(json.dumps({"step": step}).encode()))
            atomic_write(root / LATEST, lambda f: f.write(tag.encode()))
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err, root):
            raise
        raise _disk_full(run_dir, root / tag) from err
    torch.distributed.barrier()
    return root / tag


def _disk_full(run_dir: Path, partial: Path) -> DiskFullError:
    """The error for a save that ran out of space, after removing its partial folder (never resumed from, and
    the space is wanted back). What it needs: the size of the last complete checkpoint, else what was written."""
    written = _folder_bytes(partial)
    shutil.rmtree(partial, ignore_errors=True)
    last = latest_tag(run_dir)
    needed = _folder_bytes(checkpoint_dir(run_dir) / last) if last else None
    return DiskFullError(partial, needed or written, free_bytes(partial.parent), at_least=needed is None)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def latest_tag(run_dir: Path) -> str | None:
    path = checkpoint_dir(run_dir) / LATEST
    return path.read_text().strip() if path.exists() else None


def complete_dir(run_or_checkpoint: Path) -> Path:
    """A complete checkpoint folder from either a run folder (its latest) or a checkpoint folder."""
    path = Path(run_or_checkpoint)
    if not (path / "complete.json").exists():
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"{path}: neither a complete checkpoint (no complete.json) nor a run folder "
                                    f"with {checkpoint_dir(path) / LATEST}")
        path = checkpoint_dir(path) / tag
    return path


def saved_config(run_dir: Path, tag: str) -> dict:
    """The run config checkpoint ``tag`` was written with (from its model_info.json), before any state is loaded."""
    ckpt = checkpoint_dir(run_dir) / tag
    if not (ckpt / "complete.json").exists():
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or missing; resume from "
                                f"{latest_tag(run_dir)!r} (--resume auto) instead")
    info = ckpt / MODEL_INFO
    if not info.exists():
        raise FileNotFoundError(f"{info} missing: the checkpoint was written by an older mlfound, so what it was "
                                "trained as cannot be checked; start a new run_dir")
    try:
        config = json.loads(info.read_text())["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise TrainingError(f"{info} is unreadable ({type(err).__name__}: {err}); {_EARLIER}") from None
    # as today's config writes it: fields added since take their defaults and an older meta its method, so a
    # checkpoint of an older mlfound compares with the run by what it trained, not by the keys it lacked
    try:
        return RunConfig.model_validate(config).model_dump(mode="json")
    except ValueError as err:  # pydantic's ValidationError
        raise TrainingError(f"{info}: its config is not one this mlfound can run ({' '.join(str(err).split())}); "
                            "resume with the mlfound that wrote it, or start a new run_dir") from None


def restore(engine, run_dir: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Load DeepSpeed state and this rank's state from checkpoint ``tag``; (client_state, rank_state)."""
    root = checkpoint_dir(run_dir)
    if not (root / tag / "complete.json").exists():
        raise FileNotFoundError(f"checkpoint {root / tag} is incomplete or missing; resume from "
                                f"{latest_tag(run_dir)!r} (--resume auto) instead")
    rank_path = root / tag / f"rank{rank}.pt"
    if not rank_path.exists():
        raise FileNotFoundError(f"{rank_path} missing: the checkpoint was written with fewer ranks")
    try:
        loaded, client_state = engine.load_checkpoint(str(root), tag=tag)
        rank_state = torch.load(rank_path, weights_only=True)
    except Exception as err:  # torch and DeepSpeed raise many types for a damaged file; none is ours to fix
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TrainingError(f"checkpoint {root / tag} is unreadable ({type(err).__name__}: {first_line}); "
                            f"{_EARLIER}") from err
    if loaded is None:  # DeepSpeed only warns when its files are missing
        raise TrainingError(f"checkpoint {root / tag} has no DeepSpeed state; {_EARLIER}")
    return client_state, rank_state


_EARLIER = ("the checkpoint is damaged: resume from an earlier one with --resume <tag> (the folder names under "
            "<run_dir>/checkpoints), or start a new run_dir")
