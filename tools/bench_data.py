"""Data benchmark: per-rank records/s and atoms/s of shard read + decode + batching + neighbour lists.

    python tools/bench_data.py runs/demo/shards --world-size 2

Ranks are simulated one after another in this process (each reads only its own shards), so the
figures are per rank on one core; the stage columns are measured in the same run and compared
as ratios, since timings on shared machines are noisy.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from mlfound.data.throughput import format_table, measure
from mlfound.errors import run_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_root", type=Path, help="folder with one <task>/manifest.json per task")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--records", type=int, default=2000, help="records per rank and stage")
    p.add_argument("--max-atoms", type=int, default=256)
    p.add_argument("--cutoff", type=float, default=5.0, help="neighbour-list cutoff (Å)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task_dirs = sorted(d.parent for d in args.shard_root.glob("*/manifest.json"))
    if not task_dirs:
        print(f"error: no <task>/manifest.json under {args.shard_root}; run tools/shard_dataset.py first",
              file=sys.stderr)
        return 2
    rows = [(d.name, rank, measure(d, rank, args.world_size, args.records, args.max_atoms, args.cutoff))
            for d in task_dirs for rank in range(args.world_size)]
    print(f"# data pipeline, {args.world_size} simulated ranks, max {args.max_atoms} atoms/batch, "
          f"cutoff {args.cutoff} Å, {args.records} records per rank and stage, pid {os.getpid()}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
