"""An experiment as one YAML file (configs/experiments/): the corpus and how it is pretrained, the target,
the fine-tuning recipes, MACE and MD, and the RunConfig each pretraining run gets from them. It is checked
whole when loaded, so a typo fails before hours of pretraining and not after."""
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlfound.config import ConfigError, describe, load_config, load_validated
from mlfound.finetune import FinetuneConfig
from mlfound.meta.methods import METHODS, method_fields

ROOT = Path(__file__).resolve().parents[1]  # the repository: relative paths of an experiment are relative to it
MACE_PYTHON = ROOT / ".venv-mace" / "bin" / "python"
MACE_CLI = ROOT / "tools" / "peers" / "mace_cli.py"
MACE_RECIPES = ROOT / "configs" / "peers" / "mace_recipes.yaml"  # what mace_cli.py --recipe NAME trains
PRETRAIN_CHECKPOINTS = 20  # per pretraining run, so a run killed midway resumes, losing at most 5% of it
# FinetuneConfig fields the tool sets for every recipe alike, so recipes differ only in how they train
SET_BY_THE_TOOL = {"head": "it is target.head", "max_steps": "set finetune.max_steps (one budget for every recipe)",
                   "seed": "the subset index seeds each fine-tune"}
COTRAIN = "cotrain"  # the scratch start fine-tuned with the replay recipes: corpus and target from random weights
RECIPE_FIELDS = [field for field in FinetuneConfig.model_fields if field not in SET_BY_THE_TOOL]


def _from_root(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


RootPath = Annotated[Path, AfterValidator(_from_root)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pretrain(_Strict):
    corpus: RootPath  # every *.extxyz here is sharded into `shards` when a task has none there
    shards: RootPath  # where the corpus is sharded (reused when every task's manifest is there)
    config: RootPath  # the pretraining RunConfig; run_dir, seed and data.shard_root are set by the tool
    overrides: list[str] = []  # dotted overrides of `config` for every method (and the scratch model)
    grad_steps: int = Field(3000, ge=1)  # gradient steps per rank, every method
    # names of mlfound/meta/methods.py, each pretrained once per seed
    methods: list[str] = ["single", "joint", "reptile_k1", "reptile_k5", "reptile_k20"]
    seeds: list[int] = Field([0, 1, 2], min_length=1)  # pretraining seeds (MACE's training seeds too)

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: use names of mlfound/meta/methods.py: {sorted(METHODS)}")
        return methods


class Target(_Strict):
    file: RootPath  # extxyz of the target LoT with energies and forces
    head: str  # the new head fine-tuned for the target LoT
    test: int = Field(50, ge=1)  # structures held out for testing
    # structures held out for validation (recipe choice, early stopping); the rest is the training pool
    val: int = Field(25, ge=1)
    scan: RootPath | None = None  # a torsion scan at the target LoT, for the smoothness columns


class Finetune(_Strict):
    sizes: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)  # training-set sizes N
    subsets: list[int] = Field([0, 1], min_length=1)  # nested draws of N structures per size (seeded by the index)
    max_steps: int = Field(2000, ge=1)  # steps of every fine-tune, every recipe
    recipes: dict[str, dict[str, Any]] = Field(min_length=1)  # name -> FinetuneConfig fields

    @field_validator("recipes")
    @classmethod
    def _finetune_fields(cls, recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each recipe as FinetuneConfig reads it, so a typo fails here and not after hours of pretraining."""
        return {name: _check_recipe(name, recipe or {}) for name, recipe in recipes.items()}


class Mace(_Strict):
    enabled: bool = False  # MACE from scratch on the same splits and subsets (needs .venv-mace)
    # of configs/peers/mace_recipes.yaml: one name for every N, or one per fine-tuning size ({10: plain, 50:
    # plain_6k}), as MACE's best recipe on validation depends on N; "grid" is what E1/E2 first ran
    recipe: str | dict[int, str] = "grid"
    max_epochs: int | None = Field(None, ge=1)  # None: mace_cli.py's own default

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe: str | dict[int, str]) -> str | dict[int, str]:
        for name in [recipe] if isinstance(recipe, str) else recipe.values():
            if name not in mace_recipes():
                raise ValueError(f"{name!r} is not a recipe of {repo_relative(MACE_RECIPES)}: {sorted(mace_recipes())}")
        return recipe

    def recipe_at(self, n: int) -> str:
        """The recipe MACE trains with on N structures."""
        return self.recipe if isinstance(self.recipe, str) else self.recipe[n]


def mace_recipes() -> dict[str, dict[str, Any]]:
    """MACE's training recipes by name (configs/peers/mace_recipes.yaml)."""
    return yaml.safe_load(MACE_RECIPES.read_text())


class Md(_Strict):
    n: int = Field(ge=1)  # the fine-tuning size whose models run MD
    runs: int = Field(10, ge=1)  # per method
    steps: int = Field(4000, ge=1)  # Langevin steps per run
    temperature_k: float = Field(600.0, gt=0)  # Langevin temperature
    timestep_fs: float = Field(0.5, gt=0)  # time step


class Goal(_Strict):
    """What the report checks (issue 12, item 5): at N = n the best pretrained start's test force MAE is
    ``below_scratch`` (a fraction) under scratch's and ``better_than_mace`` times under MACE's, and every
    Reptile start is ahead of joint. The report says which hold; with no results at N = n it says so."""
    n: int = Field(50, ge=1)  # the training size the goal is judged at
    # the best pretrained start's test force MAE at least this fraction below scratch's
    below_scratch: float = Field(0.30, gt=0, lt=1)
    better_than_mace: float = Field(1.5, gt=0)  # and at least this many times below MACE's


class Experiment(_Strict):
    pretrain: Pretrain
    target: Target
    finetune: Finetune
    mace: Mace = Mace()
    md: Md | None = None  # None: no MD stability runs
    goal: Goal = Goal()


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
    if isinstance(exp.mace.recipe, dict) and (missing := sorted(set(exp.finetune.sizes) - set(exp.mace.recipe))):
        raise ConfigError(f"invalid experiment {path}: mace.recipe has no recipe for N = {missing} of finetune.sizes "
                          f"{exp.finetune.sizes}: give one per size, or one name for every N")
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


def finetune_config(exp: Experiment, recipe: dict[str, Any], seed: int) -> FinetuneConfig:
    """What a fine-tune with ``recipe`` runs: the recipe over FinetuneConfig's defaults, plus what the tool sets."""
    return FinetuneConfig(**recipe, head=exp.target.head, max_steps=exp.finetune.max_steps, seed=seed)


def resolved_recipes(exp: Experiment, start: str) -> dict[str, dict[str, Any]]:
    """Each of ``start``'s recipes as the FinetuneConfig it runs (the per-unit seed left out): what a cached
    result is checked against, so a recipe is not reused after a default it leaves unset changed."""
    return {name: finetune_config(exp, recipe, seed=0).model_dump(mode="json", exclude={"seed"})
            for name, recipe in recipes_for(exp, start).items()}


def starts(exp: Experiment) -> list[str]:
    """Every start fine-tuned: scratch, co-training when a recipe replays, the pretraining methods."""
    return ["none", *([COTRAIN] if recipes_for(exp, COTRAIN) else []), *exp.pretrain.methods]


def outer_steps(method: str, grad_steps: int) -> int:
    """Outer steps of a run of ``grad_steps`` gradient steps per rank (each outer step takes k)."""
    return max(grad_steps // method_fields(method)["inner_steps"], 1)


def method_overrides(method: str, grad_steps: int) -> list[str]:
    """Overrides of each method, all at ``grad_steps`` gradient steps per rank."""
    return [f"meta.method={method}", f"train.outer_steps={outer_steps(method, grad_steps)}"]


def run_overrides(exp: Experiment, method: str, run_dir: Path, seed: int, single_task: str | None) -> list[str]:
    """Everything the tool sets on pretrain.config for one run; ``none`` (scratch) only the shared part."""
    shared = [f"run_dir={run_dir}", f"seed={seed}", f"data.shard_root={exp.pretrain.shards}",
              *exp.pretrain.overrides]
    if method == "none":
        return shared
    single = [f"meta.single_task={single_task}"] if method == "single" else []
    checkpoint_every = max(outer_steps(method, exp.pretrain.grad_steps) // PRETRAIN_CHECKPOINTS, 1)
    quiet = ["train.eval_every=null", "train.log_every=null", f"train.save_every={checkpoint_every}"]
    return [*shared, *quiet, *method_overrides(method, exp.pretrain.grad_steps), *single]


def pretrain_config(exp: Experiment, method: str, run_dir: Path, seed: int, single_task: str | None = None):
    """The RunConfig of one run (``single`` without ``single_task``: the first task, to check the config)."""
    if method == "single" and single_task is None:
        single_task = load_config(exp.pretrain.config, run_overrides(exp, "none", run_dir, seed, None)).data.tasks[0]
    return load_config(exp.pretrain.config, run_overrides(exp, method, run_dir, seed, single_task))


def portable(value):
    """``value`` (JSON) with paths inside the repository relative to it, so that a grid's record reads the
    same in every clone."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return repo_relative(Path(value))
    return value


def repo_relative(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
