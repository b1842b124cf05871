"""Public dataset layouts as presets: the format, keys, units and sign conventions of each, and the
level-of-theory (LoT) tasks one of its files yields.

``mlfound shard --preset NAME`` and ``mlfound finetune --preset NAME`` read through these, so that a
user never types a dataset's keys or units. The sources and layouts are in docs/datasets.md; where a detail was
not checked against a released file, it says so there.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mlfound.data.record import DataError
from mlfound.data.source import SourceSpec


@dataclasses.dataclass(frozen=True)
class PresetTask:
    """One LoT of a dataset: where its labels are, and the LoT metadata written to the task's manifest."""
    energy_key: str
    forces_key: str | None  # None: the LoT has energies only
    lot: dict[str, str]  # lot_method, lot_basis, lot_code


@dataclasses.dataclass(frozen=True)
class Preset:
    source: str  # where the data is published
    format: str  # a reader (mlfound.data.readers.READERS)
    energy_unit: str | None  # None: the unit the file declares (else eV)
    length_unit: str | None
    tasks: dict[str, PresetTask]  # task name -> labels; one file yields every task
    forces_are_gradient: bool = False
    nan_is_unlabelled: bool = False
    stress_key: str | None = None  # None: the dataset has no stress
    stress_unit: str | None = None  # None: energy unit / length unit³
    stress_positive_is_compression: bool = False  # VASP's sign

    def source_options(self, task: PresetTask, energy_unit: str | None = None,
                       length_unit: str | None = None) -> dict:
        """SourceSpec fields (all but path and task) reading ``task``; a given unit replaces the preset's."""
        return {"format": self.format, "energy_key": task.energy_key, "forces_key": task.forces_key,
                "energy_unit": energy_unit or self.energy_unit, "length_unit": length_unit or self.length_unit,
                "forces_are_gradient": self.forces_are_gradient, "nan_is_unlabelled": self.nan_is_unlabelled,
                "stress_key": self.stress_key, "stress_unit": self.stress_unit,
                "stress_positive_is_compression": self.stress_positive_is_compression}


def _lot(method: str, basis: str | None = None, code: str | None = None) -> dict[str, str]:
    return {f"lot_{k}": v for k, v in (("method", method), ("basis", basis), ("code", code)) if v}


PRESETS: dict[str, Preset] = {
    "spice2": Preset(
        source="SPICE 2 (Eastman et al., Sci. Data 10, 11, 2023; J. Chem. Theory Comput. 20, 8583, 2024), "
               "SPICE-2.0.1.hdf5 from github.com/openmm/spice-dataset",
        format="spice", energy_unit="hartree", length_unit="bohr", forces_are_gradient=True,
        tasks={"spice2": PresetTask("dft_total_energy", "dft_total_gradient",
                                    _lot("wB97M-D3(BJ)", "def2-TZVPPD", "Psi4"))}),
    "ani1x": Preset(
        source="ANI-1x and ANI-1ccx (Smith et al., Sci. Data 7, 134, 2020), ani1x-release.h5",
        format="hdf5", energy_unit="hartree", length_unit="Ang", nan_is_unlabelled=True,
        tasks={"ani1x_wb97x_dz": PresetTask("wb97x_dz.energy", "wb97x_dz.forces", _lot("wB97x", "6-31G(d)")),
               "ani1x_wb97x_tz": PresetTask("wb97x_tz.energy", "wb97x_tz.forces", _lot("wB97x", "def2-TZVPP")),
               "ani1x_ccsd_t_cbs": PresetTask("ccsd(t)_cbs.energy", None, _lot("CCSD(T)*", "CBS"))}),
    "ani2x": Preset(
        source="ANI-2x (Devereux et al., J. Chem. Theory Comput. 16, 4192, 2020), ANI-2x-wB97X-631Gd.h5",
        format="ani2x", energy_unit="hartree", length_unit="Ang",
        tasks={"ani2x": PresetTask("energies", "forces", _lot("wB97x", "6-31G(d)"))}),
    "qm7x": Preset(
        source="QM7-X (Hoja et al., Sci. Data 8, 43, 2021), 1000.hdf5 ... 8000.hdf5",
        format="qm7x", energy_unit="eV", length_unit="Ang",
        tasks={"qm7x": PresetTask("ePBE0+MBD", "totFOR", _lot("PBE0+MBD", "tight", "FHI-aims"))}),
    "transition1x": Preset(
        source="Transition1x (Schreiner et al., Sci. Data 9, 779, 2022), Transition1x.h5",
        format="transition1x", energy_unit="eV", length_unit="Ang",
        tasks={"transition1x": PresetTask("wB97x_6-31G(d).energy", "wB97x_6-31G(d).forces",
                                          _lot("wB97x", "6-31G(d)", "ORCA"))}),
    "md17": Preset(
        source="sGDML datasets: MD17 (Chmiela et al., Sci. Adv. 3, e1603015, 2017), its CCSD(T) sets and MD22, "
               "*.npz from sgdml.org; the LoT is the file's own 'theory'",
        format="sgdml", energy_unit="kcal/mol", length_unit="Ang",
        tasks={"md17": PresetTask("E", "F", {})}),
    "rmd17": Preset(
        source="rMD17 (Christensen and von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018, 2020), rmd17_*.npz",
        format="npz", energy_unit="kcal/mol", length_unit="Ang",
        tasks={"rmd17": PresetTask("energies", "forces", _lot("PBE", "def2-SVP", "ORCA"))}),
    "mptrj": Preset(
        source="MPtrj (Deng et al., Nat. Mach. Intell. 5, 1031, 2023), MPtrj_2022.9_full.json",
        format="mptrj", energy_unit="eV", length_unit="Ang",
        stress_key="stress", stress_unit="kBar", stress_positive_is_compression=True,  # VASP's, as in the file
        tasks={"mptrj": PresetTask("corrected_total_energy", "force", _lot("PBE(+U)", "PAW", "VASP"))}),
    "omat24": Preset(
        source="OMat24 (Barroso-Luque et al., arXiv:2410.12771, 2024), *.aselmdb (ASE LMDB)",
        format="ase", energy_unit="eV", length_unit="Ang", stress_key="stress",  # ASE's unit and sign
        tasks={"omat24": PresetTask("energy", "forces", _lot("PBE(+U)", "PAW", "VASP"))}),
}
FIXED_BY_PRESET = ("format", "energy_key", "forces_key")  # options a preset sets and the user may not change


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_tasks(name: str, chosen: list[str] | None = None, rename: str | None = None) -> dict[str, PresetTask]:
    """The tasks of preset ``name`` to read: all, or those ``chosen``; ``rename`` names the one task chosen."""
    preset = get_preset(name)
    unknown = sorted(set(chosen or ()) - set(preset.tasks))
    if unknown:
        raise DataError(f"preset {name!r} has no task {', '.join(unknown)}; its tasks: {', '.join(preset.tasks)}")
    tasks = {task: labels for task, labels in preset.tasks.items() if not chosen or task in chosen}
    if rename is None:
        return tasks
    if len(tasks) > 1:
        raise DataError(f"a task name names one task, but preset {name!r} yields {len(tasks)} "
                        f"({', '.join(tasks)}); pick one with --preset-task")
    return {rename: next(iter(tasks.values()))}


def single_task(name: str, chosen: str | None = None) -> tuple[str, PresetTask]:
    """The one task of preset ``name`` to read (fine-tuning reads one LoT): ``chosen``, or the only one."""
    tasks = preset_tasks(name, [chosen] if chosen else None)
    if len(tasks) > 1:
        raise DataError(f"preset {name!r} yields {len(tasks)} tasks, one per LoT ({', '.join(tasks)}); "
                        "pick one with --preset-task")
    return next(iter(tasks.items()))


def preset_sources(name: str, paths: list[Path], chosen: list[str] | None = None, rename: str | None = None,
                   energy_unit: str | None = None,
                   length_unit: str | None = None) -> dict[str, tuple[list[SourceSpec], dict]]:
    """Per task of preset ``name``: a SourceSpec for each file, and the task's LoT metadata."""
    preset = get_preset(name)
    return {task: ([SourceSpec(path=Path(path), task=task, **preset.source_options(labels, energy_unit, length_unit))
                    for path in paths], labels.lot)
            for task, labels in preset_tasks(name, chosen, rename).items()}


def refuse_fixed_options(name: str, **given) -> None:
    """A preset sets the format and the keys; giving them too would silently be one or the other."""
    clashing = [f"--{key.replace('_', '-')}" for key in FIXED_BY_PRESET if given.get(key) is not None]
    if clashing:
        raise DataError(f"preset {name!r} sets {', '.join(clashing)}; drop them, or drop --preset and give "
                        "--format and the keys yourself")


def describe_presets() -> str:
    """One line per preset, for --help."""
    return "\n".join(f"  {name:<13}tasks {', '.join(p.tasks)}; {p.source}" for name, p in PRESETS.items())


def add_reading_arguments(p) -> None:
    """The command-line options that ``reading_options`` takes, for every command that reads one task of a file."""
    p.add_argument("--preset", help="a public dataset's layout (docs/datasets.md): sets format, keys and units")
    p.add_argument("--preset-task", help="the preset's task (LoT) to read, for a preset with several")
    p.add_argument("--format", help="reader (default: by file suffix); see mlfound shard --help")
    p.add_argument("--energy-key", help="default: energy")
    p.add_argument("--forces-key", help="default: forces; 'none' for energy-only data")
    p.add_argument("--energy-unit", help="eV, hartree, kcal/mol, kJ/mol (default: the preset's, else the file's "
                   "energy_unit, else eV)")
    p.add_argument("--length-unit", help="Ang or bohr (default: the preset's, else the file's length_unit, else Ang)")
    p.add_argument("--no-unit-check", action="store_true",
                   help="accept data whose energies look like another unit than eV (Hartree, kcal/mol)")


def reading_options(preset: str | None = None, preset_task: str | None = None, format: str | None = None,
                    energy_key: str | None = None, forces_key: str | None = None, energy_unit: str | None = None,
                    length_unit: str | None = None) -> tuple[dict, dict]:
    """How a command line that reads one task of a file (fine-tuning, evaluation) reads it: SourceSpec fields
    (all but path and task) and the LoT metadata the preset knows. Without a preset, the format, keys and units
    given (``forces_key="none"``: energy-only data), else the defaults."""
    if preset is None:
        if preset_task is not None:
            raise DataError("--preset-task picks a task of a preset; give --preset too")
        no_forces = (forces_key or "").lower() == "none"
        return {"format": format or "auto", "energy_key": energy_key or "energy",
                "forces_key": None if no_forces else forces_key or "forces",
                "energy_unit": energy_unit, "length_unit": length_unit}, {}
    refuse_fixed_options(preset, format=format, energy_key=energy_key, forces_key=forces_key)
    _, labels = single_task(preset, preset_task)
    return get_preset(preset).source_options(labels, energy_unit, length_unit), labels.lot
