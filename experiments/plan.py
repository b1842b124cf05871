"""The grid's units (a start model fine-tuned on N structures of one subset, or MACE trained on them), their
order, and where each one's result lives; a result counts as done only if made from the same inputs."""
import dataclasses
import json
from pathlib import Path

from experiments.config import (
    COTRAIN,
    MACE_CLI,
    MACE_PYTHON,
    ROOT,
    Experiment,
    mace_recipes,
    portable,
    recipes_for,
    resolved_recipes,
    starts,
)
from mlfound.data.files import sha256_file
from mlfound.finetune import as_recorded


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


def start_model(out: Path, method: str, seed: int) -> Path:
    return out / "models" / f"{'none' if method == COTRAIN else method}_s{seed}.safetensors"


def result_path(out: Path, unit: Unit) -> Path:
    return out / "results" / f"{unit.name}.json"


def finetuned_model(out: Path, unit: Unit) -> Path:
    return out / "finetuned" / f"{unit.name}.safetensors"


def unit_inputs(exp: Experiment, out: Path, unit: Unit) -> dict:
    """What a unit's result depends on beyond the splits (check_same_models guards those): for a fine-tune, its
    start model's sha256, so a result is never reused with a start model made again differently, and the
    FinetuneConfig each recipe resolves to, so a recipe is not reused after a default it leaves unset changed;
    for MACE, its recipe's fields, so a recipe edited under the same name runs again."""
    md = exp.md.model_dump(exclude={"n", "runs"}) if unit.md_runs else None
    if unit.method == "mace":
        recipe = exp.mace.recipe_at(unit.n)
        return {"recipe": recipe, "recipe_fields": mace_recipes()[recipe],
                "max_epochs": exp.mace.max_epochs, "md_runs": unit.md_runs, "md": md}
    training = {"max_steps": exp.finetune.max_steps, "recipes": resolved_recipes(exp, unit.method)} if unit.n \
        else {"max_steps": 0}
    start = {"start_sha256": sha256_file(start_model(out, unit.method, unit.seed))}
    return portable({**training, **start, "md_runs": unit.md_runs, "md": md})


def is_done(exp: Experiment, out: Path, unit: Unit) -> bool:
    """Whether ``unit``'s result is on disk, made from today's inputs (FinetuneConfig fields added since, at their
    defaults, change nothing)."""
    path = result_path(out, unit)
    if not path.exists():
        return False
    recorded = json.loads(path.read_text()).get("inputs", {})
    inputs = unit_inputs(exp, out, unit)
    if isinstance(inputs.get("recipes"), dict) and isinstance(recorded.get("recipes"), dict):
        inputs["recipes"] = {name: as_recorded(config, recorded["recipes"].get(name, {}))
                             for name, config in inputs["recipes"].items()}
    return recorded == inputs
