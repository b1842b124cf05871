from pathlib import Path

import pytest

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR
