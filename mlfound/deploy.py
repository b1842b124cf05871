"""One head of a release as a self-contained TorchScript file, for programs that do not import mlfound
(LAMMPS, C++, another Python process).

    mlfound deploy e2-reptile-k5 --head hf_631g --dtype float64 --out hf_631g.pt

The file holds the trunk (compiled by e3nn's ``jit.compile``, the route MACE and NequIP ship theirs by), the
head's readout, its float64 reference energies and scale, and ``mlfound.json`` (head, cutoff, elements, units,
the release's sha256) as an extra file. The caller gives the neighbour list, as LAMMPS and ASE codes have one:

    module = torch.jit.load("hf_631g.pt")
    energy_ev, forces_ev_a, stress_ev_a3 = module(atomic_numbers, positions_a, edge_index, edge_shift_a, cell_a)

``atomic_numbers`` (N,) int64; ``positions_a`` (N, 3); ``edge_index`` (2, E) int64 [sender, receiver], every
ordered pair closer than the cutoff (a full list, periodic images included); ``edge_shift_a`` (E, 3) Cartesian,
the edge vector being positions[receiver] - positions[sender] + shift; ``cell_a`` (3, 3), rows the lattice
vectors (zeros for a molecule: its stress is NaN). Energy float64 eV, forces eV/Å, stress eV/Å³ in ASE's sign.

Why TorchScript, which torch 2.13 deprecates: it is what LAMMPS's ML-IAP and MACE's and NequIP's pair styles
load, and ``torch.export`` could not capture the forces here (with ``autograd.grad`` inside: "fake tensor in
the exported program's constants"; with ``torch.func.grad``: "Cannot access data pointer" in e3nn's
tensor products; an energy-only export worked).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from e3nn.util import jit
from torch import nn

from mlfound.data.batching import neighbour_list
from mlfound.data.files import sha256_file
from mlfound.data.record import Record
from mlfound.model import Potential, physics
from mlfound.progress import stages
from mlfound.release import Release

METADATA_FILE = "mlfound.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@jit.compile_mode("script")
class DeployedHead(nn.Module):
    """The energy of one head, its forces and stress, of one structure: what ``Potential.energy_forces_stress``
    computes for a batch of one graph under that head."""

    def __init__(self, model: Potential, head: str):
        super().__init__()
        task = model.task_names.index(head)
        self.trunk = model.trunk
        self.readout = model.heads.heads[head]
        self.register_buffer("species_of_z", model.species_of_z.clone())
        self.register_buffer("references_ev", model.references_ev[task].clone())  # (S,) float64
        self.scale_ev = float(model.scales_ev[task])

    def forward(self, atomic_numbers: torch.Tensor, positions_a: torch.Tensor, edge_index: torch.Tensor,
                edge_shift_a: torch.Tensor, cell_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = self.readout[0].weight.dtype
        species = self.species_of_z[atomic_numbers]
        if bool((species < 0).any()) or bool(torch.isnan(self.references_ev[species]).any()):
            raise ValueError("an element this head has no reference energy for (mlfound.json lists its elements)")
        positions = positions_a.to(dtype).detach().requires_grad_(True)
        strain = torch.zeros((1, 3, 3), dtype=dtype, device=positions.device).requires_grad_(True)
        one_graph = torch.zeros(edge_index.shape[1], dtype=torch.long, device=positions.device)
        vectors = physics.edge_vectors(positions, edge_index, edge_shift_a, strain, one_graph)
        features = self.trunk(species, vectors, edge_index)
        atom_energy = self.references_ev[species] + self.scale_ev * self.readout(features).squeeze(-1).double()
        energy = atom_energy.sum()
        grads = torch.autograd.grad([energy], [positions, strain])
        forces, denergy_dstrain = grads[0], grads[1]
        assert forces is not None and denergy_dstrain is not None
        volume = torch.abs(torch.linalg.det(cell_a.to(torch.float64))).reshape(1)
        stress = physics.stress(denergy_dstrain.double(), volume)[0]
        return energy.detach(), -forces.detach(), stress.detach()  # results, not a graph to train through


@contextlib.contextmanager
def _torchscript_deprecation_silenced():
    """torch 2.13 warns on every TorchScript call; why we use it anyway is in the module's docstring."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def deploy(release: Release, head: str, out: Path, dtype: str = "float64") -> Path:
    """Write ``head`` of ``release`` as TorchScript to ``out`` (atomically: a temporary file renamed into place)."""
    release.check_head(head)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = copy.deepcopy(release.model).to(DTYPES[dtype]).eval()  # references and scales stay float64
    metadata = {"head": head, "lot": release.metadata["heads"][head], "cutoff_a": model.config.cutoff_a,
                "elements": [z for z in model.elements if not model.missing_references(head, [z])],
                "dtype": dtype, "release": str(release.path),
                "release_sha256": sha256_file(release.path) if release.path else None,
                "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å³, ASE's sign"}}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with _torchscript_deprecation_silenced(), stages(["script", "write"], desc=f"deploy {head}") as start:
            start("script")
            module = jit.compile(DeployedHead(model, head))
            start("write")
            torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class DeployedCalculator(Calculator):
    """ASE calculator for a file written by ``deploy``: the TorchScript module with the data pipeline's
    neighbour list, and no mlfound model code. What ``mlfound.lammps_driver`` runs when given such a file."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, path: Path | str, **kwargs):
        super().__init__(**kwargs)
        files = {METADATA_FILE: ""}
        with _torchscript_deprecation_silenced():
            self.module = torch.jit.load(str(path), _extra_files=files)
        self.metadata = json.loads(files[METADATA_FILE])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = self.atoms.pbc.all()
        if self.atoms.pbc.any() and not periodic:
            raise PropertyNotImplementedError("a deployed head takes molecules or cells periodic in all directions")
        cell = np.asarray(self.atoms.cell[:]) if periodic else np.zeros((3, 3))
        rec = Record(z=self.atoms.numbers.astype(np.int64), pos_a=self.atoms.positions, energy_ev=float("nan"),
                     cell_a=cell if periodic else None, pbc=self.atoms.pbc.copy() if periodic else None)
        edge_index, shift_a = neighbour_list(rec, self.metadata["cutoff_a"])
        energy, forces, stress = self.module(torch.from_numpy(rec.z), torch.from_numpy(rec.pos_a),
                                             torch.from_numpy(edge_index), torch.from_numpy(shift_a),
                                             torch.from_numpy(cell))
        self.results = {"energy": energy.item(), "free_energy": energy.item(), "forces": forces.double().numpy()}
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress.numpy())
