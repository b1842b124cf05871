"""ZeRO memory benchmark: optimizer-state bytes per rank at ZeRO stages 0, 1 and 2, measured, and the
ZeRO formula extrapolated to more ranks.

    torchrun --nproc_per_node 2 tools/bench_zero_memory.py --config configs/demo.yaml

Each stage builds the real engine (joint mode, Adam, so there is optimizer state to shard), takes two
steps, and counts on every rank the bytes of the Adam moments and of the fp32 weight copy the
optimizer steps (ZeRO keeps a flat fp32 partition per rank even in fp32 training; stage 0 steps the
model's own parameters). Gradients are not measured (DeepSpeed frees them after the step); they
come from the formula. The formula (Rajbhandari et al. 2020) for Ψ parameters on N ranks, fp32:
moments 8Ψ/N and fp32 partition 4Ψ/N at stage >= 1 (8Ψ and 0 at stage 0), gradients 4Ψ/N at
stage 2 (4Ψ otherwise), weights 4Ψ on every rank.
"""
import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mlfound.config import load_config  # noqa: E402
from mlfound.errors import run_main  # noqa: E402
from mlfound.train.trainer import Trainer  # noqa: E402

EXTRAPOLATE_RANKS = (2, 8, 64, 512)
EXTRAPOLATE_PARAMS = (None, 10_000_000, 100_000_000)  # None: the benchmarked model


def measure(config: str, stage: int, overrides: list[str]) -> dict:
    cfg = load_config(config, [*overrides, "meta.method=joint", "meta.outer.lr=1e-3", "meta.outer.lr_final=1e-3",
                               f"deepspeed.zero_stage={stage}", f"run_dir=runs/bench_zero/stage{stage}"])
    trainer = Trainer(cfg)
    for step in range(2):
        trainer.outer_step(trainer.tasks_of_step(step))
    zero = trainer.engine.optimizer
    torch_optimizer = getattr(zero, "optimizer", zero)  # ZeRO wraps the client optimizer
    moments = sum(t.numel() * t.element_size() for state in torch_optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    stepped = [p for group in torch_optimizer.param_groups for p in group["params"]]
    module_params = {id(p) for p in trainer.engine.module.parameters()}
    master_copy = sum(p.numel() * p.element_size() for p in stepped if id(p) not in module_params)
    return {"stage": stage, "rank": trainer.rank, "world": trainer.world_size,
            "params": sum(p.numel() for p in trainer.engine.module.parameters()),
            "moments": moments, "master": master_copy}


def formula_bytes(params: int, ranks: int, stage: int) -> dict:
    return {"moments": 8 * params / (ranks if stage >= 1 else 1), "master": 4 * params / ranks if stage >= 1 else 0,
            "grads": 4 * params / (ranks if stage >= 2 else 1), "weights": 4 * params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rows = [measure(args.config, stage, args.overrides) for stage in (0, 1, 2)]
    gathered = [None] * rows[0]["world"]
    torch.distributed.all_gather_object(gathered, rows)
    if rows[0]["rank"] != 0:
        return 0
    params = rows[0]["params"]
    print(f"# measured: {rows[0]['world']} ranks, {params:,} parameters, Adam (joint mode), fp32; bytes per rank")
    print(f"{'stage':>5}{'rank':>5}{'Adam moments':>14}{'fp32 copy':>11}{'formula: moments':>18}{'copy':>9}")
    for rank_rows in gathered:
        for r in rank_rows:
            expected = formula_bytes(params, r["world"], r["stage"])
            print(f"{r['stage']:>5}{r['rank']:>5}{r['moments']:>14,}{r['master']:>11,}{expected['moments']:>18,.0f}"
                  f"{expected['master']:>9,.0f}")
    print("# formula per rank: moments + fp32 partition + gradients (plus 4 bytes/parameter of weights on every rank)")
    print(f"{'parameters':>12}{'stage':>6}" + "".join(f"{f'N={n}':>12}" for n in EXTRAPOLATE_RANKS))
    for psi in EXTRAPOLATE_PARAMS:
        psi = psi or params
        for stage in (0, 1, 2):
            cells = [formula_bytes(psi, n, stage) for n in EXTRAPOLATE_RANKS]
            print(f"{psi:>12,}{stage:>6}" + "".join(f"{_size(c['moments'] + c['master'] + c['grads']):>12}"
                                                    for c in cells))
    return 0


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes:.0f} B"
        num_bytes /= 1024
    return ""


if __name__ == "__main__":
    sys.exit(run_main(main))
