"""The architecture of a model: what a release stores and every part of the model is built from."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(32, ge=1)  # features per irrep order in the hidden layers
    # highest rotation order of the hidden features (and, with correlation 1, of edge directions)
    l_max: int = Field(2, ge=0, le=4)
    num_layers: int = Field(3, ge=1)  # message-passing layers
    cutoff_a: float = Field(5.0, gt=0)  # radial cutoff of the neighbour graph (Å)
    num_basis: int = Field(8, ge=1)  # Bessel radial basis functions
    radial_hidden: int = Field(64, ge=1)  # width of the radial MLP
    radial_layers: int = Field(1, ge=1)  # hidden layers of the radial MLP (NequIP's default; release format 2)
    head_hidden: int = Field(32, ge=1)  # width of each task head's MLP
    # None: counted from the training shards' manifests at the cutoff when pretraining starts (train.build), so
    # the release stores the number; releases before format 5 hold the fixed 10.0 they were trained with
    avg_num_neighbors: float | None = Field(None, gt=0)
    scalar_last_layer: bool = True  # the last layer outputs only the invariants the heads read (release format 2)
    correlation: int = Field(1, ge=1, le=4)  # body order - 1 of each layer's features: 1 two-body, 3 as MACE
    # with correlation > 1: messages keep every l <= l_max, so the last layer's products see vectors (format 4)
    product_messages_all_l: bool = True
    # with correlation > 1: spherical harmonics and the product basis's features up to this l, above l_max (as
    # MACE's max_ell, 3 by default there); None: l_max (format 6)
    product_l_max: int | None = Field(None, ge=0, le=4)

    @model_validator(mode="after")
    def _product_l_max_fits(self):
        if self.product_l_max is not None and self.product_l_max < self.l_max:
            raise ValueError(f"product_l_max {self.product_l_max} is below l_max {self.l_max}: the product basis "
                             "multiplies at least the features the layers pass on")
        if self.product_l_max not in (None, self.l_max) and self.correlation == 1:
            raise ValueError(f"product_l_max {self.product_l_max} needs a product basis (correlation > 1); the "
                             "two-body trunk (correlation 1) would ignore it")
        return self
