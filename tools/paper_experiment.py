"""The paper's experiment at small scale (Allen et al. 2024): does pretraining on many LoTs, and
Reptile in particular, make fine-tuning on a new LoT better from little data?

    python tools/paper_experiment.py --out runs/paper            # about 46 minutes on 2 cores

It shards data/demo/ into --shards first if that folder has no shards yet (as the README's main job).

Pretraining (2 DeepSpeed ranks, equal budget of gradient steps per rank, 2 seeds each):
  none      no pretraining (the model at its random initialisation)
  single    single-task on the best single LoT (the head `auto` picks for the target)
  joint     multi-head joint training (Adam), every rank its own task per step
  reptile   k = 5 (and k = 1, k = 20 at the same number of gradient steps)
Fine-tuning: a new head for the target LoT (HF/6-31G paracetamol), `init=auto`, on N structures
from a fixed training pool, 2 subsets per N, Adam with a cosine lr decay, early stopping on a fixed
validation split; test errors on one fixed test split and the torsion-scan smoothness. Baselines:
references only, and the zero-shot pretrained head with refitted references (fine-tuning for zero
steps).
Every unit writes its result to <out>/results/ as it finishes: rerun the command to resume.
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
DEMO = ROOT / "data" / "demo"
METHODS = ("single", "joint", "reptile_k1", "reptile_k5", "reptile_k20")
SIZES = (10, 25, 50, 100, 200)
SEEDS = (0, 1)
SUBSETS = (0, 1)
HEAD = "hf_631g"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "paper")
    p.add_argument("--shards", type=Path, default=ROOT / "runs" / "demo" / "shards")
    p.add_argument("--target", type=Path, default=DEMO / "hf_631g.extxyz")
    p.add_argument("--scan", type=Path,
                   default=DEMO / "scans" / "hf_631g_paracetamol-amide_scan.extxyz")
    p.add_argument("--workers", type=int, default=2, help="parallel fine-tunes (one core each)")
    p.add_argument("--max-steps", type=int, default=2000, help="fine-tuning steps (lr decays to 1%% by the last)")
    p.add_argument("--lr", type=float, default=1e-2, help="fine-tuning lr at the start")
    p.add_argument("--grad-steps", type=int, default=3000, help="pretraining gradient steps per rank, every method")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="pretraining methods next to scratch (default: all)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    make_shards(args)
    split = make_split(args)
    models = {f"none_s{seed}": scratch_release(args, seed) for seed in SEEDS}
    best_single = choose_single_task(args, split) if "single" in args.methods else "(single not run)"
    print(f"best single LoT for the target: {best_single}", flush=True)
    for method in args.methods:
        extra = [f"meta.single_task={best_single}"] if method == "single" else []
        for seed in SEEDS:
            models[f"{method}_s{seed}"] = pretrain(args, method, seed, overrides(method, args.grad_steps) + extra)
    print(f"pretraining done after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    units = [(name, path, n, subset) for name, path in models.items() for n in [0, *args.sizes]
             for subset in (SUBSETS if n else (0,))]
    results = run_units(args, split, units)
    rows = summarise(results, args.methods, args.sizes)
    write_report(args, rows, results, best_single, time.perf_counter() - start)
    return 0


# -- data --------------------------------------------------------------------------------------
def make_shards(args) -> None:
    """The demo corpus as shards, 10% held out, exactly as the README's main job makes them."""
    if (args.shards / "gfn2_xtb" / "manifest.json").exists():
        return
    cmd = [sys.executable, str(ROOT / "tools" / "shard_dataset.py"), *map(str, sorted(DEMO.glob("*.extxyz"))),
           "--out", str(args.shards), "--val-fraction", "0.1"]
    subprocess.run(cmd, check=True)


def make_split(args) -> dict[str, Path]:
    """One fixed split of the target: 50 test, 25 validation, the rest (225) the training pool."""
    from mlfound.data.sets import load_records, split_records, write_extxyz

    out = args.out / "target"
    paths = {name: out / f"{name}.extxyz" for name in ("pool", "val", "test")}
    if not all(path.exists() for path in paths.values()):
        records = load_records(args.target, HEAD)
        for name, subset in split_records(records, {"test": 50, "val": 25, "pool": None}, seed=0).items():
            write_extxyz(subset, paths[name])
    return paths


# -- pretraining ---------------------------------------------------------------------------------
def overrides(method: str, grad_steps: int) -> list[str]:
    """configs/demo.yaml overrides of each method, all at ``grad_steps`` gradient steps per rank."""
    adam = ["meta.outer_lr=2e-3", "meta.outer_lr_final=2e-4"]
    if method in ("single", "joint"):
        return [f"meta.mode={method}", f"train.outer_steps={grad_steps}", *adam]
    k = int(method.removeprefix("reptile_k"))
    return ["meta.mode=reptile", f"meta.inner_steps={k}", f"train.outer_steps={max(grad_steps // k, 1)}"]


def pretrain(args, method: str, seed: int, overrides: list[str]) -> Path:
    """A 2-rank DeepSpeed run of launch/pretrain.py, exported as a release (skipped if already there)."""
    from mlfound.train.export import export

    release = args.out / "models" / f"{method}_s{seed}.safetensors"
    if release.exists():
        return release
    run_dir = args.out / "pretrain" / f"{method}_s{seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "pretrain.py"), "--config", str(CONFIG), f"run_dir={run_dir}", f"seed={seed}",
           f"data.shard_root={args.shards}", "train.eval_every=100000", "train.save_every=100000",
           "train.log_every=100000", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1"}
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"pretraining {method} seed {seed} failed:\n{done.stderr[-3000:]}")
    export(run_dir, release)
    print(f"pretrained {method} seed {seed} in {time.perf_counter() - tic:.0f} s", flush=True)
    return release


def scratch_release(args, seed: int) -> Path:
    """The untrained model, as a release: the 'no pretraining' starting point."""
    import torch

    from mlfound.config import load_config
    from mlfound.release import release_metadata, save_release
    from mlfound.train.build import build_potential, load_manifests

    path = args.out / "models" / f"none_s{seed}.safetensors"
    if not path.exists():
        cfg = load_config(CONFIG, [f"data.shard_root={args.shards}"])
        torch.manual_seed(seed)
        model = build_potential(cfg, load_manifests(cfg))
        save_release(model, release_metadata(model, {}, history=[{"stage": "none"}]), path)
    return path


def choose_single_task(args, split) -> str:
    """The LoT whose head, after a short joint pretraining, best explains the target (the `auto` score)."""
    from mlfound.data.sets import load_records
    from mlfound.finetune import choose_init_head, head_scores
    from mlfound.release import load

    probe = pretrain(args, "joint", SEEDS[0], overrides("joint", args.grad_steps))
    return choose_init_head(head_scores(load(probe).model, load_records(split["pool"], HEAD)))


# -- fine-tuning -------------------------------------------------------------------------------
def run_units(args, split, units) -> list[dict]:
    todo = [u for u in units if not result_path(args, *u).exists()]
    print(f"{len(units)} fine-tune units, {len(todo)} to run", flush=True)
    with cf.ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(finetune_unit, args, split, *u) for u in todo]
        for i, future in enumerate(cf.as_completed(futures), 1):
            r = future.result()
            if i % 10 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} fine-tunes done", flush=True)
            del r
    return [json.loads(result_path(args, *u).read_text()) for u in units]


def result_path(args, name: str, _path, n: int, subset: int) -> Path:
    return args.out / "results" / f"{name}_n{n}_sub{subset}.json"


def finetune_unit(args, split, name: str, path: Path, n: int, subset: int) -> dict:
    """Fine-tune ``name`` on ``n`` pool structures (n = 0: zero-shot, references refitted on 50)."""
    from mlfound.data.files import atomic_write_bytes, json_text
    from mlfound.data.sets import load_records
    from mlfound.data.sets import subset as draw
    from mlfound.evaluate import evaluate, scan_report
    from mlfound.finetune import FinetuneConfig, finetune
    from mlfound.release import load

    pool, val, test = (load_records(split[k], HEAD) for k in ("pool", "val", "test"))
    train = draw(pool, n or 50, seed=100 * subset + 7)
    cfg = FinetuneConfig(head=HEAD, lr=args.lr, max_steps=args.max_steps if n else 0, eval_every=50, patience=10,
                         seed=subset)
    tic = time.perf_counter()
    result = finetune(load(path), train, val, cfg, progress=False)
    scan_records = load_records(args.scan, HEAD)
    smoothness, *_ = scan_report(result.release, scan_records, HEAD, args.scan)
    row = {"model": name, "method": name.rsplit("_s", 1)[0], "seed": int(name.rsplit("_s", 1)[1]), "n": n,
           "subset": subset, "best_step": result.best_step, "seconds": time.perf_counter() - tic,
           "init": result.release.metadata["heads"][HEAD]["initialised_from"],
           "train": evaluate(result.release, train, HEAD), "test": evaluate(result.release, test, HEAD),
           "scan": smoothness,
           "references_only": references_only(train, test)}
    atomic_write_bytes(result_path(args, name, path, n, subset), json_text(row).encode())
    return row


def references_only(train, test) -> dict:
    """The trivial baseline: per-element references fitted on the training structures, no network."""
    from mlfound.data.references import reference_energy
    from mlfound.finetune import fit_references

    refs, _ = fit_references(train, np.zeros(len(train)))
    errors = np.array([(r.energy_ev - reference_energy(r.z, refs)) / r.num_atoms for r in test])
    forces = np.concatenate([r.forces_ev_a.ravel() for r in test])
    return {"energy_mae_mev_atom": 1e3 * float(np.abs(errors).mean()),
            "forces_mae_mev_a": 1e3 * float(np.abs(forces).mean())}


# -- report ------------------------------------------------------------------------------------
def summarise(results: list[dict], methods: list[str], sizes: list[int]) -> list[dict]:
    rows = []
    for method in ["none", *methods]:
        for n in [0, *sizes]:
            runs = [r for r in results if r["method"] == method and r["n"] == n]
            if not runs:
                continue
            cell = {"method": method, "n": n, "runs": len(runs)}
            for key, pick in (("e_mae", lambda r: r["test"]["energy_mae_mev_atom"]),
                              ("f_mae", lambda r: r["test"]["forces_mae_mev_a"]),
                              ("f_train", lambda r: r["train"]["forces_mae_mev_a"]),
                              ("d2", lambda r: r["scan"]["second_difference_rms_error_mev"]),
                              ("spurious", lambda r: r["scan"]["spurious_extrema"]),
                              ("ref_e", lambda r: r["references_only"]["energy_mae_mev_atom"]),
                              ("ref_f", lambda r: r["references_only"]["forces_mae_mev_a"])):
                values = [pick(r) for r in runs]
                cell[key] = (float(np.mean(values)), float(np.std(values)))
            rows.append(cell)
    return rows


def write_report(args, rows, results, best_single, seconds) -> None:
    from mlfound.data.files import atomic_write_bytes, json_text
    from mlfound.evaluate import plot_learning_curves

    tuned = [r for r in results if r["n"]]
    at_cap = sum(r["best_step"] == args.max_steps for r in tuned)
    lines = [f"# {len(results)} fine-tune units, {seconds / 60:.1f} min in all; best single LoT: {best_single}",
             f"# pretraining: {args.grad_steps} gradient steps per rank; fine-tuning: Adam lr {args.lr:g}, cosine decay"
             f" over at most {args.max_steps} steps; {at_cap} of {len(tuned)} fine-tunes were best at the last step",
             "# test errors mean ± std over 2 pretraining seeds x 2 subsets (n = 0: zero-shot, refitted references)",
             f"{'method':<13}{'N':>4}{'runs':>5}{'E MAE meV/atom':>18}{'F MAE meV/Å':>16}{'train F MAE':>14}"
             f"{'scan d2 err meV':>18}{'spurious':>11}"]
    for r in rows:
        lines.append(f"{r['method']:<13}{r['n']:>4}{r['runs']:>5}{_pm(r['e_mae']):>18}{_pm(r['f_mae'], 0):>16}"
                     f"{_pm(r['f_train'], 0):>14}{_pm(r['d2']):>18}{_pm(r['spurious']):>11}")
    lines.append("# references only (no network), fitted on the same N structures")
    for n in sorted({r["n"] for r in rows if r["n"]}):
        cell = next(r for r in rows if r["n"] == n)
        lines.append(f"{'references':<13}{n:>4}{'':>5}{_pm(cell['ref_e']):>18}{_pm(cell['ref_f'], 0):>16}")
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(args.out / "table.txt", (table + "\n").encode())
    atomic_write_bytes(args.out / "results.json", json_text(results).encode())
    curves = {}
    for r in results:
        if r["n"]:
            curves.setdefault(r["method"], {}).setdefault(r["n"], []).append(r["test"])
    plot_learning_curves(curves, args.out / "learning_curve.png", "new LoT (HF/6-31G paracetamol): test error")
    print(f"wrote {args.out / 'table.txt'}, results.json, learning_curve.png")


def _pm(mean_std, digits: int = 1) -> str:
    return f"{mean_std[0]:.{digits}f} ± {mean_std[1]:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
