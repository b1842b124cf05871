"""Unit conversion at the reader: everything inside mlfound is eV and Å."""
from ase import units

ENERGY_TO_EV = {"ev": 1.0, "hartree": units.Hartree, "kcal/mol": units.kcal / units.mol,
                "kj/mol": units.kJ / units.mol}
LENGTH_TO_A = {"a": 1.0, "ang": 1.0, "angstrom": 1.0, "bohr": units.Bohr}


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
