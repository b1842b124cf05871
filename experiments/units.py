"""One unit, run in a worker process: a start model fine-tuned with every recipe (the one validation picks is
tested, scanned and run in MD), or MACE from scratch in its own venv on the same structures."""
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from ase.io import read

from experiments.config import MACE_CLI, MACE_PYTHON, Experiment, finetune_config, recipes_for
from experiments.plan import Unit, finetuned_model, result_path, start_model, unit_inputs
from experiments.prepare import train_subset
from mlfound.calculator import MLFoundCalculator
from mlfound.config import LossConfig
from mlfound.data.files import atomic_write_bytes, json_text
from mlfound.data.references import reference_energy
from mlfound.data.sets import load_records, write_extxyz
from mlfound.evaluate import evaluate, scan_report
from mlfound.finetune import FinetuneConfig, finetune, fit_references
from mlfound.md_stability import first_unphysical_event
from mlfound.meta.loss import validation_loss
from mlfound.release import load, save_release

ZERO_SHOT_REFERENCE_STRUCTURES = 50  # N = 0 refits the new head's references on this many pool structures


def run_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> None:
    """Run one unit and write its result (atomically, with the inputs it was made from) for the grid to reuse."""
    try:
        row = mace_unit(exp, out, split, unit) if unit.method == "mace" else finetune_unit(exp, out, split, unit)
    except Exception as err:  # the pool re-raises it in the parent, which should say which unit failed
        raise RuntimeError(f"unit {unit.name} failed: {type(err).__name__}: {err}") from err
    row.update(method=unit.method, inputs=unit_inputs(exp, out, unit))
    atomic_write_bytes(result_path(out, unit), json_text(row).encode())


def finetune_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> dict:
    """Fine-tune one start with every recipe; only the recipe validation picks is tested."""
    head = exp.target.head
    pool, val, test = (load_records(split[k], head) for k in ("pool", "val", "test"))
    train = train_subset(pool, unit.n or ZERO_SHOT_REFERENCE_STRUCTURES, unit.subset)
    tic = time.perf_counter()
    result, recipe, validation_loss = best_recipe(exp, load(start_model(out, unit.method, unit.seed)), train, val, unit)
    if unit.n:
        save_release(result.release.model, result.release.metadata, finetuned_model(out, unit))
    return {"model": f"{unit.method}_s{unit.seed}", "seed": unit.seed, "n": unit.n, "subset": unit.subset,
            "recipe": recipe, "validation_loss": validation_loss, "best_step": result.best_step,
            "seconds": time.perf_counter() - tic, "init": result.release.metadata["heads"][head]["initialised_from"],
            "train": evaluate(result.release, train, head), "test": evaluate(result.release, test, head),
            "scan": scan_smoothness(exp, result.release), "references_only": references_only(train, test),
            "md": md_runs(exp, split, result.release, unit.md_runs) if unit.md_runs else None}


def best_recipe(exp: Experiment, base, train: list, val: list, unit: Unit):
    """(result, recipe name, {recipe: validation loss}) of the recipe whose kept weights have the lowest
    validation loss (the first on ties); N = 0 is one zero-step fine-tune, no recipe."""
    if not unit.n:
        cfg = FinetuneConfig(head=exp.target.head, max_steps=0, seed=unit.subset)
        return finetune(base, train, val, cfg, progress=False), None, {}
    best, validation_loss = None, {}
    for name, recipe in recipes_for(exp, unit.method).items():
        result = finetune(base, train, val, finetune_config(exp, recipe, unit.subset), progress=False)
        validation_loss[name] = validation_loss_of_kept_weights(result)
        if best is None or validation_loss[name] < validation_loss[best[0]]:
            best = (name, result)
    return best[1], best[0], validation_loss


def validation_loss_of_kept_weights(result) -> float:
    """The fine-tuning validation loss at the step whose weights the fine-tune kept, in one form for every
    recipe: FinetuneConfig's default loss weights and σ = 1 eV (E RMSE in eV/atom, F RMSE in eV/Å). Recipes
    that change the loss weights or the source head (and so σ) still compare; for recipes that change neither
    it ranks recipes as FinetuneResult.history's minimum "loss" does. NaN (a diverged fine-tune) counts as inf."""
    errors = next(h["errors"] for h in result.history if h["step"] == result.best_step)
    loss = validation_loss(errors, sigma_ev=1.0, weights=LossConfig())
    return loss if np.isfinite(loss) else float("inf")


def scan_smoothness(exp: Experiment, release) -> dict | None:
    if exp.target.scan is None:
        return None
    smoothness, *_ = scan_report(release, load_records(exp.target.scan, exp.target.head), exp.target.head,
                                 exp.target.scan)
    return smoothness


def references_only(train, test) -> dict:
    """The trivial baseline: per-element references fitted on the training structures, no network."""
    refs, _ = fit_references(train, np.zeros(len(train)))
    errors = np.array([(r.energy_ev - reference_energy(r.z, refs)) / r.num_atoms for r in test])
    forces = np.concatenate([r.forces_ev_a.ravel() for r in test])
    return {"energy_mae_mev_atom": 1e3 * float(np.abs(errors).mean()),
            "forces_mae_mev_a": 1e3 * float(np.abs(forces).mean())}


def mace_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> dict:
    """MACE from scratch on the unit's train subset (tools/peers/mace_cli.py in its own venv)."""
    train = out / "mace" / f"train_n{unit.n}_sub{unit.subset}.extxyz"
    if not train.exists():
        write_extxyz(train_subset(load_records(split["pool"], exp.target.head), unit.n, unit.subset), train)
    cmd = [str(MACE_PYTHON), str(MACE_CLI), "--train", str(train), "--val", str(split["val"]), "--test",
           str(split["test"]), "--out", str(out / "mace" / unit.name), "--seed", str(unit.seed), "--recipe",
           exp.mace.recipe_at(unit.n)]
    if exp.mace.max_epochs is not None:
        cmd += ["--max-epochs", str(exp.mace.max_epochs)]
    if unit.md_runs:
        cmd += ["--md-structure", str(split["test"]), "--md-runs", str(unit.md_runs), "--md-steps",
                str(exp.md.steps), "--md-temperature-k", str(exp.md.temperature_k), "--md-timestep-fs",
                str(exp.md.timestep_fs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"MACE {unit.name} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": f"mace_s{unit.seed}", "seed": unit.seed, "n": unit.n, "subset": unit.subset,
            "seconds": report["train_seconds"], "params": report["params"], "test": report["test"],
            "md": report.get("md")}


def md_runs(exp: Experiment, split: dict[str, Path], release, runs: int) -> dict:
    """``runs`` Langevin runs (seeds 0, 1, ...) until the first unphysical event, from the first test
    structure; in the form tools/peers/mace_cli.py reports MACE's."""
    calc = MLFoundCalculator(release, head=exp.target.head)
    start = read(split["test"], index=0)
    return {"runs": [dataclasses.asdict(first_unphysical_event(start, calc, temperature_k=exp.md.temperature_k,
                                                               steps=exp.md.steps, timestep_fs=exp.md.timestep_fs,
                                                               seed=seed)) for seed in range(runs)]}
