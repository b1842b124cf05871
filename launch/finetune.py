"""Fine-tune a released model on a small dataset (the command is ``mlfound finetune``, in
mlfound/finetune_command.py; ``--help`` says everything).

    python launch/finetune.py --model default --head hf_631g \\
        --train runs/demo/split/train.extxyz --num-train 50 --val runs/demo/split/val.extxyz \\
        --out runs/demo/finetuned.safetensors
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads

from mlfound.finetune_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/finetune.py"))
