"""A combinatorial molecule library: scaffolds x substituents x positions, for corpora larger than a hand-written
list (no database is reachable from the machines this project runs on).

Each scaffold (a ring system, as SMILES) gets one to ``max_substituents`` substituents (SMILES with one dummy atom
``*`` where they attach) on distinct carbon atoms that carry a hydrogen; every product is sanitised by RDKit,
kept only if neutral, made of the allowed elements and of ``min_atoms``-``max_atoms`` atoms with hydrogens, and
deduplicated by InChIKey (symmetric positions give the same molecule once). The first product of each InChIKey
in enumeration order names it, so the library is a pure function of its definition; ``choose`` then draws a
seeded sample of a given size, the excluded molecules (the fine-tuning targets) left out.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Library:
    scaffolds: dict[str, str]  # name -> SMILES of a ring system
    substituents: dict[str, str]  # name -> SMILES with one dummy atom "*" at the attachment point
    max_substituents: int = 2
    min_atoms: int = 7  # with hydrogens
    max_atoms: int = 40
    elements: tuple[str, ...] = ("H", "C", "N", "O", "F", "S")


def enumerate_library(library: Library) -> dict[str, str]:
    """{name: canonical SMILES} of every distinct product, in enumeration order (scaffolds, then substitution
    count, positions and substituents in definition order); names are ``<scaffold>_<substituent><atom index>...``
    and unique. A scaffold or substituent RDKit cannot read is a ValueError naming it."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # products that fail sanitisation are dropped here, not logged
    scaffolds = {name: _read(smiles, f"scaffold {name!r}") for name, smiles in library.scaffolds.items()}
    substituents = {name: _substituent(name, smiles) for name, smiles in library.substituents.items()}
    products: dict[str, tuple[str, str]] = {}  # InChIKey -> (name, SMILES)
    for scaffold_name, scaffold in scaffolds.items():
        positions = [atom.GetIdx() for atom in scaffold.GetAtoms()
                     if atom.GetSymbol() == "C" and atom.GetTotalNumHs() > 0 and atom.GetNumExplicitHs() == 0]
        _keep(products, scaffold_name, scaffold, library)
        for count in range(1, library.max_substituents + 1):
            for sites in itertools.combinations(positions, count):
                for chosen in itertools.product(substituents, repeat=count):
                    name = scaffold_name + "_" + "_".join(f"{sub}{site}" for sub, site in zip(chosen, sites))
                    product = _attach(scaffold, sites, [substituents[sub] for sub in chosen])
                    if product is not None:
                        _keep(products, name, product, library)
    return dict(products.values())


def choose(molecules: dict[str, str], count: int, seed: int, exclude_smiles: list[str] = ()) -> dict[str, str]:
    """``count`` molecules drawn without replacement by ``seed``, in the order drawn (so a recipe's first n are a
    random n of them), leaving out those with the InChIKey of any of ``exclude_smiles``; fewer available than
    asked is a ValueError saying how many."""
    from rdkit import Chem

    excluded = {Chem.MolToInchiKey(_read(smiles, "excluded molecule")) for smiles in exclude_smiles}
    allowed = [name for name, smiles in molecules.items()
               if Chem.MolToInchiKey(Chem.MolFromSmiles(smiles)) not in excluded]
    if count > len(allowed):
        raise ValueError(f"the library has {len(allowed)} molecules after exclusions, fewer than the {count} asked "
                         "for: add scaffolds or substituents, or allow more substituents")
    picked = np.random.default_rng(seed).choice(len(allowed), size=count, replace=False)  # in random order
    return {allowed[i]: molecules[allowed[i]] for i in picked}


def _read(smiles: str, what: str):
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot read the SMILES {smiles!r} of {what}")
    return mol


def _substituent(name: str, smiles: str):
    mol = _read(smiles, f"substituent {name!r}")
    dummies = [atom for atom in mol.GetAtoms() if atom.GetAtomicNum() == 0]
    if len(dummies) != 1 or dummies[0].GetDegree() != 1:
        raise ValueError(f"substituent {name!r} ({smiles}) needs exactly one dummy atom '*' with one bond, where it "
                         "attaches")
    return mol


def _attach(scaffold, sites: tuple[int, ...], substituents: list):
    """The scaffold with each substituent bonded to its site (a hydrogen replaced), sanitised; None if RDKit
    refuses the product (a valence it cannot have)."""
    from rdkit import Chem

    product = Chem.RWMol(scaffold)
    pieces = []
    for label, (site, substituent) in enumerate(zip(sites, substituents), start=1):
        dummy = product.AddAtom(Chem.Atom(0))
        product.GetAtomWithIdx(dummy).SetAtomMapNum(label)
        product.AddBond(site, dummy, Chem.BondType.SINGLE)
        piece = Chem.RWMol(substituent)
        next(a for a in piece.GetAtoms() if a.GetAtomicNum() == 0).SetAtomMapNum(label)
        pieces.append(piece)
    joined = product.GetMol()
    for piece in pieces:
        joined = Chem.CombineMols(joined, piece)
    try:
        joined = Chem.molzip(joined)
        Chem.SanitizeMol(joined)
    except (Chem.rdchem.MolSanitizeException, RuntimeError, ValueError):
        return None
    return joined


def _keep(products: dict, name: str, mol, library: Library) -> None:
    """Adds ``mol`` under ``name`` if it passes the filters and its InChIKey is new."""
    from rdkit import Chem

    with_hydrogens = Chem.AddHs(mol)
    symbols = {atom.GetSymbol() for atom in with_hydrogens.GetAtoms()}
    if (Chem.GetFormalCharge(mol) != 0 or not symbols <= set(library.elements)
            or not library.min_atoms <= with_hydrogens.GetNumAtoms() <= library.max_atoms
            or any(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms())):
        return
    products.setdefault(Chem.MolToInchiKey(mol), (name, Chem.MolToSmiles(mol)))
