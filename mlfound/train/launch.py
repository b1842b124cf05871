"""Pretraining as a command (``mlfound pretrain``): each rank runs ``main``; ``start`` starts a whole multi-rank
run from Python (the paper experiment, tools), so no code of the library names a script.

    deepspeed --num_gpus 2 --module mlfound.train.launch --config configs/demo.yaml [key=value ...] [--resume auto]
    torchrun --nproc_per_node 2 -m mlfound.train.launch --config configs/demo.yaml
    mlfound pretrain --config configs/demo.yaml          # one process
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

from mlfound.config import load_config
from mlfound.errors import run_main


def main(argv=None, prog="python -m mlfound.train.launch") -> int:
    """The command: a user error is one line and exit code 2 (also when called from Python)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher leaves it unset
    return run_main(functools.partial(pretrain, prog=prog), argv)


def pretrain(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Pretrain on many LoT tasks with DeepSpeed.\n\n"
                                     + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", help="'auto' for the latest complete checkpoint, or a checkpoint tag")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. meta.inner_steps=5")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --resume
    cfg = load_config(args.config, args.overrides)
    from mlfound.train.trainer import Trainer  # after the config is known good: importing DeepSpeed is slow

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def start(config: Path, overrides: list[str], ranks: int = 2, resume: str | None = None,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """A ``ranks``-process run of ``config`` on this machine through torchrun (one thread per rank), waited for;
    its output captured. ``env`` adds to this process's environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "mlfound.train.launch", "--config", str(config), *overrides,
           *(["--resume", resume] if resume else [])]
    return subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


if __name__ == "__main__":
    sys.exit(main())
