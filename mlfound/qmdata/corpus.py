"""Resumable, parallel generation of a recipe's corpus: one extxyz per LoT task.

Work is split into units whose results are written atomically under ``<out>/.work/<recipe>/``:
first one MD trajectory per (molecule or periodic box, temperature), or with normal-mode sampling one unit
per molecule (its Hessian serves every temperature, a frames file each), then one label chunk per
(task, molecule, temperature, chunk); a box's frames carry their cells, and its labels a stress.
A killed run loses at most the units in flight; rerunning skips every unit already on disk. SCF
failures go to ``<task>.rejects.jsonl``, never lost silently. A label chunk records a checksum of the frames
it labelled, so labels carried to another machine (whose geometries are made again) are written only onto the
same frames.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from mlfound.data.files import atomic_write
from mlfound.data.record import DataError
from mlfound.progress import progress
from mlfound.qmdata import geometries, levels
from mlfound.qmdata.recipes import Crystal, Recipe

LABEL_CHUNK_FRAMES = 10


@dataclasses.dataclass(frozen=True)
class GeometryUnit:
    molecule: str
    temperature_k: float

    @property
    def stem(self) -> str:
        return f"{self.molecule}_T{int(self.temperature_k)}"


@dataclasses.dataclass(frozen=True)
class LabelUnit:
    task: str
    geometry: GeometryUnit
    frames: tuple[int, ...]  # MD frame indices, in order, every ``frame_step``-th of the trajectory
    frame_step: int
    forces: bool | None = None  # the task's override of its LoT's with_forces

    @property
    def stem(self) -> str:
        return f"{self.task}/{self.geometry.stem}_f{self.frames[0]:04d}_s{self.frame_step}"


def make_corpus(recipe_name: str, recipe: Recipe, out_dir: Path, workers: int) -> dict[str, dict]:
    """Run (or resume) every unit of ``recipe`` and write ``<out_dir>/<task>.extxyz``; return counts."""
    work_dir = out_dir / ".work" / recipe_name
    geom_units = [GeometryUnit(m, t) for m in _molecules_used(recipe) for t in recipe.temperatures_k]
    missing = [u for u in geom_units if not _geometry_path(work_dir, u).exists()]
    if recipe.sampling == "normal_modes":  # one Hessian per molecule serves its temperatures: a unit per molecule
        by_molecule: dict[str, list[GeometryUnit]] = {}
        for unit in missing:
            by_molecule.setdefault(unit.molecule, []).append(unit)
        _run_units(_make_normal_mode_geometries, [(recipe, units, work_dir) for units in by_molecule.values()],
                   workers, "normal modes")
    else:
        _run_units(_make_geometry, [(recipe, u, work_dir) for u in missing], workers, "MD")
    label_units = [LabelUnit(task.lot, GeometryUnit(m, t), chunk, task.frame_step, task.forces)
                   for task in recipe.tasks for m in recipe.molecules_of(task) for t in recipe.temperatures_k
                   for chunk in _chunks(range(0, recipe.frames_per_temperature, task.frame_step))]
    _run_units(_make_labels, [(u, work_dir) for u in label_units
                              if not _label_path(work_dir, u).exists()], workers, "labels")
    rows = {task.lot: _write_task(task.lot, recipe, [u for u in label_units if u.task == task.lot], work_dir,
                                  out_dir) for task in recipe.tasks}
    geometry_seconds = sum(_seconds(_geometry_path(work_dir, unit)) for unit in geom_units)
    summary = {"recipe": recipe_name, "geometry_cpu_hours": geometry_seconds / 3600, "tasks": rows}
    atomic_write(out_dir / f"{recipe_name}.summary.json", lambda f: f.write(json.dumps(summary, indent=1)), text=True)
    return rows


def _molecules_used(recipe: Recipe) -> list[str]:
    """The molecules and boxes the tasks label, in the recipe's order."""
    used = {m for task in recipe.tasks for m in recipe.molecules_of(task)}
    unknown = used - set(recipe.smiles) - set(recipe.boxes)
    boxed = {box.molecule for box in recipe.boxes.values()} - set(recipe.smiles)
    if unknown or boxed:
        raise ValueError(f"recipe names molecules without SMILES: {sorted(unknown | boxed)}")
    return [m for m in [*recipe.smiles, *recipe.boxes] if m in used]


def _chunks(frames: range) -> list[tuple[int, ...]]:
    return [tuple(frames[i:i + LABEL_CHUNK_FRAMES]) for i in range(0, len(frames), LABEL_CHUNK_FRAMES)]


def _run_units(fn, args_list, workers: int, what: str) -> None:
    if not args_list:
        return
    if workers <= 1:
        for args in progress(args_list, desc=what, unit="unit"):
            fn(*args)
        return
    with cf.ProcessPoolExecutor(workers, initializer=single_thread) as pool:
        futures = [pool.submit(fn, *args) for args in args_list]
        for future in progress(cf.as_completed(futures), total=len(futures), desc=what, unit="unit"):
            future.result()  # re-raise a worker's error here, with its traceback


def single_thread() -> None:
    """Each worker process uses one core; parallelism comes from the pool."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from pyscf import lib

    lib.num_threads(1)


def _geometry_path(work_dir: Path, unit: GeometryUnit) -> Path:
    return work_dir / "geometries" / f"{unit.stem}.npz"


def _label_path(work_dir: Path, unit: LabelUnit) -> Path:
    return work_dir / "labels" / f"{unit.stem}.json"


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF  # RDKit wants a C int


def _make_geometry(recipe: Recipe, unit: GeometryUnit, work_dir: Path) -> None:
    started = time.perf_counter()
    box = recipe.boxes.get(unit.molecule)
    molecule = box.molecule if box else unit.molecule
    seed = _seed(recipe.seed, unit.stem)
    if isinstance(box, Crystal):
        symbols, pos0_a, cell_a = geometries.molecular_crystal(box)
    else:
        symbols, pos0_a = geometries.rdkit_conformer(recipe.smiles[molecule], _seed(recipe.seed, molecule))
        if box is not None:
            symbols, pos0_a, cell_a = geometries.molecular_box(symbols, pos0_a, box.copies, box.density_g_cm3, seed)
    if box is None:
        frames_a = geometries.xtb_md_frames(symbols, pos0_a, unit.temperature_k, recipe.frames_per_temperature,
                                            seed=seed, stride=recipe.md_stride_steps)
        arrays = {"symbols": np.array(symbols), "frames_a": frames_a}
    else:
        frames_a, cells_a = geometries.periodic_md_frames(symbols, pos0_a, cell_a, unit.temperature_k,
                                                          recipe.frames_per_temperature, seed,
                                                          stride=recipe.md_stride_steps, max_strain=box.max_strain)
        arrays = {"symbols": np.array(symbols), "frames_a": frames_a, "cells_a": cells_a}
    arrays["seconds"] = np.array(time.perf_counter() - started)
    atomic_write(_geometry_path(work_dir, unit), lambda f: np.savez(f, **arrays))


def _level(unit: LabelUnit) -> levels.LevelOfTheory:
    lot = levels.LEVELS[unit.task]
    return lot if unit.forces is None else dataclasses.replace(lot, with_forces=unit.forces)


def _make_normal_mode_geometries(recipe: Recipe, units: list[GeometryUnit], work_dir: Path) -> None:
    """One molecule's frames at each of ``units``' temperatures, from one set of normal modes."""
    started = time.perf_counter()
    molecule = units[0].molecule
    symbols, pos0_a = geometries.rdkit_conformer(recipe.smiles[molecule], _seed(recipe.seed, molecule))
    modes = geometries.normal_modes(symbols, pos0_a)
    for unit in units:
        frames_a = geometries.normal_mode_frames(modes, unit.temperature_k, recipe.frames_per_temperature,
                                                 seed=_seed(recipe.seed, unit.stem))
        seconds = (time.perf_counter() - started) / len(units)  # the Hessian's cost shared out
        arrays = {"symbols": np.array(symbols), "frames_a": frames_a, "seconds": np.array(seconds)}
        atomic_write(_geometry_path(work_dir, unit), lambda f: np.savez(f, **arrays))


def _make_labels(unit: LabelUnit, work_dir: Path) -> None:
    lot = _level(unit)
    started = time.perf_counter()
    with np.load(_geometry_path(work_dir, unit.geometry)) as stored:
        geom = dict(stored)  # read once: each access of an npz member reads it from disk again
    symbols = [str(s) for s in geom["symbols"]]
    records, rejects = [], []
    for frame in unit.frames:
        stress = None
        try:
            if "cells_a" in geom:
                energy_ev, forces, stress = levels.label_periodic(lot, symbols, geom["frames_a"][frame],
                                                                  geom["cells_a"][frame])
            else:
                energy_ev, forces = levels.label(lot, symbols, geom["frames_a"][frame])
        except levels.NotConvergedError as err:
            rejects.append({"frame": frame, "reason": str(err)})
            continue
        records.append({"frame": frame, "energy_ev": energy_ev,
                        "forces_ev_a": None if forces is None else forces.tolist(),
                        "stress_ev_a3": None if stress is None else stress.tolist()})
    payload = json.dumps({"records": records, "rejects": rejects, "seconds": time.perf_counter() - started,
                          "frames_sha256": _frames_sha256(geom, unit.frames)})
    atomic_write(_label_path(work_dir, unit), lambda f: f.write(payload.encode()))


def _frames_sha256(geometry, frames: tuple[int, ...]) -> str:
    """Checksum of the positions (and cells) of ``frames``: what a label chunk was computed on."""
    digest = hashlib.sha256()
    for key in ("symbols", "frames_a", "cells_a"):
        if key in geometry:
            values = geometry[key] if key == "symbols" else geometry[key][list(frames)]
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _write_task(task: str, recipe: Recipe, units: list[LabelUnit], work_dir: Path, out_dir: Path) -> dict:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    lot = _level(units[0]) if units else levels.LEVELS[task]
    frames, rejects, label_seconds = [], [], 0.0
    for unit in units:
        with np.load(_geometry_path(work_dir, unit.geometry)) as stored:
            geom = dict(stored)  # read once, not once per record
        label_path = _label_path(work_dir, unit)
        result = json.loads(label_path.read_text())
        recorded = result.get("frames_sha256")  # absent in units written before it was recorded
        if recorded is not None and recorded != _frames_sha256(geom, unit.frames):
            raise DataError(f"{label_path} labels other frames than {_geometry_path(work_dir, unit.geometry)} holds "
                             "(geometries made again elsewhere came out different); delete the label file to "
                             "label these frames")
        label_seconds += result.get("seconds", 0.0)  # absent in units written before it was recorded
        box = recipe.boxes.get(unit.geometry.molecule)
        for rec in result["records"]:
            atoms = Atoms([str(s) for s in geom["symbols"]], positions=geom["frames_a"][rec["frame"]])
            if box is not None:
                atoms.set_cell(geom["cells_a"][rec["frame"]])
                atoms.pbc = True
            atoms.info.update(lot.metadata())
            atoms.info.update(molecule=unit.geometry.molecule, smiles=recipe.smiles[box.molecule if box else
                                                                                     unit.geometry.molecule],
                              temperature_K=unit.geometry.temperature_k, md_frame=rec["frame"])
            forces = None if rec["forces_ev_a"] is None else np.array(rec["forces_ev_a"])
            stress = rec.get("stress_ev_a3")  # eV/Å³, ASE's sign: extxyz writes it as the frame's stress
            atoms.calc = SinglePointCalculator(atoms, energy=rec["energy_ev"], forces=forces,
                                               **({} if stress is None else {"stress": np.array(stress)}))
            frames.append(atoms)
        rejects += [{"task": task, "molecule": unit.geometry.molecule,
                     "temperature_K": unit.geometry.temperature_k, **r} for r in result["rejects"]]
    out_path = out_dir / f"{task}.extxyz"
    atomic_write(out_path, lambda f: write(f, frames, format="extxyz"), text=True)
    rejects_path = out_dir / f"{task}.rejects.jsonl"
    if rejects:
        atomic_write(rejects_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rejects)), text=True)
    elif rejects_path.exists():
        rejects_path.unlink()
    return {"structures": len(frames), "rejected": len(rejects),
            "molecules": len({a.info["molecule"] for a in frames}), "forces": lot.with_forces,
            "label_cpu_hours": label_seconds / 3600,
            "elements": dict(sorted(Counter(s for a in frames for s in a.get_chemical_symbols()).items())),
            "atoms": _size_histogram([len(a) for a in frames])}


def _seconds(geometry_path: Path) -> float:
    """The CPU seconds a geometry file's unit took (0 for files written before they were recorded)."""
    with np.load(geometry_path) as geometry:
        return float(geometry["seconds"]) if "seconds" in geometry else 0.0


def _size_histogram(sizes: list[int]) -> dict[str, int]:
    """Structures per size bin of ten atoms ("1-10", "11-20", ...)."""
    bins = Counter((size - 1) // 10 for size in sizes)
    return {f"{10 * b + 1}-{10 * b + 10}": bins[b] for b in sorted(bins)}
