"""Sharding benchmark: records/s per worker and peak memory at two corpus sizes, in one table.

    python tools/bench_shard.py                      # 10^5 and 10^6 structures, 1 and 2 workers
    python tools/bench_shard.py --sizes 1e3 1e4      # a quick check

Synthetic corpora, for throughput only (not for training): the demo frames of --source (default HF/6-31G
paracetamol, 20 atoms) with every atom displaced by N(0, 0.02 Å) and the energy moved to first order
(E - F·δ, forces kept), so that the unit check accepts the labels. Each corpus is --files extxyz files of
one task (the workers' units of work). Each run is a fresh ``tools/shard_dataset.py`` process, sampled
every 50 ms with psutil: peak memory of its process tree (PSS summed, so pages shared by forked workers
count once) and of its largest process (RSS), and the CPU time of the tree. On a shared machine, wall-clock speed-up
depends on what else runs; records per CPU-second per worker shows what parallelism itself costs.
Goals (issue 13): peak RSS within 1.2x between the sizes, and records/s growing with workers. Everything
is written under --scratch and removed at the end.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from ase.io import read

from mlfound.errors import run_main

ROOT = Path(__file__).resolve().parents[1]
DISPLACEMENT_A = 0.02
BYTES_PER_ATOM = 300  # extxyz text + bucket files + shards, per atom of the corpus: for the disk check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6], help="structures per corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--files", type=int, default=8, help="extxyz files per corpus")
    p.add_argument("--source", type=Path, default=ROOT / "data" / "demo" / "hf_631g.extxyz")
    p.add_argument("--scratch", type=Path, default=ROOT / "runs" / "bench_shard")
    args = p.parse_args(argv)
    frames = read(args.source, index=":")
    sizes = [int(s) for s in args.sizes]
    need = max(sizes) * np.mean([len(a) for a in frames]) * BYTES_PER_ATOM
    args.scratch.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.scratch).free < 1.5 * need:
        print(f"error: {args.scratch} has {shutil.disk_usage(args.scratch).free / 1e9:.1f} GB free, the largest "
              f"corpus needs about {need / 1e9:.1f} GB; pass smaller --sizes or another --scratch", file=sys.stderr)
        return 2
    rows = []
    try:
        for size in sizes:
            corpus = args.scratch / f"corpus-{size}"
            sources = write_corpus(frames, size, args.files, corpus, seed=size)
            for workers in args.workers:
                out = args.scratch / f"shards-{size}-{workers}"
                load = os.getloadavg()[0]
                measured = run_sharder(sources, out, workers)
                digests = [s["sha256"] for s in json.loads((out / "bench" / "manifest.json").read_text())["shards"]]
                rows.append(dict(size=size, workers=workers, load=load, digests=digests, **measured))
                shutil.rmtree(out)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    print(f"# tools/bench_shard.py: {args.source.name} frames + N(0, {DISPLACEMENT_A} Å), {args.files} files per "
          f"corpus, {os.cpu_count()} CPUs, default --shuffle-buffer-mb")
    print(format_table(rows))
    return 0


def write_corpus(frames: list, size: int, num_files: int, folder: Path, seed: int) -> list[Path]:
    """``size`` perturbed copies of ``frames`` (cycled) in ``num_files`` extxyz files of one task."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part{k:03d}.extxyz" for k in range(num_files)]
    lot = " ".join(f"{k}={v}" for k, v in frames[0].info.items() if k.startswith("lot_") and " " not in str(v))
    bounds = np.linspace(0, size, num_files + 1).astype(int)
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:]):
        with open(path, "w") as file:
            for i in range(start, stop):
                atoms = frames[i % len(frames)]
                forces = atoms.get_forces()
                shift = rng.normal(0.0, DISPLACEMENT_A, forces.shape)
                energy = float(atoms.get_potential_energy() - (forces * shift).sum())
                file.write(f"{len(atoms)}\nProperties=species:S:1:pos:R:3:forces:R:3 energy={energy!r} "
                           f'energy_unit=eV forces_unit=eV/Ang {lot} pbc="F F F"\n')
                columns = np.hstack([atoms.positions + shift, forces])
                file.writelines(f"{s} " + " ".join(f"{x:.10f}" for x in row) + "\n"
                                for s, row in zip(atoms.get_chemical_symbols(), columns))
    return paths


def run_sharder(sources: list[Path], out: Path, workers: int) -> dict:
    """Seconds, CPU seconds of the process tree, peak memory of the tree and of its largest process (MB)."""
    command = [sys.executable, str(ROOT / "tools" / "shard_dataset.py"), *map(str, sources), "--task", "bench",
               "--out", str(out), "--workers", str(workers)]
    log = out.with_suffix(".log")  # a file, not a pipe: the progress bars would fill a pipe and block the run
    start = time.perf_counter()
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    tree = TreeSampler(proc.pid)
    while proc.poll() is None:
        tree.sample()
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    log.unlink()
    return dict(seconds=seconds, cpu_s=sum(tree.cpu_s.values()), tree_mb=tree.peak_tree / 2**20,
                process_mb=tree.peak_process / 2**20)


class TreeSampler:
    """Peak memory of the process tree (PSS summed: pages shared by forked workers counted once) and of its
    largest process (RSS), and the CPU time of every process of the tree: pool workers are the forkserver's
    children, whose usage their grandparent's rusage never sees."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_tree = self.peak_process = 0
        self.cpu_s: dict[int, float] = {}

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    memory, times = proc.memory_full_info(), proc.cpu_times()
            except psutil.NoSuchProcess:  # ended while sampled
                continue
            total += memory.pss
            self.peak_process = max(self.peak_process, memory.rss)
            self.cpu_s[proc.pid] = times.user + times.system
        self.peak_tree = max(self.peak_tree, total)


def format_table(rows: list[dict]) -> str:
    """One row per (size, workers), with the machine's load average as the run began (other jobs: on 2 cores a
    load above 1 slows 2 workers), the speed-up against 1 worker at that size and the peak memory against the
    smallest size at that worker count."""
    base = {(r["size"], r["workers"]): r for r in rows}
    smallest = min(r["size"] for r in rows)
    lines = [f"{'structures':>10} {'workers':>7} {'load':>5} {'seconds':>8} {'records/s':>9} {'per worker':>10} "
             f"{'speed-up':>8} {'CPU s':>7} {'rec/CPU-s':>9} {'same bytes':>10} {'tree PSS MB':>11} "
             f"{'largest RSS':>11} {'PSS / ' + f'{smallest:.0e}':>11}"]
    for r in rows:
        one = base[(r["size"], min(w for s, w in base if s == r["size"]))]
        small = base[(smallest, r["workers"])]
        rate = r["size"] / r["seconds"]
        same = "yes" if r["digests"] == one["digests"] else "NO"
        lines.append(f"{r['size']:>10.0e} {r['workers']:>7} {r['load']:>5.1f} {r['seconds']:>8.1f} {rate:>9.0f} "
                     f"{rate / r['workers']:>10.0f} {one['seconds'] / r['seconds']:>7.2f}x {r['cpu_s']:>7.0f} "
                     f"{r['size'] / r['cpu_s']:>9.0f} {same:>10} {r['tree_mb']:>11.0f} {r['process_mb']:>11.0f} "
                     f"{r['tree_mb'] / small['tree_mb']:>10.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
