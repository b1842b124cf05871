"""DeepSpeed setup from our config: one source for its dict, CPU (gloo) and GPU (nccl) alike."""
from __future__ import annotations

import importlib
import os
import sys

import torch

from mlfound.config import OuterOptimizerConfig, RunConfig

NO_SHM_OP = "MLFOUND_NO_SHM_OP"  # "1": skip building DeepSpeed's CPU shared-memory op (tests, short runs)


def init_distributed() -> tuple[int, int]:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on GPU); (rank, world size).

    Without a launcher (a plain ``python`` run) this is a one-process world. On CPU, DeepSpeed
    JIT-compiles a shared-memory comm op at init (~30 s, needs g++, cached); the environment variable
    MLFOUND_NO_SHM_OP=1 skips it (DeepSpeed has no switch: its builder is replaced), which rank 0 says."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    no_shm_op = os.environ.get(NO_SHM_OP) == "1"
    if no_shm_op:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if get_accelerator().device_name() != "cpu":  # collectives before the engine exists need this rank's device
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    rank = torch.distributed.get_rank()
    if no_shm_op and rank == 0:
        print(f"{NO_SHM_OP}=1: DeepSpeed's shared-memory comm op was not built; collectives on CPU use plain gloo",
              file=sys.stderr, flush=True)
    return rank, torch.distributed.get_world_size()


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed config dict; gradient clipping always explicit (DeepSpeed 0.19 defaults to 1.0)."""
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # our batches are atom-budget graphs; DeepSpeed only counts them
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
    }
    ds.update(cfg.deepspeed.extra)
    return ds


def build_engine(cfg: RunConfig, model: torch.nn.Module):
    """Engine with the outer optimizer (a client torch optimizer: no JIT-compiled ops) and a linear outer-lr
    anneal; what it steps on is the pseudo-gradient (mlfound/meta/methods.py)."""
    import deepspeed

    optimizer = outer_optimizer(cfg.meta.outer, model.parameters())
    total = max(cfg.train.outer_steps, 1)
    final_ratio = cfg.meta.outer.lr_final / cfg.meta.outer.lr

    def anneal(step: int) -> float:
        return 1.0 + (final_ratio - 1.0) * min(step, total) / total

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, anneal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine


def outer_optimizer(outer: OuterOptimizerConfig, parameters) -> torch.optim.Optimizer:
    """Interpolation is SGD on what the trainer hands it for that optimizer, θ0 − θk (lr = Reptile's ε)."""
    if outer.name in ("interpolation", "sgd"):
        return torch.optim.SGD(parameters, lr=outer.lr)
    if outer.name == "nesterov":
        return torch.optim.SGD(parameters, lr=outer.lr, momentum=outer.momentum, nesterov=True)
    return torch.optim.Adam(parameters, lr=outer.lr, betas=outer.betas)
