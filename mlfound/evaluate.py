"""Evaluation of released models: error tables, parity plots, torsion-scan smoothness, learning curves.

Torsion scans test what error tables on MD frames miss: a potential can have small errors and still
put wiggles (spurious minima and maxima) into a rotational profile. Smoothness is measured as the RMS
of the difference between the model's and the reference's second finite differences along the scan
(meV), plus the count of spurious extrema (model extrema with no reference extremum of the same kind
within one scan point) and of missed ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mlfound.data.files import atomic_write
from mlfound.committee import force_deviation, members
from mlfound.data.record import DataError, Record
from mlfound.data.references import reference_energy
from mlfound.metrics import error_table
from mlfound.predict import check_head_elements, head_batches, predict
from mlfound.progress import progress as show_progress
from mlfound.release import Release, ReleaseError

SCAN_ANGLE_KEY = "scan_angle_deg"


def evaluate(release: Release, records: list[Record], head: str, max_atoms: int = 512,
             progress: bool = False) -> dict[str, float]:
    """Energy (meV/atom) and force (meV/Å) MAE/RMSE of ``head`` on ``records``; ``progress``: a bar (commands)."""
    release.check_head(head)
    model = release.model
    check_head_elements(model, head, {int(z) for rec in records for z in rec.z})
    batches = head_batches(records, head, model.task_names, model.config.cutoff_a, max_atoms)
    batches = show_progress(batches, desc=f"evaluate {head}", unit="batch", enabled=progress)
    return error_table(model, {head: batches}, next(model.parameters()).device)[head]


def scan_angles(path: Path, num_records: int) -> tuple[np.ndarray, bool]:
    """Scan coordinate of each frame (``scan_angle_deg`` in the extxyz info, else the frame index) and
    whether the scan closes on itself (a uniform full turn), so differences wrap around."""
    from ase.io import iread

    angles = [atoms.info.get(SCAN_ANGLE_KEY) for atoms in iread(path, index=":")]
    if any(a is None for a in angles):
        return np.arange(num_records, dtype=float), False
    angles = np.asarray(angles, dtype=float)
    steps = np.diff(angles)
    periodic = bool(len(steps) and np.allclose(steps, steps[0]) and np.isclose(steps[0] * len(angles), 360.0))
    return angles, periodic


def scan_smoothness(model_energy_ev: np.ndarray, reference_energy_ev: np.ndarray, periodic: bool) -> dict:
    """Smoothness of a model's scan profile against the QM reference (energies along the scan, in order)."""
    model_d2, ref_d2 = _second_difference(model_energy_ev, periodic), _second_difference(reference_energy_ev, periodic)
    model_ext, ref_ext = extrema(model_energy_ev, periodic), extrema(reference_energy_ev, periodic)
    offset = model_energy_ev - reference_energy_ev
    return {
        "num_points": len(model_energy_ev), "periodic": periodic,
        "second_difference_rms_error_mev": 1e3 * float(np.sqrt(((model_d2 - ref_d2) ** 2).mean())),
        "reference_second_difference_rms_mev": 1e3 * float(np.sqrt((ref_d2**2).mean())),
        "relative_energy_rmse_mev": 1e3 * float(np.sqrt(((offset - offset.mean()) ** 2).mean())),
        "reference_barrier_mev": 1e3 * float(np.ptp(reference_energy_ev)),
        "model_barrier_mev": 1e3 * float(np.ptp(model_energy_ev)),
        "num_reference_extrema": len(ref_ext), "num_model_extrema": len(model_ext),
        "spurious_extrema": _unmatched(model_ext, ref_ext, len(model_energy_ev), periodic),
        "missed_extrema": _unmatched(ref_ext, model_ext, len(model_energy_ev), periodic),
    }


def extrema(energy: np.ndarray, periodic: bool) -> list[tuple[int, str]]:
    """(index, "min" | "max") of every strict local extremum; a plateau counts once, at its first point."""
    slopes = np.sign(np.diff(np.append(energy, energy[0]) if periodic else energy))
    found = []
    indices = range(len(energy)) if periodic else range(1, len(energy) - 1)
    for i in indices:
        before, after = slopes[i - 1], slopes[i % len(slopes)]
        if before < 0 < after:
            found.append((i, "min"))
        elif before > 0 > after:
            found.append((i, "max"))
    return found


def scan_report(release: Release, records: list[Record], head: str, path: Path) -> tuple[dict, np.ndarray, ...]:
    """Smoothness of ``head`` along the scan in file ``path``; also the angles, model and reference energies."""
    angles, periodic = scan_angles(path, len(records))
    model_energy, _ = predict(release.model, records, head, compute_forces=False)
    reference = np.array([r.energy_ev for r in records])
    return scan_smoothness(model_energy, reference, periodic), angles, model_energy, reference


def plot_scan(angles: np.ndarray, model_energy_ev: np.ndarray, reference_energy_ev: np.ndarray, path: Path,
              title: str) -> Path:
    """Model vs reference profile, each relative to its own minimum, in meV."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(angles, 1e3 * (reference_energy_ev - reference_energy_ev.min()), "o-", color="k", label="QM reference")
    ax.plot(angles, 1e3 * (model_energy_ev - model_energy_ev.min()), "s--", color="tab:blue", label="model")
    ax.set_xlabel("torsion angle (deg)" if np.ptp(angles) > len(angles) else "scan point")
    ax.set_ylabel("relative energy (meV)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def committee_report(release: Release, records: list[Record], head: str) -> dict:
    """Whether the spread of ``head``'s committee predicts the head's error on labelled ``records``: Spearman
    rank correlations of the per-atom force deviation with the per-atom force error (|F - F_ref|, eV/Å), per
    atom and per structure (the largest of each, as an active-learning loop ranks structures)."""
    from scipy.stats import spearmanr

    names = members(release.metadata, head)
    if len(names) == 1:
        raise ReleaseError(f"{release.path}: head {head!r} has no committee; fine-tune it with --committee K")
    forces_by_member = [predict(release.model, records, name)[1] for name in names]
    deviations, errors = [], []
    for g, record in enumerate(records):
        if record.forces_ev_a is not None:
            deviations.append(force_deviation(np.stack([forces[g] for forces in forces_by_member])))
            errors.append(np.linalg.norm(forces_by_member[0][g] - record.forces_ev_a, axis=1))
    if len(deviations) < 3:
        raise DataError(f"a committee report needs at least 3 structures with forces; these records have "
                        f"{len(deviations)}")
    largest_deviation, largest_error = [d.max() for d in deviations], [e.max() for e in errors]
    return {"members": names, "num_structures": len(deviations),
            "spearman_per_structure": float(spearmanr(largest_deviation, largest_error).statistic),
            "spearman_per_atom": float(spearmanr(np.concatenate(deviations), np.concatenate(errors)).statistic),
            "mean_max_forces_deviation_ev_a": float(np.mean(largest_deviation)),
            "mean_max_forces_error_ev_a": float(np.mean(largest_error))}


PARITY_PANELS = {"energy": ("energy per atom above the head's\nelement references (eV/atom)", "meV/atom"),
                 "forces": ("force components (eV/Å)", "meV/Å")}


def parity_values(release: Release, records: list[Record], head: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference and predicted energy per atom (eV/atom) and force components (eV/Å, of the records with
    forces), the values of ``plot_parity``; their MAEs are the error table's. Energies are taken above the
    head's per-element references, which both sides share: absolute energies per atom spread by composition
    (hundreds of eV) and would hide the errors (meV) on the diagonal."""
    model = release.model
    energy_ev, forces_ev_a = predict(model, records, head)
    references = dict(zip(model.elements, model.references_ev[model.task_names.index(head)].tolist()))
    offset_ev = np.array([reference_energy(r.z, references) for r in records])
    num_atoms = np.array([len(r.z) for r in records])
    values = {"energy": ((np.array([r.energy_ev for r in records]) - offset_ev) / num_atoms,
                         (energy_ev - offset_ev) / num_atoms)}
    with_forces = [i for i, r in enumerate(records) if r.forces_ev_a is not None]
    if with_forces:
        values["forces"] = (np.concatenate([records[i].forces_ev_a.ravel() for i in with_forces]),
                            np.concatenate([forces_ev_a[i].ravel() for i in with_forces]))
    return values


def plot_parity(values: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Predicted against reference values, each panel with its MAE: where an error table's averages hide
    outliers, a branch of structures or a scale error, a parity plot shows them."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 4.5), squeeze=False)
    for ax, (kind, (reference, predicted)) in zip(axes[0], values.items()):
        label, unit = PARITY_PANELS[kind]
        low, high = min(reference.min(), predicted.min()), max(reference.max(), predicted.max())
        ax.plot([low, high], [low, high], color="k", lw=0.8)
        ax.scatter(reference, predicted, s=6, alpha=0.5, color="tab:blue")
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"MAE {1e3 * np.abs(predicted - reference).mean():.3g} {unit} ({len(reference)} values)")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(title)
    return _save(fig, path)


def plot_learning_curves(curves: dict[str, dict[int, list[dict]]], path: Path, title: str = "") -> Path:
    """Energy and force MAE against the number of fine-tuning structures, log-log; each point is the
    mean over runs (seeds, subsets) with error bars of ± one standard deviation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "energy_mae_mev_atom", "energy MAE (meV/atom)"),
                           (axes[1], "forces_mae_mev_a", "force MAE (meV/Å)")):
        for name, by_n in curves.items():
            sizes = sorted(by_n)
            values = [[run[key] for run in by_n[n]] for n in sizes]
            ax.errorbar(sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values],
                        marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning structures")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return _save(fig, path)


def num_finetune_structures(release: Release, head: str) -> int:
    """How many structures ``head`` was fine-tuned on, from the release's metadata."""
    data = release.metadata["heads"][head].get("finetune_data")
    if data is None:
        raise ReleaseError(f"{release.path}: head {head!r} was not fine-tuned; a learning curve needs "
                           "fine-tuned models")
    return data["num_train"]


def _second_difference(energy: np.ndarray, periodic: bool) -> np.ndarray:
    if periodic:
        return np.roll(energy, -1) - 2 * energy + np.roll(energy, 1)
    return energy[2:] - 2 * energy[1:-1] + energy[:-2]


def _unmatched(found: list[tuple[int, str]], reference: list[tuple[int, str]], n: int, periodic: bool) -> int:
    def near(i, j):
        d = abs(i - j)
        return min(d, n - d) <= 1 if periodic else d <= 1

    return sum(not any(kind == rkind and near(i, j) for j, rkind in reference) for i, kind in found)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    _pyplot().close(fig)
    return Path(path)
