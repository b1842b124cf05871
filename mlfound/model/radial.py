"""Radial basis: Bessel functions times a smooth polynomial cutoff (NequIP/DimeNet)."""
import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/c) sin(n π r / c) / r for n = 1..num_basis, multiplied by the cutoff envelope."""

    def __init__(self, cutoff_a: float, num_basis: int = 8, envelope_power: int = 6):
        super().__init__()
        self.cutoff_a, self.p = cutoff_a, envelope_power
        self.register_buffer("frequencies", torch.arange(1, num_basis + 1) * math.pi / cutoff_a)

    def forward(self, r_E: torch.Tensor) -> torch.Tensor:  # (E,) -> (E, num_basis)
        r = r_E.unsqueeze(-1)
        bessel = math.sqrt(2.0 / self.cutoff_a) * torch.sin(self.frequencies * r) / r
        return bessel * self.envelope(r)

    def envelope(self, r: torch.Tensor) -> torch.Tensor:
        """Polynomial cutoff with p continuous derivatives at r = cutoff: energies stay smooth."""
        x, p = r / self.cutoff_a, self.p
        value = (1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))
        return value * (x < 1.0)
