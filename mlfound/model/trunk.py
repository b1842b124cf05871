"""e3nn message-passing trunk: species embedding, spherical harmonics of edge directions,
radial-weighted tensor-product convolutions, gated nonlinearities (NequIP-like), and optionally
MACE's many-body step: each node's aggregated features A are multiplied with themselves channel by
channel, A, A⊗A, A⊗A⊗A coupled by Clebsch-Gordan to every output irrep with element-dependent
weights, so one layer's features reach body order ``correlation + 1`` at the cost of node (not edge)
operations. That product basis is what makes MACE learn more per structure than two-body messages.

Shape legend: N atoms, E edges, C channels, B radial basis functions.
"""
from __future__ import annotations

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn

from mlfound.model.config import ModelConfig
from mlfound.model.ops import one_hot
from mlfound.model.radial import BesselBasis

# Initial scale of the product basis's element weights: small, so training starts near the two-body model and
# grows the many-body terms from data (validation force error at N = 10: 243 meV/Å with 1, 216 with 0.1, 220
# with 0.01; N = 50 and 200 alike; docs/benchmarks.md). MACE likewise scales its contraction weights down.
PRODUCT_INIT_STD = 0.1


def hidden_irreps(channels: int, l_max: int) -> o3.Irreps:
    """C copies of each l <= l_max with natural parity: Cx0e + Cx1o + Cx2e + ..."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(l_max + 1)])


class ProductBasis(nn.Module):
    """B = Σ_ν Linear_ν(A^⊗ν), ν = 1..correlation: channel-wise ("uuu") Clebsch-Gordan products of a node's
    features with themselves, weighted per element (MACE's symmetric contraction, without its reduction to
    the symmetric subspace: a few redundant paths, no loss of body order). A may hold higher l than B
    (``model.product_l_max``): the intermediate powers keep every l of A, the last one and every Linear_ν only
    the l of B, so no path is computed whose output nothing reads."""

    def __init__(self, irreps: o3.Irreps, correlation: int, num_species: int, irreps_out: o3.Irreps | None = None):
        super().__init__()
        irreps_out = irreps if irreps_out is None else irreps_out
        self.products = nn.ModuleList()
        self.weights = nn.ModuleList()  # species -> that element's weights of each product's paths
        for order in range(2, correlation + 1):
            irreps_power = irreps_out if order == correlation else irreps
            instructions = [(i, j, k, "uuu", True) for i, (_, ir_i) in enumerate(irreps)
                            for j, (_, ir_j) in enumerate(irreps) for k, (_, ir_k) in enumerate(irreps_power)
                            if ir_k in ir_i * ir_j]
            product = o3.TensorProduct(irreps, irreps, irreps_power, instructions, shared_weights=False,
                                       internal_weights=False)
            self.products.append(product)
            weights = nn.Embedding(num_species, product.weight_numel)
            nn.init.normal_(weights.weight, std=PRODUCT_INIT_STD)
            self.weights.append(weights)
        self.linears = nn.ModuleList(o3.Linear(irreps_out if order == correlation else irreps, irreps_out)
                                     for order in range(1, correlation + 1))

    def forward(self, a_NI: torch.Tensor, species_N: torch.Tensor) -> torch.Tensor:
        powers_NI = [a_NI]  # A, A⊗A, ...; loops over whole ModuleLists, as TorchScript needs (mlfound deploy)
        for product, weights in zip(self.products, self.weights):
            powers_NI.append(product(powers_NI[-1], a_NI, weights(species_N)))
        basis_NI = self.linears[0](a_NI)
        for index, linear in enumerate(self.linears):
            if index > 0:
                basis_NI = basis_NI + linear(powers_NI[index])
        return basis_NI


class Interaction(nn.Module):
    """h_i <- Gate(Linear(B(Σ_j TP(h_j, Y(r̂_ij); R(|r_ij|))))) + S(h_i), B the product basis (identity for
    correlation 1, the two-body NequIP-like layer) and S a linear self-connection, element-dependent with the
    product basis as in MACE (on validation data it cut the force error at N = 10 by 8%, docs/benchmarks.md)."""

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, irreps_sh: o3.Irreps,
                 num_basis: int, radial_hidden: int, radial_layers: int, avg_num_neighbors: float,
                 correlation: int = 1, irreps_product: o3.Irreps | None = None, num_species: int = 0,
                 irreps_message: o3.Irreps | None = None, irreps_basis: o3.Irreps | None = None):
        """``irreps_message``: the irreps the messages keep (default ``irreps_out``); ``irreps_basis``: the irreps
        the product basis outputs (default ``irreps_product``)."""
        super().__init__()
        irreps_message = irreps_message or irreps_out
        irreps_mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir in ir_in * ir_sh:
                    if ir in irreps_message:
                        instructions.append((i, j, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir))
        irreps_mid = o3.Irreps(irreps_mid)
        irreps_mid_sorted, perm, _ = irreps_mid.sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid_sorted, instructions,
                                   shared_weights=False, internal_weights=False)
        self.radial = FullyConnectedNet([num_basis] + [radial_hidden] * radial_layers + [self.tp.weight_numel],
                                        torch.nn.functional.silu)
        scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated else o3.Irreps("")
        self.gate = Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid] if gated else [], gated)
        if correlation > 1:  # A in the product irreps (all l, even for a scalars-only output), then B
            self.to_a = o3.Linear(irreps_mid_sorted.simplify(), irreps_product)
            irreps_basis = irreps_product if irreps_basis is None else irreps_basis
            self.product_basis = ProductBasis(irreps_product, correlation, num_species, irreps_basis)
            self.linear = o3.Linear(irreps_basis, self.gate.irreps_in)
        else:
            self.linear = o3.Linear(irreps_mid_sorted.simplify(), self.gate.irreps_in)
        if correlation > 1:
            self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, o3.Irreps(f"{num_species}x0e"),
                                                                  self.gate.irreps_out)
        else:
            self.self_connection = o3.Linear(irreps_in, self.gate.irreps_out)
        self.num_species = num_species
        self.norm = avg_num_neighbors**0.5
        self.irreps_out = self.gate.irreps_out

    def forward(self, h_NI, sh_EY, radial_EB, edge_index_2E, species_N):
        sender, receiver = edge_index_2E[0], edge_index_2E[1]
        messages_EM = self.tp(h_NI[sender], sh_EY, self.radial(radial_EB))
        aggregated_NM = torch.zeros(h_NI.shape[0], messages_EM.shape[1], dtype=messages_EM.dtype,
                                    device=messages_EM.device).index_add_(0, receiver, messages_EM) / self.norm
        if not hasattr(self, "product_basis"):
            return self.gate(self.linear(aggregated_NM)) + self.self_connection(h_NI)
        basis_NI = self.product_basis(self.to_a(aggregated_NM), species_N)
        species_NS = one_hot(species_N, self.num_species, h_NI.dtype)
        return self.gate(self.linear(basis_NI)) + self.self_connection(h_NI, species_NS)


class Trunk(nn.Module):
    """Species indices and edge vectors -> per-atom invariant features (N, C)."""

    def __init__(self, config: ModelConfig, num_species: int):
        """``config.product_l_max``: with correlation > 1, the l up to which edge directions are expanded and the
        product basis multiplies features (MACE's max_ell), while the features passed between layers stop at
        l_max. ``config.avg_num_neighbors`` must be set (pretraining counts it from the data)."""
        super().__init__()
        channels, l_max = config.channels, config.l_max
        self.embedding = nn.Embedding(num_species, channels)
        product_l_max = l_max if config.product_l_max is None else config.product_l_max
        self.irreps_sh = o3.Irreps.spherical_harmonics(product_l_max)
        self.spherical_harmonics = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.radial_basis = BesselBasis(config.cutoff_a, config.num_basis)
        irreps = o3.Irreps(f"{channels}x0e")
        self.layers = nn.ModuleList()
        for index in range(config.num_layers):
            # only scalars leave the trunk, so the last layer need not compute l > 0 outputs (NequIP does the same)
            last = index == config.num_layers - 1 and config.scalar_last_layer
            irreps_out = hidden_irreps(channels, 0 if last else l_max)
            irreps_product = hidden_irreps(channels, product_l_max)
            # the product basis contracts vectors into invariants only if the messages carry them, even where the
            # layer outputs scalars alone (as MACE's last layer); without, its products were of scalars only
            all_l = config.correlation > 1 and config.product_messages_all_l
            layer = Interaction(irreps, irreps_out, self.irreps_sh, config.num_basis, config.radial_hidden,
                                config.radial_layers, config.avg_num_neighbors, config.correlation, irreps_product,
                                num_species, irreps_product if all_l else irreps_out, hidden_irreps(channels, l_max))
            self.layers.append(layer)
            irreps = layer.irreps_out
        self.readout = o3.Linear(irreps, o3.Irreps(f"{channels}x0e"))

    def forward(self, species_N, vectors_E3, edge_index_2E):
        h = self.embedding(species_N)
        # edge geometry in the positions' precision, then in the weights' dtype (bf16 under DeepSpeed bf16)
        sh_EY = self.spherical_harmonics(vectors_E3).to(h.dtype)
        radial_EB = self.radial_basis(torch.linalg.vector_norm(vectors_E3, dim=-1)).to(h.dtype)
        for layer in self.layers:
            h = layer(h, sh_EY, radial_EB, edge_index_2E, species_N)
        return self.readout(h)
