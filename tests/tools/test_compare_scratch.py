"""tools/compare_scratch.py keeps its split and results only for the inputs that made them: another target, split
size or recipe under the same --out is one line, never a table that mixes them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlfound.data.files import FolderLock, sha256_file
from mlfound.finetune import FinetuneConfig
from mlfound.release import resolve

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compare_scratch.py"
pytestmark = pytest.mark.faults


def compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--target", str(ROOT / "data/demo/hf_631g.extxyz"), "--head",
                           "hf_631g", "--out", str(out), "--sizes", "10", "--subsets", "0", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def write_result(out: Path, unit: tuple, recipe: dict, **config_changes) -> None:
    """A unit's result as the tool writes it, made from ``recipe`` under FinetuneConfig's defaults (changed by
    ``config_changes``: a result from before a default changed)."""
    fields = {**{k: v for k, v in recipe.items() if k != "model"}, **config_changes}
    made = {"recipe": recipe, "finetune_config": FinetuneConfig(head="hf_631g", **fields).model_dump(exclude={"seed"}),
            "model_sha256": sha256_file(resolve("default"))}
    errors = {"forces_mae_mev_a": 100.0, "energy_mae_mev_atom": 2.0}
    framework, name, n, subset = unit
    path = out / "results" / f"{framework}_{name}_n{n}_sub{subset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unit": list(unit), "inputs": made, "val": errors, "test": errors}))


def test_a_split_or_result_from_other_inputs_is_refused_and_a_matching_one_reused(tmp_path):
    assert compare(tmp_path).returncode == 0  # no units: the split alone
    other_split = compare(tmp_path, "--test", "40")
    assert other_split.returncode == 2 and "split/inputs.json was made from other inputs (differing: test)" in \
        other_split.stderr
    write_result(tmp_path, ("mlfound", "a", 10, 0), {"lr": 0.02})
    reused = compare(tmp_path, "--recipes", 'a={"lr": 0.02}')
    assert reused.returncode == 0 and "1 of 1 units on disk; running 0" in reused.stdout
    changed = compare(tmp_path, "--recipes", 'a={"lr": 0.01}')
    assert changed.returncode == 2 and "(differing: finetune_config, recipe)" in changed.stderr
    assert compare(tmp_path, "--recipes", "a={lr}").stderr.startswith("error: --recipes a: not JSON")


def test_a_result_made_under_other_finetune_defaults_is_refused_and_the_release_is_fine_tuned_as_is(tmp_path):
    """A recipe names changes over FinetuneConfig's defaults, so a result made before a default changed would
    otherwise be reused under the same name (a MACE recipe edited in configs/peers/mace_recipes.yaml likewise);
    --finetune recipes start from the release and cannot change its architecture; an unknown MACE recipe fails
    before any unit runs."""
    write_result(tmp_path, ("release", "default", 10, 0), {}, energy_weight=1.0)
    stale = compare(tmp_path, "--finetune", "default={}")
    assert stale.returncode == 2 and "release_default_n10_sub0.json was made from other inputs (differing: " \
        "finetune_config)" in stale.stderr
    write_result(tmp_path, ("release", "default", 10, 0), {})
    reused = compare(tmp_path, "--finetune", "default={}")
    assert reused.returncode == 0 and "1 of 1 units on disk; running 0" in reused.stdout, reused.stderr
    assert any(line.split()[:2] == ["release", "default"] for line in reused.stdout.splitlines())
    result = tmp_path / "results" / "release_default_n10_sub0.json"  # made before FinetuneConfig had `committee`
    older = json.loads(result.read_text())
    del older["inputs"]["finetune_config"]["committee"]
    result.write_text(json.dumps(older))
    assert "1 of 1 units on disk; running 0" in compare(tmp_path, "--finetune", "default={}").stdout
    mace = tmp_path / "results" / "mace_plain_n10_sub0.json"
    errors = {"forces_mae_mev_a": 100.0, "energy_mae_mev_atom": 2.0}
    made = {"mace_recipe": "plain", "mace_recipe_fields": {"updates": 1000}}  # "plain" as it was once defined
    mace.write_text(json.dumps({"unit": ["mace", "plain", 10, 0], "inputs": made, "val": errors, "test": errors}))
    edited = compare(tmp_path, "--mace", "plain")
    assert edited.returncode == 2 and "(differing: mace_recipe_fields)" in edited.stderr
    unknown = compare(tmp_path, "--finetune", "default={}", "--mace", "plian")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: --mace plian: not a recipe of "
                                                                 "configs/peers/mace_recipes.yaml")
    changed = compare(tmp_path, "--finetune", 'plm3={"model": {"product_l_max": 3}}')
    assert changed.returncode == 2 and changed.stderr.startswith("error: --finetune plm3: a fine-tuned release "
                                                                 "keeps its architecture")


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
    write_result(tmp_path, ("mlfound", "plm3", 10, 0), {"model": {"product_l_max": 3}})
    valid = compare(tmp_path, "--recipes", 'plm3={"model": {"product_l_max": 3}}')
    assert valid.returncode == 0 and "1 of 1 units on disk; running 0" in valid.stdout, valid.stderr


def test_a_recipe_without_a_name_or_a_name_given_twice_is_refused_before_any_unit(tmp_path):
    """An empty shell variable gives --recipes "" (a unit with no name); a name given twice would keep only the
    last recipe. Each is one line naming the option, and nothing runs."""
    for args, message in ((["--recipes", ""], "error: --recipes '': a recipe needs a name"),
                          (["--recipes", '={"lr": 0.01}'], "error: --recipes '={\"lr\": 0.01}': a recipe needs a name"),
                          (["--finetune", "a/b"], "error: --finetune 'a/b': a recipe needs a name"),
                          (["--recipes", "a", 'a={"lr": 0.01}'], "error: --recipes a: given twice"),
                          (["--mace", "plain", "plain"], "error: --mace plain: given twice")):
        run = compare(tmp_path, *args)
        assert run.returncode == 2 and run.stderr.startswith(message), (args, run.stderr)
    assert not (tmp_path / "results").exists() and not (tmp_path / "split").exists()
