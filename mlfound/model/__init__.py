"""Model: e3nn equivariant trunk, per-task readout heads, and the Potential giving E and F = -dE/dpos."""
from mlfound.model.config import ModelConfig
from mlfound.model.potential import Potential

__all__ = ["ModelConfig", "Potential"]
