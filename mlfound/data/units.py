"""Unit conversion at the reader: everything inside mlfound is eV and Å."""
import math

import numpy as np
from ase import units
from ase.stress import voigt_6_to_full_3x3_stress

from mlfound.data.record import DataError

ENERGY_TO_EV = {"ev": 1.0, "hartree": units.Hartree, "kcal/mol": units.kcal / units.mol,
                "kj/mol": units.kJ / units.mol}
LENGTH_TO_A = {"a": 1.0, "ang": 1.0, "angstrom": 1.0, "bohr": units.Bohr}
PRESSURE_TO_EV_A3 = {"gpa": units.GPa, "kbar": units.GPa / 10}
DEFAULT_ENERGY_UNIT = "eV"  # of a source that declares none and is given none
DEFAULT_LENGTH_UNIT = "Ang"


def energy_factor(unit: str) -> float:
    """Multiply an energy in ``unit`` by this to get eV."""
    return _lookup(ENERGY_TO_EV, unit, "energy")


def length_factor(unit: str) -> float:
    """Multiply a length in ``unit`` by this to get Å."""
    return _lookup(LENGTH_TO_A, unit, "length")


def stress_ev_a3(value, unit: str | None, positive_is_compression: bool, energy_to_ev: float,
                 length_to_a: float) -> np.ndarray:
    """A stress label as (3, 3) eV/Å³ in ASE's sign (positive: tension). ``value``: Voigt 6 (xx yy zz yz xz xy,
    ASE's order), 9 or 3 x 3 numbers in ``unit`` (GPa, kBar; None: energy unit / length unit³); VASP's sign
    (``positive_is_compression``, MPtrj) is flipped. Raises ValueError for anything else."""
    array = np.asarray(value, np.float64)
    if array.shape == (6,):
        array = voigt_6_to_full_3x3_stress(array)
    elif array.size == 9:
        array = array.reshape(3, 3)
    else:
        raise ValueError(f"a stress has 6 (Voigt) or 9 components, not shape {array.shape}")
    factor = energy_to_ev / length_to_a**3 if unit is None else _lookup(PRESSURE_TO_EV_A3, unit, "stress")
    return array * factor * (-1.0 if positive_is_compression else 1.0)


def virial_stress_ev_a3(virial, volume: float, energy_to_ev: float) -> np.ndarray:
    """The stress (eV/Å³, ASE's sign) of a virial W (3 x 3 or 9 numbers, energy unit): stress = -W / V."""
    array = np.asarray(virial, np.float64)
    if array.size != 9:
        raise ValueError(f"a virial has 9 components, not shape {array.shape}")
    return -array.reshape(3, 3) * energy_to_ev / volume


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
