"""Fine-tune a release on a small dataset, onto an existing head or a new head for a new LoT.

A new head starts as a copy of an existing head (``init="auto"`` picks the head whose outputs, once
references are refitted on the training structures, leave the smallest energy residual) and gets
its own float64 references fitted to what that head's network part leaves unexplained. Copying the
head's weights *and* its scale means fine-tuning for zero steps changes no prediction: the new head
predicts exactly what its source predicts, up to the refitted per-element references.

Training is single-process plain torch (Adam): fine-tuning sets are small. The recipe for a
pretrained start has four parts, each off by default and each a config key: per-part learning rates
(``lr_trunk`` below ``lr_head`` keeps what pretraining learned), a linear lr warmup, an exponential
moving average of the weights (ema-pytorch; validation and the result use the averaged weights), and
early stopping, which restores the weights of the best validation loss. The result is a new release
keeping every old head.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from ema_pytorch import EMA
from pydantic import BaseModel, ConfigDict, Field

from mlfound import committee
from mlfound.data.batching import AtomBudgetBatcher
from mlfound.data.plausibility import check_units
from mlfound.data.readers import lot_label
from mlfound.data.record import DataError, Record
from mlfound.data.references import ReferenceFit, reference_energy
from mlfound.data.streams import TaskStream
from mlfound.config import LossConfig
from mlfound.meta.loss import potential_loss, validation_loss
from mlfound.metrics import error_table
from mlfound.model import Potential
from mlfound.predict import head_batches, network_energy, predict
from mlfound.progress import progress as show_progress
from mlfound.release import Release, ReleaseError, release_metadata
from mlfound.tracking import Tracker
from mlfound.train.guards import TrainingError


class ReplayConfig(BaseModel):
    """Replay of pretraining tasks against forgetting: every ``every``-th step adds one batch of the
    next task (round robin) from the pretraining shards, trained on its own head."""
    model_config = ConfigDict(extra="forbid")
    shard_root: Path  # manifests are read here; the shards too, unless shard_url_template is given
    tasks: list[str]  # pretraining tasks replayed in turn (heads of the release)
    every: int = Field(4, ge=1)  # one replayed batch every this many steps
    shard_url_template: str | None = None  # as data.shard_url_template: shards from a mirror, sha256-checked


class FinetuneConfig(LossConfig):
    """How one fine-tune trains; the loss weights (energy_weight, forces_weight, stress_weight) are pretraining's
    LossConfig fields, with its defaults."""
    model_config = ConfigDict(extra="forbid")
    head: str  # an existing head, or the name of a new head for a new LoT
    init: str = "auto"  # new head only: "auto" or the existing head to copy
    lot: dict = {}  # new head only: LoT metadata recorded in the release
    freeze: Literal["none", "trunk"] = "none"  # trunk: train the head alone
    # Adam lr, decayed by a cosine to lr * lr_final_ratio at max_steps. On the demo target (N = 200, 3000 steps) a
    # constant 1e-3 left test forces at 191 meV/Å and the energy error jumping between evaluations; cosine 1e-2: 154.
    lr: float = Field(1e-2, gt=0)
    lr_trunk: float | None = Field(None, gt=0)  # default: lr
    lr_head: float | None = Field(None, gt=0)  # default: lr
    # cosine decay to lr * lr_final_ratio at max_steps, or constant
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    amsgrad: bool = Field(False, description="Adam's AMSGrad variant (MACE's default optimizer)")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 penalty on every weight (MACE decays its "
                                "interactions' weights by 5e-7)")
    lr_final_ratio: float = Field(0.01, ge=0, le=1)  # the cosine's end as a fraction of lr
    # σ of the fine-tuned head: "source" keeps the copied head's (from the pretraining corpus); "data" sets the
    # training set's RMS force (as MACE's rms_forces_scaling), rescaling the head's last layer so that no
    # prediction changes before the first step: only what one optimizer step means in eV/Å changes
    head_scale: Literal["source", "data"] = "source"
    warmup_steps: int = Field(0, ge=0)  # lr rises linearly from lr / warmup_steps to lr over these steps
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the weights (ema-pytorch beta); None: no EMA
    max_steps: int = Field(3000, ge=0)  # optimizer steps (one batch each)
    eval_every: int = Field(50, ge=1)  # steps between validations (early stopping, the kept step, the tracker)
    # evaluations without improvement; None: run max_steps. Harmless at 3000 steps (the kept step was the same in
    # 7 of 8 E2 fine-tunes); at 6000 it stopped cosine runs on a plateau at high lr, 8-13% worse on validation
    # than running the schedule out (docs/benchmarks.md §6), so longer budgets want None.
    patience: int | None = Field(10, ge=1)
    max_atoms_per_batch: int = Field(100, ge=1)  # atom budget of one batch
    seed: int = 0  # the batch order (and, from scratch, the initial weights)
    replay: ReplayConfig | None = None
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    check_units: bool = True  # refuse data that cannot be in eV and Å (mlfound.data.plausibility)
    # forces from one graph torch.compile fuses (mlfound.model.compiled): ~3x faster steps on CPU, after a compile
    # of 0.5-3.5 minutes; the same results to float32 rounding
    compile_forces: bool = False
    # heads of this LoT on the fine-tuned trunk (mlfound.committee): the head, and K - 1 heads drawn afresh and
    # trained on bootstrap resamples with the trunk frozen, whose spread flags structures to distrust
    committee: int = Field(1, ge=1)


@dataclasses.dataclass
class FinetuneResult:
    release: Release
    head_scores: dict[str, dict[str, float]]  # new head: residual per candidate head; empty otherwise
    history: list[dict]  # validation at every evaluation
    best_step: int


def head_scores(model: Potential, records: list[Record]) -> dict[str, dict[str, float]]:
    """For each existing head: energy residual RMSE (meV/atom) after refitting references to the
    records, and force RMSE (meV/Å); plus the references-only baseline (no network) for scale."""
    scores = {"(references only)": _refit_residual(records, np.zeros(len(records)))}
    for head in model.task_names:
        energy_ev, forces = predict(model, records, head)  # one pass per head gives both scores
        scores[head] = _refit_residual(records, network_energy(model, records, head, energy_ev))
        scores[head]["forces_rmse_mev_a"] = _force_rmse(records, forces)
    return scores


def choose_init_head(scores: dict[str, dict[str, float]]) -> str:
    heads = {h: s for h, s in scores.items() if not h.startswith("(")}
    return min(heads, key=lambda h: heads[h]["energy_rmse_mev_atom"])


def fit_references(records: list[Record], network_energy_ev: np.ndarray) -> tuple[dict[int, float], list[str]]:
    """Float64 per-element references for E - network part, by least squares over the records."""
    fit = ReferenceFit()
    for rec, net in zip(records, network_energy_ev):
        fit.add(rec.z, rec.energy_ev - net)
    return fit.solve()


def references_and_scales(model: Potential) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Each head's per-element references and its σ, as the Potential constructor takes them."""
    references = {t: dict(zip(model.elements, model.references_ev[i].tolist())) for i, t in enumerate(model.task_names)}
    return references, {t: float(s) for t, s in zip(model.task_names, model.scales_ev)}


def add_head(model: Potential, head: str, source: str, references_ev: dict[int, float]) -> Potential:
    """A copy of ``model`` with one more head: ``source``'s weights and scale, new references."""
    old_refs, scales = references_and_scales(model)
    grown = Potential(model.config, model.elements, model.task_names + [head], {**old_refs, head: references_ev},
                      {**scales, head: scales[source]})
    state = {k: v for k, v in model.state_dict().items() if k not in ("references_ev", "scales_ev")}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(Potential.head_prefix(head)) or k in ("references_ev", "scales_ev")
                                  for k in missing), (missing, unexpected)
    grown.heads.heads[head].load_state_dict(model.heads.heads[source].state_dict())
    return grown.to(next(model.parameters()).device)


def reinitialised(base: Release, seed: int, **model_changes) -> Release:
    """``base``'s architecture (with ``model_changes`` to its ModelConfig, if any), elements, heads, references
    and scales with every weight drawn afresh (seeded): the from-scratch baseline that a pretrained start must
    beat, built exactly like the start it is compared with. Its history says so, and the release keeps no trace
    of the pretrained weights."""
    model = base.model
    config = model.config.model_validate({**model.config.model_dump(), **model_changes})
    torch.manual_seed(seed)
    fresh = Potential(config, model.elements, model.task_names, *references_and_scales(model))
    heads = {head: {k: v for k, v in meta.items() if k == "lot"} for head, meta in base.metadata["heads"].items()}
    stage = {"stage": "reinitialised", "seed": seed, **({"model_changes": model_changes} if model_changes else {})}
    return Release(fresh.eval(), release_metadata(fresh, heads, None, [stage]))


def as_recorded(config: dict, recorded: dict) -> dict:
    """``config`` (a FinetuneConfig dump) without the fields FinetuneConfig gained after ``recorded`` (an older
    dump) was written, where they hold their defaults: a result made before an option existed is still the
    result of the same fine-tune, and the record of a grid stays valid as the code grows."""
    return {key: value for key, value in config.items()
            if key in recorded or value != FinetuneConfig.model_fields[key].default}


def data_scale_ev(records: list[Record]) -> float:
    """σ from fine-tuning data as pretraining takes it from a corpus (train.build.task_scale_ev): the RMS force
    component in eV/Å, else (no forces, or all zero: relaxed structures) the spread of energy per atom after a
    per-element reference fit, else 1 eV."""
    forces = [r.forces_ev_a for r in records if r.forces_ev_a is not None]
    rms_force_ev_a = float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 0.0
    if rms_force_ev_a:
        return rms_force_ev_a
    refs, _ = fit_references(records, np.zeros(len(records)))
    residual = [(r.energy_ev - reference_energy(r.z, refs)) / len(r.z) for r in records]
    return float(np.std(residual)) or 1.0


def rescale_head(model: Potential, head: str, scale_ev: float) -> None:
    """Set ``head``'s σ to ``scale_ev`` and divide its last layer by the ratio, so predictions stay the same."""
    index = model.task_names.index(head)
    ratio = float(model.scales_ev[index]) / scale_ev
    last = model.heads.heads[head][-1]
    with torch.no_grad():
        last.weight.mul_(ratio)
        last.bias.mul_(ratio)
        model.scales_ev[index] = scale_ev


def finetune(base: Release, train: list[Record], val: list[Record] | None, cfg: FinetuneConfig,
             progress: bool = True, tracker: Tracker | None = None) -> FinetuneResult:
    """Fine-tune ``base`` on ``train`` (early stopping on ``val`` if given) into a new release; ``tracker``
    (mlfound.tracking) receives the training loss, lr and step time, and every validation."""
    _check_elements(base.model, train + (val or []))
    if cfg.check_units:
        for what, records in (("training data", train), ("validation data", val or [])):
            check_units(records, what)
    model = copy.deepcopy(base.model).to(cfg.device)
    scores, heads_meta = {}, copy.deepcopy(base.metadata["heads"])
    if cfg.head in base.heads:
        _check_same_lot(cfg.head, heads_meta[cfg.head].get("lot", {}), cfg.lot)
        source = cfg.head
    else:
        scores = head_scores(model, train)
        source = choose_init_head(scores) if cfg.init == "auto" else cfg.init
        base.check_head(source)
        refs, notes = fit_references(train, network_energy(model, train, source))
        for note in notes:
            print(f"note: head {cfg.head}: {note}", flush=True)
        model = add_head(model, cfg.head, source, refs)
        heads_meta[cfg.head] = {"lot": cfg.lot, "initialised_from": source}
    if cfg.head_scale == "data":
        rescale_head(model, cfg.head, data_scale_ev(train))
    model.compiled_forces = cfg.compile_forces
    history, best_step = _train(model, train, val, cfg, progress, tracker or Tracker())
    model = _train_committee(model, train, val, cfg, progress)
    model.compiled_forces = False  # a runtime choice: the release's model starts eager, as a loaded one does
    heads_meta[cfg.head]["finetune_data"] = {"num_train": len(train), "num_val": len(val or []),
                                    "sources": sorted({Path(r.source).name for r in train + (val or [])})}
    if cfg.committee > 1:
        names = committee.member_names(cfg.head, cfg.committee)
        heads_meta[cfg.head]["committee"] = names
        heads_meta |= {name: {"lot": heads_meta[cfg.head].get("lot", {}), "committee_of": cfg.head}
                       for name in names[1:]}
    stage = {"stage": "finetune", "head": cfg.head, "initialised_from": source, "best_step": best_step,
             "config": cfg.model_dump(mode="json"), "head_scores": scores,
             "final_validation": history[-1]["errors"] if history else {}}
    metadata = release_metadata(model.cpu(), heads_meta, base.metadata.get("training"),
                                base.metadata.get("history", []) + [stage])
    return FinetuneResult(Release(model.eval(), metadata), scores, history, best_step)


def _train_committee(model: Potential, train: list[Record], val: list[Record] | None, cfg: FinetuneConfig,
                     progress: bool) -> Potential:
    """``model`` with members 1..K-1 of ``cfg.head``'s committee: each a head with the head's references and
    scale, weights drawn afresh (seeded), trained like the head on a bootstrap resample of ``train`` with the
    trunk frozen, so the head itself and its trunk stay exactly as fine-tuned."""
    references = dict(zip(model.elements, model.references_ev[model.task_names.index(cfg.head)].tolist()))
    for index, member in enumerate(committee.member_names(cfg.head, cfg.committee)[1:], start=1):
        seed = cfg.seed + index
        model = add_head(model, member, cfg.head, references)
        torch.manual_seed(seed)
        for layer in model.heads.heads[member]:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        resample = [train[i] for i in np.random.default_rng(seed).integers(0, len(train), len(train))]
        # no EMA: its average of the frozen trunk could differ from it by rounding, and so move the head itself
        member_cfg = cfg.model_copy(update={"head": member, "freeze": "trunk", "replay": None, "ema_decay": None,
                                            "seed": seed, "committee": 1})
        model.compiled_forces = cfg.compile_forces
        _train(model, resample, val, member_cfg, progress, Tracker())
    return model


def _train(model: Potential, train: list[Record], val: list[Record] | None, cfg: FinetuneConfig,
           progress: bool, tracker: Tracker) -> tuple[list[dict], int]:
    optimizer = torch.optim.Adam(_param_groups(model, cfg), amsgrad=cfg.amsgrad, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))
    sigma = float(model.scales_ev[model.task_names.index(cfg.head)])
    val_batches = head_batches(val, cfg.head, model.task_names, model.config.cutoff_a,
                               cfg.max_atoms_per_batch) if val else []
    ema = _weight_average(model, cfg)
    scored = ema.ema_model if ema else model  # the weights validation scores and the release keeps
    history: list[dict] = []
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    evaluations_since_best = 0
    window = {"start": time.perf_counter(), "steps": 0, "loss_sum": 0.0}  # training since the last evaluation

    def evaluate(step: int) -> bool:
        """Record validation at ``step``; False once patience is exhausted."""
        nonlocal best, evaluations_since_best
        errors = error_table(scored, {cfg.head: val_batches}, cfg.device)[cfg.head]
        loss = validation_loss(errors, sigma, cfg)
        history.append({"step": step, "loss": loss, "errors": errors})
        _track(tracker, step, cfg.head, loss, errors, window, scheduler.get_last_lr()[0])
        if loss < best[0]:
            best, evaluations_since_best = (loss, step, copy.deepcopy(scored.state_dict())), 0
        else:
            evaluations_since_best += 1
        return cfg.patience is None or evaluations_since_best < cfg.patience

    if val_batches and not evaluate(0):
        return history, 0
    train_batches = _epochs(train, cfg, model)
    replay = _replay_batchers(cfg, model)
    bar = show_progress(range(1, cfg.max_steps + 1), desc=f"fine-tune {cfg.head}", unit="step", enabled=progress)
    model.train()
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = potential_loss(model, next(train_batches).to(cfg.device), cfg)
        if replay and step % cfg.replay.every == 0:
            loss = loss + potential_loss(model, next(replay[step // cfg.replay.every % len(replay)]).to(cfg.device),
                                         cfg)[0]
        if not torch.isfinite(loss):
            raise TrainingError(f"fine-tuning head {cfg.head!r}, step {step}: the loss is {loss.item()}; stopped "
                                "before applying it, nothing written. Lower --lr (or --lr-trunk/--lr-head)")
        loss.backward()
        optimizer.step()
        scheduler.step()
        window["steps"], window["loss_sum"] = window["steps"] + 1, window["loss_sum"] + loss.item()
        if ema:
            ema.update()
        if val_batches and step % cfg.eval_every == 0:
            keep_going = evaluate(step)
            bar.set_postfix(val_E=f"{history[-1]['errors']['energy_mae_mev_atom']:.1f}",
                            val_F=f"{history[-1]['errors']['forces_mae_mev_a']:.0f}", best=best[1])
            if not keep_going:
                break
    model.eval()
    if not val_batches:
        if ema:
            model.load_state_dict(ema.ema_model.state_dict())
        return history, cfg.max_steps
    model.load_state_dict(best[2])
    return history, best[1]


def _track(tracker: Tracker, step: int, head: str, val_loss: float, errors: dict, window: dict, lr: float) -> None:
    """One evaluation and the training since the previous one to ``tracker``; the window restarts."""
    seconds, steps = time.perf_counter() - window["start"], window["steps"]
    training = {"train/loss": window["loss_sum"] / steps, "train/seconds_per_step": seconds / steps} if steps else {}
    tracker.scalars(step, {**training, "train/lr": lr, "val/loss": val_loss,
                           **{f"val/{head}/{metric}": value for metric, value in errors.items()}})
    window.update(start=time.perf_counter(), steps=0, loss_sum=0.0)


def _weight_average(model: Potential, cfg: FinetuneConfig) -> EMA | None:
    """An EMA copy updated after every step. Its decay ramps up from 0 to ``ema_decay`` (ema-pytorch's
    1 - (1 + step)^-2/3 warmup), so early averages do not drag in the starting weights for long."""
    if cfg.ema_decay is None:
        return None
    return _ParameterEMA(model, beta=cfg.ema_decay, update_after_step=0, update_every=1, include_online_model=False)


class _ParameterEMA(EMA):
    """EMA of the parameters alone. ema-pytorch also copies buffers, pairing the two models' by position; but a
    Potential's buffers never train (references, scales, e3nn's masks), and its deepcopy registers e3nn's constants
    of l >= 2 paths as buffers that a freshly built model (a new head's, ``add_head``) lacks, so the pairs shifted
    and the first update failed on a size mismatch."""

    def get_buffers_iter(self, model):
        return iter(())


def _lr_factor(cfg: FinetuneConfig):
    """Multiplier of every group's lr after ``step`` steps: a linear warmup over ``warmup_steps``, times
    1 (constant) or a cosine from 1 to lr_final_ratio at max_steps."""
    final = cfg.lr_final_ratio

    def factor(step: int) -> float:
        warmup = min((step + 1) / cfg.warmup_steps, 1.0) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "constant":
            return warmup
        return warmup * (final + (1 - final) * 0.5 * (1 + np.cos(np.pi * min(step / max(cfg.max_steps, 1), 1))))
    return factor


def _param_groups(model: Potential, cfg: FinetuneConfig) -> list[dict]:
    """Trunk (unless frozen) and the target head; replayed tasks' heads train too. Everything else is frozen."""
    trained_heads = [cfg.head] + (cfg.replay.tasks if cfg.replay else [])
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [{"params": [p for h in trained_heads for p in model.heads.heads[h].parameters()],
               "lr": cfg.lr_head or cfg.lr}]
    if cfg.freeze == "none":
        groups.append({"params": list(model.trunk.parameters()), "lr": cfg.lr_trunk or cfg.lr})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def _epochs(records: list[Record], cfg: FinetuneConfig, model: Potential):
    """Endless shuffled epochs of atom-budget batches of the training records, all read by the target head."""
    rng = np.random.default_rng(cfg.seed)
    while True:
        shuffled = [records[i] for i in rng.permutation(len(records))]
        yield from head_batches(shuffled, cfg.head, model.task_names, model.config.cutoff_a, cfg.max_atoms_per_batch)


def _replay_batchers(cfg: FinetuneConfig, model: Potential) -> list[AtomBudgetBatcher]:
    if cfg.replay is None:
        return []
    missing = [t for t in cfg.replay.tasks if t not in model.task_names]
    if missing:
        raise ReleaseError(f"replay tasks {missing} have no head in this model; its heads are {model.task_names}")
    return [AtomBudgetBatcher(TaskStream(cfg.replay.shard_root / task, cfg.seed,
                                         shard_url_template=cfg.replay.shard_url_template), cfg.max_atoms_per_batch,
                              model.config.cutoff_a, model.task_names) for task in cfg.replay.tasks]


def _refit_residual(records: list[Record], network_energy_ev: np.ndarray) -> dict[str, float]:
    refs, _ = fit_references(records, network_energy_ev)
    residual = np.array([(rec.energy_ev - net - reference_energy(rec.z, refs)) / rec.num_atoms
                         for rec, net in zip(records, network_energy_ev)])
    return {"energy_rmse_mev_atom": 1e3 * float(np.sqrt((residual**2).mean()))}


def _force_rmse(records: list[Record], forces: list[np.ndarray]) -> float:
    """meV/Å over the records that have force labels; NaN when none has."""
    errors = [(f - r.forces_ev_a).ravel() for r, f in zip(records, forces) if r.forces_ev_a is not None]
    return 1e3 * float(np.sqrt((np.concatenate(errors) ** 2).mean())) if errors else float("nan")


def _check_same_lot(head: str, head_lot: dict, data_lot: dict) -> None:
    """Data at another LoT would silently turn an existing head into a mixture of two LoTs."""
    if lot_label(head_lot) != "?" and lot_label(data_lot) != "?" and lot_label(head_lot) != lot_label(data_lot):
        raise DataError(f"the data is at {lot_label(data_lot)} but head {head!r} is {lot_label(head_lot)}; "
                        "give a new head name to add a head for this level of theory")


def _check_elements(model: Potential, records: list[Record]) -> None:
    unknown = sorted({int(z) for rec in records for z in rec.z} - set(model.elements))
    if unknown:
        raise DataError(f"elements {unknown} occur in the fine-tuning data but the model knows only "
                        f"{model.elements}; fine-tune a model pretrained on those elements")
