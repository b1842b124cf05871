"""NequIP worker for tools/bench_peers.py (timing, or accuracy with --fit-train), run inside
.venv-nequip (nequip 0.19.1, e3nn 0.6).

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
from common import fit_and_test, parse_args, read_frames, report  # noqa: E402

TYPES = ["H", "C", "N", "O"]


def main() -> None:
    args = parse_args()
    set_global_state()
    torch.set_num_threads(args.threads)
    model = NequIPGNNModel(seed=args.seed, model_dtype="float32", type_names=TYPES, r_max=args.cutoff,
                           num_layers=args.layers, l_max=args.l_max, parity=False, num_features=args.channels,
                           radial_mlp_width=64, num_bessels=8, avg_num_neighbors=10.0,
                           per_type_energy_scales=1.0, per_type_energy_shifts=0.0)
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES)
    neighbours = NeighborListTransform(r_max=args.cutoff)

    def make_inputs(frames):
        return AtomicDataDict.batched_from_list([neighbours(mapper(from_ase(a))) for a in frames])

    def forward(batch, training: bool):
        out = model(dict(batch))
        return out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1), out[AtomicDataDict.FORCE_KEY]

    if args.fit_train:
        return fit_and_test("nequip", model, make_inputs, forward, args)
    frames = read_frames(args.data, args.batch)
    batch = make_inputs(frames)
    report("nequip", model, forward, batch, frames, int(batch[AtomicDataDict.POSITIONS_KEY].shape[0]),
           int(batch[AtomicDataDict.EDGE_INDEX_KEY].shape[1]), None, args.repeats)


if __name__ == "__main__":
    main()
