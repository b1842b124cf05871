"""MACE from scratch through MACE's own CLI (``mace_run_train``): the strongest-peer baseline of the
fine-tuning experiment. Runs inside .venv-mace (mace-torch 0.3.16); mlfound is not installed there.

    .venv-mace/bin/python tools/peers/mace_cli.py --train T.extxyz --val V.extxyz --test X.extxyz --out DIR --seed 0

Steps: copy the three files into DIR with the labels under MACE's keys (``REF_energy`` in info,
``REF_forces`` in arrays; ours sit in a SinglePointCalculator); run ``mace_run_train`` (log in
DIR/mace_train.log); load the final model with ``MACECalculator`` (float64) and score it on --test with ASE;
optionally run Langevin MD with ``mlfound/md_stability.py`` (loaded by file path). The last stdout line is
one JSON object: framework, seed, num_train, params, train_seconds, test errors (energy per atom in
meV/atom, force components in meV/Å; MAE and RMSE), and md (``stability_summary`` plus the runs, or null).

Recipe: MACE's README recipe ("Training" section of github.com/ACEsuit/mace), its defaults elsewhere:

- model ``MACE``, ``--num_channels 32 --max_L 1 --max_ell 1 --correlation 3 --num_interactions 2
  --r_max 5.0``: our peer size, with spherical harmonics to l_max as in tools/peers/time_mace.py (MACE's
  default ``--max_ell 3`` costs 4x per epoch here, and at this budget the model is limited by epochs, not
  capacity: train force MAE 78 vs validation 124 meV/Å after 150 epochs, still falling). Otherwise MACE's
  defaults: 8 Bessel functions, radial MLP [64, 64, 64], readout MLP 16x0e, ``rms_forces_scaling``, average
  neighbour count from the training set;
- ``--E0s average``: the README's option when isolated-atom energies are unknown. The target is one
  molecule, so the least-squares E0s are not identifiable per element; MACE's minimum-norm solution only
  fixes their sum over the molecule to the mean training energy, which is all a one-molecule model needs;
- weighted loss, energy weight 1 and forces weight 100 (MACE defaults); Adam with AMSGrad, lr 0.01, weight
  decay 5e-7, gradient clipping 10; ReduceLROnPlateau (factor 0.8, patience 50 epochs); EMA of the weights
  with decay 0.99 (README); ``--stage_two`` (README) from MACE's default 75% of the epochs: energy weight
  1000, forces weight 100, lr 1e-3;
- ``--default_dtype float64`` (MACE's default for training), batch size min(5, n), validation set = --val,
  ``--seed``, device cpu;
- ``--max_num_epochs`` = --max-epochs, by default 3,000 gradient updates whatever n (MACE's README: keep
  epochs x n / batch size constant as n changes): 300 epochs at n = 50, 1,500 at n = 10, 75 at n = 200.
  The budget is set by the strongest MACE we could afford: at n = 50, 1,500 updates (3.3 CPU-minutes) gave
  test force MAE 116 meV/Å and 3.3 meV/atom on the tools/bench_peers.py split (n = 10: 192 meV/Å);
  3,000 updates (6.7 CPU-minutes) gave 89 meV/Å and 2.2 meV/atom. mlfound's fine-tunes get 2,000 steps;
- ``--eval_interval``: every epoch up to 150 epochs, else every (epochs // 150)-th (every 5th at n = 10,
  where validating 25 structures every epoch took more time than training: 7 minutes instead of ~3.5);
- ``--patience`` = a third of the validations (50 at n = 50; see below).

Not adopted, decided on validation (N = 50, seed 0): ReduceLROnPlateau patience 10 instead of 50 (never
fired: identical model) and an ExponentialLR decay from lr 0.01 to stage two's 1e-3 (validation force MAE
140 vs 124 meV/Å: at this budget the model needs steps, not a lower learning rate).

MACE keeps the checkpoint with the lowest validation loss (EMA weights) in each stage and writes it as
``mace.model`` (stage one) and ``mace_stagetwo.model`` (stage two); the stage-two model is the final one
when it exists. In mace-torch 0.3.16 (single process) ``--patience`` only ends stage one early (jumping to
stage two); in stage two it logs "Stopping optimization" and carries on to ``--max_num_epochs``.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.io import read, write  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MD_STABILITY = ROOT / "mlfound" / "md_stability.py"
NAME = "mace"  # MACE's --name: DIR/mace.model, DIR/mace_stagetwo.model
# Recipes (--recipe): configs/peers/mace_recipes.yaml, which says what each one is
RECIPES = yaml.safe_load((ROOT / "configs" / "peers" / "mace_recipes.yaml").read_text())
NUM_VALIDATIONS = 150  # at most ~this many validations per run (module docstring)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="extxyz with energies and forces")
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="run directory (MACE's --work_dir)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="grid", help="training recipe (RECIPES)")
    p.add_argument("--reuse-model", action="store_true",
                   help="score the model a run with the same --out already trained instead of training again")
    p.add_argument("--max-epochs", type=int, help="default: the recipe's gradient updates (module docstring)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--l-max", type=int, default=1, help="MACE's --max_L (and --max_ell where the recipe has none)")
    p.add_argument("--correlation", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--md-structure", type=Path, help="run MD from the first frame of this file")
    p.add_argument("--md-runs", type=int, default=10, help="Langevin runs, seeds 0..runs-1")
    p.add_argument("--md-steps", type=int, default=4000)
    p.add_argument("--md-timestep-fs", type=float, default=0.5)
    p.add_argument("--md-temperature-k", type=float, default=600.0)
    return p.parse_args(argv)


def write_mace_extxyz(source: Path, target: Path) -> list[Atoms]:
    """Copy ``source`` to ``target`` with energy (eV) and forces (eV/Å) under MACE's REF_ keys; return the
    frames of ``source`` (with their SinglePointCalculator)."""
    frames = read(source, index=":")
    copies = []
    for i, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        if "energy" not in results or "forces" not in results:
            raise SystemExit(f"{source} frame {i} has no energy and forces")
        copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info["REF_energy"] = float(results["energy"])
        copy.arrays["REF_forces"] = np.asarray(results["forces"], dtype=np.float64)
        copies.append(copy)
    write(target, copies, format="extxyz")
    return frames


def max_epochs(args: argparse.Namespace, num_train: int) -> int:
    """--max-epochs, or the epochs that make the recipe's gradient updates in batches of min(5, n) structures
    (MACE's training loader drops the last incomplete batch of each epoch)."""
    if args.max_epochs is not None:
        return args.max_epochs
    return max(1, round(RECIPES[args.recipe]["updates"] / (num_train // min(5, num_train))))


def mace_command(args: argparse.Namespace, train: Path, val: Path, num_train: int, num_val: int) -> list[str]:
    """The ``mace_run_train`` command line of the recipe in the module docstring."""
    num_epochs = max_epochs(args, num_train)
    eval_every = max(1, num_epochs // NUM_VALIDATIONS)
    cli = Path(sys.executable).with_name("mace_run_train")
    launcher = [str(cli)] if cli.exists() else [sys.executable, "-m", "mace.cli.run_train"]
    recipe = RECIPES[args.recipe]
    return launcher + [
        f"--name={NAME}", f"--work_dir={args.out}", f"--seed={args.seed}", "--device=cpu",
        f"--default_dtype={recipe['dtype']}", f"--train_file={train}", f"--valid_file={val}",
        "--energy_key=REF_energy", "--forces_key=REF_forces", "--E0s=average", "--model=MACE",
        f"--num_channels={args.channels}", f"--max_L={args.l_max}", f"--max_ell={recipe['max_ell'] or args.l_max}",
        f"--correlation={args.correlation}", f"--num_interactions={args.layers}", f"--r_max={args.cutoff}",
        "--loss=weighted", "--energy_weight=1.0", "--forces_weight=100.0", "--lr=0.01", "--amsgrad",
        *(["--ema", "--ema_decay=0.99"] if recipe["ema"] else []), *(["--stage_two"] if recipe["stage_two"] else []),
        f"--batch_size={min(5, num_train)}",
        f"--valid_batch_size={min(num_val, 50)}", f"--max_num_epochs={num_epochs}",
        f"--eval_interval={eval_every}", f"--patience={max(1, num_epochs // eval_every // 3)}",
        "--error_table=PerAtomMAE", "--plot=False",
    ]


def train(command: list[str], out: Path, log: Path) -> float:
    """Run MACE's CLI with its output in ``log``; its wall time in seconds. An earlier run's checkpoints
    and models in ``out`` are removed first: MACE loads the latest checkpoint it finds there at the end."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for model in out.glob(f"{NAME}*.model"):
        model.unlink()
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mace_run_train failed ({done.returncode}); last lines of {log}:\n"
                         + "".join(log.read_text().splitlines(keepends=True)[-30:]))
    return seconds


def final_model(out: Path) -> Path:
    """The stage-two model when MACE wrote one, else the stage-one model."""
    for name in (f"{NAME}_stagetwo.model", f"{NAME}.model"):
        if (out / name).exists():
            return out / name
    raise SystemExit(f"mace_run_train wrote no {NAME}.model in {out}")


def test_errors(calc, frames: list[Atoms]) -> dict:
    """Energy per atom (meV/atom) and force component (meV/Å) MAE and RMSE of ``calc`` on ``frames``."""
    energy_errors, force_errors = [], []
    for atoms in frames:
        ref_energy_ev, ref_forces = atoms.get_potential_energy(), atoms.get_forces()
        probe = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        probe.calc = calc
        energy_errors.append((probe.get_potential_energy() - ref_energy_ev) / len(atoms))
        force_errors.append((probe.get_forces() - ref_forces).ravel())
    energy_mev, forces_mev = 1e3 * np.array(energy_errors), 1e3 * np.concatenate(force_errors)
    return {"energy_mae_mev_atom": float(np.abs(energy_mev).mean()),
            "forces_mae_mev_a": float(np.abs(forces_mev).mean()),
            "energy_rmse_mev_atom": float(np.sqrt((energy_mev**2).mean())),
            "forces_rmse_mev_a": float(np.sqrt((forces_mev**2).mean()))}


def load_md_stability():
    """mlfound/md_stability.py by file path: it imports only numpy, ASE and the standard library."""
    spec = importlib.util.spec_from_file_location("md_stability", MD_STABILITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def md_stability(calc, args: argparse.Namespace) -> dict:
    """``stability_summary`` of --md-runs Langevin runs (seeds 0..runs-1) from the first --md-structure frame,
    plus every run as a dict."""
    md = load_md_stability()
    start = read(args.md_structure, index=0)
    runs = [md.first_unphysical_event(start, calc, temperature_k=args.md_temperature_k, steps=args.md_steps,
                                      timestep_fs=args.md_timestep_fs, seed=seed) for seed in range(args.md_runs)]
    return {**md.stability_summary(runs), "runs": [dataclasses.asdict(run) for run in runs]}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_frames = write_mace_extxyz(args.train, args.out / "train.extxyz")
    val_frames = write_mace_extxyz(args.val, args.out / "val.extxyz")
    test_frames = read(args.test, index=":")
    command = mace_command(args, args.out / "train.extxyz", args.out / "val.extxyz", len(train_frames),
                           len(val_frames))
    train_seconds = 0.0 if args.reuse_model else train(command, args.out, args.out / "mace_train.log")

    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(final_model(args.out)), device="cpu", default_dtype="float64")
    report = {"framework": "mace", "seed": args.seed, "num_train": len(train_frames),
              "params": sum(p.numel() for p in calc.models[0].parameters()), "train_seconds": train_seconds,
              "model": final_model(args.out).name, "test": test_errors(calc, test_frames),
              "md": md_stability(calc, args) if args.md_structure else None}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
