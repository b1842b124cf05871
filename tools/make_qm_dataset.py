"""Generate a multi-fidelity QM corpus with real QM codes (needs `pip install -e .[qm]`).

    python tools/make_qm_dataset.py --recipe demo-pretrain demo-target --out data/demo --workers 2
    python tools/make_qm_dataset.py --scan paracetamol-amide --out data/demo --workers 2
    python tools/make_qm_dataset.py --recipe scale-druglike --tasks b3lyp_631g pbe0_631gs --out data/scale

Recipes are resumable: kill the run and start the same command again to continue. --tasks labels only the named
tasks (the costly SCF ones first, say); a later run without it adds the rest and reuses every unit done. Each
recipe's <out>/<recipe>.summary.json records per task the structures, rejects, label CPU hours, elements and
sizes, and the geometries' CPU hours (the data README's table). When done, the folder's SHA256SUMS lists every
extxyz in it, so a regenerated corpus can be checked against the one a result was measured on:
`cd data/e2 && sha256sum -c SHA256SUMS`.
"""
import argparse
import sys
from pathlib import Path

from mlfound.data.files import FolderLock, atomic_write_bytes, sha256_file
from mlfound.errors import run_main
from mlfound.qmdata.corpus import make_corpus
from mlfound.qmdata.recipes import RECIPES
from mlfound.qmdata.scans import SCANS, make_scan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", nargs="+", default=[], choices=sorted(RECIPES),
                        help="one or more recipes, run in order into the same folder")
    parser.add_argument("--scan", nargs="+", default=[], choices=sorted(SCANS),
                        help="torsion scans to label, each into <lot>_<scan>_scan.extxyz")
    parser.add_argument("--out", type=Path, required=True, help="folder for <task>.extxyz files")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one core each)")
    parser.add_argument("--tasks", nargs="+", metavar="LOT",
                        help="label only these tasks of the recipes now; a later run without it adds the rest")
    args = parser.parse_args(argv)
    if not args.recipe and not args.scan:
        parser.error("name at least one --recipe or --scan")
    recipes = {name: RECIPES[name] for name in args.recipe}
    if args.tasks:
        known = {task.lot for recipe in recipes.values() for task in recipe.tasks}
        if unknown := sorted(set(args.tasks) - known):
            parser.error(f"--tasks {' '.join(unknown)}: not a task of recipe {', '.join(args.recipe)}; "
                         f"its tasks are {', '.join(sorted(known))}")
        recipes = {name: recipe.only_tasks(set(args.tasks)) for name, recipe in recipes.items()}
    with FolderLock(args.out, "tools/make_qm_dataset.py run"):  # one generator per folder: they share work files
        for name in args.scan:
            print(f"wrote {make_scan(name, SCANS[name], args.out, args.workers)}")
        summary = {}
        for name, recipe in recipes.items():
            summary.update(make_corpus(name, recipe, args.out, args.workers))
    if summary:
        print(f"{'task':<14}{'structures':>11}{'molecules':>10}{'rejected':>9}{'CPU h':>8}  forces  atoms per structure")
    for task, row in summary.items():
        print(f"{task:<14}{row['structures']:>11}{row['molecules']:>10}{row['rejected']:>9}"
              f"{row['label_cpu_hours']:>8.2f}  {str(row['forces']):<7} {row['atoms']}")
    if summary:
        print("(per recipe: <out>/<recipe>.summary.json, with the elements and the geometries' CPU hours)")
    print(f"wrote {write_checksums(args.out)}")
    return 0


def write_checksums(folder: Path) -> Path:
    """``sha256sum -c``-compatible list of every extxyz in ``folder`` (scans included)."""
    files = sorted(folder.rglob("*.extxyz"))
    lines = "".join(f"{sha256_file(path)}  {path.relative_to(folder)}\n" for path in files)
    return atomic_write_bytes(folder / "SHA256SUMS", lines.encode())


if __name__ == "__main__":
    sys.exit(run_main(main))
