"""Pretraining benchmark: two methods (default Reptile k = 5 and joint) on the same config, side by side in one run.

    torchrun --nproc_per_node 2 tools/bench_pretrain.py --config configs/demo.yaml --steps 20

Reports seconds per outer step, seconds per gradient step (an outer step takes k inner steps plus one
all-reduce; joint's k is 1), atoms/s per rank, and the ratio of seconds per gradient step: what k inner steps
per all-reduce save.
Bytes communicated are measured by DeepSpeed's comms logger over separate steps after the timed
ones (the logger synchronises every collective, so it stays off while timing).
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from mlfound.config import load_config  # noqa: E402
from mlfound.errors import run_main  # noqa: E402
from mlfound.train.trainer import Trainer  # noqa: E402


def time_method(config: str, method: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    cfg = load_config(config, [*overrides, f"meta.method={method}", f"run_dir=runs/bench_pretrain/{method}"])
    cfg.deepspeed.extra["comms_logger"] = {"enabled": True, "prof_all": False}
    trainer = Trainer(cfg)
    for step in range(warmup):
        trainer.outer_step(trainer.tasks_of_step(step))
    trainer.take_window()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.outer_step(trainer.tasks_of_step(step))
    seconds = time.perf_counter() - start
    window = trainer.take_window()
    grad_steps = steps * cfg.meta.inner_steps
    bytes_per_outer = communicated_bytes(trainer, warmup + steps, max(steps // 4, 2))
    return {"method": method, "k": cfg.meta.inner_steps, "s_outer": seconds / steps,
            "s_grad": seconds / grad_steps, "atoms_per_s": window["atoms"] / seconds,
            "data_wait": window["data_s"] / seconds, "rank": trainer.rank, "world": trainer.world_size,
            "bytes_outer": bytes_per_outer, "bytes_grad": bytes_per_outer * steps / grad_steps,
            "params": sum(p.numel() for p in trainer.engine.module.parameters())}


def communicated_bytes(trainer: Trainer, first_step: int, steps: int) -> float:
    """Bytes this rank hands to collectives per outer step (all ops, as DeepSpeed's comms logger counts)."""
    import deepspeed.comm as dist

    dist.comms_logger.comms_dict.clear()
    dist.comms_logger.start_profiling_comms()
    for step in range(first_step, first_step + steps):
        trainer.outer_step(trainer.tasks_of_step(step))
    dist.comms_logger.stop_profiling_comms()
    total = sum(size * record[0] for sizes in dist.comms_logger.comms_dict.values() for size, record in sizes.items())
    return total / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed outer steps per method")
    p.add_argument("--methods", nargs=2, default=["reptile_k5", "joint"], metavar=("METHOD", "BASELINE"),
                   help="names of mlfound/meta/methods.py; the second is the baseline of the ratios")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rows = [time_method(args.config, method, args.steps, args.warmup, args.overrides) for method in args.methods]
    if rows[0]["rank"] == 0:
        print(f"# {rows[0]['world']} ranks, {args.steps} timed outer steps per method after {args.warmup} warm-up")
        print(f"# {rows[0]['params']:,} parameters; bytes: what this rank passes to collectives (comms logger)")
        print(f"{'method':<15}{'k':>3}{'s/outer step':>14}{'s/grad step':>13}{'atoms/s/rank':>14}{'data wait':>11}"
              f"{'KiB/outer step':>16}{'KiB/grad step':>15}")
        for r in rows:
            print(f"{r['method']:<15}{r['k']:>3}{r['s_outer']:>14.3f}{r['s_grad']:>13.3f}{r['atoms_per_s']:>14.0f}"
                  f"{100 * r['data_wait']:>10.0f}%{r['bytes_outer'] / 1024:>16.1f}{r['bytes_grad'] / 1024:>15.1f}")
        method, baseline = rows
        print(f"s/grad step, {method['method']} / {baseline['method']} = {method['s_grad'] / baseline['s_grad']:.2f}")
        print(f"bytes per gradient step, {baseline['method']} / {method['method']} = "
              f"{baseline['bytes_grad'] / method['bytes_grad']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
