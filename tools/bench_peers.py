"""mlfound vs MACE and NequIP, side by side in one run, at matched sizes on the same molecules.

    bash tools/setup_peer_venvs.sh         # once: .venv-mace and .venv-nequip
    python tools/bench_peers.py            # about 10 minutes on 2 cores

Every framework builds a model with hidden irreps Cx0e + Cx1o (+ Cx2e), 2 layers, 5 Å cutoff and
8 Bessel functions, and times one training step (energy, forces by autograd with create_graph,
energy + force MSE, backward, Adam) and one inference step (energy and forces) on the same batch of
demo paracetamol frames, one thread each; plus one ASE force call on one molecule through each
framework's own calculator (mlfound and MACE; NequIP's needs a compiled model and is left out).
Frameworks alternate within each round and the best of the rounds' medians is kept, so machine
noise hits every framework alike. Ratios are peer time / mlfound time: above 1, mlfound is faster.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = {"mlfound": (".venv", "time_mlfound.py"), "nequip": (".venv-nequip", "time_nequip.py"),
           "mace": (".venv-mace", "time_mace.py")}


def run_worker(framework: str, l_max: int, batch: int, args) -> dict | None:
    venv, script = WORKERS[framework]
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        return None
    cmd = [str(python), str(ROOT / "tools" / "peers" / script), "--data", str(args.data), "--batch", str(batch),
           "--l-max", str(l_max), "--channels", str(args.channels), "--layers", str(args.layers),
           "--cutoff", str(args.cutoff), "--repeats", str(args.repeats)]
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
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per worker (median)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    missing = [f for f, (venv, _) in WORKERS.items() if not (ROOT / venv / "bin" / "python").exists()]
    if missing:
        print(f"# not set up, left out: {missing} (run bash tools/setup_peer_venvs.sh)")
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for l_max in args.l_max:
            for batch in args.batch:
                for framework in WORKERS:
                    row = run_worker(framework, l_max, batch, args)
                    if row is None:
                        continue
                    key = (l_max, batch, framework)
                    old = best.get(key)
                    best[key] = row if old is None else {
                        **row, **{k: min(row[k], old[k]) for k in ("train_ms", "infer_ms", "calculator_ms")
                                  if row[k] is not None}}
    print(f"# {args.channels} channels, {args.layers} layers, {args.cutoff} Å cutoff, float32, 1 thread; "
          f"best of {args.rounds} rounds of median-of-{args.repeats}")
    print(f"{'l_max':>5}{'batch':>6}{'atoms':>6}{'framework':>10}{'params':>8}{'train ms':>10}{'atoms/s':>9}"
          f"{'infer ms':>10}{'ASE ms':>8}{'peer/mlfound train':>20}{'infer':>7}")
    for l_max in args.l_max:
        for batch in args.batch:
            ours = best.get((l_max, batch, "mlfound"))
            for framework in WORKERS:
                r = best.get((l_max, batch, framework))
                if r is None:
                    continue
                calc = f"{r['calculator_ms']:.1f}" if r["calculator_ms"] is not None else "-"
                ratios = (f"{r['train_ms'] / ours['train_ms']:>20.2f}{r['infer_ms'] / ours['infer_ms']:>7.2f}"
                          if ours and framework != "mlfound" else f"{'':>27}")
                print(f"{l_max:>5}{batch:>6}{r['atoms']:>6}{framework:>10}{r['params']:>8,}{r['train_ms']:>10.1f}"
                      f"{1e3 * r['atoms'] / r['train_ms']:>9.0f}{r['infer_ms']:>10.1f}{calc:>8}{ratios}")
    if args.json:
        args.json.write_text(json.dumps([{"l_max": k[0], "batch": k[1], **v} for k, v in best.items()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
