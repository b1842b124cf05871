"""Shard QM source files into per-task webdataset shards with a manifest.json each.

    python tools/shard_dataset.py data/demo/*.extxyz --out runs/demo/shards --workers 2
    python tools/shard_dataset.py rmd17_aspirin.npz --task rmd17 --energy-key energies \\
        --energy-unit kcal/mol --out shards
    python tools/shard_dataset.py ani1x.h5 --task ani1x --energy-key wb97x_dz.energy \\
        --forces-key wb97x_dz.forces --energy-unit hartree --out shards --skip-bad

Each file's task is its file name stem unless --task is given (files of one task are merged).
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
import signal
import sys
from pathlib import Path

from mlfound.data import DataError
from mlfound.data.readers import SourceSpec, lot_label
from mlfound.data.record import DEFAULT_MIN_DISTANCE_A
from mlfound.data.shards import DEFAULT_SHUFFLE_BUFFER_MB, REJECTS_NAME, ShardOptions, shard_tasks


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, help="extxyz/ASE db/any ASE format, .npz (rMD17), .h5 (ANI-1x)")
    p.add_argument("--out", type=Path, required=True, help="shard root; each task gets <out>/<task>/")
    p.add_argument("--task", help="task (level-of-theory) name for all sources; default: each file's stem")
    p.add_argument("--format", default="auto", choices=["auto", "ase", "extxyz", "npz", "hdf5"])
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--energy-unit", help="eV, hartree, kcal/mol, kJ/mol (default: the file's energy_unit info key, "
                   "else eV; an explicit unit that contradicts the file's is an error)")
    p.add_argument("--length-unit", help="Ang or bohr (default: the file's length_unit info key, else Ang)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    by_task: dict[str, list[SourceSpec]] = {}
    for path in args.sources:
        task = args.task or path.stem
        by_task.setdefault(task, []).append(SourceSpec(
            path=path, task=task, format=args.format, energy_key=args.energy_key, forces_key=args.forces_key,
            energy_unit=args.energy_unit, length_unit=args.length_unit))
    options = ShardOptions(args.records_per_shard, args.min_distance, args.skip_bad, args.val_fraction,
                           check_units=not args.no_unit_check)
    lot = {f"lot_{k}": v for k, v in (("method", args.method), ("basis", args.basis), ("code", args.code)) if v}
    print(f"{'task':<14}{'records':>8}{'val':>6}{'rejected':>9}{'shards':>7}{'atoms':>8}{'forces':>7}"
          f"{'ref RMS eV':>11}  LoT")
    # killed (a scheduler's SIGTERM) or interrupted: stop the workers and remove the temporaries before exiting
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = shard_tasks(by_task, args.out, options, lot=lot, workers=args.workers,
                          shuffle_buffer_mb=args.shuffle_buffer_mb)
    try:
        with contextlib.closing(results):
            for task, m in results:
                print(f"{task:<14}{m['num_records']:>8}{m['num_validation_records']:>6}{m['num_rejected']:>9}"
                      f"{len(m['shards']):>7}{m['num_atoms_total']:>8}{m['num_with_forces']:>7}"
                      f"{m['stats']['residual_rms_ev']:>11.4f}  {lot_label(m['lot'])}")
                for note in m["reference_notes"]:
                    print(f"  warning ({task}): {note}")
                if m["num_rejected"]:
                    print(f"  {task}: {m['num_rejected']} rejected records listed in {args.out / task / REJECTS_NAME}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
