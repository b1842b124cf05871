"""Corpus recipes: which molecules are sampled, and which LoT labels which molecules.

Like real datasets, the LoTs cover overlapping but different molecule sets; one is energy-only.
"""
from __future__ import annotations

import dataclasses

# Small neutral closed-shell CHNO molecules (1-6 heavy atoms): cheap enough for DFT on 2 cores.
SMALL_MOLECULES: dict[str, str] = {
    "methane": "C", "ethane": "CC", "propane": "CCC", "ethylene": "C=C", "acetylene": "C#C",
    "water": "O", "ammonia": "N", "methanol": "CO", "ethanol": "CCO", "propanol": "CCCO",
    "dimethyl_ether": "COC", "formaldehyde": "C=O", "acetaldehyde": "CC=O", "acetone": "CC(C)=O",
    "formic_acid": "OC=O", "acetic_acid": "CC(=O)O", "methylamine": "CN", "dimethylamine": "CNC",
    "hydrogen_cyanide": "C#N", "acetonitrile": "CC#N", "formamide": "NC=O", "acetamide": "CC(N)=O",
    "urea": "NC(N)=O", "glycine": "NCC(=O)O", "furan": "c1ccoc1", "pyrrole": "c1cc[nH]c1",
    "imidazole": "c1c[nH]cn1", "oxazole": "c1cocn1",
}
TARGET_MOLECULES: dict[str, str] = {"paracetamol": "CC(=O)Nc1ccc(O)cc1"}


@dataclasses.dataclass(frozen=True)
class TaskRecipe:
    lot: str  # key of levels.LEVELS; also the task name
    molecules: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Recipe:
    smiles: dict[str, str]
    temperatures_k: tuple[float, ...]
    frames_per_temperature: int
    md_stride_steps: int  # MD steps (0.5 fs) between saved frames
    tasks: tuple[TaskRecipe, ...]
    seed: int = 0


_SMALL = list(SMALL_MOLECULES)
RECIPES: dict[str, Recipe] = {
    # Five pretraining tasks: 28 molecules x 3 temperatures x 4 frames = 336 geometries in the pool.
    "demo-pretrain": Recipe(
        smiles=SMALL_MOLECULES, temperatures_k=(300.0, 600.0, 1000.0), frames_per_temperature=4, md_stride_steps=40,
        tasks=(
            TaskRecipe("gfn2_xtb", tuple(_SMALL)),
            TaskRecipe("gfn1_xtb", tuple(_SMALL[:22])),
            TaskRecipe("hf_sto3g", tuple(_SMALL[6:])),
            TaskRecipe("pbe0_631gs", tuple(_SMALL[:10] + _SMALL[16:26])),
            TaskRecipe("b3lyp_631g", tuple(_SMALL[4:24])),
        )),
    # Fine-tuning target: one drug-like molecule at a LoT none of the pretraining tasks uses.
    "demo-target": Recipe(
        smiles=TARGET_MOLECULES, temperatures_k=(300.0, 600.0, 900.0), frames_per_temperature=100, md_stride_steps=20,
        tasks=(TaskRecipe("hf_631g", ("paracetamol",)),)),
    # Seconds-long recipe for tests of the tool itself.
    "tiny": Recipe(
        smiles={"water": "O", "methanol": "CO"}, temperatures_k=(300.0,), frames_per_temperature=2, md_stride_steps=5,
        tasks=(TaskRecipe("gfn2_xtb", ("water", "methanol")), TaskRecipe("hf_sto3g", ("water",)))),
}
