"""mlfound vs MACE and NequIP, side by side in one run, at matched sizes on the same molecules.

    bash tools/setup_peer_venvs.sh         # once: .venv-mace and .venv-nequip
    python tools/bench_peers.py            # speed: about 10 minutes on 2 cores
    python tools/bench_peers.py --accuracy # accuracy at equal recipe: about 15 minutes on 2 cores

Every framework builds a model with hidden irreps Cx0e + Cx1o (+ Cx2e), 2 layers, 5 Å cutoff and
8 Bessel functions, and times one training step (energy, forces by autograd with create_graph,
energy + force MSE, backward, Adam) and one inference step (energy and forces) on the same batch of
demo paracetamol frames, one thread each; plus one ASE force call on one molecule through each
framework's own calculator (mlfound and MACE; NequIP's needs a compiled model and is left out).
Frameworks alternate within each round and the best of the rounds' medians is kept, so machine
noise hits every framework alike. Ratios are peer time / mlfound time: above 1, mlfound is faster.
"mlfound-compiled" is the same model with ``compiled_forces`` (mlfound.model.compiled: the force
derivative traced into one graph that torch.compile fuses; its compile, minutes, is not timed) and its
inference without autograd; its ratios are the last two columns.

--accuracy trains each framework from scratch on the same N demo paracetamol structures (nested
subsets, N = 10, 50, 200 by default) with one recipe (tools/peers/common.py: fit_and_test) and tests on
the same 50, for 2 seeds each (2 workers at a time): test error at equal size, data and steps.
Ratio = peer error / mlfound error. --correlation sets the product basis of MACE and mlfound alike
(mlfound's correlation 1 is its two-body NequIP-like trunk).
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

from mlfound.errors import run_main

ROOT = Path(__file__).resolve().parents[1]
# framework -> venv, worker script, the worker's extra arguments
WORKERS = {"mlfound": (".venv", "time_mlfound.py", ()),
           "mlfound-compiled": (".venv", "time_mlfound.py", ("--compile",)),
           "nequip": (".venv-nequip", "time_nequip.py", ()), "mace": (".venv-mace", "time_mace.py", ())}


def run_worker(framework: str, l_max: int, batch: int, args, extra: tuple = ()) -> dict | None:
    venv, script, worker_args = WORKERS[framework]
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        return None
    cmd = [str(python), str(ROOT / "tools" / "peers" / script), "--data", str(args.data), "--batch", str(batch),
           "--l-max", str(l_max), "--channels", str(args.channels), "--layers", str(args.layers),
           "--correlation", str(args.correlation),
           *(("--product-l-max", str(args.product_l_max)) if args.product_l_max is not None else ()),
           "--cutoff", str(args.cutoff), "--repeats", str(args.repeats), *worker_args, *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo" / "hf_631g.extxyz")
    p.add_argument("--l-max", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="molecules per batch")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--correlation", type=int, default=3, help="product basis order, MACE's and mlfound's")
    p.add_argument("--product-l-max", type=int, help="edge directions and product-basis features to this l (MACE's "
                   "max_ell, mlfound's model.product_l_max); default: each --l-max")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per worker (median)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--accuracy", action="store_true", help="test errors at equal recipe instead of speed")
    p.add_argument("--num-train", type=int, nargs="+", default=[10, 50, 200], help="accuracy: training set sizes")
    p.add_argument("--fit-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--frameworks", nargs="+", choices=list(WORKERS),
                   help="default: all for speed; all but mlfound-compiled (the same numbers, sooner) for --accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_peers_accuracy", help="accuracy: split files")
    p.add_argument("--evaluate-on", choices=["test", "val"], default="test",
                   help="accuracy: 'val' scores on 50 held-out structures outside every training subset and the "
                        "test set, for choosing a model or recipe without looking at test")
    args = p.parse_args(argv)
    if not args.data.is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    missing = [f for f, (venv, _, _) in WORKERS.items() if not (ROOT / venv / "bin" / "python").exists()]
    if missing:
        print(f"# not set up, left out: {missing} (run bash tools/setup_peer_venvs.sh)")
    if args.accuracy:
        args.frameworks = args.frameworks or [f for f in WORKERS if f != "mlfound-compiled"]
        return accuracy(args)
    args.frameworks = args.frameworks or list(WORKERS)
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for l_max in args.l_max:
            for batch in args.batch:
                for framework in args.frameworks:
                    row = run_worker(framework, l_max, batch, args)
                    if row is None:
                        continue
                    key = (l_max, batch, framework)
                    old = best.get(key)
                    best[key] = row if old is None else {
                        **row, **{k: min(row[k], old[k]) for k in ("train_ms", "infer_ms", "calculator_ms")
                                  if row[k] is not None}}
    print(f"# {args.channels} channels, {args.layers} layers, correlation {args.correlation}, product l_max "
          f"{args.product_l_max or 'l_max'}, {args.cutoff} Å cutoff, float32, 1 thread; "
          f"best of {args.rounds} rounds of median-of-{args.repeats}")
    print(f"{'l_max':>5}{'batch':>6}{'atoms':>6}{'framework':>17}{'params':>8}{'train ms':>10}{'atoms/s':>9}"
          f"{'infer ms':>10}{'ASE ms':>8}{'peer/mlfound train':>20}{'infer':>7}{'peer/compiled train':>21}{'infer':>7}")
    for l_max in args.l_max:
        for batch in args.batch:
            for framework in args.frameworks:
                r = best.get((l_max, batch, framework))
                if r is None:
                    continue
                calc = f"{r['calculator_ms']:.1f}" if r["calculator_ms"] is not None else "-"
                ratios = ""
                for ours, width in ((best.get((l_max, batch, "mlfound")), 20), (best.get((l_max, batch, "mlfound-compiled")), 21)):
                    ratios += (f"{r['train_ms'] / ours['train_ms']:>{width}.2f}{r['infer_ms'] / ours['infer_ms']:>7.2f}"
                               if ours and not framework.startswith("mlfound") else f"{'':>{width + 7}}")
                print(f"{l_max:>5}{batch:>6}{r['atoms']:>6}{framework:>17}{r['params']:>8,}{r['train_ms']:>10.1f}"
                      f"{1e3 * r['atoms'] / r['train_ms']:>9.0f}{r['infer_ms']:>10.1f}{calc:>8}{ratios}")
    if args.json:
        args.json.write_text(json.dumps([{"l_max": k[0], "batch": k[1], **v} for k, v in best.items()], indent=1))
    return 0


def accuracy(args) -> int:
    """Every framework trained from scratch by the same recipe on the same nested subsets; test MAE mean ± std
    over seeds, one row per framework and training size."""
    import numpy as np
    from ase.io import read, write

    frames = read(args.data, index=":")
    order = np.random.default_rng(0).permutation(len(frames))
    split = {"test": order[:50], **{f"train{n}": order[50:50 + n] for n in args.num_train},
             "val": order[50 + max(args.num_train):100 + max(args.num_train)]}
    paths = {name: args.out / f"{name}.extxyz" for name in split}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, index in split.items():
        write(paths[name], [frames[i] for i in index])
    l_max, batch = args.l_max[0], 5
    jobs = [(n, framework, seed) for n in args.num_train for seed in args.seeds for framework in args.frameworks]

    def run(job):
        n, framework, seed = job
        extra = ("--fit-train", paths[f"train{n}"], "--fit-test", paths[args.evaluate_on],
                 "--fit-steps", args.fit_steps, "--seed", seed)
        row = run_worker(framework, l_max, batch, args, extra)
        return None if row is None else {**row, "num_train": n}

    with cf.ThreadPoolExecutor(2) as pool:
        rows = [r for r in pool.map(run, jobs) if r is not None]
    print(f"# {args.channels} channels, l_max {l_max}, {args.layers} layers, correlation {args.correlation}, "
          f"{args.cutoff} Å cutoff, float32; N train / 50 {args.evaluate_on} structures, {batch} per batch, "
          f"{args.fit_steps} steps, mean ± std over seeds {args.seeds}")
    print(f"{'N':>4}{'framework':>10}{'params':>8}{'ms/step':>9}{'E MAE meV/atom':>17}{'F MAE meV/Å':>15}"
          f"{'peer/mlfound F':>16}")
    for n in args.num_train:
        of_n = [r for r in rows if r["num_train"] == n]
        mean_f = {f: np.mean([r["forces_mae_mev_a"] for r in of_n if r["framework"] == f])
                  for f in {r["framework"] for r in of_n}}  # a framework without its venv has no rows
        for framework in args.frameworks:
            runs = [r for r in of_n if r["framework"] == framework]
            if not runs:
                continue
            e = [r["energy_mae_mev_atom"] for r in runs]
            f = [r["forces_mae_mev_a"] for r in runs]
            ms = np.mean([1e3 * r["train_seconds"] / r["steps"] for r in runs])
            ratio = (f"{mean_f[framework] / mean_f['mlfound']:>16.2f}" if framework != "mlfound" and "mlfound" in mean_f
                     else f"{'':>16}")
            print(f"{n:>4}{framework:>10}{runs[0]['params']:>8,}{ms:>9.1f}{np.mean(e):>9.1f} ± {np.std(e):<5.1f}"
                  f"{np.mean(f):>9.0f} ± {np.std(f):<3.0f}{ratio}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
