"""A two-stage start, measured against an experiment's record: a pretrained start (e.g. Reptile) first
fine-tuned on the existing head of the LoT nearest the target, on that LoT's corpus file, then fine-tuned
on the target exactly as the grid's units are (same pool, subsets, validation and test splits, recipes).

    python tools/probe_two_stage.py --experiment configs/experiments/e1.yaml --record docs/experiments/e1 \\
        --start reptile_k20 --near pbe0_631gs --seeds 0 1 2 --sizes 10 50

Why: on E1 and E2 the single-task start on the nearest LoT wins at small N and Reptile at large N; this asks
whether Reptile's start, moved towards the nearest LoT, keeps both. The table compares the two-stage start
with the record's scratch, single and source start on the same draws; decide on the validation column.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives beside mlfound, not installed

import numpy as np  # noqa: E402

from experiments.config import ROOT, load_experiment, portable, resolved_recipes  # noqa: E402
from experiments.plan import Unit  # noqa: E402
from experiments.prepare import check_same_models, make_shards, make_split, train_subset  # noqa: E402
from experiments.units import best_recipe  # noqa: E402
from mlfound.config import ConfigError  # noqa: E402
from mlfound.data.files import FolderLock, atomic_write_bytes, json_text, sha256_file  # noqa: E402
from mlfound.data.sets import load_records, split_records  # noqa: E402
from mlfound.errors import run_main  # noqa: E402
from mlfound.evaluate import evaluate  # noqa: E402
from mlfound.finetune import FinetuneConfig, finetune  # noqa: E402
from mlfound.release import load, save_release  # noqa: E402


def two_stage_start(record: Path, corpus: Path, start: str, seed: int, near: str, steps: int, out: Path) -> Path:
    """The record's ``start`` model fine-tuned on head ``near`` with 90% of ``corpus/near.extxyz`` (10% for
    early stopping), once per seed; made again when what made it (start model, corpus file, config) differs."""
    path = out / f"{start}_s{seed}_{near}.safetensors"
    start_path, corpus_path = record / "models" / f"{start}_s{seed}.safetensors", corpus / f"{near}.extxyz"
    config = FinetuneConfig(head=near, max_steps=steps, lr=1e-2, seed=seed)
    inputs = {"start_sha256": sha256_file(start_path), "corpus_sha256": sha256_file(corpus_path),
              "config": config.model_dump(mode="json")}
    made_by = path.with_suffix(".inputs.json")
    if not (path.exists() and made_by.exists() and json.loads(made_by.read_text()) == inputs):
        records = load_records(corpus_path, near)
        parts = split_records(records, {"val": len(records) // 10, "train": None}, seed=0)
        tic = time.perf_counter()
        result = finetune(load(start_path), parts["train"], parts["val"], config, progress=False)
        save_release(result.release.model, result.release.metadata, path)
        atomic_write_bytes(made_by, json_text(inputs).encode())
        print(f"stage 1, seed {seed}: {len(parts['train'])} structures at {near}, best step {result.best_step} of "
              f"{steps}, {time.perf_counter() - tic:.0f} s", flush=True)
    return path


def target_unit(exp, record: Path, base_path: Path, start: str, seed: int, n: int, subset: int, out: Path) -> dict:
    """One fine-tune on the target as the grid runs it: every recipe, the lowest validation loss kept and tested;
    a result made from another stage-1 model or under other fine-tuning configs is made again."""
    path = out / f"two_stage_s{seed}_n{n}_sub{subset}.json"
    inputs = {"base_sha256": sha256_file(base_path), "recipes": resolved_recipes(exp, start)}
    if path.exists() and json.loads(path.read_text()).get("inputs") == portable(inputs):
        return json.loads(path.read_text())
    head = exp.target.head
    split = make_split(exp, record)  # the grid's split of the target (made again in a fresh clone)
    pool, val, test = (load_records(split[k], head) for k in ("pool", "val", "test"))
    result, recipe, losses = best_recipe(exp, load(base_path), train_subset(pool, n, subset), val,
                                         Unit(start, seed, n, subset))
    row = {"seed": seed, "n": n, "subset": subset, "recipe": recipe, "validation_loss": losses,
           "best_step": result.best_step, "test": evaluate(result.release, test, head), "inputs": portable(inputs)}
    atomic_write_bytes(path, json_text(row).encode())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, required=True)
    p.add_argument("--record", type=Path, required=True, help="the experiment's --out (models/, target/, results/)")
    p.add_argument("--start", default="reptile_k20", help="the record's pretrained start to begin from")
    p.add_argument("--near", required=True, help="the LoT (existing head) of stage 1, e.g. the grid's best single")
    p.add_argument("--steps", type=int, default=2000, help="stage 1 fine-tuning steps (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    p.add_argument("--out", type=Path, help="default: runs/<experiment>/two-stage")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the experiment, as the grid was run with")
    args = p.parse_args()
    exp = load_experiment(args.experiment, args.overrides)
    if args.start not in exp.pretrain.methods:
        raise ConfigError(f"--start {args.start} is not a pretraining method of {args.experiment}: "
                          f"{exp.pretrain.methods}")
    if not (args.record / "models_made_by.json").exists():
        raise ConfigError(f"{args.record} holds no run of an experiment: give the grid's --out")
    check_same_models(exp, args.record)  # the record was made by this experiment, with these overrides
    out = args.out or ROOT / "runs" / args.experiment.stem / "two-stage"
    with FolderLock(out, "tools/probe_two_stage.py run"):
        make_shards(exp)  # the replay recipes read them
        return _probe(args, exp, out)


def _probe(args, exp, out: Path) -> None:
    compared = ["none", *(m for m in ("single", args.start) if m in exp.pretrain.methods)]
    rows = {}
    for seed in args.seeds:
        base = two_stage_start(args.record, exp.pretrain.corpus, args.start, seed, args.near, args.steps, out)
        for n in args.sizes:
            for subset in exp.finetune.subsets:
                rows["two-stage", seed, n, subset] = target_unit(exp, args.record, base, args.start, seed, n,
                                                                 subset, out)
                for method in compared:
                    result = args.record / "results" / f"{method}_s{seed}_n{n}_sub{subset}.json"
                    if not result.exists():
                        raise FileNotFoundError(f"{result} is missing: run the experiment's grid at seed {seed} first")
                    rows[method, seed, n, subset] = json.loads(result.read_text())
    print(f"two-stage = {args.start}, then {args.steps} steps at {args.near}; means over "
          f"{len(args.seeds)} seeds x {len(exp.finetune.subsets)} subsets; val loss x1e3 (choose on it), test MAE")
    print(f"{'start':<14}{'N':>4}{'val loss':>16}{'F MAE meV/Å':>16}{'E MAE meV/atom':>17}")
    for n in args.sizes:
        for method in [*compared, "two-stage"]:
            cells = [r for (m, _, size, _), r in rows.items() if m == method and size == n]
            val = [1e3 * min(r["validation_loss"].values()) for r in cells]
            f_mae = [r["test"]["forces_mae_mev_a"] for r in cells]
            e_mae = [r["test"]["energy_mae_mev_atom"] for r in cells]
            print(f"{method:<14}{n:>4}{_pm(val, 2):>16}{_pm(f_mae, 0):>16}{_pm(e_mae, 2):>17}")


def _pm(values: list[float], digits: int) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


if __name__ == "__main__":
    sys.exit(run_main(main))
