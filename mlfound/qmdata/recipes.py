"""Corpus recipes: which molecules are sampled, and which LoT labels which molecules and frames.

Like real datasets, the LoTs cover overlapping but different molecule sets; one is energy-only.
Two recipes mirror the seed paper's experiments (Allen et al. 2024): ``e1-one-molecule`` labels one
molecule's MD at many LoTs, ``e2-many-molecules`` labels ~100 drug-like molecules at five LoTs.
Both fine-tune at ``demo-target`` (paracetamol at HF/6-31G), a LoT that neither corpus uses and, for
E2, a molecule it does not contain.
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
# Held-out fine-tuning targets beside paracetamol: a molecule no corpus holds (at a LoT E2 has) and a LoT no corpus
# uses (on a molecule E2 holds at its xTB LoTs only), so every claim is checked on more than the target it was tuned on.
HELD_OUT_MOLECULES: dict[str, str] = {"salicylamide": "NC(=O)c1ccccc1O", "n_acetylglycine": "CC(=O)NCC(=O)O"}

# Drug-like CHNO molecules for E2: fragments and relatives of paracetamol first (phenols, anilides,
# aromatic amines and carbonyls), then unrelated heterocycles, lactams, amino acids and small polar
# molecules. Paracetamol itself is left out: E2's target is a molecule the corpus does not contain.
DRUGLIKE_MOLECULES: dict[str, str] = {
    "phenol": "Oc1ccccc1", "aniline": "Nc1ccccc1", "acetanilide": "CC(=O)Nc1ccccc1",
    "4_aminophenol": "Nc1ccc(O)cc1", "n_methylacetamide": "CNC(C)=O", "benzene": "c1ccccc1",
    "toluene": "Cc1ccccc1", "anisole": "COc1ccccc1", "phenacetin": "CCOc1ccc(NC(C)=O)cc1",
    "methacetin": "COc1ccc(NC(C)=O)cc1", "4_acetamidobenzoic_acid": "CC(=O)Nc1ccc(cc1)C(=O)O",
    "2_hydroxyacetanilide": "CC(=O)Nc1ccccc1O", "3_hydroxyacetanilide": "CC(=O)Nc1cccc(O)c1",
    "formanilide": "O=CNc1ccccc1", "n_methylaniline": "CNc1ccccc1", "4_nitrophenol": "O=[N+]([O-])c1ccc(O)cc1",
    "hydroquinone": "Oc1ccc(O)cc1", "catechol": "Oc1ccccc1O", "resorcinol": "Oc1cccc(O)c1",
    "p_cresol": "Cc1ccc(O)cc1", "4_methylacetanilide": "CC(=O)Nc1ccc(C)cc1", "benzamide": "NC(=O)c1ccccc1",
    "benzoic_acid": "OC(=O)c1ccccc1", "salicylic_acid": "OC(=O)c1ccccc1O", "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "methyl_salicylate": "COC(=O)c1ccccc1O", "4_hydroxybenzaldehyde": "O=Cc1ccc(O)cc1",
    "4_hydroxyacetophenone": "CC(=O)c1ccc(O)cc1", "acetophenone": "CC(=O)c1ccccc1", "benzaldehyde": "O=Cc1ccccc1",
    "benzyl_alcohol": "OCc1ccccc1", "4_aminobenzoic_acid": "Nc1ccc(C(=O)O)cc1", "benzocaine": "CCOC(=O)c1ccc(N)cc1",
    "n_n_dimethylacetamide": "CN(C)C(C)=O", "propionanilide": "CCC(=O)Nc1ccccc1",
    "diacetamate": "CC(=O)Nc1ccc(OC(C)=O)cc1", "p_phenetidine": "CCOc1ccc(N)cc1", "4_methoxyphenol": "COc1ccc(O)cc1",
    "napqi": "CC(=O)N=C1C=CC(=O)C=C1", "p_benzoquinone": "O=C1C=CC(=O)C=C1", "n_benzylacetamide": "CC(=O)NCc1ccccc1",
    "tyramine": "NCCc1ccc(O)cc1", "dopamine": "NCCc1ccc(O)c(O)c1", "mandelic_acid": "OC(C(=O)O)c1ccccc1",
    "phenylacetic_acid": "OC(=O)Cc1ccccc1", "2_phenylethanol": "OCCc1ccccc1",
    "pyridine": "c1ccncc1", "2_pyridone": "O=c1cccc[nH]1", "nicotinamide": "NC(=O)c1cccnc1",
    "isoniazid": "NNC(=O)c1ccncc1", "pyrimidine": "c1cncnc1", "uracil": "O=c1cc[nH]c(=O)[nH]1",
    "thymine": "Cc1c[nH]c(=O)[nH]c1=O", "cytosine": "Nc1cc[nH]c(=O)n1", "pyrazine": "c1cnccn1",
    "indole": "c1ccc2[nH]ccc2c1", "benzimidazole": "c1ccc2[nH]cnc2c1", "benzoxazole": "c1ccc2ocnc2c1",
    "quinoline": "c1ccc2ncccc2c1", "naphthalene": "c1ccc2ccccc2c1", "2_naphthol": "Oc1ccc2ccccc2c1",
    "coumarin": "O=c1ccc2ccccc2o1", "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "theophylline": "Cn1c(=O)c2[nH]cnc2n(C)c1=O", "2_aminopyridine": "Nc1ccccn1", "4_aminopyridine": "Nc1ccncc1",
    "histamine": "NCCc1c[nH]cn1", "phenylalanine": "NC(Cc1ccccc1)C(=O)O",
    "hydantoin": "O=C1CNC(=O)N1", "succinimide": "O=C1CCC(=O)N1", "2_pyrrolidone": "O=C1CCCN1",
    "caprolactam": "O=C1CCCCCN1", "piperidine": "C1CCNCC1", "morpholine": "C1COCCN1", "piperazine": "C1CNCCN1",
    "tetrahydrofuran": "C1CCOC1", "1_4_dioxane": "C1COCCO1", "cyclohexanol": "OC1CCCCC1",
    "cyclohexanone": "O=C1CCCCC1", "gamma_butyrolactone": "O=C1CCCO1", "alanine": "CC(N)C(=O)O",
    "serine": "NC(CO)C(=O)O", "proline": "OC(=O)C1CCCN1", "glycylglycine": "NCC(=O)NCC(=O)O",
    "n_acetylglycine": "CC(=O)NCC(=O)O", "alanine_dipeptide": "CC(=O)NC(C)C(=O)NC", "beta_alanine": "NCCC(=O)O",
    "gaba": "NCCCC(=O)O", "lactic_acid": "CC(O)C(=O)O", "pyruvic_acid": "CC(=O)C(=O)O",
    "methyl_acetate": "COC(C)=O", "ethyl_acetate": "CCOC(C)=O", "malonic_acid": "OC(=O)CC(=O)O",
    "urethane": "CCOC(N)=O", "n_methylurea": "CNC(N)=O", "guanidine": "NC(N)=N", "acetamidine": "CC(N)=N",
    "nitromethane": "C[N+](=O)[O-]", "acrylamide": "C=CC(N)=O", "acrylic_acid": "C=CC(=O)O",
    "2_butanone": "CCC(C)=O", "isopropanol": "CC(C)O", "tert_butanol": "CC(C)(C)O", "diethyl_ether": "CCOCC",
    "propionamide": "CCC(N)=O", "butyric_acid": "CCCC(=O)O", "ethylene_glycol": "OCCO", "glycerol": "OCC(O)CO",
    "ethanolamine": "NCCO",
}


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


# Urea, P-42_1m (No. 113), two molecules per cell: the neutron structure of Swaminathan, Craven & McMullan,
# Acta Cryst. B40, 300 (1984); tests/qmdata check its bonds (C=O 1.26, C-N 1.35, N-H 1.00 Å) and H-bonds.
UREA_CRYSTAL = Crystal("urea", 113, (5.565, 5.565, 4.684, 90.0, 90.0, 90.0), ("C", "O", "N", "H", "H"),
                       ((0.0, 0.5, 0.3260), (0.0, 0.5, 0.5953), (0.1459, 0.6459, 0.1766), (0.2575, 0.7575, 0.2827),
                        (0.1441, 0.6441, -0.0380)), repeat=(1, 1, 2))


@dataclasses.dataclass(frozen=True)
class TaskRecipe:
    lot: str  # key of levels.LEVELS; also the task name
    molecules: tuple[str, ...]  # keys of the recipe's SMILES or of its boxes
    frame_step: int = 1  # label every n-th MD frame: expensive LoTs see fewer frames, as in real corpora


@dataclasses.dataclass(frozen=True)
class Recipe:
    smiles: dict[str, str]
    temperatures_k: tuple[float, ...]
    frames_per_temperature: int
    md_stride_steps: int  # MD steps (0.5 fs) between saved frames
    tasks: tuple[TaskRecipe, ...]
    seed: int = 0
    boxes: dict[str, Box | Crystal] = dataclasses.field(default_factory=dict)  # periodic systems, by name


_SMALL = list(SMALL_MOLECULES)
_DRUGLIKE = list(DRUGLIKE_MOLECULES)
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
    # Two held-out targets made like demo-target: <out>/pbe0_631gs.extxyz (salicylamide) and wb97x_631gs.extxyz.
    "held-out-targets": Recipe(
        smiles=HELD_OUT_MOLECULES, temperatures_k=(300.0, 600.0, 900.0), frames_per_temperature=100,
        md_stride_steps=20, seed=4, tasks=(TaskRecipe("pbe0_631gs", ("salicylamide",)),
                                           TaskRecipe("wb97x_631gs", ("n_acetylglycine",)))),
    # E1, one molecule at many LoTs: the target's own MD (another seed than demo-target's, so no test
    # geometry is pretrained on) at five LoTs; the DFT LoTs label every third frame.
    "e1-one-molecule": Recipe(
        smiles=TARGET_MOLECULES, temperatures_k=(300.0, 600.0, 900.0), frames_per_temperature=150, md_stride_steps=20,
        seed=1, tasks=(
            TaskRecipe("gfn2_xtb", ("paracetamol",)),
            TaskRecipe("gfn1_xtb", ("paracetamol",)),
            TaskRecipe("hf_sto3g", ("paracetamol",)),
            TaskRecipe("pbe0_631gs", ("paracetamol",), frame_step=3),
            TaskRecipe("b3lyp_631g", ("paracetamol",), frame_step=3),
        )),
    # E2, many molecules: overlapping molecule sets per LoT; the costlier the LoT, the fewer and
    # smaller the molecules it labels (relatives of the target come first in DRUGLIKE_MOLECULES).
    "e2-many-molecules": Recipe(
        smiles=DRUGLIKE_MOLECULES, temperatures_k=(300.0, 600.0, 900.0), frames_per_temperature=6, md_stride_steps=40,
        seed=2, tasks=(
            TaskRecipe("gfn2_xtb", tuple(_DRUGLIKE)),
            TaskRecipe("gfn1_xtb", tuple(_DRUGLIKE[:80])),
            TaskRecipe("hf_sto3g", tuple(_DRUGLIKE[:50]), frame_step=2),
            TaskRecipe("pbe0_631gs", tuple(_DRUGLIKE[:8] + _DRUGLIKE[45:50] + _DRUGLIKE[69:76]), frame_step=3),
            TaskRecipe("b3lyp_631g", tuple(_DRUGLIKE[:30]), frame_step=3),
        )),
    # Periodic systems (liquid water and methanol boxes, the urea crystal) labelled under periodic boundaries by
    # both xTBs, with stress: the materials side of the demo (issue 14).
    "demo-periodic": Recipe(
        smiles={"water": "O", "methanol": "CO", "urea": "NC(N)=O"}, temperatures_k=(300.0, 500.0),
        frames_per_temperature=6, md_stride_steps=20, seed=3,
        boxes={"water_box": Box("water", 8, 1.0), "methanol_box": Box("methanol", 4, 0.79),
               "urea_crystal": UREA_CRYSTAL},
        tasks=(TaskRecipe("gfn1_xtb", ("water_box", "methanol_box", "urea_crystal")),
               TaskRecipe("gfn2_xtb", ("water_box", "methanol_box", "urea_crystal"), frame_step=2))),
    # Seconds-long recipes for tests of the tool itself.
    "tiny": Recipe(
        smiles={"water": "O", "methanol": "CO"}, temperatures_k=(300.0,), frames_per_temperature=2, md_stride_steps=5,
        tasks=(TaskRecipe("gfn2_xtb", ("water", "methanol")), TaskRecipe("hf_sto3g", ("water",)))),
    "tiny-periodic": Recipe(
        smiles={"water": "O"}, temperatures_k=(300.0,), frames_per_temperature=2, md_stride_steps=2,
        boxes={"water_box": Box("water", 2, 0.9)}, tasks=(TaskRecipe("gfn1_xtb", ("water_box",)),)),
}
