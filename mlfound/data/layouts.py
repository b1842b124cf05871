"""Readers for the public array layouts: HDF5 trees of molecule groups (ANI-1x, ANI-2x, SPICE, QM7-X,
Transition1x), npz (rMD17, sGDML/MD17) and MPtrj's JSON of pymatgen structures.

One HDF5 walker serves every HDF5 layout: a *molecule group* is a group holding the layout's atomic-numbers
dataset; its conformers are the rows of its positions dataset, read in chunks so that a group of a million
conformers (ANI-2x) costs bounded memory. The layouts differ only in dataset names, in where the atomic numbers
live (per group or per conformer) and in groups to skip because their records appear elsewhere too. What each
public dataset's keys, units and signs are is in presets.py and docs/datasets.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import numpy as np

from mlfound.data import units
from mlfound.data.record import DataError, Record
from mlfound.data.source import BadRecord, SourceSpec, Unlabelled
from mlfound.data.units import DEFAULT_ENERGY_UNIT, DEFAULT_LENGTH_UNIT, energy_factor, length_factor, pick_unit

CHUNK_CONFORMERS = 4096  # conformers read from one HDF5 group at a time


@dataclasses.dataclass(frozen=True)
class Hdf5Layout:
    numbers_key: str  # (N,) per molecule group, or (M, N) per conformer (ANI-2x)
    positions_key: str  # (M, N, 3), or (N, 3) in a group holding one conformer (QM7-X)
    provenance_keys: tuple[str, ...] = ()  # text datasets of a group kept with its records (SPICE's smiles)
    skip_groups: tuple[str, ...] = ()  # group names, at any depth, whose records the file holds elsewhere too


HDF5_LAYOUTS = {
    "hdf5": Hdf5Layout("atomic_numbers", "coordinates"),  # ANI-1x
    "ani2x": Hdf5Layout("species", "coordinates"),
    "spice": Hdf5Layout("atomic_numbers", "conformations", provenance_keys=("smiles", "subset")),
    "qm7x": Hdf5Layout("atNUM", "atXYZ"),
    # the "data" split repeats train/val/test; a reaction's transition state is one of its path's images
    "transition1x": Hdf5Layout("atomic_numbers", "positions", skip_groups=("data", "transition_state")),
}


@dataclasses.dataclass(frozen=True)
class NpzLayout:
    numbers_key: str  # (N,)
    positions_key: str  # (M, N, 3)
    energy_fallback: str | None = None  # read when the energy key is absent (rMD17's "energies")
    declares_units: bool = False  # the file names its units in e_unit and r_unit (sGDML)


NPZ_LAYOUTS = {
    "npz": NpzLayout("nuclear_charges", "coords", energy_fallback="energies"),  # rMD17
    "sgdml": NpzLayout("z", "R", declares_units=True),  # sGDML / MD17 / MD22
}


def read_hdf5(spec: SourceSpec, layout: Hdf5Layout) -> Iterator[Record | BadRecord | Unlabelled]:
    """Every conformer of every molecule group, numbered in the order of a depth-first walk of the file."""
    h5py = _h5py()
    try:
        handle = h5py.File(spec.path, "r")
    except OSError as err:
        raise DataError(f"{spec.path}: cannot open as HDF5 ({err})") from err
    with handle:
        first_index = 0
        for group in _molecule_groups(spec, handle, layout, h5py.Group):
            num = yield from _group_records(spec, group, layout, first_index)
            first_index += num


def _molecule_groups(spec: SourceSpec, group, layout: Hdf5Layout, group_type) -> Iterator:
    """Depth first, in the file's order. A group of datasets without the numbers dataset is broken (an error naming
    it), never skipped in silence; an empty group holds nothing."""
    children = [child for name, child in group.items()
                if isinstance(child, group_type) and name not in layout.skip_groups]
    if layout.numbers_key in group:
        yield group
    elif len(group) and not any(isinstance(child, group_type) for child in group.values()):
        raise DataError(f"{spec.path}: group {group.name!r} lacks dataset {layout.numbers_key!r} "
                        f"(has {sorted(group)}); is this file in the {spec.format!r} layout?")
    for child in children:
        yield from _molecule_groups(spec, child, layout, group_type)


def _group_records(spec: SourceSpec, group, layout: Hdf5Layout, first_index: int):
    """Yield the group's conformers as records; return how many there are. A missing label dataset makes each of
    them a bad record (a missing numbers or positions dataset leaves nothing to count: an error)."""
    for key in (layout.numbers_key, layout.positions_key):
        if key not in group:
            raise DataError(f"{spec.path}: group {group.name!r} lacks dataset {key!r} (has {sorted(group)})")
    positions = group[layout.positions_key]
    single = positions.ndim == 2  # a group holding one conformer
    num = 1 if single else len(positions)
    missing = [key for key in (spec.energy_key, spec.forces_key) if key is not None and key not in group]
    if missing:
        for i in range(num):
            yield BadRecord(spec.path, first_index + i, f"group {group.name!r} lacks dataset {missing[0]!r} "
                            f"(has {sorted(group)}); give the right key, or --skip-bad to reject its records")
        return num
    provenance = {"group": group.name, **{key: _text(spec, group, key) for key in layout.provenance_keys}}
    numbers, energies = group[layout.numbers_key], group[spec.energy_key]
    forces = group[spec.forces_key] if spec.forces_key else None
    shared_numbers = numbers[()] if numbers.ndim == 1 else None  # else (M, N): a row per conformer
    for start in range(0, num, CHUNK_CONFORMERS):
        rows = slice(start, min(num, start + CHUNK_CONFORMERS))
        yield from conformer_records(
            spec, f"{spec.path}: group {group.name!r}", first_index=first_index + start, provenance=provenance,
            numbers=_rows(numbers, rows, single) if shared_numbers is None else shared_numbers,
            positions=_rows(positions, rows, single), energies=_rows(energies, rows, single),
            forces=None if forces is None else _rows(forces, rows, single))
    return num


def _rows(dataset, rows: slice, single: bool) -> np.ndarray:
    """Rows of a per-conformer dataset; the dataset of a group holding one conformer is that conformer's row."""
    return dataset[()][None] if single else dataset[rows]


def _text(spec: SourceSpec, group, key: str) -> str:
    if key not in group:
        raise DataError(f"{spec.path}: group {group.name!r} lacks dataset {key!r} (has {sorted(group)})")
    value = np.asarray(group[key][()]).reshape(-1)
    value = value[0] if len(value) == 1 else value
    return value.decode() if isinstance(value, bytes) else str(value)


def read_npz(spec: SourceSpec, layout: NpzLayout) -> Iterator[Record | Unlabelled]:
    """One molecule per file: numbers (N,), positions (M, N, 3), energies (M,) or (M, 1), forces (M, N, 3)."""
    data = _npz(spec)
    missing = {layout.numbers_key, layout.positions_key} - set(data.files)
    if missing:
        raise DataError(f"{spec.path}: npz lacks keys {sorted(missing)} (has {data.files}); "
                        f"is this file in the {spec.format!r} layout?")
    energy_key = spec.energy_key
    if energy_key not in data.files and layout.energy_fallback in data.files:
        energy_key = layout.energy_fallback
    for key in (energy_key, spec.forces_key):
        if key is not None and key not in data.files:
            raise DataError(f"{spec.path}: npz has no key {key!r} (has {data.files}); give the right key")
    if layout.declares_units:
        spec = dataclasses.replace(spec, **_declared_units(spec, data))
    yield from conformer_records(spec, str(spec.path), numbers=data[layout.numbers_key],
                                 positions=data[layout.positions_key], energies=data[energy_key],
                                 forces=data[spec.forces_key] if spec.forces_key else None, first_index=0)


def _declared_units(spec: SourceSpec, data) -> dict:
    """sGDML files name their units (r_unit "Ang", e_unit "kcal/mol"); a given unit must agree."""
    declared = {key: str(data[key]) for key in ("e_unit", "r_unit") if key in data.files}
    try:
        return {"energy_unit": pick_unit("energy", spec.energy_unit, declared.get("e_unit"), energy_factor),
                "length_unit": pick_unit("length", spec.length_unit, declared.get("r_unit"), length_factor)}
    except DataError as err:
        raise DataError(f"{spec.path}: {err}") from None


def file_lot(spec: SourceSpec, fmt: str) -> dict:
    """The level of theory a file of one of these layouts names itself: only sGDML does, in its ``theory`` key
    (e.g. "PBE+TS", "CCSD(T)/cc-pVTZ")."""
    if fmt != "sgdml":
        return {}
    data = _npz(spec)
    return {"lot_method": str(data["theory"])} if "theory" in data.files else {}


def _npz(spec: SourceSpec):
    try:
        return np.load(spec.path)
    except Exception as err:
        raise DataError(f"{spec.path}: cannot open as npz ({err})") from err


def conformer_records(spec: SourceSpec, where: str, numbers, positions, energies, forces, first_index: int,
                      provenance: dict | None = None) -> Iterator[Record | Unlabelled]:
    """Conformers in the source's units as records in eV and Å: ``numbers`` (N,) shared or (M, N) each,
    ``positions`` (M, N, 3), ``energies`` (M,) or (M, 1), ``forces`` (M, N, 3) or None. Shapes within a
    conformer are left to ``validate_record``; disagreeing conformer counts are an error naming ``where``."""
    num = len(positions)
    energies = np.asarray(energies)
    if energies.shape == (num, 1):
        energies = energies[:, 0]
    counts = {"energies": len(energies), "force sets": num if forces is None else len(forces),
              "atomic-number rows": num if np.ndim(numbers) == 1 else len(numbers)}
    if energies.ndim != 1 or any(count != num for count in counts.values()):
        raise DataError(f"{where}: {num} conformations but shapes {energies.shape} of energies and "
                        f"{', '.join(f'{count} {name}' for name, count in counts.items())}")
    e_factor, l_factor, f_factor = _factors(spec)
    for i in range(num):
        energy = float(energies[i])
        if spec.nan_is_unlabelled and math.isnan(energy):
            yield Unlabelled(str(spec.path), first_index + i)
            continue
        yield Record(
            z=np.asarray(numbers if np.ndim(numbers) == 1 else numbers[i], np.int64),
            pos_a=np.asarray(positions[i], np.float64) * l_factor, energy_ev=energy * e_factor,
            forces_ev_a=None if forces is None else np.asarray(forces[i], np.float64) * f_factor,
            task=spec.task, source=str(spec.path), index=first_index + i, provenance=provenance or {})


def _factors(spec: SourceSpec) -> tuple[float, float, float]:
    """Energy, length and forces factors to eV, Å and eV/Å; the forces' sign flips for a gradient."""
    e_factor = energy_factor(spec.energy_unit or DEFAULT_ENERGY_UNIT)
    l_factor = length_factor(spec.length_unit or DEFAULT_LENGTH_UNIT)
    return e_factor, l_factor, (-1.0 if spec.forces_are_gradient else 1.0) * e_factor / l_factor


def read_mptrj(spec: SourceSpec) -> Iterator[Record | BadRecord]:
    """MPtrj JSON: ``{mp_id: {frame_id: {"structure": <pymatgen Structure dict>, <labels>...}}}``, streamed one
    material at a time (the full file is 11 GB of JSON), each structure parsed by pymatgen."""
    ijson, structure_type = _materials_packages()
    with open(spec.path, "rb") as file:
        index = 0
        try:
            for mp_id, frames in ijson.kvitems(file, "", use_float=True):
                if not isinstance(frames, dict):
                    raise DataError(f"{spec.path}: {mp_id!r} holds {type(frames).__name__}, not a dict of frames; "
                                    "is this file in the MPtrj layout?")
                for frame_id, frame in frames.items():
                    yield _mptrj_record(spec, structure_type, frame, index, mp_id, frame_id)
                    index += 1
        except ijson.JSONError as err:
            raise DataError(f"{spec.path}: not valid JSON after record {index} ({err}); "
                            "the file is truncated or malformed") from err


def _mptrj_record(spec: SourceSpec, structure_type, frame: dict, index: int, mp_id: str,
                  frame_id: str) -> Record | BadRecord:
    name = f"{mp_id}/{frame_id}"
    missing = [key for key in ("structure", spec.energy_key, spec.forces_key) if key is not None and key not in frame]
    if missing:
        return BadRecord(spec.path, index, f"frame {name} lacks {missing[0]!r} (has {sorted(frame)})")
    try:
        structure = structure_type.from_dict(frame["structure"])
    except Exception as err:  # noqa: BLE001 - pymatgen raises many types for a malformed dict
        return BadRecord(spec.path, index, f"frame {name}: not a pymatgen structure ({type(err).__name__}: {err})")
    if not structure.is_ordered:
        return BadRecord(spec.path, index, f"frame {name}: a disordered structure (partial occupancies) has no "
                         "single element per site")
    e_factor, l_factor, f_factor = _factors(spec)
    try:
        energy = float(frame[spec.energy_key])
        forces = None if spec.forces_key is None else np.asarray(frame[spec.forces_key], np.float64)
        stress = None if frame.get(spec.stress_key) is None else units.stress_ev_a3(
            frame[spec.stress_key], spec.stress_unit, spec.stress_positive_is_compression, e_factor, l_factor)
    except (TypeError, ValueError) as err:  # null, text or ragged lists
        return BadRecord(spec.path, index, f"frame {name}: its labels are not numbers ({err})")
    return Record(
        z=np.asarray(structure.atomic_numbers, np.int64), pos_a=np.asarray(structure.cart_coords) * l_factor,
        energy_ev=energy * e_factor, forces_ev_a=None if forces is None else forces * f_factor,
        cell_a=np.asarray(structure.lattice.matrix, np.float64) * l_factor,
        pbc=np.asarray(structure.lattice.pbc, bool), task=spec.task, source=str(spec.path), index=index,
        provenance={"mp_id": mp_id, "frame": frame_id}, stress_ev_a3=stress)


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading HDF5 needs h5py: pip install 'mlfound[hdf5]'") from err
    return h5py


def _materials_packages():
    try:
        import ijson
        from pymatgen.core import Structure
    except ImportError as err:
        raise ImportError("reading MPtrj needs ijson and pymatgen: pip install 'mlfound[materials]'") from err
    return ijson, Structure


READERS = {**{name: functools.partial(read_hdf5, layout=layout) for name, layout in HDF5_LAYOUTS.items()},
           **{name: functools.partial(read_npz, layout=layout) for name, layout in NPZ_LAYOUTS.items()},
           "mptrj": read_mptrj}
