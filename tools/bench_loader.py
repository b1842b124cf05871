"""Loader benchmark: data wait and pace without and with background workers, side by side in one run.

    python tools/bench_loader.py --config configs/demo.yaml --workers 1 2

1. Rank 0's loader (of 2 ranks) on the config's schedule (k batches of one task per Reptile step) feeding a
   consumer that takes 0 ms (the loader alone), 5 ms or 20 ms per batch, sleeping as a host does while an
   accelerator computes: batches/s and the consumer's data-wait fraction. Pace = loader alone / 200 batches/s,
   the demand of the 5 ms consumer (the goal is >= 3). With the loader alone, the CPU time per batch spent
   in the training process and in the workers: what a batch costs however busy the machine is.
2. The config's pretraining itself (torchrun, --ranks ranks, --train-steps steps): s/step and data-wait
   fraction, averaged over every rank's log windows after the first (start-up). 2 ranks are the demo on 2 cores,
   where ranks and workers share the cores; 1 rank leaves a core to its worker, as a GPU node does.
Worker counts alternate measurement by measurement, so a change in the machine's load hits every column.
"""
import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlfound.config import load_config
from mlfound.data.throughput import loader_pace
from mlfound.errors import run_main
from mlfound.train.build import build_loader, build_sampler, load_manifests

ROOT = Path(__file__).resolve().parents[1]
CONSUMERS_MS = (0.0, 5.0, 20.0)
WARMUP_STEPS = 2


def pace(config: str, overrides: list[str], workers: int, consumer_ms: float, num_batches: int) -> dict:
    """loader_pace, plus the CPU seconds per batch spent in this (the training) process and in the workers:
    what a batch costs whatever else runs on the machine (workers' time counts from start to exit)."""
    cfg = load_config(config, [*overrides, f"data.loader_workers={workers}"])
    sampler = build_sampler(cfg, load_manifests(cfg))
    loader = build_loader(cfg, 0, 2, sampler, torch.device("cpu"))
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    num_steps = max(num_batches // loader.batches_per_step, 1)
    try:
        result = loader_pace(loader, lambda step: sampler.draw(step, 0), loader.batches_per_step,
                             consumer_ms / 1e3, num_steps, WARMUP_STEPS)
    finally:
        own = time.process_time() - own
        loader.close()
        gc.collect()  # the DataLoader iterators shut their workers down when collected
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    batches = (num_steps + WARMUP_STEPS) * loader.batches_per_step
    workers_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {**result, "own_ms": 1e3 * own / batches, "workers_ms": 1e3 * workers_s / batches}


def pretrain(config: str, overrides: list[str], workers: int, steps: int, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(ROOT / "launch" / "pretrain.py"), "--config", config, *overrides, f"run_dir={run_dir}",
               f"data.loader_workers={workers}", f"train.outer_steps={steps}", f"train.log_every={max(steps // 5, 1)}",
               f"train.save_every={steps}", f"train.eval_every={steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"pretraining with {workers} workers failed:\n{done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        windows = [json.loads(line) for rank in range(ranks)
                   for line in (Path(run_dir) / f"metrics_rank{rank}.jsonl").read_text().splitlines()[1:]]
    return {"s_per_step": sum(w["seconds_per_step"] for w in windows) / len(windows),
            "data_wait": sum(w["data_wait_fraction"] for w in windows) / len(windows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data.loader_workers to compare with 0")
    p.add_argument("--batches", type=int, default=300, help="timed batches per loader measurement")
    p.add_argument("--train-steps", type=int, default=100, help="outer steps of each pretraining run")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 1], help="ranks of each pretraining comparison")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.shard_root=runs/demo/shards")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    counts, rows = [0, *args.workers], []
    for ms in CONSUMERS_MS:
        results = [pace(args.config, args.overrides, w, ms, args.batches if ms < 20 else args.batches // 3)
                   for w in counts]
        name = "loader alone" if ms == 0 else f"consumer {ms:.0f} ms/batch"
        rows.append((f"{name}: batches/s", [r["batches_per_s"] for r in results], "{:.0f}"))
        if ms:
            rows.append((f"{name}: data wait %", [100 * r["data_wait"] for r in results], "{:.1f}"))
        else:
            rows.append(("pace vs the 5 ms consumer", [r["batches_per_s"] / 200 for r in results], "{:.2f}"))
            rows.append(("CPU ms/batch, training process", [r["own_ms"] for r in results], "{:.2f}"))
            rows.append(("CPU ms/batch, loader workers", [r["workers_ms"] for r in results], "{:.2f}"))
    for ranks in args.ranks:
        runs = [pretrain(args.config, args.overrides, w, args.train_steps, ranks) for w in counts]
        name = f"pretraining, {ranks} rank{'s' * (ranks > 1)}"
        rows.append((f"{name}: s/step", [r["s_per_step"] for r in runs], "{:.3f}"))
        rows.append((f"{name}: data wait %", [100 * r["data_wait"] for r in runs], "{:.1f}"))
    cfg = load_config(args.config, args.overrides)
    print(f"# {args.config}: {cfg.meta.method} k={cfg.meta.inner_steps}, "
          f"max {cfg.data.max_atoms_per_batch} atoms/batch, prefetch {cfg.data.loader_prefetch}; "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'measurement':<36}{'workers 0':>10}" + "".join(f"{f'workers {w}':>11}{'x w0':>7}" for w in args.workers))
    for name, values, fmt in rows:
        cells = "".join(f"{fmt.format(v):>11}" + (f"{v / values[0]:>7.2f}" if values[0] else f"{'-':>7}")
                        for v in values[1:])
        print(f"{name:<36}{fmt.format(values[0]):>10}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
