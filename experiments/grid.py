"""The whole grid, resumable: seed by seed, that seed's pretraining runs and then its units in parallel
worker processes; and the interim report over the draws done so far."""
import concurrent.futures as cf
import json
import time
from pathlib import Path

from experiments.config import Experiment
from experiments.plan import Unit, is_done, plan_units, print_plan, result_path, start_model
from experiments.prepare import choose_single_task, make_split, prepare_starts, pretrain
from experiments.report import write_model_cards, write_report
from experiments.units import run_unit


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
    interim = "interim: " if len(complete) < len(draws) else ""
    write_report(exp, out, title, results, best_single,
                 f"{interim}{len(complete)} of {len(draws)} draws (seed, subset) complete {complete}, "
                 f"{len(results)} of {len(units)} units; {md_done} of {sum(u.md_runs for u in units)} MD runs done")


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
