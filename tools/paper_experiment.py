"""The paper's experiment at small scale (Allen et al. 2024): does pretraining on many LoTs, and
Reptile in particular, make fine-tuning on a new LoT better from little data? One tool, one YAML
per experiment (configs/experiments/):

    python tools/paper_experiment.py --experiment configs/experiments/demo.yaml --out runs/paper  # demo corpus
    python tools/paper_experiment.py --experiment configs/experiments/e1.yaml     # E1: paracetamol at 5 LoTs
    python tools/paper_experiment.py --experiment configs/experiments/e2.yaml     # E2: 109 drug-like molecules
    python tools/paper_experiment.py --experiment configs/experiments/e1.yaml finetune.sizes=[10,50] md.runs=4

Corpora: data/demo and data/e1 are committed, data/e2 as corpus.tar.xz (`tar -xJf data/e2/corpus.tar.xz -C
data/e2`); `python tools/make_qm_dataset.py --recipe e1-one-molecule --out data/e1 --workers 2`
(e2-many-molecules, data/e2) makes them again. Dotted overrides follow the file (defaults <
YAML < command line; unknown keys are errors naming the key, and every fine-tuning recipe is checked
against FinetuneConfig before anything runs). Relative paths in the YAML are relative to the
repository root; --out defaults to runs/<experiment>/paper.

Stages, each skipping what <out> already holds (rerun the command to resume; a pretraining run goes on from
its last checkpoint, written every 5% of the run):
  shards    pretrain.corpus/*.extxyz into pretrain.shards (10% validation) when a task has none
  pretrain  2 DeepSpeed ranks per run, pretrain.grad_steps gradient steps per rank, every method at each
            seed before that seed's units: `single` (the LoT whose head `auto` picks for the target after a
            joint run), `joint` (multi-head Adam) and `reptile_k<k>`; `none` is the model at its random
            initialisation
  finetune  a new head for the target LoT, `init=auto`, on N structures of a fixed pool (finetune.subsets
            draws per N); every recipe of finetune.recipes runs and the one whose kept weights have the lowest
            validation loss (one loss form for all) is alone tested (test split, torsion scan); scratch goes
            through the same grid with the recipes that train on the target alone, and `cotrain`, the scratch
            start with the recipes that replay pretraining data (corpus and target trained together from
            random weights), is a baseline of its own. N = 0: zero-shot (references refitted on 50 pool
            structures, no training)
  mace      MACE from scratch on the same train subsets, validation and test splits
            (tools/peers/mace_cli.py in .venv-mace; left out with a note when that venv is missing)
  md        inside the units at N = md.n: md.runs Langevin runs per method (mlfound and MACE alike) from the
            first test structure, split over the method's units at md.n, seeds 0, 1, ... within each unit
Outputs: <out>/table.txt (mean ± std over seeds x subsets), results.json, learning_curve.png, and
model_cards/<method>_s<seed>.json for every pretrained start (`mlfound export MODEL --card ...` attaches one).
Units run in rounds (every method and N at seed 0, subset 0, then the next draw), so `--report` gives a fair
interim table of a grid still running or stopped midway: it runs nothing, reports the draws whose every unit is
done, and says how much of the plan they cover.

A grid longer than one machine's life is kept in git: with --out under docs/experiments/ (its .gitignore keeps
out the bulky, remade parts), the start models and every unit's result are committed as they come, and the same
command in a fresh clone goes on from there. Paths in the record are relative to the repository, and a unit's
result holds its start model's sha256, so a result is reused only with the model it was made from.
"""
import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402

from mlfound.config import ConfigError, describe, load_config, load_validated  # noqa: E402
from mlfound.finetune import FinetuneConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MACE_PYTHON = ROOT / ".venv-mace" / "bin" / "python"
MACE_CLI = ROOT / "tools" / "peers" / "mace_cli.py"
ZERO_SHOT_REFERENCE_STRUCTURES = 50  # N = 0 refits the new head's references on this many pool structures
PRETRAIN_CHECKPOINTS = 20  # per pretraining run, so a run killed midway resumes, losing at most 5% of it
# FinetuneConfig fields the tool sets for every recipe alike, so recipes differ only in how they train
SET_BY_THE_TOOL = {"head": "it is target.head", "max_steps": "set finetune.max_steps (one budget for every recipe)",
                   "seed": "the subset index seeds each fine-tune"}
DEFAULT_ENERGY_WEIGHT = FinetuneConfig.model_fields["energy_weight"].default  # of the recipe-independent
DEFAULT_FORCES_WEIGHT = FinetuneConfig.model_fields["forces_weight"].default  # validation loss recipes compete on
COTRAIN = "cotrain"  # the scratch start fine-tuned with the replay recipes: corpus and target from random weights
RECIPE_FIELDS = [field for field in FinetuneConfig.model_fields if field not in SET_BY_THE_TOOL]


# -- experiment config -------------------------------------------------------------------------
def _from_root(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


RootPath = Annotated[Path, AfterValidator(_from_root)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pretrain(_Strict):
    corpus: RootPath  # every *.extxyz here is sharded into `shards` when a task has none there
    shards: RootPath
    config: RootPath  # the pretraining RunConfig; run_dir, seed and data.shard_root are set by the tool
    overrides: list[str] = []  # dotted overrides of `config` for every method (and the scratch model)
    grad_steps: int = Field(3000, ge=1)  # gradient steps per rank, every method
    methods: list[str] = ["single", "joint", "reptile_k1", "reptile_k5", "reptile_k20"]
    seeds: list[int] = Field([0, 1, 2], min_length=1)

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in ("single", "joint") and not re.fullmatch(r"reptile_k[1-9]\d*", m)]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: use single, joint or reptile_k<inner steps>")
        return methods


class Target(_Strict):
    file: RootPath
    head: str  # the new head fine-tuned for the target LoT
    test: int = Field(50, ge=1)
    val: int = Field(25, ge=1)
    scan: RootPath | None = None  # a torsion scan at the target LoT, for the smoothness columns


class Finetune(_Strict):
    sizes: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    subsets: list[int] = Field([0, 1], min_length=1)
    max_steps: int = Field(2000, ge=1)
    recipes: dict[str, dict[str, Any]] = Field(min_length=1)  # name -> FinetuneConfig fields

    @field_validator("recipes")
    @classmethod
    def _finetune_fields(cls, recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each recipe as FinetuneConfig reads it, so a typo fails here and not after hours of pretraining."""
        return {name: _check_recipe(name, recipe or {}) for name, recipe in recipes.items()}


class Mace(_Strict):
    enabled: bool = False
    max_epochs: int | None = Field(None, ge=1)  # None: mace_cli.py's own default


class Md(_Strict):
    n: int = Field(ge=1)  # the fine-tuning size whose models run MD
    runs: int = Field(10, ge=1)  # per method
    steps: int = Field(4000, ge=1)
    temperature_k: float = Field(600.0, gt=0)
    timestep_fs: float = Field(0.5, gt=0)


class Experiment(_Strict):
    pretrain: Pretrain
    target: Target
    finetune: Finetune
    mace: Mace = Mace()
    md: Md | None = None  # None: no MD stability runs


def _check_recipe(name: str, recipe: dict[str, Any]) -> dict[str, Any]:
    owned = [f"finetune.recipes.{name}.{key}: {SET_BY_THE_TOOL[key]}" for key in recipe if key in SET_BY_THE_TOOL]
    if owned:
        raise ValueError("; ".join(owned))
    try:
        cfg = FinetuneConfig.model_validate({"head": "new", **recipe})
    except ValidationError as err:
        problems = describe(err, prefix=f"finetune.recipes.{name}.")
        if any(e["type"] == "extra_forbidden" for e in err.errors()):
            problems += f" (recipe keys are FinetuneConfig fields: {', '.join(RECIPE_FIELDS)})"
        raise ValueError(problems) from None
    if cfg.replay is not None:  # like every path in the experiment, relative to the repository root
        cfg.replay.shard_root = _from_root(cfg.replay.shard_root)
    return {key: value for key, value in cfg.model_dump(mode="json").items() if key in recipe}


def load_experiment(path: Path, overrides: list[str] = ()) -> Experiment:
    """The experiment in ``path`` with dotted ``overrides``; a ConfigError names the file and the key."""
    exp = load_validated(Experiment, path, overrides, what="experiment")
    if exp.md is not None and exp.md.n not in exp.finetune.sizes:
        raise ConfigError(f"invalid experiment {path}: md.n {exp.md.n} is not among finetune.sizes "
                          f"{exp.finetune.sizes}: MD runs models fine-tuned on md.n structures")
    for method in ["none", *exp.pretrain.methods]:
        try:
            pretrain_config(exp, method, Path("check"), seed=0)
        except ConfigError as err:
            raise ConfigError(f"invalid experiment {path}: pretrain.overrides as `{method}` runs them: {err}") from None
    if not recipes_for(exp, "none"):
        raise ConfigError(f"invalid experiment {path}: every recipe of finetune.recipes replays pretraining data, "
                          "so scratch (trained on the target alone) has none: add one without `replay`")
    return exp


def recipes_for(exp: Experiment, start: str) -> dict[str, dict[str, Any]]:
    """The recipes a start is fine-tuned with: a pretrained start, all. Replay trains on the pretraining corpus,
    so with it the scratch start is no longer trained from scratch: `none` gets the recipes without replay (the
    from-scratch baseline) and `cotrain` those with it."""
    if start not in ("none", COTRAIN):
        return exp.finetune.recipes
    return {name: recipe for name, recipe in exp.finetune.recipes.items()
            if (recipe.get("replay") is not None) == (start == COTRAIN)}


def starts(exp: Experiment) -> list[str]:
    """Every start fine-tuned: scratch, co-training when a recipe replays, the pretraining methods."""
    return ["none", *([COTRAIN] if recipes_for(exp, COTRAIN) else []), *exp.pretrain.methods]


# -- entry point -------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, default=ROOT / "configs" / "experiments" / "demo.yaml")
    p.add_argument("--out", type=Path, help="results folder (default: runs/<experiment name>/paper)")
    p.add_argument("--workers", type=int, default=2, help="parallel fine-tunes, MACE trainings, MD runs (1 core each)")
    p.add_argument("--report", action="store_true",
                   help="write the report from the results <out> holds so far; run nothing (an interim look)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the experiment, e.g. finetune.sizes=[10]")
    args = p.parse_args(argv)
    try:
        exp = load_experiment(args.experiment, args.overrides)
        out = args.out or ROOT / "runs" / args.experiment.stem / "paper"
        if args.report and not (out / "models_made_by.json").exists():
            raise ConfigError(f"{out} holds no run of an experiment: give the grid's --out, or run it first")
        if not args.report:
            make_shards(exp)
        check_same_models(exp, out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report:
        report_so_far(exp, out, title=args.experiment.stem)
    else:
        run_experiment(exp, out, args.workers, title=args.experiment.stem)
    return 0


def run_experiment(exp: Experiment, out: Path, workers: int, title: str) -> None:
    """Seed by seed: that seed's pretraining runs, then its units, so a grid stopped midway holds whole
    draws rather than every pretraining run and no fine-tune."""
    start = time.perf_counter()
    split = make_split(exp, out)
    units = plan_units(exp)
    print_plan(exp, units)
    best_single = prepare_starts(exp, out, split)
    for seed in exp.pretrain.seeds:
        for method in exp.pretrain.methods:
            pretrain(exp, out, method, seed, best_single if method == "single" else None)
        print(f"seed {seed}: pretrained, {(time.perf_counter() - start) / 60:.1f} min in", flush=True)
        run_jobs(exp, out, split, [u for u in units if u.seed == seed], f"units of seed {seed}", workers)
    results = [json.loads(result_path(out, unit).read_text()) for unit in units]
    minutes = (time.perf_counter() - start) / 60
    report = write_report(exp, out, title, results, best_single, f"{len(results)} units, {minutes:.1f} min in all")
    write_model_cards(exp, out, report)


def report_so_far(exp: Experiment, out: Path, title: str) -> None:
    """The report over the draws (seed, subset) whose every unit is done, so that every method is compared
    on the same draws (MD runs included); runs nothing, and writes no model cards (they would quote a
    partial learning curve)."""
    units = plan_units(exp)
    draws: dict[tuple[int, int], list[Unit]] = {}
    for unit in units:
        draws.setdefault((unit.seed, unit.subset), []).append(unit)
    complete = [draw for draw, draw_units in draws.items() if all(is_done(exp, out, u) for u in draw_units)]
    results = [json.loads(result_path(out, u).read_text()) for draw in complete for u in draws[draw]]
    if not results:
        print(f"no draw (seed, subset) has all its units done in {out} yet: nothing to report")
        return
    best_single = "(single not run)"
    if "single" in exp.pretrain.methods:
        probe_done = start_model(out, "joint", exp.pretrain.seeds[0]).exists()
        best_single = choose_single_task(exp, out, make_split(exp, out)) if probe_done else "(not chosen yet)"
    md_done = sum(len(r["md"]["runs"]) for r in results if r.get("md"))
    write_report(exp, out, title, results, best_single,
                 f"interim: {len(complete)} of {len(draws)} draws (seed, subset) complete {complete}, "
                 f"{len(results)} of {len(units)} units; {md_done} of {sum(u.md_runs for u in units)} MD runs done")


# -- data --------------------------------------------------------------------------------------
def make_shards(exp: Experiment) -> None:
    """The corpus as shards, 10% held out, exactly as the README's main job makes them."""
    tasks = pretrain_config(exp, "none", Path("shards"), seed=0).data.tasks
    shards, corpus = exp.pretrain.shards, exp.pretrain.corpus
    if not _missing_tasks(shards, tasks):
        return
    sources = sorted(corpus.glob("*.extxyz"))
    if not sources:
        packed = corpus / "corpus.tar.xz"
        make = f"unpack it first: tar -xJf {packed} -C {corpus}" if packed.exists() else \
            "make the corpus first (tools/make_qm_dataset.py)"
        raise ConfigError(f"pretrain.corpus {corpus} has no *.extxyz and pretrain.shards {shards} lacks the tasks "
                          f"{_missing_tasks(shards, tasks)}: {make}")
    cmd = [sys.executable, str(ROOT / "tools" / "shard_dataset.py"), *map(str, sources), "--out", str(shards),
           "--val-fraction", "0.1"]
    subprocess.run(cmd, check=True)
    if _missing_tasks(shards, tasks):
        raise ConfigError(f"pretrain.corpus {corpus} has no data for the pretraining tasks "
                          f"{_missing_tasks(shards, tasks)} (files are named <task>.extxyz)")


def _missing_tasks(shards: Path, tasks: list[str]) -> list[str]:
    return [task for task in tasks if not (shards / task / "manifest.json").exists()]


def make_split(exp: Experiment, out: Path) -> dict[str, Path]:
    """One fixed split of the target: target.test test, target.val validation, the rest the training pool."""
    from mlfound.data.sets import load_records, split_records, write_extxyz

    paths = {name: out / "target" / f"{name}.extxyz" for name in ("pool", "val", "test")}
    if not all(path.exists() for path in paths.values()):
        records = load_records(exp.target.file, exp.target.head)
        sizes = {"test": exp.target.test, "val": exp.target.val, "pool": None}
        for name, records_of_split in split_records(records, sizes, seed=0).items():
            write_extxyz(records_of_split, paths[name])
    return paths


def train_subset(pool: list, n: int, subset: int) -> list:
    """The N training structures of ``subset``: the same for every start model and for MACE."""
    from mlfound.data.sets import subset as draw

    return draw(pool, n, seed=100 * subset + 7)


def check_same_models(exp: Experiment, out: Path) -> None:
    """Models and splits in ``out`` are reused: refuse an ``out`` made from another corpus, config or target."""
    from mlfound.data.files import atomic_write_bytes, json_text

    made_by = portable({"pretrain": exp.pretrain.model_dump(mode="json", exclude={"methods", "seeds", "shards"}),
                        "target": exp.target.model_dump(mode="json")})
    path = out / "models_made_by.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{section}.{key}" for section, now in made_by.items() for key in now
                   if before.get(section, {}).get(key) != now[key]]
        if changed:
            raise ConfigError(f"{out} holds models and splits made with other {', '.join(changed)} "
                              f"(see {path}): use another --out")
    atomic_write_bytes(path, json_text(made_by).encode())


# -- pretraining ---------------------------------------------------------------------------------
def outer_steps(method: str, grad_steps: int) -> int:
    """Outer steps of a run of ``grad_steps`` gradient steps per rank (Reptile takes k per outer step)."""
    if method in ("single", "joint"):
        return grad_steps
    return max(grad_steps // int(method.removeprefix("reptile_k")), 1)


def method_overrides(method: str, grad_steps: int) -> list[str]:
    """Overrides of each method, all at ``grad_steps`` gradient steps per rank."""
    steps = [f"train.outer_steps={outer_steps(method, grad_steps)}"]
    if method in ("single", "joint"):
        return [f"meta.mode={method}", *steps, "meta.outer_lr=2e-3", "meta.outer_lr_final=2e-4"]
    return ["meta.mode=reptile", f"meta.inner_steps={method.removeprefix('reptile_k')}", *steps]


def run_overrides(exp: Experiment, method: str, run_dir: Path, seed: int, single_task: str | None) -> list[str]:
    """Everything the tool sets on pretrain.config for one run; ``none`` (scratch) only the shared part."""
    shared = [f"run_dir={run_dir}", f"seed={seed}", f"data.shard_root={exp.pretrain.shards}",
              *exp.pretrain.overrides]
    if method == "none":
        return shared
    single = [f"meta.single_task={single_task}"] if method == "single" else []
    checkpoint_every = max(outer_steps(method, exp.pretrain.grad_steps) // PRETRAIN_CHECKPOINTS, 1)
    quiet = ["train.eval_every=100000", "train.log_every=100000", f"train.save_every={checkpoint_every}"]
    return [*shared, *quiet, *method_overrides(method, exp.pretrain.grad_steps), *single]


def pretrain_config(exp: Experiment, method: str, run_dir: Path, seed: int, single_task: str | None = None):
    """The RunConfig of one run (``single`` without ``single_task``: the first task, to check the config)."""
    if method == "single" and single_task is None:
        single_task = load_config(exp.pretrain.config, run_overrides(exp, "none", run_dir, seed, None)).data.tasks[0]
    return load_config(exp.pretrain.config, run_overrides(exp, method, run_dir, seed, single_task))


def prepare_starts(exp: Experiment, out: Path, split: dict[str, Path]) -> str:
    """The scratch starts of every seed as releases in <out>/models, and the single-task choice (from the
    first seed's joint run); returns that choice."""
    for seed in exp.pretrain.seeds:
        scratch_release(exp, out, seed)
    best_single = choose_single_task(exp, out, split) if "single" in exp.pretrain.methods else "(single not run)"
    print(f"best single LoT for the target: {best_single}", flush=True)
    return best_single


def start_model(out: Path, method: str, seed: int) -> Path:
    return out / "models" / f"{'none' if method == COTRAIN else method}_s{seed}.safetensors"


def pretrain(exp: Experiment, out: Path, method: str, seed: int, single_task: str | None = None) -> Path:
    """A 2-rank DeepSpeed run of launch/pretrain.py, exported as a release (skipped if already there);
    a run stopped midway (killed job, lost node) goes on from its last checkpoint."""
    from mlfound.train.checkpoint import latest_tag
    from mlfound.train.export import export

    release = start_model(out, method, seed)
    if release.exists():
        return release
    run_dir = out / "pretrain" / f"{method}_s{seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "pretrain.py"), "--config", str(exp.pretrain.config),
           *run_overrides(exp, method, run_dir, seed, single_task), "--resume", "auto"]
    if (tag := latest_tag(run_dir)) is not None:
        print(f"pretraining {method} seed {seed}: resuming from its checkpoint {tag}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1"}
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"pretraining {method} seed {seed} failed:\n{done.stderr[-3000:]}")
    export(run_dir, release)
    print(f"pretrained {method} seed {seed} in {time.perf_counter() - tic:.0f} s", flush=True)
    return release


def scratch_release(exp: Experiment, out: Path, seed: int) -> Path:
    """The untrained model (pretraining config and overrides, seeded), as a release: the 'none' start."""
    import torch

    from mlfound.release import release_metadata, save_release
    from mlfound.train.build import build_potential, load_manifests

    path = start_model(out, "none", seed)
    if not path.exists():
        cfg = pretrain_config(exp, "none", out / "pretrain" / f"none_s{seed}", seed)
        torch.manual_seed(seed)
        model = build_potential(cfg, load_manifests(cfg))
        save_release(model, release_metadata(model, {}, history=[{"stage": "none"}]), path)
    return path


def choose_single_task(exp: Experiment, out: Path, split: dict[str, Path]) -> str:
    """The LoT whose head, after joint pretraining, best explains the target (the `auto` score)."""
    from mlfound.data.sets import load_records
    from mlfound.finetune import choose_init_head, head_scores
    from mlfound.release import load

    probe = pretrain(exp, out, "joint", exp.pretrain.seeds[0])
    return choose_init_head(head_scores(load(probe).model, load_records(split["pool"], exp.target.head)))


# -- units and the compute plan ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Unit:
    """One start model fine-tuned on N structures of one subset (N = 0: zero-shot), or MACE trained on them."""
    method: str  # "none", "cotrain", a pretraining method, or "mace"
    seed: int  # the pretraining seed (MACE: its training seed)
    n: int
    subset: int
    md_runs: int = 0  # Langevin runs with this unit's model (units at md.n only)

    @property
    def name(self) -> str:
        return f"{self.method}_s{self.seed}_n{self.n}_sub{self.subset}"


def plan_units(exp: Experiment) -> list[Unit]:
    """Fine-tune units of every start (zero-shot once per seed) and MACE units when MACE can run, in rounds:
    every method at every N for seed 0, subset 0 first, then the next subset and seed, so a grid stopped
    midway (or its interim --report) compares all methods on the same draws. Each method's md.runs MD runs
    are split over its units at md.n in that order (run i in unit i mod their number)."""
    sizes = {method: [*([0] if method != COTRAIN else []), *exp.finetune.sizes] for method in starts(exp)}
    units = [Unit(method, seed, n, subset) for method in starts(exp) for seed in exp.pretrain.seeds
             for n in sizes[method] for subset in (exp.finetune.subsets if n else exp.finetune.subsets[:1])]
    if mace_unavailable(exp) is None:
        units += [Unit("mace", seed, n, subset) for seed in exp.pretrain.seeds for n in exp.finetune.sizes
                  for subset in exp.finetune.subsets]
    units = sorted(units, key=lambda u: (exp.pretrain.seeds.index(u.seed), exp.finetune.subsets.index(u.subset), u.n))
    if exp.md is None:
        return units
    md_runs = {}
    for method in [*starts(exp), "mace"]:
        at_md_n = [u for u in units if u.method == method and u.n == exp.md.n]
        md_runs |= {u: len(range(i, exp.md.runs, len(at_md_n))) for i, u in enumerate(at_md_n)}
    return [dataclasses.replace(u, md_runs=md_runs.get(u, 0)) for u in units]


def mace_unavailable(exp: Experiment) -> str | None:
    """Why MACE rows are left out, or None when they run."""
    if not exp.mace.enabled:
        return "mace.enabled is false"
    if not MACE_PYTHON.exists():
        return f"{MACE_PYTHON.relative_to(ROOT)} is missing (bash tools/setup_peer_venvs.sh makes it)"
    if not MACE_CLI.exists():
        return f"{MACE_CLI.relative_to(ROOT)} is missing"
    return None


def print_plan(exp: Experiment, units: list[Unit]) -> None:
    p = exp.pretrain
    num_probes = int("single" in p.methods and "joint" not in p.methods)  # the single-task choice's joint run
    probe = f" + {num_probes} joint probe for the single-task choice" if num_probes else ""
    tuned = [u for u in units if u.method != "mace" and u.n]
    mace = [u for u in units if u.method == "mace"]
    num_pretrain = len(p.methods) * len(p.seeds) + num_probes
    print(f"plan: {num_pretrain} pretraining runs ({len(p.methods)} methods x {len(p.seeds)} seeds{probe}); "
          f"{len(tuned)} fine-tune units ({', '.join(starts(exp))}) with their recipes = "
          f"{sum(len(recipes_for(exp, u.method)) for u in tuned)} fine-tunes "
          f"+ {len(units) - len(tuned) - len(mace)} zero-shot; {len(mace)} MACE units; "
          f"{sum(u.md_runs for u in units)} MD runs inside the units at N = md.n", flush=True)
    if mace_unavailable(exp):
        print(f"MACE rows are left out: {mace_unavailable(exp)}", flush=True)


# -- jobs: resumable, in parallel ----------------------------------------------------------------
def run_jobs(exp: Experiment, out: Path, split: dict[str, Path], units: list[Unit], what: str, workers: int) -> None:
    """Run the units whose result is missing or was made with other inputs."""
    todo = [unit for unit in units if not is_done(exp, out, unit)]
    print(f"{len(units)} {what}, {len(todo)} to run", flush=True)
    with cf.ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_unit, exp, out, split, unit) for unit in todo]
        for i, future in enumerate(cf.as_completed(futures), 1):
            future.result()
            if i % 10 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} {what} done", flush=True)


def result_path(out: Path, unit: Unit) -> Path:
    return out / "results" / f"{unit.name}.json"


def finetuned_model(out: Path, unit: Unit) -> Path:
    return out / "finetuned" / f"{unit.name}.safetensors"


def unit_inputs(exp: Experiment, out: Path, unit: Unit) -> dict:
    """What a unit's result depends on beyond the splits (check_same_models guards those): for a fine-tune,
    its start model's sha256, so a result is never reused with a start model made again differently."""
    from mlfound.data.files import sha256_file

    md = exp.md.model_dump(exclude={"n", "runs"}) if unit.md_runs else None
    if unit.method == "mace":
        return {"max_epochs": exp.mace.max_epochs, "md_runs": unit.md_runs, "md": md}
    training = {"max_steps": exp.finetune.max_steps, "recipes": recipes_for(exp, unit.method)} if unit.n else \
        {"max_steps": 0}
    start = {"start_sha256": sha256_file(start_model(out, unit.method, unit.seed))}
    return portable({**training, **start, "md_runs": unit.md_runs, "md": md})


def is_done(exp: Experiment, out: Path, unit: Unit) -> bool:
    path = result_path(out, unit)
    return path.exists() and json.loads(path.read_text()).get("inputs") == unit_inputs(exp, out, unit)


def run_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> None:
    from mlfound.data.files import atomic_write_bytes, json_text

    try:
        row = mace_unit(exp, out, split, unit) if unit.method == "mace" else finetune_unit(exp, out, split, unit)
    except Exception as err:  # the pool re-raises it in the parent, which should say which unit failed
        raise RuntimeError(f"unit {unit.name} failed: {type(err).__name__}: {err}") from err
    row.update(method=unit.method, inputs=unit_inputs(exp, out, unit))
    atomic_write_bytes(result_path(out, unit), json_text(row).encode())


def portable(value):
    """``value`` (JSON) with paths inside the repository relative to it, so that a grid's record reads the
    same in every clone."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return _shown(Path(value))
    return value


# -- fine-tuning -------------------------------------------------------------------------------
def finetune_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> dict:
    """Fine-tune one start with every recipe; only the recipe validation picks is tested."""
    from mlfound.data.sets import load_records
    from mlfound.evaluate import evaluate
    from mlfound.release import load, save_release

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
    from mlfound.finetune import FinetuneConfig, finetune

    if not unit.n:
        cfg = FinetuneConfig(head=exp.target.head, max_steps=0, seed=unit.subset)
        return finetune(base, train, val, cfg, progress=False), None, {}
    best, validation_loss = None, {}
    for name, recipe in recipes_for(exp, unit.method).items():
        cfg = FinetuneConfig(**recipe, head=exp.target.head, max_steps=exp.finetune.max_steps, seed=unit.subset)
        result = finetune(base, train, val, cfg, progress=False)
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
    loss = DEFAULT_ENERGY_WEIGHT * (errors["energy_rmse_mev_atom"] / 1e3) ** 2
    if errors["forces_rmse_mev_a"] == errors["forces_rmse_mev_a"]:  # not NaN: the split has forces
        loss += DEFAULT_FORCES_WEIGHT * (errors["forces_rmse_mev_a"] / 1e3) ** 2
    return loss if np.isfinite(loss) else float("inf")


def scan_smoothness(exp: Experiment, release) -> dict | None:
    from mlfound.data.sets import load_records
    from mlfound.evaluate import scan_report

    if exp.target.scan is None:
        return None
    smoothness, *_ = scan_report(release, load_records(exp.target.scan, exp.target.head), exp.target.head,
                                 exp.target.scan)
    return smoothness


def references_only(train, test) -> dict:
    """The trivial baseline: per-element references fitted on the training structures, no network."""
    from mlfound.data.references import reference_energy
    from mlfound.finetune import fit_references

    refs, _ = fit_references(train, np.zeros(len(train)))
    errors = np.array([(r.energy_ev - reference_energy(r.z, refs)) / r.num_atoms for r in test])
    forces = np.concatenate([r.forces_ev_a.ravel() for r in test])
    return {"energy_mae_mev_atom": 1e3 * float(np.abs(errors).mean()),
            "forces_mae_mev_a": 1e3 * float(np.abs(forces).mean())}


# -- MACE and MD -------------------------------------------------------------------------------
def mace_unit(exp: Experiment, out: Path, split: dict[str, Path], unit: Unit) -> dict:
    """MACE from scratch on the unit's train subset (tools/peers/mace_cli.py in its own venv)."""
    from mlfound.data.sets import load_records, write_extxyz

    train = out / "mace" / f"train_n{unit.n}_sub{unit.subset}.extxyz"
    if not train.exists():
        write_extxyz(train_subset(load_records(split["pool"], exp.target.head), unit.n, unit.subset), train)
    cmd = [str(MACE_PYTHON), str(MACE_CLI), "--train", str(train), "--val", str(split["val"]), "--test",
           str(split["test"]), "--out", str(out / "mace" / unit.name), "--seed", str(unit.seed)]
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
    from ase.io import read

    from mlfound.calculator import MLFoundCalculator
    from mlfound.md_stability import first_unphysical_event

    calc = MLFoundCalculator(release, head=exp.target.head)
    start = read(split["test"], index=0)
    return {"runs": [dataclasses.asdict(first_unphysical_event(start, calc, temperature_k=exp.md.temperature_k,
                                                               steps=exp.md.steps, timestep_fs=exp.md.timestep_fs,
                                                               seed=seed)) for seed in range(runs)]}


def md_summaries(results: list[dict]) -> dict[str, dict]:
    """stability_summary per method, over the MD runs of its units."""
    from mlfound.md_stability import StabilityRun, stability_summary

    fields = [field.name for field in dataclasses.fields(StabilityRun)]
    runs: dict[str, list] = {}
    for r in results:
        if r.get("md"):
            runs.setdefault(r["method"], []).extend(StabilityRun(**{k: run[k] for k in fields})
                                                    for run in r["md"]["runs"])
    return {method: stability_summary(method_runs) for method, method_runs in runs.items()}


# -- report ------------------------------------------------------------------------------------
METRICS = {"e_mae": ("test", "energy_mae_mev_atom"), "f_mae": ("test", "forces_mae_mev_a"),
           "f_train": ("train", "forces_mae_mev_a"), "d2": ("scan", "second_difference_rms_error_mev"),
           "spurious": ("scan", "spurious_extrema"), "ref_e": ("references_only", "energy_mae_mev_atom"),
           "ref_f": ("references_only", "forces_mae_mev_a")}


def summarise(exp: Experiment, results: list[dict]) -> list[dict]:
    """Mean and std of every metric per (method, N) over seeds x subsets, and how often each recipe won."""
    rows = []
    for method in [*starts(exp), "mace"]:
        for n in [0, *exp.finetune.sizes]:
            runs = [r for r in results if r["method"] == method and r["n"] == n]
            if not runs:
                continue
            cell = {"method": method, "n": n, "runs": len(runs)}
            for key, (part, metric) in METRICS.items():
                values = [r[part][metric] for r in runs if r.get(part) and r[part].get(metric) is not None]
                cell[key] = (float(np.mean(values)), float(np.std(values))) if values else None
            chosen = [r.get("recipe") for r in runs]
            cell["recipes"] = ", ".join(f"{name} {chosen.count(name)}/{len(runs)}"
                                        for name in recipes_for(exp, method)) if all(chosen) else ""
            rows.append(cell)
    return rows


def write_report(exp: Experiment, out: Path, title: str, results: list[dict], best_single: str,
                 headline: str) -> dict:
    from mlfound.data.files import atomic_write_bytes, json_text
    from mlfound.evaluate import plot_learning_curves

    md = md_summaries(results)
    lines = [*table_lines(exp, summarise(exp, results), results, best_single, headline), *md_lines(exp, md)]
    table = "\n".join(line.rstrip() for line in lines)
    print(table)
    atomic_write_bytes(out / "table.txt", (table + "\n").encode())
    report = {"experiment": portable(exp.model_dump(mode="json")), "best_single": best_single, "units": results,
              "md_summary": md}
    atomic_write_bytes(out / "results.json", json_text(report).encode())
    curves = {}
    for r in results:
        if r["n"]:
            curves.setdefault(r["method"], {}).setdefault(r["n"], []).append(r["test"])
    plot_learning_curves(curves, out / "learning_curve.png",
                         f"{title}: new head {exp.target.head} ({exp.target.file.name}), test error")
    print(f"wrote {out / 'table.txt'}, results.json, learning_curve.png")
    return report


def write_model_cards(exp: Experiment, out: Path, report: dict) -> None:
    """One model card per pretrained start: its learning curve next to scratch, MACE and references."""
    from mlfound.data.files import atomic_write_bytes, json_text
    from mlfound.model_card import card_from_results

    command = shlex.join(["python", _shown(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    for method in exp.pretrain.methods:
        for seed in exp.pretrain.seeds:
            card = card_from_results(report, method, seed, command, ROOT)
            atomic_write_bytes(out / "model_cards" / f"{method}_s{seed}.json",
                               json_text(card.model_dump(mode="json")).encode())
    print(f"wrote {out / 'model_cards'}/")


def table_lines(exp: Experiment, rows: list[dict], results: list[dict], best_single: str, headline: str) -> list:
    ft, p = exp.finetune, exp.pretrain
    tuned = [r for r in results if r["n"] and r["method"] != "mace"]
    at_cap = sum(r["best_step"] == ft.max_steps for r in tuned)
    recipes = "; ".join(f"{name} {json.dumps(portable(recipe))}" for name, recipe in ft.recipes.items())
    scratch = ", ".join(recipes_for(exp, "none"))
    cotrain = f", {COTRAIN} (the scratch start with {', '.join(recipes_for(exp, COTRAIN))}: corpus and target " \
        "trained together from random weights)" if COTRAIN in starts(exp) else ""
    lines = [f"# {headline}; best single LoT: {best_single}",
             f"# pretraining: {p.grad_steps} gradient steps per rank, config {_shown(p.config)} {p.overrides}",
             f"# fine-tuning recipes, at most {ft.max_steps} steps each: {recipes}",
             f"# pretrained starts run every recipe, scratch (none) only {scratch}{cotrain}",
             "# each fine-tune keeps the recipe with the lowest validation loss; only that one is tested; "
             f"{at_cap} of {len(tuned)} kept fine-tunes were best at the last step",
             f"# test errors mean ± std over `runs` draws of {len(p.seeds)} seeds x {len(ft.subsets)} subsets "
             "(n = 0: zero-shot, refitted references; mace: MACE from scratch, same splits)",
             f"{'method':<13}{'N':>4}{'runs':>5}{'E MAE meV/atom':>18}{'F MAE meV/Å':>16}{'train F MAE':>14}"
             f"{'scan d2 err meV':>18}{'spurious':>11}  recipe chosen"]
    for r in rows:
        lines.append(f"{r['method']:<13}{r['n']:>4}{r['runs']:>5}{_pm(r['e_mae']):>18}{_pm(r['f_mae'], 0):>16}"
                     f"{_pm(r['f_train'], 0):>14}{_pm(r['d2']):>18}{_pm(r['spurious']):>11}  {r['recipes']}")
    lines.append("# references only (no network), fitted on the same N structures")
    for n in ft.sizes:
        cell = next((r for r in rows if r["n"] == n and r["ref_e"]), None)
        if cell:
            lines.append(f"{'references':<13}{n:>4}{'':>5}{_pm(cell['ref_e']):>18}{_pm(cell['ref_f'], 0):>16}")
    return lines


def md_lines(exp: Experiment, summaries: dict[str, dict]) -> list[str]:
    """Per method: stable runs / runs, median and shortest time to the first event (stable runs count
    at their full length), and the kinds of events."""
    if exp.md is None:
        return []
    md = exp.md
    lines = [f"# MD stability: {md.runs} Langevin runs per method at {md.temperature_k:g} K, {md.steps} steps of "
             f"{md.timestep_fs:g} fs from the first test structure, models fine-tuned on N = {md.n} "
             "(the runs split over the method's units at that N, seeds from 0 in each); "
             "times to the first unphysical event, a stable run "
             f"counting at its full length ({md.steps * md.timestep_fs:g} fs)",
             f"{'method':<13}{'stable':>8}{'median fs':>11}{'min fs':>9}  events"]
    for method in [*starts(exp), "mace"]:
        s = summaries.get(method)
        if s:
            lines.append(f"{method:<13}{s['num_stable']:>4}/{s['num_runs']:<3}{s['median_time_fs']:>11.0f}"
                         f"{s['min_time_fs']:>9.0f}  {_event_kinds(s['events'])}")
    return lines


def _event_kinds(events: list[str | None]) -> str:
    kinds = [("close contact" if e.startswith("atoms") else e.split(":")[0].split(" ")[0]) for e in events if e]
    return ", ".join(f"{kind} {kinds.count(kind)}" for kind in sorted(set(kinds))) or "none"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _pm(mean_std, digits: int = 1) -> str:
    return f"{mean_std[0]:.{digits}f} ± {mean_std[1]:.{digits}f}" if mean_std else ""


if __name__ == "__main__":
    sys.exit(main())
