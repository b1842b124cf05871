"""The overlap check by neighbour list (vesin) agrees with the brute-force distance over all pairs and images."""
import itertools

import numpy as np
import pytest

from mlfound.data import DataError, Record, validate_record
from mlfound.data.record import closest_pair


def brute_force_closest(rec: Record, within_a: float):
    """(i, j, d) with i <= j of the closest pair nearer than ``within_a`` over all pairs and periodic images."""
    periodic = rec.pbc if rec.pbc is not None else np.zeros(3, bool)
    reach = [range(-3, 4) if p else range(1) for p in periodic]
    best = None
    for shift in itertools.product(*reach):
        offset_a = np.asarray(shift, float) @ rec.cell_a if any(shift) else np.zeros(3)
        d = np.linalg.norm(rec.pos_a[None, :, :] + offset_a - rec.pos_a[:, None, :], axis=-1)
        if not any(shift):
            d[np.diag_indices(len(d))] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < within_a and (best is None or d[i, j] < best[2]):
            best = (int(min(i, j)), int(max(i, j)), float(d[i, j]))
    return best


def random_record(rng, num_atoms, box_a, cell_a=None, pbc=None):
    return Record(z=rng.integers(1, 9, num_atoms), pos_a=rng.uniform(0, box_a, (num_atoms, 3)), energy_ev=-1.0,
                  cell_a=cell_a, pbc=pbc, source="random.extxyz", index=0)


@pytest.mark.parametrize("seed", range(6))
def test_molecules_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    rec = random_record(rng, int(rng.integers(2, 40)), box_a=4.0)
    for within_a in (0.3, 0.8, 1.5):
        expected = brute_force_closest(rec, within_a)
        got = closest_pair(rec, within_a)
        assert (got is None) == (expected is None)
        if got is not None:
            assert got[:2] == expected[:2] and got[2] == pytest.approx(expected[2], abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_periodic_cells_agree_with_brute_force(seed):
    """Triclinic cells, some periodic in only some directions, atoms near faces: image pairs count."""
    rng = np.random.default_rng(100 + seed)
    cell_a = np.diag(rng.uniform(3.0, 5.0, 3)) + np.triu(rng.uniform(-0.8, 0.8, (3, 3)), 1)
    pbc = np.array([True, True, True]) if seed % 2 == 0 else rng.integers(0, 2, 3).astype(bool) | [True, False, False]
    rec = random_record(rng, int(rng.integers(1, 12)), box_a=1.0, cell_a=cell_a, pbc=pbc)
    rec.pos_a = rng.uniform(0, 1, (rec.num_atoms, 3)) @ cell_a
    for within_a in (0.5, 1.2, 2.0):
        expected = brute_force_closest(rec, within_a)
        got = closest_pair(rec, within_a)
        assert (got is None) == (expected is None), (within_a, got, expected)
        if got is not None:
            assert got[2] == pytest.approx(expected[2], abs=1e-12)
            assert got[:2] == expected[:2]


def test_an_atom_near_its_own_image_is_an_overlap():
    cell_a = np.diag([0.3, 5.0, 5.0])
    rec = Record(z=np.array([1]), pos_a=np.zeros((1, 3)), energy_ev=-1.0, cell_a=cell_a,
                 pbc=np.array([True, False, False]), source="thin.extxyz", index=3)
    with pytest.raises(DataError, match=r"thin.extxyz record 3: atoms 0 and 0 are 0.300 Å apart \(< 0.5 Å\)"):
        validate_record(rec, 0.5)


@pytest.mark.parametrize("cell_a, message", [
    (np.array([[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]]), r"has volume 0.00 Å³: its lattice vectors are linearly"),
    (np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 0]]), r"has volume 0.00 Å³"),
    (None, r"periodic \(pbc \[True, True, False\]\) but has no cell"),
])
def test_a_periodic_record_needs_a_cell_with_a_volume(cell_a, message):
    rec = Record(z=np.array([1, 1]), pos_a=np.array([[0.0, 0, 0], [0.8, 0, 0]]), energy_ev=-1.0, cell_a=cell_a,
                 pbc=np.array([True, True, False]), source="flat.extxyz", index=2)
    with pytest.raises(DataError, match="flat.extxyz record 2: .*" + message):
        validate_record(rec)


@pytest.mark.parametrize("pbc", [[True, False, False], [False, True, True]])
def test_pairs_across_a_face_count_only_where_periodic(pbc):
    cell_a = np.array([[4.0, 0.0, 0.0], [0.5, 4.0, 0.0], [0.3, -0.4, 4.0]])
    fractional = np.array([[0.01, 0.5, 0.5], [0.97, 0.5, 0.5], [0.5, 0.5, 0.5]])
    rec = Record(z=np.array([6, 8, 1]), pos_a=fractional @ cell_a, energy_ev=-1.0, cell_a=cell_a,
                 pbc=np.array(pbc), source="face.extxyz", index=0)
    expected = brute_force_closest(rec, 0.5)
    assert closest_pair(rec, 0.5) == pytest.approx(expected)
    assert (expected is not None) == pbc[0], "0.16 Å apart through the face, 3.84 Å inside the cell"
