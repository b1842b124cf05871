"""mlfound from scratch, the release fine-tuned and MACE from scratch on a fine-tuning target, recipe by recipe: the
parity check that must hold before a pretrained start can be judged, and the gap the pretrained start closes.

    python tools/compare_scratch.py --target data/demo/hf_631g.extxyz --head hf_631g --out runs/scratch/paracetamol \\
        --recipes default='{}' forces100='{"energy_weight": 1, "forces_weight": 100}' --evaluate-on val
    python tools/compare_scratch.py ... --finetune default='{}' --mace plain    # the release itself, and MACE
    python tools/compare_scratch.py ... --evaluate-on test    # the recipes chosen on val, now on test

The target is split as the paper experiment splits it (``split_records(..., {test, val, pool: rest}, seed=0)``)
and every size N draws the experiment's nested-by-seed subsets (``train_subset``), so a number here and one in
an E1/E2 grid come from the same structures. mlfound's start is ``--model``'s architecture with fresh weights
(``mlfound.finetune.reinitialised``, seeded by the subset), fine-tuned by ``finetune`` with each recipe (JSON of
FinetuneConfig fields over its defaults); --finetune recipes fine-tune ``--model``'s own weights (framework
"release"); MACE runs ``tools/peers/mace_cli.py`` in .venv-mace with the named recipe (of
configs/peers/mace_recipes.yaml). Each unit's result is a JSON file under --out/results, so a stopped run resumes
and a table can be reprinted (--report); a result or split made from other inputs (target file, split sizes,
recipe, FinetuneConfig's defaults, MACE recipe's fields, model) is refused, never mixed in. Choose recipes with
--evaluate-on val; test only what was chosen.
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives beside mlfound, not installed

import numpy as np  # noqa: E402

from mlfound.errors import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
MACE_PYTHON, MACE_CLI = ROOT / ".venv-mace" / "bin" / "python", ROOT / "tools" / "peers" / "mace_cli.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, required=True, help="extxyz of the target LoT (energies and forces)")
    p.add_argument("--head", required=True, help="the target's task name (a new head for a new LoT)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="default", help="release whose architecture is trained from random weights")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--subsets", type=int, nargs="+", default=[0, 1])
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--val", type=int, default=25)
    p.add_argument("--recipes", nargs="*", default=[], metavar="NAME=JSON", help="mlfound recipes, from scratch")
    p.add_argument("--finetune", nargs="*", default=[], metavar="NAME=JSON",
                   help="mlfound recipes fine-tuning --model's own weights (no model changes)")
    p.add_argument("--mace", nargs="*", default=[], metavar="RECIPE", help="MACE recipes of tools/peers/mace_cli.py")
    p.add_argument("--evaluate-on", choices=["val", "test"], default="val")
    p.add_argument("--workers", type=int, default=1, help="units in parallel, one core each")
    p.add_argument("--report", action="store_true", help="print the table of the results on disk, run nothing")
    args = p.parse_args(argv)
    recipes = {"mlfound": parse_recipes("--recipes", args.recipes),
               "release": parse_recipes("--finetune", args.finetune)}
    units = [(framework, name, n, subset) for n in args.sizes for subset in args.subsets
             for framework, names in (*recipes.items(), ("mace", args.mace)) for name in names]
    if args.report:
        print_table(args, units)
        return 0
    from mlfound.data.files import FolderLock

    check_model_changes(args.model, recipes["mlfound"])
    check_mace_recipes(args.mace)
    with FolderLock(args.out, "tools/compare_scratch.py run"):  # units and split are shared files
        split = make_split(args)
        todo = [u for u in units if not done(args.out, u, unit_inputs(args, recipes, u))]
        print(f"{len(units) - len(todo)} of {len(units)} units on disk; running {len(todo)}", flush=True)
        with cf.ProcessPoolExecutor(args.workers) as pool:
            for unit, row in zip(todo, pool.map(run_unit, [(args, recipes, split, u) for u in todo])):
                print(f"{unit}: {args.evaluate_on} F MAE {row[args.evaluate_on]['forces_mae_mev_a']:.0f} meV/Å "
                      f"({row['seconds']:.0f} s)", flush=True)
    print_table(args, units)
    return 0


def parse_recipes(option: str, texts: list[str]) -> dict[str, dict]:
    """NAME=JSON items by name; a name given twice is refused (the last would silently replace the first)."""
    from mlfound.config import ConfigError

    recipes = {}
    for text in texts:
        name, recipe = parse_recipe(option, text)
        if name in recipes:
            raise ConfigError(f"{option} {name}: given twice; give each recipe a name of its own")
        recipes[name] = recipe
    return recipes


def parse_recipe(option: str, text: str) -> tuple[str, dict]:
    from mlfound.config import ConfigError
    from mlfound.finetune import FinetuneConfig
    from mlfound.model import ModelConfig

    name, _, fields = text.partition("=")
    if not RECIPE_NAME.fullmatch(name):  # an empty $VAR in the shell gives ""; the name is part of file names
        raise ConfigError(f"{option} {text!r}: a recipe needs a name of letters, digits and _.+- (it names the "
                          "result files): NAME or NAME='{\"lr\": 0.01}'")
    try:
        recipe = json.loads(fields or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} {name}: not JSON ({err}); write NAME='{{\"lr\": 0.01}}'") from None
    FinetuneConfig.model_validate({"head": "x", **{k: v for k, v in recipe.items() if k != "model"}})
    if option == "--finetune" and "model" in recipe:
        raise ConfigError(f"--finetune {name}: a fine-tuned release keeps its architecture; model changes belong "
                          "in --recipes (from scratch)")
    unknown = sorted(set(recipe.get("model", {})) - set(ModelConfig.model_fields))
    if unknown:  # typos fail here; the values are checked against --model's own config in check_model_changes
        raise ConfigError(f"{option} {name}: model has no field {unknown}; it has {sorted(ModelConfig.model_fields)}")
    return name, recipe


def check_model_changes(model_path, recipes: dict[str, dict]) -> None:
    """Each recipe's model changes over ``--model``'s architecture (not ModelConfig's defaults, which a release
    need not share) make a valid model: a bad combination fails before the first unit, naming the recipe."""
    from pydantic import ValidationError

    from mlfound.config import ConfigError, describe
    from mlfound.release import load, resolve

    config = load(resolve(model_path)).model.config
    for name, recipe in recipes.items():
        try:
            config.model_validate({**config.model_dump(), **recipe.get("model", {})})
        except ValidationError as err:
            raise ConfigError(f"--recipes {name}: over --model {model_path}: {describe(err)}") from None


def check_mace_recipes(names: list[str]) -> None:
    from experiments.config import MACE_RECIPES, mace_recipes, repo_relative
    from mlfound.config import ConfigError

    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"--mace {' '.join(twice)}: given twice; name each recipe once")
    unknown = sorted(set(names) - set(mace_recipes()))
    if unknown:
        raise ConfigError(f"--mace {' '.join(unknown)}: not a recipe of {repo_relative(MACE_RECIPES)}: "
                          f"{sorted(mace_recipes())}")


def make_split(args) -> dict[str, Path]:
    from mlfound.data.files import atomic_write_bytes, sha256_file
    from mlfound.data.sets import load_records, split_records, write_extxyz

    if not args.target.is_file():
        raise FileNotFoundError(f"--target {args.target}: no such file")
    inputs = {"target_sha256": sha256_file(args.target), "head": args.head, "test": args.test, "val": args.val}
    paths = {name: args.out / "split" / f"{name}.extxyz" for name in ("pool", "val", "test")}
    record = args.out / "split" / "inputs.json"
    if record.exists():
        check_same(record, json.loads(record.read_text()), inputs)
    if not all(path.exists() for path in paths.values()):
        records = load_records(args.target, args.head)
        sizes = {"test": args.test, "val": args.val, "pool": None}
        for name, records_of_split in split_records(records, sizes, seed=0).items():
            write_extxyz(records_of_split, paths[name])
        atomic_write_bytes(record, json.dumps(inputs, indent=1).encode())
    return paths


def unit_inputs(args, recipes: dict, unit: tuple) -> dict:
    """What a unit's result depends on beyond the split: the recipe, and for mlfound the FinetuneConfig it resolves
    to (so a result made under other defaults is refused, not reused under the recipe's name) and the start."""
    from experiments.config import mace_recipes
    from mlfound.data.files import sha256_file
    from mlfound.finetune import FinetuneConfig
    from mlfound.release import resolve

    framework, name, _, _ = unit
    if framework == "mace":
        return {"mace_recipe": name, "mace_recipe_fields": mace_recipes()[name]}
    recipe = recipes[framework][name]
    config = FinetuneConfig(head=args.head, **{k: v for k, v in recipe.items() if k != "model"})
    return {"recipe": recipe, "finetune_config": config.model_dump(mode="json", exclude={"seed"}),
            "model_sha256": sha256_file(resolve(args.model))}


def done(out: Path, unit: tuple, inputs: dict) -> bool:
    """Whether ``unit``'s result is on disk, made from ``inputs``; one made from others is an error, not reused."""
    path = result_path(out, unit)
    if not path.exists():
        return False
    check_same(path, json.loads(path.read_text()).get("inputs", {}), inputs)
    return True


def check_same(path: Path, recorded: dict, inputs: dict) -> None:
    from mlfound.config import ConfigError
    from mlfound.finetune import as_recorded

    if "finetune_config" in inputs and isinstance(recorded.get("finetune_config"), dict):  # fields added since count
        inputs = {**inputs, "finetune_config": as_recorded(inputs["finetune_config"], recorded["finetune_config"])}
    changed = sorted(k for k in inputs if recorded.get(k) != inputs[k])
    if changed:
        raise ConfigError(f"{path} was made from other inputs (differing: {', '.join(changed)}); give another "
                          "--out or recipe name, or delete it to run it again")


def result_path(out: Path, unit: tuple) -> Path:
    framework, name, n, subset = unit
    return out / "results" / f"{framework}_{name}_n{n}_sub{subset}.json"


def run_unit(job) -> dict:
    args, recipes, split, unit = job
    framework, name, n, subset = unit
    tic = time.perf_counter()
    if framework == "mace":
        row = mace_unit(args, split, n, subset, name)
    else:
        row = mlfound_unit(args, recipes[framework][name], split, n, subset, from_scratch=framework == "mlfound")
    row = {"unit": list(unit), "inputs": unit_inputs(args, recipes, unit), "seconds": time.perf_counter() - tic,
           **row}
    from mlfound.data.files import atomic_write_bytes, json_text

    path = result_path(args.out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_text(row).encode())
    return row


def train_records(split: dict[str, Path], head: str, n: int, subset: int) -> list:
    from experiments.prepare import train_subset
    from mlfound.data.sets import load_records

    return train_subset(load_records(split["pool"], head), n, subset)


def mlfound_unit(args, recipe: dict, split: dict[str, Path], n: int, subset: int, from_scratch: bool) -> dict:
    import torch

    from mlfound.data.sets import load_records
    from mlfound.evaluate import evaluate
    from mlfound.finetune import FinetuneConfig, finetune, reinitialised
    from mlfound.release import load, resolve

    torch.set_num_threads(1)
    train = train_records(split, args.head, n, subset)
    val, test = (load_records(split[k], args.head) for k in ("val", "test"))
    recipe = dict(recipe)
    release = load(resolve(args.model))
    start = reinitialised(release, subset, **recipe.pop("model", {})) if from_scratch else release
    result = finetune(start, train, val, FinetuneConfig(head=args.head, seed=subset, **recipe), progress=False)
    return {"best_step": result.best_step, "val": evaluate(result.release, val, args.head),
            "test": evaluate(result.release, test, args.head), "history": result.history}  # where it over-fits


def mace_unit(args, split: dict[str, Path], n: int, subset: int, name: str) -> dict:
    from mlfound.data.sets import write_extxyz

    work = args.out / "mace" / f"{name}_n{n}_sub{subset}"
    work.mkdir(parents=True, exist_ok=True)
    train = write_extxyz(train_records(split, args.head, n, subset), work / "train_subset.extxyz")
    rows = {}
    for scored in ("val", "test"):  # mace_cli scores one file; the model is trained once (the val run)
        cmd = [str(MACE_PYTHON), str(MACE_CLI), "--train", str(train), "--val", str(split["val"]),
               "--test", str(split[scored]), "--out", str(work), "--seed", str(subset), "--recipe", name]
        if scored == "test":
            cmd.append("--reuse-model")
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"MACE {name} n={n} subset {subset} failed:\n{done.stderr[-3000:]}")
        rows[scored] = json.loads(done.stdout.strip().splitlines()[-1])["test"]
    return rows


def print_table(args, units: list[tuple]) -> None:
    """Mean ± std over subsets of the --evaluate-on force and energy MAE, one row per framework and recipe."""
    rows = {u: json.loads(result_path(args.out, u).read_text()) for u in units if result_path(args.out, u).exists()}
    print(f"# {args.target} ({args.head}): mlfound and mace from scratch, release fine-tuned; {args.evaluate_on} "
          f"errors (split test {args.test}, val {args.val}, seed 0), mean ± std over subsets {args.subsets}; "
          "F MAE meV/Å, E MAE meV/atom")
    names = list(dict.fromkeys((u[0], u[1]) for u in units))
    print(f"{'framework':<10}{'recipe':<22}" + "".join(f"{'N=' + str(n) + ' F':>14}{'E':>6}" for n in args.sizes))
    for framework, name in names:
        cells = []
        for n in args.sizes:
            done = [rows[u][args.evaluate_on] for u in units if u[:3] == (framework, name, n) and u in rows]
            if len(done) < len(args.subsets):
                cells.append(f"{f'({len(done)}/{len(args.subsets)})':>14}{'':>6}")
                continue
            f = [d["forces_mae_mev_a"] for d in done]
            e = [d["energy_mae_mev_atom"] for d in done]
            cells.append(f"{np.mean(f):>9.0f} ± {np.std(f):<2.0f}{np.mean(e):>6.1f}")
        print(f"{framework:<10}{name:<22}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(run_main(main))
