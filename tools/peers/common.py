"""Shared by the timing workers, which run in different venvs (mlfound, MACE, NequIP): argument
parsing, the molecules, and the timer. Imports only numpy, ASE and the standard library."""
import argparse
import json
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="extxyz with energies and forces")
    p.add_argument("--batch", type=int, default=8, help="structures per batch")
    p.add_argument("--l-max", type=int, default=1)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def read_frames(path: str, num: int):
    from ase.io import read

    frames = read(path, index=f":{num}")
    if len(frames) < num:
        raise SystemExit(f"{path} has {len(frames)} frames, fewer than --batch {num}")
    return frames


def median_ms(step, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``step`` in ms after warm-up: robust to the noise of a shared machine."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def report(framework: str, model, atoms: int, edges: int, train_step, inference_step, calculator_ms, repeats: int):
    """Time both steps and print the one JSON line bench_peers.py reads."""
    print(json.dumps({"framework": framework, "params": sum(p.numel() for p in model.parameters()),
                      "atoms": atoms, "edges": edges, "train_ms": median_ms(train_step, repeats),
                      "infer_ms": median_ms(inference_step, repeats), "calculator_ms": calculator_ms}))


def calculator_ms(atoms, calc, repeats: int) -> float:
    """ms per ASE force call on one molecule, positions jiggled so every call computes."""
    import numpy as np

    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)

    def step():
        atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
        atoms.get_forces()

    return median_ms(step, repeats)
