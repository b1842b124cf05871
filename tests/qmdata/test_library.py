"""The combinatorial library and normal-mode sampling behind issue 37's corpus: real RDKit, real GFN2-xTB."""
import dataclasses

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import read
from rdkit import Chem

from mlfound.qmdata import geometries
from mlfound.qmdata.corpus import make_corpus
from mlfound.qmdata.library import Library, choose, enumerate_library
from mlfound.qmdata.recipes import RECIPES, LibraryDraw, Recipe, TaskRecipe, load_recipes
from tests.qmdata.test_make_qm_dataset import counts

SMALL = Library(scaffolds={"benzene": "c1ccccc1", "pyridine": "c1ccncc1", "cyclohexane": "C1CCCCC1"},
                substituents={"methyl": "*C", "hydroxy": "*O", "acetamido": "*NC(C)=O", "fluoro": "*F"},
                max_substituents=2)
PARACETAMOL = "CC(=O)Nc1ccc(O)cc1"


def inchikey(smiles: str) -> str:
    return Chem.MolToInchiKey(Chem.MolFromSmiles(smiles))


def test_the_library_is_every_distinct_product_once_within_its_bounds():
    molecules = enumerate_library(SMALL)
    keys = [inchikey(smiles) for smiles in molecules.values()]
    assert len(set(keys)) == len(keys)  # symmetric positions gave each product once
    assert list(molecules.values()).count("Cc1ccccc1") == 1 and PARACETAMOL in molecules.values()  # toluene once
    assert "Cc1ccccc1" == molecules["benzene_methyl0"]
    for smiles in molecules.values():
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        assert SMALL.min_atoms <= mol.GetNumAtoms() <= SMALL.max_atoms and Chem.GetFormalCharge(mol) == 0
    # one scaffold x (1 + 4 substituents x unique positions + pairs); pyridine's three unique positions
    assert sum(name.startswith("pyridine_") and name.count("_") == 1 for name in molecules) == 3 * 4
    assert enumerate_library(SMALL) == molecules  # a pure function of its definition
    smaller = enumerate_library(dataclasses.replace(SMALL, max_atoms=12))
    assert set(smaller.values()) < set(molecules.values())


def test_a_draw_is_seeded_and_leaves_the_targets_out():
    molecules = enumerate_library(SMALL)
    drawn = choose(molecules, 40, seed=3, exclude_smiles=[PARACETAMOL])
    assert len(drawn) == 40 and drawn == choose(molecules, 40, seed=3, exclude_smiles=[PARACETAMOL])
    assert list(drawn) != sorted(drawn, key=list(molecules).index)  # in random order: a task's first n are random
    everything = choose(molecules, len(molecules) - 1, seed=0, exclude_smiles=[PARACETAMOL])
    assert inchikey(PARACETAMOL) not in {inchikey(smiles) for smiles in everything.values()}
    with pytest.raises(ValueError, match=f"has {len(molecules) - 1} molecules after exclusions, fewer than the "
                                         f"{len(molecules)} asked for"):
        choose(molecules, len(molecules), seed=0, exclude_smiles=[PARACETAMOL])


@pytest.mark.parametrize("name, smiles, message", [
    ("twice", "*C*", "needs exactly one dummy atom"), ("nothing", "C", "needs exactly one dummy atom"),
    ("broken", "*C(", "RDKit cannot read the SMILES"),
])
def test_a_bad_substituent_is_named(name, smiles, message):
    with pytest.raises(ValueError, match=f"{message}.*" if "dummy" in message else message):
        enumerate_library(Library(scaffolds={"benzene": "c1ccccc1"}, substituents={name: smiles}))


def test_the_scale_recipe_draws_from_its_library_in_the_yaml(tmp_path):
    recipe = RECIPES["scale-druglike"]
    assert isinstance(recipe.molecules, LibraryDraw) and recipe.sampling == "normal_modes"
    assert recipe.molecules.count == 1000 and PARACETAMOL in recipe.molecules.exclude_smiles
    assert [task.molecules for task in recipe.tasks] == [1000, 800, 400, 150, 250]
    assert recipe.tasks[-1].forces is True  # B3LYP/6-31G with forces at scale
    path = tmp_path / "recipes.yaml"
    path.write_text("molecules: {few: {water: O}}\nlibraries:\n  tiny: {scaffolds: {benzene: c1ccccc1}, "
                    "substituents: {methyl: '*C', hydroxy: '*O'}}\nrecipes:\n  draw: {molecules: {library: tiny, "
                    "count: 3, seed: 1}, temperatures_k: [300.0], frames_per_temperature: 1, md_stride_steps: 1, "
                    "tasks: [{lot: gfn2_xtb, molecules: 2}]}\n")
    drawn = load_recipes(path)[1]["draw"]
    assert len(drawn.smiles) == 3 and drawn.molecules_of(drawn.tasks[0]) == tuple(drawn.smiles)[:2]
    too_many = dataclasses.replace(drawn, tasks=(TaskRecipe("gfn2_xtb", 4),))
    with pytest.raises(ValueError, match="first 4 molecules of a recipe that has 3"):
        too_many.molecules_of(too_many.tasks[0])


def test_normal_mode_frames_carry_the_harmonic_energy_of_their_temperature():
    symbols, pos_a = geometries.rdkit_conformer("CO", seed=0)  # methanol: 6 atoms, 12 vibrations
    modes = geometries.normal_modes(symbols, pos_a)
    assert len(modes.curvature) == 3 * len(symbols) - 6
    frames = geometries.normal_mode_frames(modes, 300.0, 200, seed=0)
    assert frames.shape == (200, 6, 3)
    np.testing.assert_array_equal(frames, geometries.normal_mode_frames(modes, 300.0, 200, seed=0))
    displacement = ((frames - modes.minimum_a).reshape(200, -1) / modes.inv_sqrt_mass) @ modes.modes
    harmonic_ev = 0.5 * (modes.curvature * displacement**2).sum(axis=1)
    budget_ev = 1.5 * len(symbols) * units.kB * 300.0
    assert harmonic_ev.max() <= budget_ev * (1 + 1e-9)
    assert harmonic_ev.mean() == pytest.approx(budget_ev / 2, rel=0.15)  # the sum of shares is uniform in [0, 1]
    from tblite.ase import TBLite

    atoms = Atoms(symbols, positions=modes.minimum_a)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    minimum_ev = atoms.get_potential_energy()
    above_ev = []
    for frame in frames[:20]:
        atoms.set_positions(frame)
        above_ev.append(atoms.get_potential_energy() - minimum_ev)
    assert 0 < np.mean(above_ev) < 2 * budget_ev  # near harmonic at 300 K: the xTB energy rises as the modes say


def test_a_normal_mode_corpus_labels_its_frames_and_can_give_an_energy_only_lot_forces(tmp_path):
    recipe = Recipe(molecules={"water": "O", "methanol": "CO"}, temperatures_k=(300.0, 600.0),
                    frames_per_temperature=2, md_stride_steps=1, sampling="normal_modes",
                    tasks=(TaskRecipe("gfn2_xtb", 2), TaskRecipe("b3lyp_631g", ("water",), frame_step=2, forces=True)))
    summary = make_corpus("nms", recipe, tmp_path, workers=1)
    assert counts(summary) == {"gfn2_xtb": {"structures": 8, "rejected": 0, "molecules": 2, "forces": True},
                               "b3lyp_631g": {"structures": 2, "rejected": 0, "molecules": 1, "forces": True}}
    frames = read(tmp_path / "b3lyp_631g.extxyz", index=":")
    assert all(atoms.get_forces().shape == (3, 3) for atoms in frames)
    assert {atoms.info["temperature_K"] for atoms in frames} == {300.0, 600.0}
