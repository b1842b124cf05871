"""Pretraining benchmark: Reptile vs joint on the same config, side by side in one run.

    torchrun --nproc_per_node 2 tools/bench_pretrain.py --config configs/demo.yaml --steps 20

Reports seconds per outer step, seconds per gradient step (an outer Reptile step takes k inner
steps plus one all-reduce; a joint step is one gradient step plus one all-reduce), atoms/s per
rank, and the ratio Reptile outer step / (k x joint step): the cost of the copy and surrogate.
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


def time_mode(config: str, mode: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    extra = ["meta.outer_lr=1e-3", "meta.outer_lr_final=1e-3"] if mode == "joint" else []
    cfg = load_config(config, [*overrides, f"meta.mode={mode}", *extra, f"run_dir=runs/bench_pretrain/{mode}"])
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
    grad_steps = steps * (cfg.meta.inner_steps if mode == "reptile" else 1)
    bytes_per_outer = communicated_bytes(trainer, warmup + steps, max(steps // 4, 2))
    return {"mode": mode, "k": cfg.meta.inner_steps if mode == "reptile" else 1, "s_outer": seconds / steps,
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
    p.add_argument("--steps", type=int, default=20, help="timed outer steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rows = [time_mode(args.config, mode, args.steps, args.warmup, args.overrides) for mode in ("reptile", "joint")]
    if rows[0]["rank"] == 0:
        print(f"# {rows[0]['world']} ranks, {args.steps} timed outer steps per mode after {args.warmup} warm-up")
        print(f"# {rows[0]['params']:,} parameters; bytes: what this rank passes to collectives (comms logger)")
        print(f"{'mode':<9}{'k':>3}{'s/outer step':>14}{'s/grad step':>13}{'atoms/s/rank':>14}{'data wait':>11}"
              f"{'KiB/outer step':>16}{'KiB/grad step':>15}")
        for r in rows:
            print(f"{r['mode']:<9}{r['k']:>3}{r['s_outer']:>14.3f}{r['s_grad']:>13.3f}{r['atoms_per_s']:>14.0f}"
                  f"{100 * r['data_wait']:>10.0f}%{r['bytes_outer'] / 1024:>16.1f}{r['bytes_grad'] / 1024:>15.1f}")
        reptile, joint = rows
        print(f"reptile outer step / (k x joint step) = {reptile['s_outer'] / (reptile['k'] * joint['s_outer']):.2f}")
        print(f"bytes per gradient step, joint / reptile = {joint['bytes_grad'] / reptile['bytes_grad']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
