"""MACE worker for tools/bench_peers.py (timing, or accuracy with --fit-train), run inside .venv-mace
(mace-torch 0.3.16, e3nn 0.4.4).

Same molecules and step as time_mlfound.py: MACE with hidden irreps Cx0e + Cx1o (+ Cx2e) up to
l_max, spherical harmonics to --product-l-max (its max_ell; default l_max), ``correlation``, ``layers`` interactions, Bessel radial basis.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import mace  # noqa: E402,F401  (before e3nn: it sets the torch.load flag e3nn 0.4.4 needs)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from mace import data, modules, tools  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402
from mace.tools import torch_geometric  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import calculator_ms, fit_and_test, parse_args, read_frames, report  # noqa: E402

ELEMENTS = [1, 6, 7, 8]


def build_model(args) -> torch.nn.Module:
    irreps = " + ".join(f"{args.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(args.l_max + 1))
    return modules.MACE(
        r_max=args.cutoff, num_bessel=8, num_polynomial_cutoff=5, max_ell=args.product_l_max or args.l_max,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=args.layers, num_elements=len(ELEMENTS), hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(ELEMENTS)), avg_num_neighbors=10.0,
        atomic_numbers=ELEMENTS, correlation=args.correlation, gate=torch.nn.functional.silu)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float32)
    model = build_model(args)
    z_table = tools.AtomicNumberTable(ELEMENTS)

    def make_inputs(frames):
        graphs = [data.AtomicData.from_config(data.config_from_atoms(a), z_table=z_table, cutoff=args.cutoff)
                  for a in frames]
        return next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)))

    def forward(batch, training: bool):
        out = model(batch.to_dict(), training=training, compute_force=True)
        return out["energy"], out["forces"]

    if args.fit_train:
        return fit_and_test("mace", model, make_inputs, forward, args)
    frames = read_frames(args.data, args.batch)
    batch = make_inputs(frames)
    report("mace", model, forward, batch, frames, int(batch.num_nodes), int(batch.edge_index.shape[1]),
           calculator_ms(frames[0], MACECalculator(models=model, device="cpu", default_dtype="float32"),
                         args.repeats), args.repeats)


if __name__ == "__main__":
    main()
