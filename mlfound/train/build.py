"""Build the model and the data streams of a run from its config and the shard manifests."""
from __future__ import annotations

import functools
import warnings

import torch

from mlfound.config import RunConfig
from mlfound.data.batching import AtomBudgetBatcher
from mlfound.data.loader import StepLoader
from mlfound.data.shard_stats import mean_neighbours
from mlfound.data.shards import VALIDATION_DIR
from mlfound.data.streams import TaskStream
from mlfound.meta.sampling import TaskSampler
from mlfound.model import Potential


def load_manifests(cfg: RunConfig) -> dict[str, dict]:
    """Each task's manifest; with local shards, every shard is checked against it here (sha256, record count),
    in the training process. Remote shards are checked as they stream in (fetching a corpus twice costs)."""
    streams = {task: TaskStream(cfg.data.shard_root / task, cfg.seed) for task in cfg.data.tasks}
    if cfg.data.shard_url_template is None:
        for stream in streams.values():
            stream.verify()
    return {task: stream.manifest for task, stream in streams.items()}


def task_scale_ev(manifest: dict) -> float:
    """σ_task: RMS force (eV/Å) when the task has forces, else the per-atom residual energy spread, else (one
    structure, or energies the references fit exactly) 1 eV, said out loud."""
    stats = manifest["stats"]
    scale_ev = stats["forces_rms_ev_a"] or stats["residual_per_atom_std_ev"]
    if not scale_ev:
        warnings.warn(f"task {manifest['task']}: no forces and no spread of energy per atom after the reference "
                      "fit, so its loss scale σ is 1 eV; give it forces or more structures for a data-derived σ",
                      stacklevel=2)
    return scale_ev or 1.0


def with_data_normalisers(cfg: RunConfig, manifests: dict[str, dict]) -> RunConfig:
    """``cfg`` with ``model.avg_num_neighbors`` counted from the training manifests where the config leaves
    it unset, so the checkpoints and the release store the number the weights were trained with."""
    if cfg.model.avg_num_neighbors is not None:
        return cfg
    model = cfg.model.model_copy(update={"avg_num_neighbors": mean_neighbours(manifests, cfg.model.cutoff_a)})
    return cfg.model_copy(update={"model": model})


def build_potential(cfg: RunConfig, manifests: dict[str, dict]) -> Potential:
    cfg = with_data_normalisers(cfg, manifests)
    elements = sorted({int(z) for m in manifests.values() for z in m["references_ev"]})
    return Potential(cfg.model, elements, list(manifests),
                     {t: m["references_ev"] for t, m in manifests.items()},
                     {t: task_scale_ev(m) for t, m in manifests.items()})


def build_batchers(cfg: RunConfig, rank: int, world_size: int,
                   with_neighbours: bool = True) -> dict[str, AtomBudgetBatcher]:
    return {task: AtomBudgetBatcher(TaskStream(cfg.data.shard_root / task, cfg.seed, rank, world_size,
                                               cfg.data.shard_url_template),
                                    cfg.data.max_atoms_per_batch, cfg.model.cutoff_a, cfg.data.tasks,
                                    cfg.data.max_graphs_per_batch, with_neighbours)
            for task in cfg.data.tasks}


def build_sampler(cfg: RunConfig, manifests: dict[str, dict]) -> TaskSampler:
    """Which task each rank trains at each step; with ``meta.single_task``, always that one."""
    sizes = {t: m["num_records"] for t, m in manifests.items()
             if cfg.meta.single_task is None or t == cfg.meta.single_task}
    return TaskSampler(sizes, cfg.meta.sampling.strategy, cfg.meta.sampling.temperature, cfg.seed)


def build_loader(cfg: RunConfig, rank: int, world_size: int, sampler: TaskSampler,
                 device: torch.device) -> StepLoader:
    """This rank's batches in the order the loop takes them: k (``meta.inner_steps``) per step."""
    batchers = build_batchers(cfg, rank, world_size, with_neighbours=not cfg.data.neighbours_on_device)
    return StepLoader(batchers, dict(zip(sampler.task_names, sampler.probabilities.tolist())),
                      functools.partial(sampler.draw, rank=rank),
                      cfg.meta.inner_steps, device,
                      cfg.data.loader_workers, cfg.data.loader_prefetch, cfg.data.neighbours_on_device)


def validation_dirs(cfg: RunConfig) -> dict:
    """Each task's validation shards; a task without them is named once (it is trained, never evaluated)."""
    dirs = {task: cfg.data.shard_root / task / VALIDATION_DIR for task in cfg.data.tasks}
    missing = [task for task, folder in dirs.items() if not (folder / "manifest.json").exists()]
    if missing:
        warnings.warn(f"tasks {missing} have no validation split under {cfg.data.shard_root}: they are trained but "
                      "never evaluated; shard them with `mlfound shard --val-fraction` to evaluate them",
                      stacklevel=2)
    return {task: folder for task, folder in dirs.items() if task not in missing}


def manifest_provenance(manifest: dict) -> dict:
    """The data a head was trained on, as recorded in a release: fingerprint, counts, source hashes."""
    return {"fingerprint": manifest["fingerprint"], "num_records": manifest["num_records"],
            "num_validation_records": manifest.get("num_validation_records", 0),
            "sources": [{"path": s["path"], "sha256": s["sha256"]} for s in manifest["sources"]]}
