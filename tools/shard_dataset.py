"""Shard QM source files into per-task webdataset shards (the command is ``mlfound shard``, in
mlfound/data/shard_command.py; ``--help`` says everything).

    python tools/shard_dataset.py data/demo/*.extxyz --out runs/demo/shards --workers 2
    python tools/shard_dataset.py SPICE-2.0.1.hdf5 --preset spice2 --out shards
"""
import sys

from mlfound.data.shard_command import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/shard_dataset.py"))
