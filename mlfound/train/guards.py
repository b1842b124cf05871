"""What a run checks before it goes on: every step's loss and update are finite on every rank, and a resumed
checkpoint is the run the config describes. A run that fails a check stops, on every rank at once, with one
line, and never writes a checkpoint past it."""
from __future__ import annotations

import hashlib

import torch

# Safe to change when resuming: how the run is optimised, batched, logged and fed, not what it trains.
# Everything else (the model, the set of tasks, the seed, the method and its sampling, ZeRO stage, precision)
# must equal the checkpoint's: the saved weights, optimizer state and streams mean nothing under another one.
SAFE_ON_RESUME = ("run_dir", "train.", "loss.", "logging.", "meta.inner_steps", "meta.inner.lr", "meta.outer.lr",
                  "meta.outer.lr_final", "deepspeed.gradient_clipping", "deepspeed.extra", "data.shard_root",
                  "data.shard_url_template", "data.max_atoms_per_batch", "data.max_graphs_per_batch",
                  "data.loader_workers", "data.loader_prefetch", "data.neighbours_on_device")


class TrainingError(RuntimeError):
    """A run cannot go on and trustworthily end: a non-finite step, or a checkpoint that is not this run."""


def non_finite_ranks(finite: torch.Tensor, rank: int, world_size: int) -> list[int]:
    """The ranks whose ``finite`` flag (a bool tensor) is False: one small all-reduce and one host read per step,
    so every rank reaches the same verdict at the same step and none waits in a collective for the others."""
    bad_R = torch.zeros(world_size, device=finite.device)
    bad_R[rank] = (~finite).float()
    if world_size > 1:
        torch.distributed.all_reduce(bad_R)
    return bad_R.nonzero().flatten().tolist()


def all_finite(tensors) -> torch.Tensor:
    """One bool tensor on the tensors' device (no host sync until it is read): whether the float64 sum of every
    tensor's sum is finite, which a single NaN or inf anywhere makes it not. One reduction per tensor and no
    copy: 3-8x faster than per-tensor ``isfinite`` (0.10 against 0.33 ms for 6k parameters, 0.16 against 1.3 ms
    for 273k, on CPU)."""
    return torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors]).sum())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters as float32 (names, shapes, bytes): equal iff no weight moved, in fp32 and
    bf16 runs alike (a bf16 run's fp32 master weights start as its bf16 weights)."""
    digest = hashlib.sha256()
    for name, value in model.named_parameters():
        digest.update(f"{name}:{tuple(value.shape)}".encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def resume_changes(saved: dict, current: dict, tag: str) -> list[str]:
    """The safe differences between the checkpoint's config ``saved`` and ``current`` (both JSON dumps), to
    log; a TrainingError naming every unsafe one. The order of ``data.tasks`` is safe: state belongs to task
    names, and the run keeps the checkpoint's order."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    saved_tasks, current_tasks = saved_flat.pop("data.tasks"), current_flat.pop("data.tasks")
    unsafe, safe = [], []
    if set(saved_tasks) != set(current_tasks):
        added, dropped = sorted(set(current_tasks) - set(saved_tasks)), sorted(set(saved_tasks) - set(current_tasks))
        unsafe.append("data.tasks" + (f" adds {added}" if added else "") + (f" drops {dropped}" if dropped else ""))
    elif saved_tasks != current_tasks:
        safe.append(f"data.tasks order {current_tasks} (the checkpoint's {saved_tasks} is kept)")
    for key in sorted(set(saved_flat) | set(current_flat)):
        before, after = saved_flat.get(key, "(unset)"), current_flat.get(key, "(unset)")
        if before != after:
            change = f"{key} {before} -> {after}"
            (safe if key.startswith(SAFE_ON_RESUME) else unsafe).append(change)
    if unsafe:
        raise TrainingError(f"cannot resume from checkpoint {tag}: the config changes what it was trained as: "
                            f"{'; '.join(unsafe)}. Resume with the checkpoint's values, or start a new run_dir")
    return safe


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "extra":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
