"""Readers: source files -> Records in eV/Å, each naming its file and index.

Formats: anything ASE reads (extxyz, ASE db, ASE LMDB, ...) here; the public array layouts (ANI-1x, ANI-2x, SPICE,
QM7-X and Transition1x HDF5, rMD17 and sGDML npz, MPtrj JSON) in layouts.py. Readers convert units and fill fields;
they do not judge records (``validate_record`` does), so a bad record reaches the caller, who raises or, with
``--skip-bad``, rejects it. A record that cannot be read at all (a malformed extxyz frame) comes as a ``BadRecord``
in its place, and a structure without a label at the task's LoT as an ``Unlabelled``, so the count stays true.
"""
from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from ase import Atoms

from mlfound.data import layouts
from mlfound.data.record import DataError, Record
from mlfound.data.source import BadRecord, SourceSpec, Unlabelled
from mlfound.data.units import (
    DEFAULT_ENERGY_UNIT,
    DEFAULT_LENGTH_UNIT,
    energy_factor,
    length_factor,
    pick_unit,
    stress_ev_a3,
    virial_stress_ev_a3,
)

RECORD_UNITS = {"energy_unit": "eV", "forces_unit": "eV/Ang"}  # what every reader returns
XYZ_SUFFIXES = (".xyz", ".extxyz")
LMDB_SUFFIX = ".aselmdb"  # ASE's LMDB database (OMat24, OMol25), read through ase-db-backends

__all__ = ["BadRecord", "SourceSpec", "Unlabelled", "read_source", "read_entries", "READERS"]


def read_source(spec: SourceSpec) -> Iterator[Record]:
    """Yield every record of one source file; the first that cannot be read raises DataError naming file and
    index. Unreadable files raise DataError naming the file. Structures without a label at the task's LoT are
    not records of it and are left out; ``read_entries`` yields them, for callers that count them."""
    return _raise_bad(read_entries(spec))


def read_entries(spec: SourceSpec) -> Iterator[Record | BadRecord | Unlabelled]:
    """Every record of one source file in order, with a BadRecord in the place of each that cannot be read and an
    Unlabelled in the place of each without a label at the task's LoT, so that a caller accounts for every index.
    A file that cannot be read on (a broken npz or HDF5 layout, a binary ASE format broken mid-file) still raises
    DataError."""
    if not Path(spec.path).exists():
        raise DataError(f"{spec.path}: no such file")
    _check_given_units(spec)
    fmt = _format(spec)
    if fmt not in READERS:
        raise DataError(f"{spec.path}: unknown format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](spec)


def _check_given_units(spec: SourceSpec) -> None:
    """A misspelt unit is the caller's error, to stop on at once, not a bad record in every frame."""
    for unit, factor in ((spec.energy_unit, energy_factor), (spec.length_unit, length_factor)):
        if unit is None:
            continue
        try:
            factor(unit)
        except ValueError as err:
            raise DataError(f"{spec.path}: {err}") from None


def lot_metadata(spec: SourceSpec) -> dict:
    """LoT metadata stored in the source (extxyz ``lot_*`` info keys of the first frame that can be read, an sGDML
    file's ``theory``) with the units of the records the readers return (the source's were converted), else empty."""
    if _format(spec) in layouts.READERS:
        lot = layouts.file_lot(spec, _format(spec))
        return {**lot, **RECORD_UNITS} if lot else {}
    first = _first_readable_atoms(spec)
    if first is None:
        return {}
    return {**{k: v for k, v in first.info.items() if k.startswith("lot_")}, **RECORD_UNITS}


def _first_readable_atoms(spec: SourceSpec) -> Atoms | None:
    """None when no frame can be read (or the format has no frames): its records are all rejected anyway."""
    fmt = _format(spec)
    if fmt == "extxyz":
        return next((atoms for _, atoms in _xyz_atoms(spec) if not isinstance(atoms, BadRecord)), None)
    if fmt == "ase":
        try:
            return next((atoms for _, atoms in _iread_atoms(spec)), None)
        except DataError:
            return None
    return None


def lot_label(lot: dict) -> str:
    """``method/basis`` of LoT metadata, e.g. "PBE0/6-31G*" or "GFN2-xTB"; "?" when unknown."""
    return "/".join(v for v in (lot.get("lot_method"), lot.get("lot_basis")) if v) or "?"


def _raise_bad(entries: Iterator[Record | BadRecord | Unlabelled]) -> Iterator[Record]:
    for entry in entries:
        if isinstance(entry, BadRecord):
            raise entry
        if isinstance(entry, Record):
            yield entry


def _format(spec: SourceSpec) -> str:
    fmt = spec.format if spec.format != "auto" else _format_from_suffix(Path(spec.path))
    return "extxyz" if fmt == "ase" and Path(spec.path).suffix.lower() in XYZ_SUFFIXES else fmt


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    return "ase"  # ASE's own formats, .aselmdb included


def read_extxyz(spec: SourceSpec) -> Iterator[Record | BadRecord]:
    """extxyz and xyz files, split into frames here and each parsed by ASE on its own, so that one malformed
    frame is one bad record with its true index (``ase.io.iread`` stops at the first)."""
    for index, atoms in _xyz_atoms(spec):
        yield atoms if isinstance(atoms, BadRecord) else _atoms_record(spec, atoms, index)


def read_ase(spec: SourceSpec) -> Iterator[Record | BadRecord]:
    """Any other format ``ase.io`` reads (ASE db, ...), through ``iread``: a file broken mid-way raises."""
    for index, atoms in _iread_atoms(spec):
        yield _atoms_record(spec, atoms, index)


def _xyz_atoms(spec: SourceSpec) -> Iterator[tuple[int, Atoms | BadRecord]]:
    from ase.io import read

    with open(spec.path, encoding="utf-8", errors="replace") as file:
        for frame in _xyz_frames(file):
            if frame.error is not None:
                yield frame.index, BadRecord(spec.path, frame.index, f"frame at line {frame.line}: {frame.error}; "
                                             "the frame is malformed or the file is truncated: fix or remove it")
                continue
            try:
                yield frame.index, read(io.StringIO(frame.text), format="extxyz")
            except Exception as err:  # noqa: BLE001 - ASE raises many types for a malformed frame
                yield frame.index, BadRecord(spec.path, frame.index, f"ASE cannot parse the frame at line "
                                             f"{frame.line} ({type(err).__name__}: {err}); fix or remove it")


def _iread_atoms(spec: SourceSpec) -> Iterator[tuple[int, Atoms]]:
    from ase.io import iread

    options = {}
    if Path(spec.path).suffix.lower() == LMDB_SUFFIX:
        try:
            import ase_db_backends  # noqa: F401 - ASE opens .aselmdb through it
        except ImportError as err:
            raise ImportError(f"{spec.path}: reading ASE LMDB needs ase-db-backends: pip install 'mlfound[lmdb]'"
                              ) from err
        options = {"readonly": True}  # no write transaction or lock file on (possibly read-only) shared storage
    frames = iread(spec.path, index=":", **options)
    index = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as err:  # ASE raises many types for truncated or malformed files
            raise DataError(f"{spec.path}: cannot read record {index} ({type(err).__name__}: {err}); "
                            "the file is truncated or malformed") from err
        yield index, atoms
        index += 1


def _atoms_record(spec: SourceSpec, atoms: Atoms, index: int) -> Record | BadRecord:
    """Labels come from ``atoms.calc.results`` (ASE >= 3.23 puts extxyz energy/forces/stress there) or from
    ``atoms.info`` / ``atoms.arrays`` under the configured keys; without a stress, a ``virial`` info key
    (energy unit, W = -stress x volume) gives it."""
    try:
        e_factor, l_factor = _frame_units(spec, atoms.info)
    except DataError as err:
        return BadRecord(spec.path, index, str(err))
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get(spec.energy_key, atoms.info.get(spec.energy_key))
    forces = None if spec.forces_key is None else results.get(spec.forces_key, atoms.arrays.get(spec.forces_key))
    periodic = bool(atoms.pbc.any())
    try:  # e.g. energy=n/a in an extxyz comment line
        energy_ev = None if energy is None else float(energy) * e_factor
    except (TypeError, ValueError):
        return BadRecord(spec.path, index, f"{spec.energy_key}={energy!r} is not a number")
    try:
        forces_ev_a = None if forces is None else np.asarray(forces, np.float64) * e_factor / l_factor
    except (TypeError, ValueError) as err:
        return BadRecord(spec.path, index, f"{spec.forces_key} is not an array of numbers ({err})")
    stress = None if spec.stress_key is None else results.get(spec.stress_key, atoms.info.get(spec.stress_key))
    virial = None if spec.stress_key is None or stress is not None else atoms.info.get("virial")
    try:
        if stress is not None:
            stress = stress_ev_a3(stress, spec.stress_unit, spec.stress_positive_is_compression, e_factor, l_factor)
        elif virial is not None:
            stress = virial_stress_ev_a3(virial, abs(atoms.cell.volume) * l_factor**3, e_factor)
    except (TypeError, ValueError) as err:
        key = spec.stress_key if virial is None else "virial"
        return BadRecord(spec.path, index, f"{key} is not a stress ({err})")
    return Record(
        z=atoms.numbers.astype(np.int64), pos_a=atoms.positions * l_factor,
        energy_ev=energy_ev, forces_ev_a=forces_ev_a,
        cell_a=np.asarray(atoms.cell[:], np.float64) * l_factor if periodic else None,
        pbc=atoms.pbc.copy() if periodic else None,
        task=spec.task, source=str(spec.path), index=index, stress_ev_a3=stress)


def _frame_units(spec: SourceSpec, info: dict) -> tuple[float, float]:
    """(energy, length) factors to eV and Å: the spec's units, else the frame's ``energy_unit``/``length_unit``
    info keys, else eV and Å. A spec unit that contradicts the frame's is an error, since picking one would
    silently scale the labels; so is a ``forces_unit`` that is not energy unit / length unit."""
    energy_unit = pick_unit("energy", spec.energy_unit, info.get("energy_unit"), energy_factor) or DEFAULT_ENERGY_UNIT
    length_unit = pick_unit("length", spec.length_unit, info.get("length_unit"), length_factor) or DEFAULT_LENGTH_UNIT
    _check_forces_unit(info.get("forces_unit"), energy_unit, length_unit)
    return energy_factor(energy_unit), length_factor(length_unit)


def _check_forces_unit(forces_unit, energy_unit: str, length_unit: str) -> None:
    if forces_unit is None:
        return
    energy_part, _, length_part = str(forces_unit).rpartition("/")
    try:
        ratio = energy_factor(energy_part) / length_factor(length_part)
    except ValueError as err:
        raise DataError(f"info key forces_unit={forces_unit}: {err}; write it as <energy unit>/<length unit>") from None
    if not math.isclose(ratio, energy_factor(energy_unit) / length_factor(length_unit)):
        raise DataError(f"info key forces_unit={forces_unit} is not {energy_unit}/{length_unit}, the units the "
                        "energies and positions are read in; correct the file's units")


@dataclasses.dataclass(frozen=True)
class _XyzFrame:
    index: int  # 0-based frame index in the file
    line: int  # 1-based line number of its count line
    text: str  # its lines: count, comment, atoms
    error: str | None  # why its layout is broken; None when it can be parsed


def _xyz_frames(lines: Iterable[str]) -> Iterator[_XyzFrame]:
    """The frames of an xyz/extxyz text (count line, comment line, one line per atom). A frame whose layout
    is broken (count line not a number, too few or too many atom lines) is yielded with its error, and the
    next frame starts at the next line that is a bare number: every line belongs to some frame."""
    reader = _Lines(lines)
    index = 0
    while reader.skip_blank():
        line = reader.number + 1
        text, error = _take_frame(reader)
        yield _XyzFrame(index, line, "".join(text), error)
        index += 1


def _take_frame(reader: _Lines) -> tuple[list[str], str | None]:
    count_line = reader.take()
    count = _atom_count(count_line)
    if count is None:
        return [count_line, *reader.take_until_count()], f"count line {count_line.strip()!r} is not a number of atoms"
    if reader.peek() is None:
        return [count_line], "the file ends after the count line"
    text = [count_line, reader.take()]
    for k in range(count):
        line = reader.peek()
        if line is None:
            return text, f"the file ends after {k} of {count} atom lines"
        if not _is_atom_line(line):  # a count line, a blank line or a cut atom line
            broken = f"line {reader.number + 1} is {line.strip()!r}, not atom line {k + 1} of {count}"
            return text + reader.take_until_count(), broken
        text.append(reader.take())
    line = reader.peek()
    if line is not None and _is_atom_line(line):  # anything shorter starts the next frame
        extra = f"the count line says {count} atoms but line {reader.number + 1} is one more atom line"
        return text + reader.take_until_count(), extra
    return text, None


def _is_atom_line(line: str) -> bool:
    """An element and three coordinates at least; ASE checks the rest against the frame's Properties."""
    return len(line.split()) >= 4


def _atom_count(line: str) -> int | None:
    stripped = line.strip()
    return int(stripped) if stripped.isdigit() else None


class _Lines:
    """Lines with one line of look-ahead and the 1-based number of the last line taken."""

    def __init__(self, lines: Iterable[str]):
        self._lines = iter(lines)
        self._next = next(self._lines, None)
        self.number = 0

    def peek(self) -> str | None:
        return self._next

    def take(self) -> str:
        line, self._next = self._next, next(self._lines, None)
        self.number += 1
        return line

    def skip_blank(self) -> bool:
        """Skip blank lines; False at the end of the file."""
        while self._next is not None and not self._next.strip():
            self.take()
        return self._next is not None

    def take_until_count(self) -> list[str]:
        """Every line up to the next bare number (the next frame's count line) or the end of the file."""
        taken = []
        while self._next is not None and _atom_count(self._next) is None:
            taken.append(self.take())
        return taken


READERS = {"extxyz": read_extxyz, "ase": read_ase, **layouts.READERS}
