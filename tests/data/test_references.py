"""Per-element least-squares references recover known energies; weak fits are flagged."""
import numpy as np
import pytest

from mlfound.data.references import ReferenceFit, reference_energy

TRUE_REFS_EV = {1: -13.6, 6: -1030.2, 7: -1485.9, 8: -2041.7}


def random_compositions(rng, num):
    return [rng.choice(list(TRUE_REFS_EV), size=rng.integers(2, 20)) for _ in range(num)]


def test_recovers_known_per_element_energies():
    rng = np.random.default_rng(0)
    fit = ReferenceFit()
    for z in random_compositions(rng, 500):
        fit.add(z, reference_energy(z, TRUE_REFS_EV) + rng.normal(0, 1e-3))
    refs, notes = fit.solve()
    assert notes == []
    for z, e in TRUE_REFS_EV.items():
        assert refs[z] == pytest.approx(e, abs=1e-3)


def test_exact_without_noise_in_float64():
    rng = np.random.default_rng(1)
    fit = ReferenceFit()
    for z in random_compositions(rng, 200):
        fit.add(z, reference_energy(z, TRUE_REFS_EV))
    refs, _ = fit.solve()
    for z, e in TRUE_REFS_EV.items():
        assert refs[z] == pytest.approx(e, abs=1e-8)


def test_single_composition_is_rank_deficient_but_fits():
    z = np.array([6, 6, 8, 1, 1, 1, 1])
    fit = ReferenceFit()
    for shift in (0.0, 0.1, -0.1):
        fit.add(z, -3000.0 + shift)
    refs, notes = fit.solve()
    assert any("rank-deficient" in n for n in notes)
    assert reference_energy(z, refs) == pytest.approx(-3000.0)


def test_rare_element_is_flagged_and_unknown_element_is_an_error():
    fit = ReferenceFit()
    rng = np.random.default_rng(2)
    for z in random_compositions(rng, 50):
        z = z[z != 7]
        fit.add(z, reference_energy(z, TRUE_REFS_EV))
    fit.add(np.array([7, 1, 1, 1]), reference_energy(np.array([7, 1, 1, 1]), TRUE_REFS_EV))
    refs, notes = fit.solve()
    assert any("Z=7 appears in only 1" in n for n in notes)
    with pytest.raises(KeyError, match=r"no reference energy for elements \[9\]"):
        reference_energy(np.array([9, 1]), refs)


def test_parts_merged_equal_one_pass_and_pickle_compactly():
    """Per-file fits from worker processes, pickled and merged, give the fit of the whole corpus."""
    import pickle

    rng = np.random.default_rng(3)
    compositions = random_compositions(rng, 300)
    energies = [reference_energy(z, TRUE_REFS_EV) + rng.normal(0, 0.1) for z in compositions]
    whole, merged = ReferenceFit(), ReferenceFit()
    for z, e in zip(compositions, energies):
        whole.add(z, e)
    for part in np.array_split(np.arange(300), 4):
        fit = ReferenceFit()
        for i in part:
            fit.add(compositions[i], energies[i])
        data = pickle.dumps(fit)
        assert len(data) < 2000, "only the elements present travel"
        merged.merge(pickle.loads(data))
    assert merged.num_structures == 300
    np.testing.assert_array_equal(merged.ctc, whole.ctc)  # integer counts: exact in any order
    np.testing.assert_array_equal(merged.structures_with, whole.structures_with)
    np.testing.assert_allclose(merged.cte, whole.cte, rtol=1e-13)
    for z, e in whole.solve()[0].items():
        assert merged.solve()[0][z] == pytest.approx(e, rel=1e-10)
