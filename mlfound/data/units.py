"""Unit conversion at the reader: everything inside mlfound is eV and Å."""
import math

from ase import units

from mlfound.data.record import DataError

ENERGY_TO_EV = {"ev": 1.0, "hartree": units.Hartree, "kcal/mol": units.kcal / units.mol,
                "kj/mol": units.kJ / units.mol}
LENGTH_TO_A = {"a": 1.0, "ang": 1.0, "angstrom": 1.0, "bohr": units.Bohr}
DEFAULT_ENERGY_UNIT = "eV"  # of a source that declares none and is given none
DEFAULT_LENGTH_UNIT = "Ang"


def energy_factor(unit: str) -> float:
    """Multiply an energy in ``unit`` by this to get eV."""
    return _lookup(ENERGY_TO_EV, unit, "energy")


def length_factor(unit: str) -> float:
    """Multiply a length in ``unit`` by this to get Å."""
    return _lookup(LENGTH_TO_A, unit, "length")


def _lookup(table: dict, unit: str, what: str) -> float:
    try:
        return table[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} unit {unit!r}; known: {sorted(table)}") from None


def pick_unit(what: str, given: str | None, declared, factor) -> str | None:
    """The unit to read ``what`` ("energy", "length") in: ``given`` by the user, ``declared`` by the file, or None
    when neither is known. A given unit that contradicts the file's is an error, since picking one would silently
    scale the labels."""
    if declared is None:
        return given
    try:
        declared_factor = factor(str(declared))
    except ValueError as err:
        raise DataError(f"{what}_unit: {err}") from None
    if given is not None and not math.isclose(factor(given), declared_factor):
        raise DataError(f"the {what} unit was given as {given!r} but the file says {what}_unit={declared}; "
                        f"leave the {what} unit unset to use the file's (or give --{what}-unit {declared}), "
                        "or correct the file")
    return str(declared)
