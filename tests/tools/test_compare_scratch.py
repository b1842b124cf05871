"""tools/compare_scratch.py keeps its split and results only for the inputs that made them: another target, split
size or recipe under the same --out is one line, never a table that mixes them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlfound.data.files import FolderLock, sha256_file
from mlfound.release import resolve

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compare_scratch.py"
pytestmark = pytest.mark.faults


def compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--target", str(ROOT / "data/demo/hf_631g.extxyz"), "--head",
                           "hf_631g", "--out", str(out), "--sizes", "10", "--subsets", "0", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_split_or_result_from_other_inputs_is_refused_and_a_matching_one_reused(tmp_path):
    assert compare(tmp_path).returncode == 0  # no units: the split alone
    other_split = compare(tmp_path, "--test", "40")
    assert other_split.returncode == 2 and "split/inputs.json was made from other inputs (differing: test)" in \
        other_split.stderr
    result = tmp_path / "results" / "mlfound_a_n10_sub0.json"
    result.parent.mkdir()
    made = {"recipe": {"lr": 0.02}, "model_sha256": sha256_file(resolve("default"))}
    errors = {"forces_mae_mev_a": 100.0, "energy_mae_mev_atom": 2.0}
    result.write_text(json.dumps({"unit": ["mlfound", "a", 10, 0], "inputs": made, "val": errors, "test": errors}))
    reused = compare(tmp_path, "--recipes", 'a={"lr": 0.02}')
    assert reused.returncode == 0 and "1 of 1 units on disk; running 0" in reused.stdout
    changed = compare(tmp_path, "--recipes", 'a={"lr": 0.01}')
    assert changed.returncode == 2 and "(differing: recipe)" in changed.stderr
    assert compare(tmp_path, "--recipes", "a={lr}").stderr.startswith("error: --recipes a: not JSON")


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path, "a comparison already running"):
        second = compare(tmp_path)
    assert second.returncode == 2 and "a comparison already running" in second.stderr


def test_model_changes_are_checked_against_the_release_architecture_not_model_config_defaults(tmp_path):
    """The default release has a product basis (correlation 3) that ModelConfig's defaults lack: product_l_max over
    it is valid; below its l_max, or a field that does not exist, is one line naming the recipe."""
    below = compare(tmp_path, "--sizes", "10", "--recipes", 'low={"model": {"product_l_max": 0}}')
    assert below.returncode == 2 and below.stderr.startswith("error: --recipes low: over --model default:")
    assert "product_l_max 0 is below l_max 1" in below.stderr
    typo = compare(tmp_path, "--recipes", 'typo={"model": {"chanels": 32}}')
    assert typo.returncode == 2 and typo.stderr.startswith("error: --recipes typo: model has no field ['chanels']")
    result = tmp_path / "results" / "mlfound_plm3_n10_sub0.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    made = {"recipe": {"model": {"product_l_max": 3}}, "model_sha256": sha256_file(resolve("default"))}
    errors = {"forces_mae_mev_a": 100.0, "energy_mae_mev_atom": 2.0}
    result.write_text(json.dumps({"unit": ["mlfound", "plm3", 10, 0], "inputs": made, "val": errors, "test": errors}))
    valid = compare(tmp_path, "--recipes", 'plm3={"model": {"product_l_max": 3}}')
    assert valid.returncode == 0 and "1 of 1 units on disk; running 0" in valid.stdout, valid.stderr
