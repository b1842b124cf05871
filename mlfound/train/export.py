"""Turn a training checkpoint into a release (``mlfound export``).

The weights are DeepSpeed's fp32 module state; for a bf16 run the fp32 master weights are rebuilt from
the optimizer shards (DeepSpeed's zero_to_fp32), since the bf16 module copy has lost precision.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mlfound.config import RunConfig
from mlfound.model import Potential
from mlfound.progress import stages
from mlfound.release import ReleaseError, release_metadata, save_release
from mlfound.train import checkpoint
from mlfound.train.guards import weights_digest

MODEL_STATES = "mp_rank_00_model_states.pt"


def export(run_or_checkpoint: Path, out: Path, allow_untrained: bool = False) -> Path:
    """Write the release of a run's latest complete checkpoint (or of the checkpoint folder given). Weights no
    step has moved (every step skipped, or zero steps) are refused unless ``allow_untrained`` (a from-scratch
    baseline); non-finite weights always are (``save_release``)."""
    ckpt = checkpoint.complete_dir(run_or_checkpoint)
    info_path = ckpt / checkpoint.MODEL_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} missing: the checkpoint was written by an older mlfound; "
                                "resume the run for one step to write a new checkpoint, then export that")
    info = json.loads(info_path.read_text())
    cfg = RunConfig(**info["config"])
    model = Potential(cfg.model, info["elements"], info["tasks"], {t: {} for t in info["tasks"]},
                      {t: 1.0 for t in info["tasks"]})
    with stages(["read the weights", "check them", "write the release"], desc=f"export {ckpt.name}") as start:
        start("read the weights")  # for bf16, rebuilt from every rank's optimizer shards: the long step
        model.load_state_dict(_fp32_state(ckpt, cfg))
        start("check them")
        if not allow_untrained and weights_digest(model) == info.get("initial_weights_sha256"):
            raise ReleaseError(f"{ckpt}: its weights are still the initial ones (step {info['step']}: no step "
                               "updated them), so a release of it would be an untrained model; export it anyway "
                               "with --allow-untrained (e.g. as a from-scratch baseline)")
        start("write the release")
        history = [{"stage": "pretrain", "method": cfg.meta.method, "outer_steps": info["step"],
                    "inner_steps": cfg.meta.inner_steps, "tasks": info["tasks"], "checkpoint": str(ckpt)}]
        metadata = release_metadata(model, info["heads"],
                                    training={"config": info["config"], "step": info["step"]}, history=history)
        return save_release(model, metadata, out)


def _fp32_state(ckpt: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    if cfg.deepspeed.bf16:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return torch.load(ckpt / MODEL_STATES, weights_only=True, map_location="cpu")["module"]
