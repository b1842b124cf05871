"""mlfound worker for tools/bench_peers.py: one training step and one inference step timed, or (with
--fit-train) common.fit_and_test's training from scratch and test errors.

Run by bench_peers.py inside mlfound's venv; prints one JSON line. Training step = energy, forces by
autograd (create_graph), energy + force MSE, backward, Adam step; inference = energy and forces.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import calculator_ms, fit_and_test, parse_args, read_frames, report  # noqa: E402

from mlfound.data.batching import collate  # noqa: E402
from mlfound.data.record import Record  # noqa: E402
from mlfound.model import ModelConfig, Potential  # noqa: E402


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = ModelConfig(channels=args.channels, l_max=args.l_max, num_layers=args.layers, cutoff_a=args.cutoff,
                         num_basis=8, radial_hidden=64, head_hidden=args.channels, correlation=args.correlation,
                         product_l_max=args.product_l_max,
                         avg_num_neighbors=10.0)
    model = Potential(config, [1, 6, 7, 8], ["target"], {"target": {1: 0.0, 6: 0.0, 7: 0.0, 8: 0.0}}, {"target": 1.0})

    def make_inputs(frames):
        records = [Record(z=a.numbers.astype(np.int64), pos_a=a.positions, energy_ev=float(a.get_potential_energy()),
                          forces_ev_a=a.get_forces(), task="target") for a in frames]
        return collate(records, args.cutoff, ["target"])

    model.compiled_forces = args.compile

    def forward(batch, training: bool):
        # the compiled graph computes forces as explicit operations: inference needs no autograd
        with torch.set_grad_enabled(training or not args.compile):
            return model(batch, compute_forces=True, training=training)

    if args.fit_train:
        return fit_and_test("mlfound", model, make_inputs, forward, args)
    frames = read_frames(args.data, args.batch)
    batch = make_inputs(frames)
    report("mlfound-compiled" if args.compile else "mlfound", model, forward, batch, frames, int(len(batch.z)), int(batch.edge_index.shape[1]),
           calculator_ms(frames[0], mlfound_calculator(model), args.repeats), args.repeats)


def mlfound_calculator(model: Potential):
    import tempfile

    from mlfound.calculator import MLFoundCalculator
    from mlfound.release import load, release_metadata, save_release

    with tempfile.TemporaryDirectory() as tmp:
        release = load(save_release(model, release_metadata(model, {}), os.path.join(tmp, "m.safetensors")))
    return MLFoundCalculator(release, head="target", dtype="float32")


if __name__ == "__main__":
    main()
