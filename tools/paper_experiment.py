"""The paper's experiment at small scale (Allen et al. 2024): does pretraining on many LoTs, and
Reptile in particular, make fine-tuning on a new LoT better from little data? One tool, one YAML
per experiment (configs/experiments/):

    python tools/paper_experiment.py --experiment configs/experiments/demo.yaml --out runs/paper  # demo corpus
    python tools/paper_experiment.py --experiment configs/experiments/e1.yaml     # E1: paracetamol at 5 LoTs
    python tools/paper_experiment.py --experiment configs/experiments/e2.yaml     # E2: 109 drug-like molecules
    python tools/paper_experiment.py --experiment configs/experiments/e1.yaml finetune.sizes=[10,50] md.runs=4

Corpora: data/demo and data/e1 are committed, data/e2 as corpus.tar.xz (`tar -xJf data/e2/corpus.tar.xz -C
data/e2`); `python tools/make_qm_dataset.py --recipe e1-one-molecule --out data/e1 --workers 2`
(e2-many-molecules, data/e2) makes them again. Dotted overrides follow the file (defaults <
YAML < command line; unknown keys are errors naming the key, and every fine-tuning recipe is checked
against FinetuneConfig before anything runs). Relative paths in the YAML are relative to the
repository root; --out defaults to runs/<experiment>/paper.

Stages, each skipping what <out> already holds (rerun the command to resume; a pretraining run goes on from
its last checkpoint, written every 5% of the run):
  shards    pretrain.corpus/*.extxyz into pretrain.shards (10% validation) when a task has none
  pretrain  2 DeepSpeed ranks per run, pretrain.grad_steps gradient steps per rank, every method at each
            seed before that seed's units: `single` (the LoT whose head `auto` picks for the target after a
            joint run), `joint` (multi-head Adam), `reptile_k<k>` and any other name of
            mlfound/meta/methods.py; `none` is the model at its random initialisation
  finetune  a new head for the target LoT, `init=auto`, on N structures of a fixed pool (finetune.subsets
            draws per N); every recipe of finetune.recipes runs and the one whose kept weights have the lowest
            validation loss (one loss form for all) is alone tested (test split, torsion scan); scratch goes
            through the same grid with the recipes that train on the target alone, and `cotrain`, the scratch
            start with the recipes that replay pretraining data (corpus and target trained together from
            random weights), is a baseline of its own. N = 0: zero-shot (references refitted on 50 pool
            structures, no training)
  mace      MACE from scratch on the same train subsets, validation and test splits
            (tools/peers/mace_cli.py in .venv-mace; left out with a note when that venv is missing)
  md        inside the units at N = md.n: md.runs Langevin runs per method (mlfound and MACE alike) from the
            first test structure, split over the method's units at md.n, seeds 0, 1, ... within each unit
Outputs: <out>/table.txt (mean ± std over seeds x subsets), results.json, learning_curve.png, and
model_cards/<method>_s<seed>.json for every pretrained start (`mlfound export MODEL --card ...` attaches one).
Units run in rounds (every method and N at seed 0, subset 0, then the next draw), so `--report` gives a fair
interim table of a grid still running or stopped midway: it runs nothing, reports the draws whose every unit is
done, and says how much of the plan they cover.

A grid longer than one machine's life is kept in git: with --out under docs/experiments/ (its .gitignore keeps
out the bulky, remade parts), the start models and every unit's result are committed as they come, and the same
command in a fresh clone goes on from there. Paths in the record are relative to the repository, and a unit's
result holds its start model's sha256, so a result is reused only with the model it was made from.

The library behind it is experiments (config, plan, prepare, units, report, grid).
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives beside mlfound, not installed

from experiments.config import ROOT, load_experiment  # noqa: E402
from experiments.grid import report_so_far, run_experiment  # noqa: E402
from experiments.prepare import check_same_models, make_shards  # noqa: E402
from mlfound.config import ConfigError  # noqa: E402
from mlfound.data.files import FolderLock
from mlfound.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, default=ROOT / "configs" / "experiments" / "demo.yaml")
    p.add_argument("--out", type=Path, help="results folder (default: runs/<experiment name>/paper)")
    p.add_argument("--workers", type=int, default=2, help="parallel fine-tunes, MACE trainings, MD runs (1 core each)")
    p.add_argument("--report", action="store_true",
                   help="write the report from the results <out> holds so far; run nothing (an interim look)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the experiment, e.g. finetune.sizes=[10]")
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment, args.overrides)
    out = args.out or ROOT / "runs" / args.experiment.stem / "paper"
    if args.report:
        if not (out / "models_made_by.json").exists():
            raise ConfigError(f"{out} holds no run of an experiment: give the grid's --out, or run it first")
        check_same_models(exp, out)
        report_so_far(exp, out, title=args.experiment.stem)
        return 0
    with FolderLock(out, "tools/paper_experiment.py grid"):
        make_shards(exp)
        check_same_models(exp, out)
        run_experiment(exp, out, args.workers, title=args.experiment.stem)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
