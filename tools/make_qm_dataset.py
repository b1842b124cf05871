"""Generate a multi-fidelity QM corpus with real QM codes (needs `pip install -e .[qm]`).

    python tools/make_qm_dataset.py --recipe demo-pretrain demo-target --out data/demo --workers 2

Resumable: kill it and run the same command again to continue.
"""
import argparse
import sys
from pathlib import Path

from mlfound.qmdata.corpus import make_corpus
from mlfound.qmdata.recipes import RECIPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, nargs="+", choices=sorted(RECIPES),
                        help="one or more recipes, run in order into the same folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for <task>.extxyz files")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one core each)")
    args = parser.parse_args(argv)
    summary = {}
    for name in args.recipe:
        summary.update(make_corpus(name, RECIPES[name], args.out, args.workers))
    print(f"{'task':<14}{'structures':>11}{'molecules':>10}{'rejected':>9}  forces")
    for task, row in summary.items():
        print(f"{task:<14}{row['structures']:>11}{row['molecules']:>10}{row['rejected']:>9}  {row['forces']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
