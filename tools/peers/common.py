"""Shared by the peer workers, which run in different venvs (mlfound, MACE, NequIP): argument
parsing, the molecules, the timer, and one training recipe for the accuracy comparison. Imports
numpy, ASE and the standard library at the top; torch (in every venv) only inside functions."""
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
    p.add_argument("--correlation", type=int, default=3, help="body order - 1 of the product basis (MACE, mlfound)")
    p.add_argument("--product-l-max", type=int, help="l of the edge directions and product-basis features (MACE's "
                   "max_ell, mlfound's model.product_l_max; NequIP has none); default: --l-max")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fit-train", help="accuracy mode: train from scratch on this extxyz ...")
    p.add_argument("--fit-test", help="... and print test errors on this one (instead of timing)")
    p.add_argument("--fit-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2, help="accuracy mode: Adam lr, cosine decay to 1%%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="mlfound: forces from its compiled graph "
                   "(mlfound.model.compiled); inference then runs without autograd")
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


def report(framework: str, model, forward, batch, frames, atoms: int, edges: int, calculator_ms, repeats: int):
    """Time one training step (energy + force MSE, backward, Adam) and one inference step of
    ``forward(batch, training)`` on ``frames``' molecules; print the one JSON line bench_peers.py reads."""
    import numpy as np
    import torch

    energy_ref = torch.tensor([a.get_potential_energy() for a in frames], dtype=torch.float32)
    forces_ref = torch.tensor(np.concatenate([a.get_forces() for a in frames]), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        energy, forces = forward(batch, True)
        loss = ((energy.float() - energy_ref) ** 2).mean() + ((forces.float() - forces_ref) ** 2).mean()
        loss.backward()
        optimizer.step()

    print(json.dumps({"framework": framework, "params": sum(p.numel() for p in model.parameters()),
                      "atoms": atoms, "edges": edges, "train_ms": median_ms(train_step, repeats),
                      "infer_ms": median_ms(lambda: forward(batch, False), repeats), "calculator_ms": calculator_ms}))


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


def fit_and_test(framework: str, model, make_inputs, forward, args) -> None:
    """Train ``model`` from scratch and print its test errors as one JSON line, with the same recipe
    for every framework: energies shifted by the training set's mean energy per atom (the demo target
    is one molecule, so per-element references are not identifiable), batches of ``args.batch``
    molecules in shuffled epochs, loss 10 * MSE(energy per atom) + MSE(forces) in eV and eV/Å, Adam
    with a cosine decay from ``args.lr`` to 1% over ``args.fit_steps``, float32, no early stopping.
    ``forward(inputs, training)`` returns the structures' energies and the atoms' forces."""
    import numpy as np
    import torch
    from ase.io import read

    train, test = read(args.fit_train, index=":"), read(args.fit_test, index=":")
    shift_ev_atom = float(np.mean([a.get_potential_energy() / len(a) for a in train]))

    def batches(frames, shuffle_rng=None):
        order = shuffle_rng.permutation(len(frames)) if shuffle_rng is not None else np.arange(len(frames))
        for i in range(0, len(frames), args.batch):
            chunk = [frames[j] for j in order[i:i + args.batch]]
            atoms = torch.tensor([len(a) for a in chunk], dtype=torch.float32)
            energy = torch.tensor([a.get_potential_energy() - shift_ev_atom * len(a) for a in chunk],
                                  dtype=torch.float32)
            forces = torch.tensor(np.concatenate([a.get_forces() for a in chunk]), dtype=torch.float32)
            yield make_inputs(chunk), energy, forces, atoms

    train_batches = list(batches(train))  # inputs (neighbour lists) built once; epochs reshuffle batch order
    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(step / args.fit_steps, 1))))
    step, start = 0, time.perf_counter()
    while step < args.fit_steps:
        for i in rng.permutation(len(train_batches)):
            inputs, energy, forces, atoms = train_batches[i]
            optimizer.zero_grad(set_to_none=True)
            energy_pred, forces_pred = forward(inputs, True)
            loss = 10 * (((energy_pred.float() - energy) / atoms) ** 2).mean() + \
                ((forces_pred.float() - forces) ** 2).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == args.fit_steps:
                break
    seconds = time.perf_counter() - start
    energy_errors, force_errors = [], []
    for inputs, energy, forces, atoms in batches(test):
        energy_pred, forces_pred = forward(inputs, False)
        energy_errors.append(((energy_pred.detach().float() - energy) / atoms).abs())
        force_errors.append((forces_pred.detach().float() - forces).abs().flatten())
    print(json.dumps({"framework": framework, "seed": args.seed, "params": sum(p.numel() for p in model.parameters()),
                      "train_seconds": seconds, "steps": args.fit_steps,
                      "energy_mae_mev_atom": 1e3 * float(torch.cat(energy_errors).mean()),
                      "forces_mae_mev_a": 1e3 * float(torch.cat(force_errors).mean())}))
