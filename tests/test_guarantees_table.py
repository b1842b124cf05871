"""docs/guarantees.md cannot rot: every row names at least one test, and every test it names exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows() -> list[str]:
    lines = (ROOT / "docs" / "guarantees.md").read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith(("| input |", "| promise |", "|---"))]


def resolve(reference: str, previous: Path | None) -> tuple[Path, str | None]:
    """`tests/a/test_b.py::name`, `test_b.py::name` (found under tests/), `::name` (the previous file), or a file."""
    path, _, name = re.sub(r"\[.*\]$", "", reference).partition("::")  # a parameter id names its test
    name = name or None
    if not path:
        return previous, name
    candidates = [ROOT / path] if path.startswith("tests/") else sorted((ROOT / "tests").rglob(Path(path).name))
    assert len(candidates) == 1 and candidates[0].exists(), f"{reference}: no single file {path}"
    return candidates[0], name


def test_every_row_names_tests_that_exist():
    rows = table_rows()
    assert len(rows) > 40
    for row in rows:
        references = [r for r in re.findall(r"`([^`]+)`", row.split(" | ")[-1]) if "test" in r]
        assert references, f"a row without a test: {row}"
        previous = None
        for reference in references:
            path, name = resolve(reference, previous)
            if name is not None:
                assert re.search(rf"^def {name}\(", path.read_text(), re.M), f"{reference}: no test {name} in {path}"
            previous = path
