"""Shard QM source files into per-task webdataset shards with a manifest.json each (``mlfound shard``).

    mlfound shard data/demo/*.extxyz --out runs/demo/shards --workers 2
    mlfound shard rmd17_aspirin.npz --task rmd17 --energy-key energies --energy-unit kcal/mol --out shards
    mlfound shard SPICE-2.0.1.hdf5 --preset spice2 --out shards
    mlfound shard ani1x-release.h5 --preset ani1x --out shards   # three LoT tasks

Each file's task is its file name stem unless --task is given (files of one task are merged). A preset
(docs/datasets.md) sets the format, keys, units and sign conventions of a public dataset and names its tasks,
one per level of theory; --preset-task reads some of them, --task renames the one read, --energy-unit and
--length-unit replace the preset's units.
Re-running with unchanged sources and options does nothing. A bad record stops the run with an
error naming file and index, or with --skip-bad is listed in <out>/<task>/rejects.jsonl (each malformed
extxyz frame on its own; reading goes on at the next frame). Units: --energy-unit/--length-unit, else
the extxyz frames' energy_unit/length_unit info keys, else eV and Å.

Files (of all tasks) are read by --workers processes; records are globally shuffled through bucket
files next to the output, holding about --shuffle-buffer-mb of records in memory. Neither option
changes a byte of the output.
"""
import argparse
import contextlib
import functools
import signal
import sys
from pathlib import Path

from mlfound.data import DataError
from mlfound.data.presets import describe_presets, preset_sources, reading_options, refuse_fixed_options
from mlfound.data.readers import READERS, SourceSpec, lot_label
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A
from mlfound.data.shards import DEFAULT_SHUFFLE_BUFFER_MB, REJECTS_NAME, ShardOptions, shard_tasks
from mlfound.errors import run_main


def parse_args(argv, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog="presets:\n" + describe_presets(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, help="extxyz/ASE db/any ASE format, .npz (rMD17), .h5 (ANI-1x), "
                   "or a public dataset's files with --preset")
    p.add_argument("--out", type=Path, required=True, help="shard root; each task gets <out>/<task>/")
    p.add_argument("--preset", help="a public dataset's layout (listed below): sets format, keys, units, tasks")
    p.add_argument("--preset-task", nargs="+", help="read only these of the preset's tasks")
    p.add_argument("--task", help="task (level-of-theory) name for all sources; default: each file's stem")
    p.add_argument("--format", choices=["auto", *READERS], help="default: auto (by suffix)")
    p.add_argument("--energy-key", help="default: energy")
    p.add_argument("--forces-key", help="default: forces; 'none' for energy-only data")
    p.add_argument("--energy-unit", help="eV, hartree, kcal/mol, kJ/mol (default: the preset's, else the file's "
                   "energy_unit info key, else eV; an explicit unit that contradicts the file's is an error)")
    p.add_argument("--length-unit", help="Ang or bohr (default: the preset's, else the file's length_unit info key, "
                   "else Ang)")
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--min-distance", type=float, default=DEFAULT_MIN_DISTANCE_A,
                   help="closer atom pairs are rejected as overlapping (Å)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of records held out for validation in <out>/<task>/val/ (by a stable hash)")
    p.add_argument("--skip-bad", action="store_true", help="reject bad records to a list instead of stopping")
    p.add_argument("--no-unit-check", action="store_true",
                   help="shard even a task whose energies look like another unit than eV (Hartree, kcal/mol)")
    p.add_argument("--workers", type=int, default=1, help="processes reading files (of all tasks) and writing shards")
    p.add_argument("--shuffle-buffer-mb", type=float, default=DEFAULT_SHUFFLE_BUFFER_MB,
                   help="records held in memory while shuffling (MB); more is kept in bucket files on disk")
    p.add_argument("--method", help="LoT method to record in the manifest (overrides the source's)")
    p.add_argument("--basis", help="LoT basis to record in the manifest")
    p.add_argument("--code", help="QM code to record in the manifest")
    args = p.parse_args(argv)
    if args.workers < 1 or args.shuffle_buffer_mb <= 0:
        p.error("--workers must be at least 1 and --shuffle-buffer-mb positive")
    return args


def main(argv=None, prog=None) -> int:
    """The command: a user error is one line and exit code 2 (also when called from Python, as the tests do)."""
    return run_main(functools.partial(shard, prog=prog), argv)


def shard(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    options = ShardOptions(args.records_per_shard, args.min_distance, args.skip_bad, args.val_fraction,
                           check_units=not args.no_unit_check)
    given_lot = {f"lot_{k}": v for k, v in (("method", args.method), ("basis", args.basis), ("code", args.code)) if v}
    # killed (a scheduler's SIGTERM) or interrupted: stop the workers and remove the temporaries before exiting
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    by_task = sources_by_task(args)
    width = max(14, *(len(task) + 2 for task in by_task))
    print(f"{'task':<{width}}{'records':>8}{'val':>6}{'rejected':>9}{'unlabelled':>11}{'shards':>7}{'atoms':>8}"
          f"{'forces':>7}{'ref RMS eV':>11}  LoT")
    lots = {task: {**lot, **given_lot} for task, (_, lot) in by_task.items()}
    results = shard_tasks({task: specs for task, (specs, _) in by_task.items()}, args.out, options, lots,
                          workers=args.workers, shuffle_buffer_mb=args.shuffle_buffer_mb)
    with contextlib.closing(results):
        for task, m in results:
            print(f"{task:<{width}}{m['num_records']:>8}{m['num_validation_records']:>6}{m['num_rejected']:>9}"
                  f"{m['num_unlabelled']:>11}{len(m['shards']):>7}{m['num_atoms_total']:>8}"
                  f"{m['num_with_forces']:>7}{m['stats']['residual_rms_ev']:>11.4f}  {lot_label(m['lot'])}")
            for note in m["reference_notes"]:
                print(f"  warning ({task}): {note}")
            if m["num_rejected"]:
                print(f"  {task}: {m['num_rejected']} rejected records listed in "
                      f"{args.out / task / REJECTS_NAME}")
    return 0


def sources_by_task(args) -> dict[str, tuple[list[SourceSpec], dict]]:
    """Per task: its source files, and the LoT metadata the preset knows (else none)."""
    if args.preset:
        refuse_fixed_options(args.preset, format=args.format, energy_key=args.energy_key, forces_key=args.forces_key)
        return preset_sources(args.preset, args.sources, args.preset_task, args.task, args.energy_unit,
                              args.length_unit)
    if args.preset_task:
        raise DataError("--preset-task picks tasks of a preset; give --preset too")
    how, _ = reading_options(None, None, args.format, args.energy_key, args.forces_key, args.energy_unit,
                             args.length_unit)
    by_task: dict[str, tuple[list[SourceSpec], dict]] = {}
    for path in args.sources:
        task = args.task or path.stem
        by_task.setdefault(task, ([], {}))[0].append(SourceSpec(path=path, task=task, **how))
    return by_task
