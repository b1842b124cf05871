"""The ``mlfound`` command: shard, pretrain, finetune, export, deploy, show, split, evaluate, learning-curve.

    mlfound shard DATA... --out SHARDS [--preset NAME]   # per-task webdataset shards (mlfound shard --help)
    mlfound pretrain --config CONFIG [key=value ...]     # one process; many: torchrun -m mlfound.train.launch
    mlfound finetune --model default --head H --train DATA --out new.safetensors
    mlfound export RUN_DIR --out model.safetensors [--register NAME [--default]] [--card CARD.json]
    mlfound export OLD.safetensors --out new.safetensors  # an older release rewritten (or given a card)
    mlfound deploy RELEASE --head HEAD --out model.pt [--dtype float32]  # TorchScript, runs without mlfound
    mlfound show MODEL                                   # heads, LoTs, sizes, history, model card
    mlfound split DATA --out DIR --sizes train=200 val=50 test=rest
    mlfound evaluate MODEL DATA --head H [--scan] [--json OUT]
    mlfound learning-curve MODEL... --data TEST --head H --out curve.png

Errors in the user's input (bad data, a file that is not a release) print one line and exit with 2; no command
writes over one of its own inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlfound.data.files import atomic_write_bytes, json_text, refuse_overwriting_inputs
from mlfound.data.presets import add_reading_arguments
from mlfound.data.record import DataError
from mlfound.errors import run_main


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FORWARDED:  # a command with its own parser: it reads the rest of the line
        return _forwarded(argv[0])(argv[1:], prog=f"mlfound {argv[0]}")
    parser = argparse.ArgumentParser(prog="mlfound", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in FORWARDED.items():
        commands.add_parser(name, help=help_text, add_help=False)

    p = commands.add_parser("export", help="turn a training checkpoint (or an older release) into a release")
    p.add_argument("checkpoint", type=Path, help="run folder (its latest checkpoint), a checkpoint folder, or a "
                   "release file to rewrite in the current format (with content hashes)")
    p.add_argument("--out", type=Path, required=True, help="release file, e.g. model.safetensors")
    p.add_argument("--register", metavar="NAME", help="also list it under NAME in models/registry.json")
    p.add_argument("--description", help="registry description (default: the name's current one, if registered)")
    p.add_argument("--default", action="store_true", help="with --register: make it the release named 'default'")
    p.add_argument("--card", type=Path, help="model card (JSON, as the paper experiment writes them) to attach")
    p.add_argument("--allow-untrained", action="store_true",
                   help="export a checkpoint whose weights no step has updated (refused otherwise)")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("deploy", help="one head of a release as a TorchScript file that runs without mlfound")
    p.add_argument("model", help="release file or registry name")
    p.add_argument("--head", required=True, help="the head (level of theory) to deploy")
    p.add_argument("--out", type=Path, required=True, help="TorchScript file, e.g. model.pt")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="weights' precision (energies are summed in float64 either way)")
    p.set_defaults(run=cmd_deploy)

    p = commands.add_parser("show", help="print a release's heads, LoTs, sizes, history and model card")
    p.add_argument("model", nargs="?", default="default",
                   help="release file or registry name (default: the registry's default release)")
    p.set_defaults(run=cmd_show)

    p = commands.add_parser("split", help="split a data file into disjoint random subsets (extxyz)")
    p.add_argument("data", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for <name>.extxyz")
    p.add_argument("--sizes", nargs="+", required=True, help="name=count or name=rest, e.g. train=200 test=rest")
    p.add_argument("--seed", type=int, default=0)
    add_reading_arguments(p)
    p.set_defaults(run=cmd_split)

    p = commands.add_parser("evaluate", help="energy/force errors of one head; --scan for a torsion scan")
    p.add_argument("model", help="release file or registry name")
    p.add_argument("data", type=Path, help="data file or shard folder")
    p.add_argument("--head", required=True)
    p.add_argument("--scan", action="store_true", help="DATA is a scan in order: report smoothness and plot it")
    p.add_argument("--plot", type=Path, help="scan plot (PNG); default <data stem>.<head>.png")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--committee", action="store_true", help="a head fine-tuned with --committee K: whether its "
                   "members' spread predicts the head's force error (Spearman, per structure and per atom)")
    p.add_argument("--parity", type=Path, help="parity plot (PNG) of energies and forces; default with --json: "
                   "beside it, <json stem>.parity.png")
    add_reading_arguments(p)
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("learning-curve", help="test errors of several fine-tunes against their training size")
    p.add_argument("models", nargs="+", help="release files; 'label=file' groups them into curves")
    p.add_argument("--data", type=Path, required=True, help="the fixed test set")
    p.add_argument("--head", required=True)
    p.add_argument("--out", type=Path, required=True, help="PNG")
    p.add_argument("--json", type=Path)
    add_reading_arguments(p)
    p.set_defaults(run=cmd_learning_curve)

    args = parser.parse_args(argv)
    if getattr(args, "default", False) and not args.register:
        parser.error("--default needs --register NAME")
    return args.run(args)


# commands whose parser lives beside their code; `mlfound NAME --help` prints it
FORWARDED = {"shard": "QM source files as per-task webdataset shards with manifests",
             "pretrain": "pretrain on many LoT tasks with DeepSpeed (one process; ranks: torchrun -m mlfound.train.launch)",
             "finetune": "fine-tune a release on a small dataset, onto an existing head or a new one"}


def _forwarded(name: str):
    """The forwarded command's unwrapped function (this process's run_main already turns errors into one line)."""
    if name == "shard":
        from mlfound.data.shard_command import shard
        return shard
    if name == "pretrain":
        from mlfound.train.launch import pretrain
        return pretrain
    from mlfound.finetune_command import finetune_command
    return finetune_command


def _reading(args) -> tuple[dict, dict]:
    """SourceSpec fields for the data options, and the LoT metadata of the preset (if any)."""
    from mlfound.data.presets import reading_options

    return reading_options(args.preset, args.preset_task, args.format, args.energy_key, args.forces_key,
                           args.energy_unit, args.length_unit)


def _records(args, path: Path, task: str):
    """The records of a data file in eV and Å, refused when their energies cannot be in eV."""
    from mlfound.data.plausibility import check_units
    from mlfound.data.sets import load_records

    records = load_records(path, task, **_reading(args)[0])
    if not args.no_unit_check:
        check_units(records, str(path))
    return records


def cmd_export(args) -> int:
    from mlfound.model_card import CARD_KEY, read_card
    from mlfound.release import load, save_release

    refuse_overwriting_inputs({"--out": args.out}, {"CHECKPOINT": args.checkpoint, "--card": args.card})
    # a bad card fails before anything is written
    card = {CARD_KEY: read_card(args.card).model_dump(mode="json")} if args.card else {}
    if args.checkpoint.is_file():
        release = load(args.checkpoint)
    else:
        from mlfound.train.export import export

        release = load(export(args.checkpoint, args.out, args.allow_untrained))
    path = save_release(release.model, {**release.metadata, **card}, args.out)
    print(f"wrote {path}")
    if args.register:
        from mlfound.release import register

        entry = register(args.register, path, args.description, default=args.default)
        print(f"registered {args.register!r}{' as the default release' if args.default else ''} "
              f"(sha256 {entry['sha256'][:12]}...)")
    return cmd_show(argparse.Namespace(model=str(path)))


def cmd_deploy(args) -> int:
    from mlfound.deploy import METADATA_FILE, deploy
    from mlfound.release import load, resolve

    model_path = resolve(args.model)
    refuse_overwriting_inputs({"--out": args.out}, {"MODEL": model_path})
    path = deploy(load(model_path), args.head, args.out, args.dtype)
    print(f"wrote {path}: head {args.head!r}, {args.dtype}; inputs and units in its {METADATA_FILE} and "
          "in mlfound/deploy.py")
    return 0


def cmd_show(args) -> int:
    from pydantic import ValidationError

    from mlfound.config import describe
    from mlfound.data.readers import lot_label
    from mlfound.model_card import CARD_KEY, card_lines
    from mlfound.release import ReleaseError, load, stored_format_version

    release = load(args.model)  # verifies the content hashes and the references against the weights
    path, meta = release.path, release.metadata
    cfg = meta["model_config"]
    shown = os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else path  # registry files too
    stored = stored_format_version(path)
    fmt = f"format {stored}" + (f", read as {meta['format_version']}" if stored != meta["format_version"] else "")
    print(f"{shown}  ({path.stat().st_size / 1024:.0f} KiB, {fmt}, "
          f"mlfound {meta['code_version']}, created {meta['created']})")
    print("content: " + ("sha256 of every tensor and metadata entry verified" if release.verified else
                         "NOT verified (written before content hashes; re-export it with mlfound export)"))
    print(f"model: {meta['num_parameters']:,} parameters; channels {cfg['channels']}, l_max {cfg['l_max']}, "
          f"correlation {cfg.get('correlation', 1)}, {cfg['num_layers']} layers, cutoff {cfg['cutoff_a']} Å, "
          f"avg_num_neighbors {cfg['avg_num_neighbors']:.2f}; elements {meta['elements']}")
    print(f"{'head':<14}{'LoT':<24}{'structures':>11}{'scale eV':>10}  from")
    for name, head in meta["heads"].items():
        lot = head.get("lot", {})
        lot_text = lot_label(lot)
        if lot.get("lot_code"):
            lot_text += f" ({lot['lot_code']})"
        data = head.get("finetune_data") or head.get("data") or {}
        count = data.get("num_train", data.get("num_records", ""))
        origin = f"fine-tuned, initialised from {head['initialised_from']}" if "initialised_from" in head else (
            "fine-tuned" if "finetune_data" in head else "pretrained")
        print(f"{name:<14}{lot_text:<24}{count:>11}{head['scale_ev']:>10.3f}  {origin}")
    for stage in meta["history"]:
        if stage["stage"] == "pretrain":
            method = stage.get("method", stage.get("mode"))  # releases before the methods table: "mode"
            print(f"history: pretrain ({method}, {stage['outer_steps']} outer steps, "
                  f"k = {stage['inner_steps']})")
        else:
            print(f"history: fine-tune head {stage['head']} (best step {stage['best_step']})")
    if CARD_KEY in meta:
        try:
            print("\n".join(card_lines(meta[CARD_KEY])))
        except ValidationError as err:
            raise ReleaseError(f"{path}: its model card is malformed ({describe(err)}); attach a valid one with "
                               f"mlfound export {path} --card CARD.json --out FILE") from None
    return 0


def cmd_split(args) -> int:
    from mlfound.data.readers import SourceSpec, lot_metadata
    from mlfound.data.sets import split_records, write_extxyz

    sizes = {}
    for item in args.sizes:
        name, _, count = item.partition("=")
        if not name or not count or not (count == "rest" or count.isdigit()):
            raise DataError(f"--sizes item {item!r}: expected name=count or name=rest")
        if name in sizes:
            raise DataError(f"--sizes {name}: given twice; each subset needs a name of its own")
        sizes[name] = None if count == "rest" else int(count)
    refuse_overwriting_inputs({f"--out {name}": args.out / f"{name}.extxyz" for name in sizes}, {"DATA": args.data})
    records = _records(args, args.data, task=args.data.stem)
    how, preset_lot = _reading(args)
    file_lot = lot_metadata(SourceSpec(path=args.data, task=args.data.stem, **how)) if args.data.is_file() else {}
    lot = {**file_lot, **preset_lot} if args.data.is_file() else {}
    for name, subset in split_records(records, sizes, args.seed).items():
        path = write_extxyz(subset, args.out / f"{name}.extxyz", info=lot)
        print(f"{name:<8}{len(subset):>6} structures  {path}")
    return 0


def cmd_evaluate(args) -> int:
    from mlfound.evaluate import committee_report, evaluate, parity_values, plot_parity, plot_scan, scan_report
    from mlfound.metrics import format_error_table
    from mlfound.release import load

    release = load(args.model)
    parity = args.parity or (args.json.with_name(f"{args.json.stem}.parity.png") if args.json else None)
    refuse_overwriting_inputs({"--plot": args.plot, "--json": args.json, "--parity": parity},
                              {"MODEL": release.path, "DATA": args.data})
    release.check_head(args.head)
    records = _records(args, args.data, args.head)
    results = {"model": str(release.path), "data": str(args.data), "head": args.head,
               "errors": evaluate(release, records, args.head, progress=True)}
    print(format_error_table({args.head: results["errors"]}))
    if args.committee:
        report = results["committee"] = committee_report(release, records, args.head)
        deviation, error = (1e3 * report[f"mean_max_forces_{what}_ev_a"] for what in ("deviation", "error"))
        print(f"committee of {len(report['members'])}: Spearman rank correlation of the force deviation with the "
              f"force error {report['spearman_per_structure']:.2f} per structure (largest per atom: {deviation:.0f} "
              f"vs {error:.0f} meV/Å on average), {report['spearman_per_atom']:.2f} per atom; "
              f"{report['num_structures']} structures")
    if parity:
        results["parity_plot"] = str(plot_parity(parity_values(release, records, args.head), parity,
                                                 f"{args.head} on {args.data.name}"))
        print(f"parity plot {parity}")
    if args.scan:
        smoothness, angles, model_energy, reference_energy = scan_report(release, records, args.head, args.data)
        plot = args.plot or Path(f"{args.data.stem}.{args.head}.png")
        plot_scan(angles, model_energy, reference_energy, plot, f"{args.head} on {args.data.name}")
        results["scan"] = {**smoothness, "plot": str(plot)}
        print(f"scan ({smoothness['num_points']} points{', periodic' if smoothness['periodic'] else ''}): "
              f"second-difference RMS error {smoothness['second_difference_rms_error_mev']:.2f} meV "
              f"(reference RMS {smoothness['reference_second_difference_rms_mev']:.2f}); "
              f"relative-energy RMSE {smoothness['relative_energy_rmse_mev']:.1f} meV; "
              f"barrier {smoothness['model_barrier_mev']:.0f} vs {smoothness['reference_barrier_mev']:.0f} meV; "
              f"extrema {smoothness['num_model_extrema']} vs {smoothness['num_reference_extrema']} "
              f"({smoothness['spurious_extrema']} spurious, {smoothness['missed_extrema']} missed); plot {plot}")
    if args.json:
        atomic_write_bytes(args.json, json_text(results).encode())
    return 0


def cmd_learning_curve(args) -> int:
    from mlfound.evaluate import evaluate, num_finetune_structures, plot_learning_curves
    from mlfound.release import load

    models = {f"MODEL {item}": item.rpartition("=")[2] for item in args.models}
    refuse_overwriting_inputs({"--out": args.out, "--json": args.json}, {"--data": args.data, **models})
    records = _records(args, args.data, args.head)
    curves: dict[str, dict[int, list[dict]]] = {}
    print(f"{'curve':<16}{'N':>6}{'E MAE':>10}{'F MAE':>10}  model")
    for item in args.models:
        label, _, path = item.rpartition("=")
        release = load(path)
        n = num_finetune_structures(release, args.head)
        errors = evaluate(release, records, args.head, progress=True)
        curves.setdefault(label or args.head, {}).setdefault(n, []).append(errors)
        print(f"{label or args.head:<16}{n:>6}{errors['energy_mae_mev_atom']:>10.1f}"
              f"{errors['forces_mae_mev_a']:>10.1f}  {path}")
    plot_learning_curves(curves, args.out, f"{args.head} on {args.data.name}")
    print(f"wrote {args.out}")
    if args.json:
        by_size = {label: {str(n): runs for n, runs in curve.items()} for label, curve in curves.items()}
        atomic_write_bytes(args.json, json_text(by_size).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
