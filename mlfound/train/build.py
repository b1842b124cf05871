"""Build the model and the data streams of a run from its config and the shard manifests."""
from __future__ import annotations

from mlfound.config import RunConfig
from mlfound.data.batching import AtomBudgetBatcher
from mlfound.data.shards import VALIDATION_DIR, load_manifest
from mlfound.data.streams import TaskStream
from mlfound.model import Potential


def load_manifests(cfg: RunConfig) -> dict[str, dict]:
    return {task: load_manifest(cfg.data.shard_root / task) for task in cfg.data.tasks}


def task_scale_ev(manifest: dict) -> float:
    """σ_task: RMS force (eV/Å) when the task has forces, else the per-atom residual energy spread."""
    stats = manifest["stats"]
    return stats["forces_rms_ev_a"] or stats["residual_per_atom_std_ev"] or 1.0


def build_potential(cfg: RunConfig, manifests: dict[str, dict]) -> Potential:
    elements = sorted({int(z) for m in manifests.values() for z in m["references_ev"]})
    return Potential(cfg.model, elements, list(manifests),
                     {t: m["references_ev"] for t, m in manifests.items()},
                     {t: task_scale_ev(m) for t, m in manifests.items()})


def build_batchers(cfg: RunConfig, rank: int, world_size: int) -> dict[str, AtomBudgetBatcher]:
    return {task: AtomBudgetBatcher(TaskStream(cfg.data.shard_root / task, cfg.seed, rank, world_size,
                                               cfg.data.shard_url_template),
                                    cfg.data.max_atoms_per_batch, cfg.model.cutoff_a, cfg.data.tasks,
                                    cfg.data.max_graphs_per_batch)
            for task in cfg.data.tasks}


def validation_dirs(cfg: RunConfig) -> dict:
    return {task: cfg.data.shard_root / task / VALIDATION_DIR for task in cfg.data.tasks
            if (cfg.data.shard_root / task / VALIDATION_DIR / "manifest.json").exists()}


def manifest_provenance(manifest: dict) -> dict:
    """The data a head was trained on, as recorded in a release: fingerprint, counts, source hashes."""
    return {"fingerprint": manifest["fingerprint"], "num_records": manifest["num_records"],
            "num_validation_records": manifest.get("num_validation_records", 0),
            "sources": [{"path": s["path"], "sha256": s["sha256"]} for s in manifest["sources"]]}
