"""Pretrain on many LoT tasks with DeepSpeed (the command is ``mlfound pretrain``, in mlfound/train/launch.py).

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/demo.yaml [key=value ...] [--resume auto] [key=value ...]
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/demo.yaml
    python launch/pretrain.py --config configs/demo.yaml          # one process
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: the deepspeed launcher leaves it unset

from mlfound.train.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/pretrain.py"))
