"""The grid's report: mean ± std over seeds x subsets per method and N (table.txt, and the force table as
markdown in table.md), the verdict on the experiment's goal, every unit's result (results.json), the learning
curves (learning_curve.png), MD stability, and a model card per pretrained start."""
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from experiments.config import COTRAIN, ROOT, Experiment, portable, recipes_for, repo_relative, starts
from mlfound.data.files import atomic_write_bytes, json_text
from mlfound.evaluate import plot_learning_curves
from mlfound.md_stability import StabilityRun, stability_summary
from mlfound.model_card import card_from_results


def md_summaries(results: list[dict]) -> dict[str, dict]:
    """stability_summary per method, over the MD runs of its units."""
    fields = [field.name for field in dataclasses.fields(StabilityRun)]
    runs: dict[str, list] = {}
    for r in results:
        if r.get("md"):
            runs.setdefault(r["method"], []).extend(StabilityRun(**{k: run[k] for k in fields})
                                                    for run in r["md"]["runs"])
    return {method: stability_summary(method_runs) for method, method_runs in runs.items()}


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
            losses = [min(r["validation_loss"].values()) for r in runs if r.get("validation_loss")]
            cell["val"] = (float(np.mean(losses)), float(np.std(losses))) if losses else None
            chosen = [r.get("recipe") for r in runs]
            cell["recipes"] = ", ".join(f"{name} {chosen.count(name)}/{len(runs)}"
                                        for name in recipes_for(exp, method)) if all(chosen) else ""
            rows.append(cell)
    return rows


def write_report(exp: Experiment, out: Path, title: str, results: list[dict], best_single: str,
                 headline: str) -> dict:
    md, rows = md_summaries(results), summarise(exp, results)
    verdict = verdict_lines(exp, rows)
    lines = [*table_lines(exp, rows, results, best_single, headline), *md_lines(exp, md),
             *(f"# {line}" for line in verdict)]
    table = "\n".join(line.rstrip() for line in lines)
    print(table)
    atomic_write_bytes(out / "table.txt", (table + "\n").encode())
    markdown = [f"<!-- {headline} -->", *markdown_lines(exp, rows, best_single), "",
                *(f"- {line}" for line in verdict)]
    atomic_write_bytes(out / "table.md", ("\n".join(markdown) + "\n").encode())
    report = {"experiment": portable(exp.model_dump(mode="json")), "best_single": best_single, "units": results,
              "md_summary": md}
    atomic_write_bytes(out / "results.json", json_text(report).encode())
    curves = {}
    for r in results:
        if r["n"]:
            curves.setdefault(r["method"], {}).setdefault(r["n"], []).append(r["test"])
    plot_learning_curves(curves, out / "learning_curve.png",
                         f"{title}: new head {exp.target.head} ({exp.target.file.name}), test error")
    print(f"wrote {out / 'table.txt'}, table.md, results.json, learning_curve.png")
    return report


def write_model_cards(exp: Experiment, out: Path, report: dict) -> None:
    """One model card per pretrained start: its learning curve next to scratch, MACE and references."""
    command = shlex.join(["python", repo_relative(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    for method in exp.pretrain.methods:
        for seed in exp.pretrain.seeds:
            card = card_from_results(report, method, seed, command, ROOT)
            atomic_write_bytes(out / "model_cards" / f"{method}_s{seed}.json",
                               json_text(card.model_dump(mode="json")).encode())
    print(f"wrote {out / 'model_cards'}/")


def table_lines(exp: Experiment, rows: list[dict], results: list[dict], best_single: str, headline: str) -> list:
    ft, p = exp.finetune, exp.pretrain
    tuned = [r for r in results if r["n"] and r["method"] != "mace"]
    mace_recipe = exp.mace.recipe if isinstance(exp.mace.recipe, str) else \
        ", ".join(f"{name} at N = {n}" for n, name in sorted(exp.mace.recipe.items()))
    at_cap = sum(r["best_step"] == ft.max_steps for r in tuned)
    recipes = "; ".join(f"{name} {json.dumps(portable(recipe))}" for name, recipe in ft.recipes.items())
    scratch = ", ".join(recipes_for(exp, "none"))
    cotrain = f", {COTRAIN} (the scratch start with {', '.join(recipes_for(exp, COTRAIN))}: corpus and target " \
        "trained together from random weights)" if COTRAIN in starts(exp) else ""
    lines = [f"# {headline}; best single LoT: {best_single}",
             f"# pretraining: {p.grad_steps} gradient steps per rank, config {repo_relative(p.config)} {p.overrides}",
             f"# fine-tuning recipes, at most {ft.max_steps} steps each: {recipes}",
             f"# pretrained starts run every recipe, scratch (none) only {scratch}{cotrain}",
             "# each fine-tune keeps the recipe with the lowest validation loss (val loss: the fine-tuning loss on "
             "the target's validation split); only that one is tested; "
             f"{at_cap} of {len(tuned)} kept fine-tunes were best at the last step",
             f"# test errors mean ± std over `runs` draws of {len(p.seeds)} seeds x {len(ft.subsets)} subsets "
             f"(n = 0: zero-shot, refitted references; mace: MACE from scratch, same splits, recipe {mace_recipe})",
             f"{'method':<13}{'N':>4}{'runs':>5}{'E MAE meV/atom':>18}{'F MAE meV/Å':>16}{'train F MAE':>14}"
             f"{'val loss x1e3':>16}{'scan d2 err meV':>18}{'spurious':>11}  recipe chosen"]
    for r in rows:
        val = tuple(1e3 * v for v in r["val"]) if r.get("val") else None
        lines.append(f"{r['method']:<13}{r['n']:>4}{r['runs']:>5}{_pm(r['e_mae']):>18}{_pm(r['f_mae'], 0):>16}"
                     f"{_pm(r['f_train'], 0):>14}{_pm(val):>16}{_pm(r['d2']):>18}{_pm(r['spurious']):>11}"
                     f"  {r['recipes']}")
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


def verdict_lines(exp: Experiment, rows: list[dict]) -> list[str]:
    """The goal (exp.goal) as measured: at N = goal.n the pretrained start with the lowest mean validation loss
    (chosen as a user would, never on test) against scratch and MACE on test force MAE, and each Reptile start
    against joint at every N; met or missed, with the numbers."""
    goal = exp.goal
    f_mae = {(r["method"], r["n"]): r["f_mae"][0] for r in rows if r["n"] and r["f_mae"]}
    val = {r["method"]: r["val"][0] for r in rows if r["n"] == goal.n and r.get("val")}
    pretrained = {m: f_mae[m, goal.n] for m in exp.pretrain.methods if (m, goal.n) in f_mae and m in val}
    if not pretrained or ("none", goal.n) not in f_mae:
        return [f"goal: no pretrained start and scratch fine-tuned on N = {goal.n} yet, so no verdict"]
    best = min(pretrained, key=val.get)
    below = 1 - pretrained[best] / f_mae["none", goal.n]
    lines = [f"goal at N = {goal.n}: the best pretrained start on validation, {best}, {pretrained[best]:.0f} meV/Å; "
             f"scratch {f_mae['none', goal.n]:.0f}: {below:.0%} lower (goal ≥ {goal.below_scratch:.0%}: "
             f"{_met(below >= goal.below_scratch)})"]
    lowest_on_test = min(pretrained, key=pretrained.get)
    if pretrained[lowest_on_test] < pretrained[best]:
        lines.append(f"on test {lowest_on_test} is lower, {pretrained[lowest_on_test]:.0f} meV/Å; the verdict "
                     "keeps the start chosen on validation")
    if ("mace", goal.n) in f_mae:
        ratio = f_mae["mace", goal.n] / pretrained[best]
        lines.append(f"MACE from scratch {f_mae['mace', goal.n]:.0f} meV/Å: {ratio:.2f}× the best pretrained start's "
                     f"(goal ≥ {goal.better_than_mace:g}×: {_met(ratio >= goal.better_than_mace)})")
    else:
        lines.append("MACE from scratch: no results at this N (mace.enabled false or not run yet), no verdict")
    sizes = [n for n in exp.finetune.sizes if ("joint", n) in f_mae]
    for method in [m for m in exp.pretrain.methods if m not in ("single", "joint")] if sizes else []:
        change = {n: f_mae[method, n] / f_mae["joint", n] - 1 for n in sizes if (method, n) in f_mae}
        ahead = len(change) == len(sizes) and all(c < 0 for c in change.values())
        lines.append(f"{method} vs joint, force MAE change at N = {', '.join(map(str, change))}: "
                     f"{', '.join(f'{c:+.0%}' for c in change.values())} (goal ahead at every N: {_met(ahead)})")
    return lines


def markdown_lines(exp: Experiment, rows: list[dict], best_single: str) -> list[str]:
    """Test force MAE per start and N as a markdown table, the lowest mlfound mean of each N in bold."""
    sizes = exp.finetune.sizes
    cells = {(r["method"], r["n"]): r for r in rows if r["n"] and r["f_mae"]}
    runs = sorted({r["runs"] for r in cells.values()})
    best = {n: min((round(r["f_mae"][0]) for (m, size), r in cells.items() if size == n and m != "mace"),
                   default=None) for n in sizes}
    labels = {"none": "scratch (`none`, target alone)", COTRAIN: f"co-training (`{COTRAIN}`)",
              "single": f"single ({best_single})", "joint": "joint", "mace": "MACE from scratch"}
    header = f"| test F MAE meV/Å, {'/'.join(map(str, runs))} run{'s' * (runs != [1])} | "
    lines = [header + " | ".join(f"N = {n}" for n in sizes) + " |",
             "|---" * (len(sizes) + 1) + "|"]
    for method in [*starts(exp), "mace"]:
        if not any((method, n) in cells for n in sizes):
            continue
        label = labels.get(method) or (f"Reptile k = {method.removeprefix('reptile_k')}"
                                       if method.startswith("reptile_k") else f"`{method}`")
        row = []
        for n in sizes:
            mean_std = cells[method, n]["f_mae"] if (method, n) in cells else None
            text = f"{mean_std[0]:.0f}" if mean_std and runs == [1] else _pm(mean_std, 0)  # one run: no spread
            row.append(f"**{text}**" if mean_std and method != "mace" and round(mean_std[0]) == best[n] else text)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def _met(held: bool) -> str:
    return "met" if held else "missed"


def _event_kinds(events: list[str | None]) -> str:
    kinds = [("close contact" if e.startswith("atoms") else e.split(":")[0].split(" ")[0]) for e in events if e]
    return ", ".join(f"{kind} {kinds.count(kind)}" for kind in sorted(set(kinds))) or "none"


def _pm(mean_std, digits: int = 1) -> str:
    return f"{mean_std[0]:.{digits}f} ± {mean_std[1]:.{digits}f}" if mean_std else ""
