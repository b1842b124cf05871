"""What the units share, made once and reused: the corpus's shards, the target's fixed split, the start
models (scratch and one 2-rank DeepSpeed pretraining run per method and seed) and the single-task choice."""
import json
import time
from pathlib import Path

import torch

from experiments.config import Experiment, portable, pretrain_config, run_overrides
from experiments.plan import start_model
from mlfound.config import ConfigError
from mlfound.data.files import atomic_write_bytes, json_text
from mlfound.data.sets import load_records, split_records, write_extxyz
from mlfound.data.sets import subset as draw
from mlfound.data.shard_command import shard
from mlfound.finetune import choose_init_head, head_scores
from mlfound.release import load, release_metadata, save_release
from mlfound.train.build import build_potential, load_manifests
from mlfound.train.checkpoint import latest_tag
from mlfound.train.export import export
from mlfound.train.guards import TrainingError
from mlfound.train.launch import start


def make_shards(exp: Experiment) -> None:
    """The corpus as shards, 10% held out, exactly as the README's main job makes them."""
    tasks = pretrain_config(exp, "none", Path("shards"), seed=0).data.tasks
    shards, corpus = exp.pretrain.shards, exp.pretrain.corpus
    if not _missing_tasks(shards, tasks):
        return
    sources = sorted(corpus.glob("*.extxyz"))
    if not sources:
        packed = corpus / "corpus.tar.xz"
        make = f"unpack it first: tar -xJf {packed} -C {corpus}" if packed.exists() else \
            "make the corpus first (tools/make_qm_dataset.py)"
        raise ConfigError(f"pretrain.corpus {corpus} has no *.extxyz and pretrain.shards {shards} lacks the tasks "
                          f"{_missing_tasks(shards, tasks)}: {make}")
    # in this process, so its errors (a folder another run shards, a bad record) reach the user as one line
    shard([*map(str, sources), "--out", str(shards), "--val-fraction", "0.1"], prog="mlfound shard")
    if _missing_tasks(shards, tasks):
        raise ConfigError(f"pretrain.corpus {corpus} has no data for the pretraining tasks "
                          f"{_missing_tasks(shards, tasks)} (files are named <task>.extxyz)")


def _missing_tasks(shards: Path, tasks: list[str]) -> list[str]:
    return [task for task in tasks if not (shards / task / "manifest.json").exists()]


def make_split(exp: Experiment, out: Path) -> dict[str, Path]:
    """One fixed split of the target: target.test test, target.val validation, the rest the training pool."""
    paths = {name: out / "target" / f"{name}.extxyz" for name in ("pool", "val", "test")}
    if not all(path.exists() for path in paths.values()):
        records = load_records(exp.target.file, exp.target.head)
        sizes = {"test": exp.target.test, "val": exp.target.val, "pool": None}
        for name, records_of_split in split_records(records, sizes, seed=0).items():
            write_extxyz(records_of_split, paths[name])
    return paths


def train_subset(pool: list, n: int, subset: int) -> list:
    """The N training structures of ``subset``: the same for every start model and for MACE."""
    return draw(pool, n, seed=100 * subset + 7)


def check_same_models(exp: Experiment, out: Path) -> None:
    """Models and splits in ``out`` are reused: refuse an ``out`` made from another corpus, config or target."""
    made_by = portable({"pretrain": exp.pretrain.model_dump(mode="json", exclude={"methods", "seeds", "shards"}),
                        "target": exp.target.model_dump(mode="json")})
    path = out / "models_made_by.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{section}.{key}" for section, now in made_by.items() for key in now
                   if before.get(section, {}).get(key) != now[key]]
        if changed:
            raise ConfigError(f"{out} holds models and splits made with other {', '.join(changed)} "
                              f"(see {path}): use another --out")
    atomic_write_bytes(path, json_text(made_by).encode())


def prepare_starts(exp: Experiment, out: Path, split: dict[str, Path]) -> str:
    """The scratch starts of every seed as releases in <out>/models, and the single-task choice (from the
    first seed's joint run); returns that choice."""
    for seed in exp.pretrain.seeds:
        scratch_release(exp, out, seed)
    best_single = choose_single_task(exp, out, split) if "single" in exp.pretrain.methods else "(single not run)"
    print(f"best single LoT for the target: {best_single}", flush=True)
    return best_single


def pretrain(exp: Experiment, out: Path, method: str, seed: int, single_task: str | None = None) -> Path:
    """A 2-rank DeepSpeed pretraining run (``mlfound.train.launch.start``), exported as a release (skipped if
    already there); a run stopped midway (killed job, lost node) goes on from its last checkpoint."""
    release = start_model(out, method, seed)
    if release.exists():
        return release
    run_dir = out / "pretrain" / f"{method}_s{seed}"
    if (tag := latest_tag(run_dir)) is not None:
        print(f"pretraining {method} seed {seed}: resuming from its checkpoint {tag}", flush=True)
    tic = time.perf_counter()
    done = start(exp.pretrain.config, run_overrides(exp, method, run_dir, seed, single_task), ranks=2,
                 resume="auto", env={"MLFOUND_NO_SHM_OP": "1"})
    if done.returncode != 0:
        if stopped := [line for line in done.stderr.splitlines() if line.startswith("error: ")]:
            # a rank stopped on a user error (a loss that is not finite, a checkpoint it cannot trust): its line
            reason = stopped[0].removeprefix("error: ")
            raise TrainingError(f"pretraining {method} seed {seed} ({run_dir}) stopped: {reason}")
        raise RuntimeError(f"pretraining {method} seed {seed} failed:\n{done.stderr[-3000:]}")
    export(run_dir, release)
    print(f"pretrained {method} seed {seed} in {time.perf_counter() - tic:.0f} s", flush=True)
    return release


def scratch_release(exp: Experiment, out: Path, seed: int) -> Path:
    """The untrained model (pretraining config and overrides, seeded), as a release: the 'none' start."""
    path = start_model(out, "none", seed)
    if not path.exists():
        cfg = pretrain_config(exp, "none", out / "pretrain" / f"none_s{seed}", seed)
        torch.manual_seed(seed)
        model = build_potential(cfg, load_manifests(cfg))
        save_release(model, release_metadata(model, {}, history=[{"stage": "none"}]), path)
    return path


def choose_single_task(exp: Experiment, out: Path, split: dict[str, Path]) -> str:
    """The LoT whose head, after joint pretraining, best explains the target (the `auto` score)."""
    probe = pretrain(exp, out, "joint", exp.pretrain.seeds[0])
    return choose_init_head(head_scores(load(probe).model, load_records(split["pool"], exp.target.head)))
