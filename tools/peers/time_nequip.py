"""Timing worker for tools/bench_peers.py, run inside .venv-nequip (nequip 0.19.1, e3nn 0.6).

Same molecules and step as time_mlfound.py: NequIP with ``layers`` convolutions, l_max, C features,
parity off (so its hidden irreps are Cx0e + Cx1o (+ Cx2e), as mlfound's), 8 Bessel functions.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from nequip.data import AtomicDataDict, from_ase  # noqa: E402
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform  # noqa: E402
from nequip.model import NequIPGNNModel  # noqa: E402
from nequip.utils.global_state import set_global_state  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import parse_args, read_frames, report  # noqa: E402

TYPES = ["H", "C", "N", "O"]


def main() -> None:
    args = parse_args()
    set_global_state()
    torch.set_num_threads(args.threads)
    frames = read_frames(args.data, args.batch)
    model = NequIPGNNModel(seed=0, model_dtype="float32", type_names=TYPES, r_max=args.cutoff,
                           num_layers=args.layers, l_max=args.l_max, parity=False, num_features=args.channels,
                           radial_mlp_width=64, num_bessels=8, avg_num_neighbors=10.0,
                           per_type_energy_scales=1.0, per_type_energy_shifts=0.0)
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES)
    neighbours = NeighborListTransform(r_max=args.cutoff)
    batch = AtomicDataDict.batched_from_list([neighbours(mapper(from_ase(a))) for a in frames])
    energy_ref = batch[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).float()
    forces_ref = batch[AtomicDataDict.FORCE_KEY].float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(dict(batch))
        loss = ((out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - energy_ref) ** 2).mean() + \
            ((out[AtomicDataDict.FORCE_KEY] - forces_ref) ** 2).mean()
        loss.backward()
        optimizer.step()

    def inference_step():
        model(dict(batch))

    report("nequip", model, int(batch[AtomicDataDict.POSITIONS_KEY].shape[0]),
           int(batch[AtomicDataDict.EDGE_INDEX_KEY].shape[1]), train_step, inference_step, None, args.repeats)


if __name__ == "__main__":
    main()
