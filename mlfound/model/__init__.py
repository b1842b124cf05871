"""Model: e3nn equivariant trunk, per-task readout heads, and the Potential giving E and F = -dE/dpos."""
from mlfound.model.potential import ModelConfig, Potential

__all__ = ["ModelConfig", "Potential"]
