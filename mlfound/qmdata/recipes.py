"""Corpus recipes: which molecules are sampled, and which LoT labels which molecules and frames.

The recipes are data, in configs/qmdata/recipes.yaml (read here once, as ``RECIPES``); this module gives them
their types. Like real datasets, the LoTs cover overlapping but different molecule sets; one is energy-only.
Two recipes mirror the seed paper's experiments (Allen et al. 2024): ``e1-one-molecule`` labels one molecule's
MD at many LoTs, ``e2-many-molecules`` labels ~100 drug-like molecules at five LoTs. Both fine-tune at
``demo-target`` (paracetamol at HF/6-31G), a LoT that neither corpus uses and, for E2, a molecule it does not
contain.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import yaml

from mlfound.qmdata.library import Library, choose, enumerate_library

RECIPES_FILE = Path(__file__).resolve().parents[2] / "configs" / "qmdata" / "recipes.yaml"


@dataclasses.dataclass(frozen=True)
class Box:
    """A periodic cell of ``copies`` molecules of ``molecule`` (a key of the recipe's SMILES) at
    ``density_g_cm3``: a liquid or molecular-solid sample with energies, forces and stress under periodic
    boundaries. MD runs with GFN1-xTB at a fixed cell; each frame is then strained by up to ``max_strain``."""
    molecule: str
    copies: int
    density_g_cm3: float
    max_strain: float = 0.03


@dataclasses.dataclass(frozen=True)
class Crystal:
    """A molecular crystal from its space group, lattice (a, b, c in Å; angles in degrees) and asymmetric unit
    in fractional coordinates, repeated ``repeat`` times along the cell vectors; MD and strain as for a Box.
    ``molecule`` names its molecule's SMILES, written into the frames' metadata."""
    molecule: str
    spacegroup: int
    cellpar: tuple[float, float, float, float, float, float]
    basis_symbols: tuple[str, ...]
    basis_fractional: tuple[tuple[float, float, float], ...]
    repeat: tuple[int, int, int] = (1, 1, 1)
    max_strain: float = 0.03


@dataclasses.dataclass(frozen=True)
class TaskRecipe:
    lot: str  # key of levels.LEVELS; also the task name
    # keys of the recipe's SMILES or of its boxes, or a count n: the recipe's first n molecules (a library draw's)
    molecules: tuple[str, ...] | int
    frame_step: int = 1  # label every n-th MD frame: expensive LoTs see fewer frames, as in real corpora
    forces: bool | None = None  # None: as the LoT's entry in levels.LEVELS says; True/False overrides it


@dataclasses.dataclass(frozen=True)
class LibraryDraw:
    """``count`` molecules of a combinatorial library (``mlfound.qmdata.library``) drawn by ``seed``, leaving out
    ``exclude_smiles`` (the fine-tuning targets' molecules, by InChIKey)."""
    library: Library
    count: int
    seed: int = 0
    exclude_smiles: tuple[str, ...] = ()

    def smiles(self) -> dict[str, str]:
        return choose(enumerate_library(self.library), self.count, self.seed, list(self.exclude_smiles))


@dataclasses.dataclass(frozen=True)
class Recipe:
    molecules: dict[str, str] | LibraryDraw  # name -> SMILES, or a draw from a library (made when first used)
    temperatures_k: tuple[float, ...]
    frames_per_temperature: int
    md_stride_steps: int  # MD steps (0.5 fs) between saved frames
    tasks: tuple[TaskRecipe, ...]
    seed: int = 0
    boxes: dict[str, Box | Crystal] = dataclasses.field(default_factory=dict)  # periodic systems, by name
    # how a molecule's frames at a temperature are drawn: xTB Langevin MD, or normal-mode sampling (displacements
    # along the GFN2-xTB normal modes with a random share of 3/2 N k T, as ANI-1's data), which costs one Hessian
    # per molecule instead of md_stride_steps xTB steps per frame
    sampling: Literal["md", "normal_modes"] = "md"

    @functools.cached_property
    def smiles(self) -> dict[str, str]:
        """name -> SMILES of every molecule (a library is enumerated here, once)."""
        return dict(self.molecules) if isinstance(self.molecules, dict) else self.molecules.smiles()

    def only_tasks(self, lots: set[str]) -> Recipe:
        """This recipe with just the tasks whose LoT is in ``lots``: its costly tasks can run first, the rest later
        (same seeds, so the same frames and work files)."""
        return dataclasses.replace(self, tasks=tuple(task for task in self.tasks if task.lot in lots))

    def molecules_of(self, task: TaskRecipe) -> tuple[str, ...]:
        """The molecules (and boxes) ``task`` labels, by name."""
        if isinstance(task.molecules, int):
            if task.molecules > len(self.smiles):
                raise ValueError(f"task {task.lot} asks for the first {task.molecules} molecules of a recipe that has "
                                 f"{len(self.smiles)}")
            return tuple(self.smiles)[:task.molecules]
        return task.molecules


def load_recipes(path: Path = RECIPES_FILE) -> tuple[dict[str, dict[str, str]], dict[str, Recipe]]:
    """The named molecule sets ({name: SMILES}) and the recipes of ``path``; a recipe's ``molecules`` is a set's
    name, its own mapping, or ``{library: NAME, count: N, seed: S, exclude: [set names]}`` (a draw from one of
    the file's ``libraries``); a box is ``kind: box`` or ``kind: crystal`` with the fields of Box or Crystal."""
    data = yaml.safe_load(path.read_text())
    sets = data["molecules"]
    recipes = {}
    for name, raw in data["recipes"].items():
        try:
            recipes[name] = _recipe(raw, sets, data.get("libraries", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: recipe {name!r} is malformed ({type(err).__name__}: {err})") from None
    return sets, recipes


def _recipe(raw: dict, sets: dict[str, dict[str, str]], libraries: dict[str, dict]) -> Recipe:
    boxes = {name: _box(dict(box)) for name, box in raw.get("boxes", {}).items()}
    tasks = tuple(TaskRecipe(t["lot"], t["molecules"] if isinstance(t["molecules"], int) else tuple(t["molecules"]),
                             t.get("frame_step", 1), t.get("forces")) for t in raw["tasks"])
    sampling = raw.get("sampling", "md")
    if sampling not in ("md", "normal_modes"):
        raise ValueError(f"sampling {sampling!r} is not md or normal_modes")
    return Recipe(molecules=_molecules(raw["molecules"], sets, libraries),
                  temperatures_k=tuple(raw["temperatures_k"]), frames_per_temperature=raw["frames_per_temperature"],
                  md_stride_steps=raw["md_stride_steps"], tasks=tasks, seed=raw.get("seed", 0), boxes=boxes,
                  sampling=sampling)


def _molecules(molecules: str | dict, sets: dict[str, dict[str, str]], libraries: dict[str, dict]):
    if isinstance(molecules, str):
        return dict(sets[molecules])
    if "library" not in molecules:
        return dict(molecules)
    draw = dict(molecules)
    definition = dict(libraries[draw.pop("library")])
    min_atoms, max_atoms = definition.pop("atoms", (Library.min_atoms, Library.max_atoms))
    library = Library(**{**definition, "elements": tuple(definition.get("elements", Library.elements))},
                      min_atoms=min_atoms, max_atoms=max_atoms)
    excluded = tuple(smiles for name in draw.pop("exclude", []) for smiles in sets[name].values())
    return LibraryDraw(library, exclude_smiles=excluded, **draw)


def _box(raw: dict) -> Box | Crystal:
    kind = raw.pop("kind")
    if kind == "box":
        return Box(**raw)
    if kind != "crystal":
        raise ValueError(f"box kind {kind!r} is not box or crystal")
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()}
    fields["basis_fractional"] = tuple(tuple(xyz) for xyz in fields["basis_fractional"])
    return Crystal(**fields)


MOLECULE_SETS, RECIPES = load_recipes()
