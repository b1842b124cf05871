"""Fine-tune a released model on a small dataset, onto an existing head or a new head for a new LoT
(``mlfound finetune``).

    mlfound finetune --model default --head hf_631g \\
        --train runs/demo/split/train.extxyz --num-train 50 --val runs/demo/split/val.extxyz \\
        --out runs/demo/finetuned.safetensors

``--model default`` (the default) is the registry's default release (``mlfound show`` describes it).
The output is a new release that keeps every old head. ``--max-steps 0`` adds the head without training.
"""
import argparse
import functools
from pathlib import Path

from mlfound.data import DataError
from mlfound.data.presets import add_reading_arguments
from mlfound.errors import run_main


def main(argv=None, prog=None) -> int:
    """The command: a user error is one line and exit code 2 (also when called from Python)."""
    return run_main(functools.partial(finetune_command, prog=prog), argv)


def finetune_command(argv=None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="release file or registry name (default: the registry's default release)")
    p.add_argument("--head", required=True, help="existing head, or a new head's name (its LoT)")
    p.add_argument("--train", type=Path, required=True, help="data file (extxyz, db, npz, h5) or shard folder")
    p.add_argument("--val", type=Path, help="validation data for early stopping")
    p.add_argument("--num-train", type=int, help="use this many training structures, drawn by --subset-seed")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the new release (.safetensors)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train --model's architecture from random weights (seeded by --seed): the baseline a "
                        "pretrained start has to beat, built exactly like it")
    p.add_argument("--head-scale", choices=["source", "data"], default=default("head_scale"),
                   help="the head's output scale: the copied head's, or the training set's RMS force")
    p.add_argument("--init", default="auto", help="new head: 'auto' (scores printed) or an existing head")
    p.add_argument("--freeze", choices=["none", "trunk"], default="none")
    p.add_argument("--lr", type=float, default=default("lr"), help="Adam lr at the start (default %(default)s)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default=default("lr_schedule"),
                   help="cosine: decay to lr x --lr-final-ratio at --max-steps (default %(default)s)")
    p.add_argument("--lr-final-ratio", type=float, default=default("lr_final_ratio"))
    p.add_argument("--lr-trunk", type=float, help="trunk lr (default: --lr); below the head's keeps pretraining")
    p.add_argument("--lr-head", type=float, help="head lr (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=default("warmup_steps"), help="linear lr warmup")
    p.add_argument("--ema-decay", type=float, help="keep an exponential moving average of the weights "
                   "(e.g. 0.99); validation and the output use it")
    p.add_argument("--max-steps", type=int, default=default("max_steps"))
    p.add_argument("--eval-every", type=int, default=default("eval_every"))
    p.add_argument("--patience", type=int, default=default("patience"),
                   help="evaluations without improvement (default %(default)s); 0: no early stop, the cosine "
                   "runs out (do that with --max-steps above 3000: a mid-schedule plateau stops it early)")
    p.add_argument("--max-atoms", type=int, default=default("max_atoms_per_batch"), help="atoms per batch")
    p.add_argument("--energy-weight", type=float, default=default("energy_weight"))
    p.add_argument("--forces-weight", type=float, default=default("forces_weight"))
    p.add_argument("--stress-weight", type=float, default=default("stress_weight"),
                   help="weight of the virial per atom, for structures with stress labels")
    p.add_argument("--replay-shards", type=Path, help="pretraining shard root, to replay its tasks")
    p.add_argument("--replay-tasks", nargs="+", default=[], help="pretraining tasks to replay")
    p.add_argument("--replay-every", type=int, default=4)
    p.add_argument("--replay-url-template", help="stream the replayed shards from a mirror, e.g. "
                   "http://host/shards/{task}/{name} (manifests stay in --replay-shards; sha256 checked)")
    add_reading_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="forces from one graph torch.compile fuses: ~3x faster steps on CPU after a compile of 1-3 min")
    p.add_argument("--committee", type=int, default=default("committee"),
                   help="K: also train K - 1 heads on the fine-tuned trunk (bootstrap resamples, trunk frozen), whose "
                   "spread the calculator and `mlfound evaluate --committee` report; K times the training time")
    p.add_argument("--log-dir", type=Path, help="TensorBoard and W&B files (default: beside --out, its name + .logs)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="log to TensorBoard (default: when the tensorboard package is installed)")
    p.add_argument("--wandb-project", help="log to this Weights & Biases project")
    p.add_argument("--wandb-entity")
    p.add_argument("--wandb-mode", choices=["online", "offline"], default="online",
                   help="offline: files under --log-dir, uploaded later with `wandb sync`")
    args = p.parse_args(argv)

    from mlfound.config import LoggingConfig, WandbConfig
    from mlfound.data.files import refuse_overwriting_inputs
    from mlfound.finetune import FinetuneConfig, ReplayConfig, finetune, reinitialised
    from mlfound.release import load, resolve, save_release
    from mlfound.tracking import open_tracker

    model_path = resolve(args.model)  # a registry name is a file too: never the output
    refuse_overwriting_inputs({"--out": args.out}, {"--model": model_path, "--train": args.train, "--val": args.val})
    if args.val is not None and args.val.resolve() == args.train.resolve():
        raise DataError(f"--val {args.val} is the training data: early stopping would choose on what it trains on; "
                        "give held-out structures (mlfound split makes them)")
    train, val, lot = read_data(args)
    replay = (ReplayConfig(shard_root=args.replay_shards, tasks=args.replay_tasks, every=args.replay_every,
                           shard_url_template=args.replay_url_template) if args.replay_shards else None)
    cfg = FinetuneConfig(head=args.head, init=args.init, lot=lot, freeze=args.freeze, lr=args.lr,
                         head_scale=args.head_scale, lr_schedule=args.lr_schedule, lr_final_ratio=args.lr_final_ratio,
                         lr_trunk=args.lr_trunk, lr_head=args.lr_head, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, max_steps=args.max_steps,
                         eval_every=args.eval_every, patience=args.patience or None,
                         max_atoms_per_batch=args.max_atoms, energy_weight=args.energy_weight,
                         forces_weight=args.forces_weight, stress_weight=args.stress_weight, seed=args.seed,
                         replay=replay, device=args.device, compile_forces=args.compile, committee=args.committee,
                         check_units=not args.no_unit_check)
    start = reinitialised(load(model_path), args.seed) if args.from_scratch else load(model_path)
    wandb = WandbConfig(project=args.wandb_project, entity=args.wandb_entity, mode=args.wandb_mode) \
        if args.wandb_project else None
    metadata = {"config": cfg.model_dump(mode="json"), "model": str(model_path),
                "data": {"train": str(args.train), "num_train": len(train), "val": str(args.val),
                         "num_val": len(val or [])}}
    tracker = open_tracker(args.log_dir or args.out.parent / f"{args.out.stem}.logs",
                           LoggingConfig(tensorboard=args.tensorboard, wandb=wandb), metadata, start_step=0)
    try:
        result = finetune(start, train, val, cfg, tracker=tracker)
    finally:
        tracker.close()
    print_summary(result)
    save_release(result.release.model, result.release.metadata, args.out)
    print(f"wrote {args.out}")
    return 0


def default(field: str):
    """FinetuneConfig's default, so the command line and the Python API cannot drift apart."""
    from mlfound.finetune import FinetuneConfig

    return FinetuneConfig.model_fields[field].default


def read_data(args):
    from mlfound.data.presets import reading_options
    from mlfound.data.readers import SourceSpec, lot_metadata
    from mlfound.data.sets import load_records, subset

    how, preset_lot = reading_options(args.preset, args.preset_task, args.format, args.energy_key, args.forces_key,
                                      args.energy_unit, args.length_unit)
    train = load_records(args.train, args.head, **how)
    if args.num_train is not None:
        train = subset(train, args.num_train, args.subset_seed)
    val = load_records(args.val, args.head, **how) if args.val else None
    lot = {} if args.train.is_dir() else lot_metadata(SourceSpec(path=args.train, task=args.head, **how))
    return train, val, {**lot, **preset_lot}


def print_summary(result) -> None:
    if result.head_scores:
        print("new-head initialisation: energy residual after refitting references on the training set")
        print(f"  {'head':<20}{'E RMSE meV/atom':>16}{'F RMSE meV/Å':>14}")
        for head, score in sorted(result.head_scores.items(), key=lambda kv: kv[1]["energy_rmse_mev_atom"]):
            forces = score.get("forces_rmse_mev_a", float("nan"))
            print(f"  {head:<20}{score['energy_rmse_mev_atom']:>16.1f}{forces:>14.0f}")
        print(f"  chosen: {result.release.metadata['history'][-1]['initialised_from']}")
    if result.history:
        first, best = result.history[0], next(h for h in result.history if h["step"] == result.best_step)
        for label, h in (("before", first), (f"best (step {result.best_step})", best)):
            e = h["errors"]
            print(f"validation {label}: E MAE {e['energy_mae_mev_atom']:.1f} meV/atom, "
                  f"F MAE {e['forces_mae_mev_a']:.0f} meV/Å ({e['num_records']} structures)")
