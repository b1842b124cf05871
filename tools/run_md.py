"""Molecular dynamics with a released model through ASE: NVE (velocity Verlet) or NVT (Langevin).

    python tools/run_md.py runs/demo/finetuned.safetensors --head hf_631g \\
        --structure runs/demo/split/test.extxyz --steps 2000 --timestep-fs 0.5 --temperature-k 300

Prints energies every --print-every steps and, for NVE, the total-energy drift; writes the frames to
--out (extxyz) if given.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mlfound.errors import run_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="release file or registry name")
    p.add_argument("--head", required=True)
    p.add_argument("--structure", type=Path, required=True, help="any file ASE reads; --index picks the frame")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--temperature-k", type=float, default=300.0, help="initial velocities (and Langevin target)")
    p.add_argument("--thermostat", choices=["none", "langevin"], default="none", help="none: NVE")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--print-every", type=int, default=100)
    p.add_argument("--out", type=Path, help="trajectory (extxyz), one frame per --print-every steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from ase import units
    from ase.io import read, write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    from mlfound.calculator import MLFoundCalculator, thermalize
    from mlfound.data.files import atomic_write, refuse_overwriting_inputs
    from mlfound.release import resolve

    model_path = resolve(args.model)
    refuse_overwriting_inputs({"--out": args.out}, {"MODEL": model_path, "--structure": args.structure})
    calc = MLFoundCalculator(model_path, head=args.head, dtype=args.dtype)
    atoms = read(args.structure, index=args.index)
    atoms.calc = calc
    rng = np.random.default_rng(args.seed)
    thermalize(atoms, temperature_K=args.temperature_k, rng=rng)
    Stationary(atoms)
    timestep = args.timestep_fs * units.fs
    if args.thermostat == "langevin":
        dynamics = Langevin(atoms, timestep, temperature_K=args.temperature_k, friction=0.01 / units.fs, rng=rng)
    else:
        dynamics = VelocityVerlet(atoms, timestep)
    frames, totals = [], []

    def report():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        totals.append(epot + ekin)
        frames.append(atoms.copy())
        print(f"{dynamics.nsteps * args.timestep_fs / 1000:8.3f} ps  Epot {epot:14.4f} eV  Ekin {ekin:8.4f} eV  "
              f"Etot {epot + ekin:14.4f} eV  T {atoms.get_temperature():6.0f} K", flush=True)

    dynamics.attach(report, interval=args.print_every)
    start = time.perf_counter()
    dynamics.run(args.steps)
    ms_per_step = 1e3 * (time.perf_counter() - start) / max(args.steps, 1)
    print(f"{args.steps} steps of {args.timestep_fs} fs, {len(atoms)} atoms: {ms_per_step:.2f} ms/step")
    if args.thermostat == "none":
        drift = 1e3 * (totals[-1] - totals[0]) / len(atoms)
        print(f"NVE total-energy drift {drift:+.4f} meV/atom over {args.steps * args.timestep_fs / 1000:.3f} ps")
    if args.out:
        atomic_write(args.out, lambda f: write(f, frames, format="extxyz"), text=True)
        print(f"wrote {args.out} ({len(frames)} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
