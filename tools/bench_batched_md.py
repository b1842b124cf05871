"""Batched MD benchmark: torch-sim with all systems in one state against the ASE loop, side by side.

    python tools/bench_batched_md.py --systems 1 8 32 --steps 40

Both integrate the same systems with velocity Verlet (NVE, one force evaluation per step) under the same
head, dtype and thread count: ASE one system after another with MLFoundCalculator, torch-sim all at once with
mlfound.batched_md.TorchSimModel. The measure is structures·steps/s after one warm-up step; the two runs
alternate per system count, so a change in the machine's load hits both columns of a row.
"""
import argparse
import itertools
import sys
import time

import torch
import torch_sim as ts
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase.units import fs

from mlfound.batched_md import TorchSimModel
from mlfound.calculator import MLFoundCalculator
from mlfound.errors import run_main
from mlfound.release import load

TIMESTEP_FS = 0.5


def ase_loop(systems, release, head: str, dtype: str, steps: int) -> float:
    """Structures·steps/s of ASE's velocity Verlet, one system after another (how an ASE user runs many)."""
    calc = MLFoundCalculator(release, head=head, dtype=dtype)
    elapsed = 0.0
    for atoms in systems:
        atoms = atoms.copy()
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * fs)
        dyn.run(1)  # warm-up: the first forces
        start = time.perf_counter()
        dyn.run(steps)
        elapsed += time.perf_counter() - start
    return len(systems) * steps / elapsed


def torch_sim_batch(systems, release, head: str, dtype: str, steps: int, device: str) -> float:
    """Structures·steps/s of torch-sim's velocity Verlet with every system in one state."""
    torch_dtype = getattr(torch, dtype)
    model = TorchSimModel(release, head=head, dtype=torch_dtype, device=device, compute_stress=False)
    units = ts.units.UnitSystem.metal
    init, update = ts.nve(model=model, dt=torch.tensor(TIMESTEP_FS * 1e-3 * units.time, dtype=torch_dtype),
                          kT=torch.tensor(300 * units.temperature, dtype=torch_dtype), seed=0)
    state = update(init(ts.io.atoms_to_state(systems, torch.device(device), torch_dtype)))  # warm-up step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        state = update(state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(systems) * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-reptile")
    parser.add_argument("--head", default="gfn1_xtb")
    parser.add_argument("--structures", default="data/demo-periodic/gfn1_xtb.extxyz",
                        help="systems are these frames, repeated as needed")
    parser.add_argument("--systems", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="torch-sim's device (the ASE loop runs where it is told)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    release = load(args.model)
    frames = read(args.structures, ":")
    print(f"{args.model} head {args.head}, {args.dtype}, {args.threads} threads, {args.steps} NVE steps of "
          f"{TIMESTEP_FS} fs after one warm-up; structures from {args.structures}")
    print(f"{'systems':>7} {'atoms':>6} {'ASE loop':>10} {'torch-sim':>10} {'ratio':>6}   (structures·steps/s)")
    for count in args.systems:
        systems = list(itertools.islice(itertools.cycle(frames), count))
        ase_rate = ase_loop(systems, release, args.head, args.dtype, args.steps)
        batch_rate = torch_sim_batch(systems, release, args.head, args.dtype, args.steps, args.device)
        print(f"{count:>7} {sum(len(a) for a in systems):>6} {ase_rate:>10.1f} {batch_rate:>10.1f} "
              f"{batch_rate / ase_rate:>5.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
