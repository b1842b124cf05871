"""Pretrain on many LoT tasks with DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/demo.yaml [key=value ...] [--resume auto] [key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/demo.yaml
    python launch/pretrain.py --config configs/demo.yaml          # one process
"""
import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: the deepspeed launcher leaves it unset

from mlfound.config import load_config
from mlfound.errors import run_main


def main(argv=None) -> int:
    """The command: a user error is one line and exit code 2 (also when called from Python)."""
    return run_main(pretrain, argv)


def pretrain(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(main())
