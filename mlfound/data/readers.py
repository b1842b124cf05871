"""Readers: source files -> Records in eV/Å, each naming its file and index.

Formats: anything ASE reads (extxyz, ASE db, ...), rMD17-style npz, ANI-1x-style HDF5.
Readers convert units and fill fields; they do not judge records (``validate_record`` does),
so a bad record reaches the caller, who raises or, with ``--skip-bad``, rejects it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlfound.data.record import DataError, Record
from mlfound.data.units import energy_factor, length_factor


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where one source file is and how to read its labels."""
    path: Path
    task: str
    format: str = "auto"  # "ase", "npz", "hdf5" or "auto" (by suffix)
    energy_key: str = "energy"
    forces_key: str = "forces"
    energy_unit: str = "eV"
    length_unit: str = "Ang"


def read_source(spec: SourceSpec) -> Iterator[Record]:
    """Yield every record of one source file; unreadable files raise DataError naming the file."""
    if not Path(spec.path).exists():
        raise DataError(f"{spec.path}: no such file")
    fmt = spec.format if spec.format != "auto" else _format_from_suffix(Path(spec.path))
    return READERS[fmt](spec)


def lot_metadata(spec: SourceSpec) -> dict:
    """LoT metadata stored in the source (extxyz ``lot_*`` info keys), else empty."""
    fmt = spec.format if spec.format != "auto" else _format_from_suffix(Path(spec.path))
    if fmt != "ase":
        return {}
    from ase.io import read

    first = read(spec.path, index=0)
    return {k: v for k, v in first.info.items() if k.startswith("lot_") or k.endswith("_unit")}


def lot_label(lot: dict) -> str:
    """``method/basis`` of LoT metadata, e.g. "PBE0/6-31G*" or "GFN2-xTB"; "?" when unknown."""
    return "/".join(v for v in (lot.get("lot_method"), lot.get("lot_basis")) if v) or "?"


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    return "ase"


def read_ase(spec: SourceSpec) -> Iterator[Record]:
    """Anything ``ase.io`` reads. Labels come from ``atoms.calc.results`` (ASE >= 3.23 puts extxyz
    energy/forces there) or from ``atoms.info`` / ``atoms.arrays`` under the configured keys."""
    from ase.io import iread

    e_factor = energy_factor(spec.energy_unit)
    l_factor = length_factor(spec.length_unit)
    index = -1
    try:
        for index, atoms in enumerate(iread(spec.path, index=":")):
            results = atoms.calc.results if atoms.calc is not None else {}
            energy = results.get(spec.energy_key, atoms.info.get(spec.energy_key))
            forces = results.get(spec.forces_key, atoms.arrays.get(spec.forces_key))
            periodic = bool(atoms.pbc.any())
            yield Record(
                z=atoms.numbers.astype(np.int64), pos_a=atoms.positions * l_factor,
                energy_ev=None if energy is None else float(energy) * e_factor,
                forces_ev_a=None if forces is None else np.asarray(forces, np.float64) * e_factor / l_factor,
                cell_a=np.asarray(atoms.cell[:], np.float64) * l_factor if periodic else None,
                pbc=atoms.pbc.copy() if periodic else None,
                task=spec.task, source=str(spec.path), index=index)
    except DataError:
        raise
    except Exception as err:  # ASE raises many types for truncated or malformed files
        raise DataError(f"{spec.path}: cannot read record {index + 1} ({type(err).__name__}: {err}); "
                        "the file is truncated or malformed") from err


def read_npz(spec: SourceSpec) -> Iterator[Record]:
    """rMD17 layout: ``nuclear_charges`` (N,), ``coords`` (M, N, 3), ``energies`` (M,), ``forces`` (M, N, 3)."""
    try:
        data = np.load(spec.path)
    except Exception as err:
        raise DataError(f"{spec.path}: cannot open as npz ({err})") from err
    keys = {"nuclear_charges", "coords"}
    missing = keys - set(data.files)
    if missing:
        raise DataError(f"{spec.path}: npz lacks keys {sorted(missing)} (has {data.files})")
    energy_key = spec.energy_key if spec.energy_key in data.files else "energies"
    if energy_key not in data.files:
        raise DataError(f"{spec.path}: npz has no energy key {spec.energy_key!r} (has {data.files})")
    forces = data[spec.forces_key] if spec.forces_key in data.files else None
    yield from _records_from_arrays(spec, data["nuclear_charges"], data["coords"], data[energy_key], forces, 0)


def read_hdf5(spec: SourceSpec) -> Iterator[Record]:
    """ANI-1x layout: one group per formula with ``atomic_numbers`` (N,), ``coordinates`` (M, N, 3),
    and label datasets named by the keys (e.g. ``wb97x_dz.energy``, ``wb97x_dz.forces``)."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading HDF5 needs h5py: pip install 'mlfound[hdf5]'") from err
    try:
        handle = h5py.File(spec.path, "r")
    except OSError as err:
        raise DataError(f"{spec.path}: cannot open as HDF5 ({err})") from err
    with handle:
        first_index = 0
        for name, group in handle.items():
            for key in ("atomic_numbers", "coordinates", spec.energy_key):
                if key not in group:
                    raise DataError(f"{spec.path}: group {name!r} lacks dataset {key!r} (has {list(group)})")
            forces = group[spec.forces_key][()] if spec.forces_key in group else None
            yield from _records_from_arrays(spec, group["atomic_numbers"][()], group["coordinates"][()],
                                            group[spec.energy_key][()], forces, first_index)
            first_index += len(group["coordinates"])


def _records_from_arrays(spec, z, coords, energies, forces, first_index) -> Iterator[Record]:
    e_factor = energy_factor(spec.energy_unit)
    l_factor = length_factor(spec.length_unit)
    if len(energies) != len(coords) or (forces is not None and len(forces) != len(coords)):
        raise DataError(f"{spec.path}: {len(coords)} coordinate sets but {len(energies)} energies"
                        + ("" if forces is None else f" and {len(forces)} force sets"))
    for i in range(len(coords)):
        yield Record(
            z=np.asarray(z, np.int64), pos_a=np.asarray(coords[i], np.float64) * l_factor,
            energy_ev=float(energies[i]) * e_factor,
            forces_ev_a=None if forces is None else np.asarray(forces[i], np.float64) * e_factor / l_factor,
            task=spec.task, source=str(spec.path), index=first_index + i)


READERS = {"ase": read_ase, "npz": read_npz, "hdf5": read_hdf5}
