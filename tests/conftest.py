import os
from pathlib import Path

import pytest

# One thread, as every launcher and subprocess of the suite uses: bit-for-bit comparisons within a process
# (zero-step fine-tuning, round trips) need a fixed reduction order, and OpenMP/BLAS may change their thread
# count under load (seen: forces 1 ulp apart in CI while a benchmark ran).
os.environ.setdefault("OMP_NUM_THREADS", "1")

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def tiny_release_path(tmp_path_factory) -> Path:
    """A release of the small untrained test potential (heads gfn2_xtb and hf_sto3g)."""
    from mlfound.release import release_metadata, save_release
    from tests.model.test_potential import make_potential

    model = make_potential(seed=1)
    lots = {"gfn2_xtb": {"lot": {"lot_method": "GFN2-xTB"}}, "hf_sto3g": {"lot": {"lot_method": "HF"}}}
    return save_release(model, release_metadata(model, lots), tmp_path_factory.mktemp("release") / "tiny.safetensors")


@pytest.fixture(scope="session")
def paracetamol(demo_dir):
    """The demo fine-tuning target: paracetamol at HF/6-31G, a LoT no pretraining task uses."""
    from mlfound.data.sets import load_records

    return load_records(demo_dir / "hf_631g.extxyz", "hf_631g")
