"""The trunk's channel-wise tensor products as a few dense matrix products instead of e3nn's one einsum per path.

Both tensor products of the trunk couple each channel with itself only: the convolution ("uvu", a node's
features with the edge's spherical harmonics) and the product basis ("uuu", a node's features with
themselves). e3nn computes them path by path, ~15 small kernels per path and as many again in the double
backward that force training needs; on a CPU at these sizes the step is dispatch-bound. Here every path is one
column block of a constant matrix, so a product is: features to a (rows, channel, component) layout, one outer
product, one matmul with the Clebsch-Gordan matrix, one multiply by the per-channel weights, one matmul that
sums the paths into their outputs, and back to e3nn's layout.

``ChannelwiseTensorProduct`` is an ``o3.TensorProduct``: the same constructor, instructions, normalisation, weight
layout and state-dict keys, so models and releases are unchanged, and ``tests/model/test_channelwise.py`` checks it
against e3nn's own forward (values, gradients and second derivatives).
"""
from __future__ import annotations

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode


@compile_mode("script")
class ChannelwiseTensorProduct(o3.TensorProduct):
    """An ``o3.TensorProduct`` whose instructions are all "uvu" (the second input of multiplicity 1) or all
    "uuu", with one multiplicity C for every irrep of the first input and the output, and weights per row."""

    def __init__(self, irreps_in1, irreps_in2, irreps_out, instructions, **kwargs):
        super().__init__(irreps_in1, irreps_in2, irreps_out, instructions, shared_weights=False,
                         internal_weights=False, **kwargs)
        modes = {ins.connection_mode for ins in self.instructions}
        channels = {mul for mul, _ in self.irreps_in1} | {mul for mul, _ in self.irreps_out}
        if len(channels) != 1 or modes not in ({"uvu"}, {"uuu"}) or not all(ins.has_weight for ins in self.instructions):
            raise ValueError(f"channel-wise products need one multiplicity and all-'uvu' or all-'uuu' weighted "
                             f"paths; got {self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, modes {modes}")
        self.channels = channels.pop()
        self.per_channel_in2 = modes == {"uuu"}
        if not self.per_channel_in2 and any(mul != 1 for mul, _ in self.irreps_in2):
            raise ValueError(f"'uvu' products here need the second input of multiplicity 1, got {self.irreps_in2}")
        dims1 = [ir.dim for _, ir in self.irreps_in1]
        dims2 = [ir.dim for _, ir in self.irreps_in2]
        dims_out = [ir.dim for _, ir in self.irreps_out]
        offsets1, offsets2, offsets_out = _offsets(dims1), _offsets(dims2), _offsets(dims_out)
        width1, width2 = sum(dims1), sum(dims2)
        path_dims = [dims_out[ins.i_out] for ins in self.instructions]
        clebsch_gordan = torch.zeros(width1 * width2, sum(path_dims), dtype=torch.float64)  # (outer product, path components)
        paths_to_out = torch.zeros(sum(path_dims), sum(dims_out))  # sums each path into its output irrep
        spread = torch.zeros(len(self.instructions), sum(path_dims))  # each path's weight onto its components
        column = 0
        for index, (ins, dim) in enumerate(zip(self.instructions, path_dims)):
            l1, l2, l3 = (self.irreps_in1[ins.i_in1].ir.l, self.irreps_in2[ins.i_in2].ir.l,
                          self.irreps_out[ins.i_out].ir.l)
            w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * ins.path_weight  # (2l1+1, 2l2+1, 2l3+1)
            for i in range(w3j.shape[0]):
                for j in range(w3j.shape[1]):
                    row = (offsets1[ins.i_in1] + i) * width2 + offsets2[ins.i_in2] + j
                    clebsch_gordan[row, column:column + dim] = w3j[i, j]
            paths_to_out[column:column + dim, offsets_out[ins.i_out]:offsets_out[ins.i_out] + dim] = torch.eye(dim)
            spread[index, column:column + dim] = 1.0
            column += dim
        self.register_buffer("clebsch_gordan", clebsch_gordan, persistent=False)
        self.register_buffer("paths_to_out", paths_to_out, persistent=False)
        self.register_buffer("spread", spread, persistent=False)
        self.slices1 = [(s.start, s.stop, d) for s, d in zip(self.irreps_in1.slices(), dims1)]
        self.slices2 = [(s.start, s.stop, d) for s, d in zip(self.irreps_in2.slices(), dims2)]
        self.blocks_out = [(offset, d) for offset, d in zip(offsets_out, dims_out)]

    def forward(self, x, y, weight: torch.Tensor | None = None):
        """(Z, in1.dim), (Z, in2.dim), (Z, weight_numel) -> (Z, out.dim), as ``o3.TensorProduct.forward``."""
        assert weight is not None
        rows, c = x.shape[0], self.channels
        x_rci = _to_channels(x, self.slices1, c)
        clebsch_gordan = self.clebsch_gordan.to(x.dtype)
        if self.per_channel_in2:
            outer = x_rci.unsqueeze(-1) * _to_channels(y, self.slices2, c).unsqueeze(-2)
            paths_rcp = outer.reshape(rows, c, -1) @ clebsch_gordan
        else:  # y first: (rows, in1 components, path components), then one small matmul per row
            coupling_rip = (y @ clebsch_gordan.reshape(x_rci.shape[2], y.shape[1], -1).transpose(0, 1).reshape(
                y.shape[1], -1)).reshape(rows, x_rci.shape[2], -1)
            paths_rcp = torch.bmm(x_rci, coupling_rip)
        weight_rci = weight.reshape(rows, -1, c).transpose(1, 2)  # e3nn's layout: path by path, channels inside
        out_rcd = (paths_rcp * (weight_rci @ self.spread.to(x.dtype))) @ self.paths_to_out.to(x.dtype)
        return torch.cat([out_rcd[:, :, o:o + d].reshape(rows, c * d) for o, d in self.blocks_out], dim=1)


def _offsets(dims: list[int]) -> list[int]:
    return [sum(dims[:i]) for i in range(len(dims))]


def _to_channels(x: torch.Tensor, slices: list[tuple[int, int, int]], channels: int) -> torch.Tensor:
    """e3nn's layout (rows, Σ C·d_l; channel-major inside each irrep) -> (rows, C, Σ d_l)."""
    return torch.cat([x[:, start:stop].reshape(x.shape[0], channels, d) for start, stop, d in slices], dim=2)
