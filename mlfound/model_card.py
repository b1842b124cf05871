"""The model card of a release: what a user needs to pick a pretrained model, namely what it was trained
on and how, and how well it fine-tunes to a new LoT next to the alternatives (mlfound from scratch, MACE
from scratch, references alone) on the same structures.

A card lives in the release header under ``model_card``, so the content hashes cover it and
``mlfound show`` prints it. Its learning curve is made from an experiment's results
(the paper experiment writes one card per pretrained model), never typed in;
``mlfound export MODEL --card CARD.json --out RELEASE`` attaches it. Size, heads, LoTs and structure
counts are not repeated here: the release's own metadata holds them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlfound.config import describe

CARD_KEY = "model_card"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurvePoint(_Strict):
    start: str  # "this model", "mlfound from scratch", "MACE from scratch", "references only"
    num_train: int = Field(ge=1)
    runs: int = Field(ge=1)  # fine-tunes averaged (pretraining seeds x training subsets)
    energy_mae_mev_atom: float
    forces_mae_mev_a: float | None  # None: an energy-only baseline has no force error to report


class LearningCurve(_Strict):
    target: str  # the data file the new head was fine-tuned on, and the head
    lot: str
    test_structures: int = Field(ge=1)
    validation_structures: int = Field(ge=1)
    protocol: str  # fine-tuning budget and how the recipe was chosen
    points: list[CurvePoint] = Field(min_length=1)


class ModelCard(_Strict):
    summary: str
    corpus: str  # where the pretraining data came from
    corpus_sha256: str | None  # sha256 of the corpus's SHA256SUMS manifest, when it has one
    pretraining: str  # method, budget, seed, model overrides
    learning_curve: LearningCurve
    notes: list[str] = []  # limitations and anything a user should know before relying on the model
    made_by: str  # the command whose results the card holds


class CardError(ValueError):
    """A card file that cannot be attached; the message names the file and the key."""


def read_card(path: Path) -> ModelCard:
    """The card in a JSON file, checked field by field."""
    try:
        return ModelCard.model_validate(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as err:
        raise CardError(f"model card {path}: invalid JSON ({err})") from None
    except ValidationError as err:
        raise CardError(f"model card {path}: {describe(err)}") from None


def card_from_results(report: dict, method: str, seed: int, command: str, root: Path) -> ModelCard:
    """The card of start ``method`` (pretraining seed ``seed``) from a paper_experiment results.json.

    Each point is the mean test error over the training subsets (and, for the baselines, the pretraining
    seed's scratch model and MACE runs with that seed); relative paths in the report are relative to ``root``
    (the tool writes paths inside the repository so), and paths are shown relative to it."""
    from mlfound.data.readers import SourceSpec, lot_label, lot_metadata

    exp, units = report["experiment"], report["units"]
    pretrain, target, finetune = exp["pretrain"], exp["target"], exp["finetune"]
    corpus, target_file = root / pretrain["corpus"], root / target["file"]
    manifest = corpus / "SHA256SUMS"
    points = []
    for n in finetune["sizes"]:
        for start, start_method in (("this model", method), ("mlfound from scratch", "none"),
                                    ("MACE from scratch", "mace")):
            runs = [u for u in units if u["method"] == start_method and u["seed"] == seed and u["n"] == n]
            if runs:
                points.append(_point(start, n, [u["test"] for u in runs]))
        baseline = [u["references_only"] for u in units if u["method"] == method and u["seed"] == seed
                    and u["n"] == n]
        if baseline:
            points.append(_point("references only", n, baseline))
    recipes = ", ".join(f"{name} {json.dumps(recipe)}" for name, recipe in finetune["recipes"].items())
    lot = lot_label(lot_metadata(SourceSpec(path=target_file, task=target["head"])))
    return ModelCard(
        summary=f"{method} pretrained on {_shown(corpus, root)}: a start for fine-tuning a new head at a new LoT",
        corpus=_shown(corpus, root),
        corpus_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None,
        pretraining=f"{method}, {pretrain['grad_steps']} gradient steps per rank on 2 ranks, seed {seed}, "
                    f"config {_shown(root / pretrain['config'], root)} {' '.join(pretrain['overrides'])}".strip(),
        learning_curve=LearningCurve(
            target=f"{_shown(target_file, root)}, new head {target['head']}", lot=lot,
            test_structures=target["test"], validation_structures=target["val"],
            protocol=f"at most {finetune['max_steps']} steps; recipes {recipes}, the lowest validation loss kept "
                     "(scratch alike)" + ("; MACE through its own CLI on the same structures"
                                          if any(p.start == "MACE from scratch" for p in points) else ""),
            points=points),
        made_by=command)


def _point(start: str, n: int, errors: list[dict]) -> CurvePoint:
    forces = [e["forces_mae_mev_a"] for e in errors if e.get("forces_mae_mev_a") is not None]
    return CurvePoint(start=start, num_train=n, runs=len(errors),
                      energy_mae_mev_atom=float(np.mean([e["energy_mae_mev_atom"] for e in errors])),
                      forces_mae_mev_a=float(np.mean(forces)) if forces else None)


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def card_lines(card: dict) -> list[str]:
    """The card as ``mlfound show`` prints it."""
    card = ModelCard.model_validate(card)
    curve = card.learning_curve
    lines = [f"model card: {card.summary}",
             f"  corpus: {card.corpus}" + (f" (SHA256SUMS {card.corpus_sha256[:12]}...)" if card.corpus_sha256 else ""),
             f"  pretraining: {card.pretraining}",
             f"  learning curve: {curve.target} ({curve.lot}); test MAE on {curve.test_structures} held-out "
             f"structures, {curve.validation_structures} for validation; {curve.protocol}",
             f"    {'start':<22}{'N':>5}{'runs':>6}{'E MAE meV/atom':>16}{'F MAE meV/Å':>13}"]
    for p in curve.points:
        forces = f"{p.forces_mae_mev_a:.0f}" if p.forces_mae_mev_a is not None else "-"
        lines.append(f"    {p.start:<22}{p.num_train:>5}{p.runs:>6}{p.energy_mae_mev_atom:>16.1f}{forces:>13}")
    lines += [f"  note: {note}" for note in card.notes]
    lines.append(f"  made by: {card.made_by}")
    return lines
