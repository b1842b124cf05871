"""The geometry every prediction path shares: edge vectors under a homogeneous strain, and the stress from the
energy's strain derivative. ``Potential`` (training, evaluation, the calculators) and the TorchScript head
``mlfound deploy`` writes call these same functions (TorchScript-compatible), so the two cannot drift apart.

Stress is the derivative of the energy under a homogeneous strain ε of each graph (positions and cell scaled by
1 + ε, as MACE and NequIP do): the energy sees atoms only through edge vectors, so straining the edge vectors
strains both. ASE's sign: positive stress is tension, pressure is -trace/3.
"""
from __future__ import annotations

from typing import Optional

import torch


def edge_vectors(pos_N3: torch.Tensor, edge_index: torch.Tensor, edge_shift_E3: torch.Tensor,
                 strain_G33: Optional[torch.Tensor] = None, edge_graph_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E, 3) vectors positions[receiver] - positions[sender] + shift, each deformed by the symmetric part of its
    graph's strain (``edge_graph_E``: the graph of each edge) when a strain is given."""
    sender, receiver = edge_index[0], edge_index[1]
    vectors_E3 = pos_N3[receiver] - pos_N3[sender] + edge_shift_E3.to(pos_N3.dtype)
    if strain_G33 is not None and edge_graph_E is not None:
        symmetric_G33 = (strain_G33 + strain_G33.transpose(1, 2)) / 2  # exact symmetry also in bf16
        vectors_E3 = vectors_E3 + torch.einsum("ei,eij->ej", vectors_E3, symmetric_G33[edge_graph_E])
    return vectors_E3


def stress(denergy_dstrain_G33: torch.Tensor, volume_a3_G: torch.Tensor) -> torch.Tensor:
    """(G, 3, 3) stress in eV/Å³: dE/dε over the cell volume; NaN for a graph without a 3-D cell (volume 0), as a
    constant rather than a division by NaN, so a loss that masks those graphs out keeps finite gradients."""
    periodic_G11 = (volume_a3_G > 0)[:, None, None]
    ones_G11 = torch.ones_like(denergy_dstrain_G33[:, :1, :1])
    volume_G11 = torch.where(periodic_G11, volume_a3_G[:, None, None].to(denergy_dstrain_G33.dtype), ones_G11)
    return torch.where(periodic_G11, denergy_dstrain_G33 / volume_G11, torch.full_like(ones_G11, float("nan")))
