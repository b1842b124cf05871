"""Model cards and the default release: a card made from an experiment's results carries its numbers,
is attached by `mlfound export --card`, printed by `mlfound show` and covered by the content hashes;
`default` resolves to the one registry entry marked default."""
import hashlib
import json
import re

import pytest

from mlfound import release as release_module
from mlfound.cli import main as mlfound
from mlfound.model_card import CARD_KEY, ModelCard, card_from_results
from mlfound.release import ReleaseError, load, register, release_metadata, save_release
from tests.model.test_potential import make_potential


def _errors(forces_mev_a: float, energy_mev_atom: float) -> dict:
    return {"num_records": 50, "energy_mae_mev_atom": energy_mev_atom, "forces_mae_mev_a": forces_mev_a}


def _unit(method: str, seed: int, n: int, subset: int, forces: float, energy: float = 2.0) -> dict:
    unit = {"method": method, "seed": seed, "n": n, "subset": subset, "test": _errors(forces, energy)}
    if method != "mace":
        unit["references_only"] = _errors(1200.0 + subset, 35.0)
    return unit


@pytest.fixture
def report(demo_dir, tmp_path):
    """A results.json as tools/paper_experiment.py writes it: two subsets, two seeds, MACE at seed 0 only."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "SHA256SUMS").write_text("abc  gfn2_xtb.extxyz\n")
    units = [_unit("reptile_k5", 0, 10, 0, 130.0), _unit("reptile_k5", 0, 10, 1, 150.0, 3.0),
             _unit("reptile_k5", 1, 10, 0, 999.0), _unit("none", 0, 10, 0, 200.0), _unit("none", 0, 10, 1, 220.0),
             _unit("reptile_k5", 0, 0, 0, 400.0), _unit("mace", 0, 10, 0, 190.0), _unit("mace", 1, 10, 0, 1.0)]
    # the corpus relative to the root, as the tool writes paths inside the repository
    experiment = {"pretrain": {"corpus": "corpus", "config": str(tmp_path / "configs" / "demo.yaml"),
                               "overrides": ["model.correlation=3"], "grad_steps": 12000},
                  "target": {"file": str(demo_dir / "hf_631g.extxyz"), "head": "hf_631g", "test": 50, "val": 25},
                  "finetune": {"sizes": [10], "max_steps": 3000, "recipes": {"cosine": {"lr": 0.01}}}}
    return {"experiment": experiment, "units": units}


def test_a_card_holds_the_mean_over_subsets_of_its_own_seed(report, tmp_path):
    card = card_from_results(report, "reptile_k5", 0, "python tools/paper_experiment.py X", tmp_path)
    points = {p.start: p for p in card.learning_curve.points}
    assert points["this model"].forces_mae_mev_a == 140.0 and points["this model"].runs == 2  # not seed 1's 999
    assert points["this model"].energy_mae_mev_atom == 2.5
    assert points["mlfound from scratch"].forces_mae_mev_a == 210.0
    assert points["MACE from scratch"].forces_mae_mev_a == 190.0 and points["MACE from scratch"].runs == 1
    assert points["references only"].forces_mae_mev_a == 1200.5
    assert all(p.num_train == 10 for p in points.values())  # zero-shot (N = 0) is not a learning-curve point
    assert card.learning_curve.lot == "HF/6-31G" and card.corpus == "corpus"
    assert card.corpus_sha256 == hashlib.sha256(b"abc  gfn2_xtb.extxyz\n").hexdigest()
    assert "12000 gradient steps" in card.pretraining and "model.correlation=3" in card.pretraining
    assert "MACE through its own CLI" in card.learning_curve.protocol


def _release(tmp_path, name="m.safetensors"):
    model = make_potential(seed=1)
    return save_release(model, release_metadata(model, {}), tmp_path / name)


def test_export_attaches_a_card_that_show_prints_and_the_hashes_cover(report, tmp_path, capsys):
    card_path = tmp_path / "card.json"
    card = card_from_results(report, "reptile_k5", 0, "python tools/paper_experiment.py X", tmp_path)
    card_path.write_text(json.dumps({**card.model_dump(mode="json"), "notes": ["one molecule only"]}))
    out = tmp_path / "with_card.safetensors"
    assert mlfound(["export", str(_release(tmp_path)), "--card", str(card_path), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "model card: reptile_k5 pretrained on corpus" in shown and "note: one molecule only" in shown
    assert re.search(r"this model +10 +2 +2\.5 +140\n", shown)
    assert load(out).metadata[CARD_KEY]["learning_curve"]["points"][0]["forces_mae_mev_a"] == 140.0

    edited = tmp_path / "edited.safetensors"
    header_text = b'forces_mae_mev_a\\": 140.0'  # the card's JSON, escaped inside the safetensors header
    assert out.read_bytes().count(header_text) == 1
    edited.write_bytes(out.read_bytes().replace(header_text, header_text.replace(b"140", b"100")))
    with pytest.raises(ReleaseError, match="metadata 'model_card'"):
        load(edited)


def test_a_bad_card_is_named_and_nothing_is_written(report, tmp_path, capsys):
    card_path = tmp_path / "card.json"
    card = card_from_results(report, "reptile_k5", 0, "x", tmp_path).model_dump(mode="json")
    card_path.write_text(json.dumps({**card, "accuracy": "great"}))
    out = tmp_path / "out.safetensors"
    assert mlfound(["export", str(_release(tmp_path)), "--card", str(card_path), "--out", str(out)]) == 2
    assert f"model card {card_path}: accuracy" in capsys.readouterr().err and not out.exists()


def test_default_names_the_one_release_marked_default(tmp_path, monkeypatch):
    monkeypatch.setattr(release_module, "REGISTRY_DIR", tmp_path)
    first, second = _release(tmp_path, "a.safetensors"), _release(tmp_path, "b.safetensors")
    register("a", first)
    with pytest.raises(ReleaseError, match="no release .* is marked default.*--default"):
        load("default")
    register("a", first, default=True)
    assert load("default").path == first
    register("b", second, default=True)  # the mark moves: one default at a time
    registry = json.loads((tmp_path / "registry.json").read_text())
    assert load("default").path == second and "default" not in registry["a"]
    register("b", second, description="re-registered")  # keeps the mark
    assert load("default").path == second
    register("b", second)  # a re-export without --description keeps the description
    assert json.loads((tmp_path / "registry.json").read_text())["b"]["description"] == "re-registered"
    with pytest.raises(ReleaseError, match="reserved"):
        register("default", first)


def test_the_shipped_default_release_carries_a_card_of_a_committed_corpus(demo_dir):
    """models/registry.json marks one default; its card names the E2 corpus it was trained on by a committed
    manifest (the first generation's, data/e2/SHA256SUMS.first-generation: the committed corpus.tar.xz is a second
    generation whose PySCF files differ in their bytes, data/e2/README.md) and holds the learning curve next to
    scratch and MACE at N = 10 and 50."""
    release = load("default")
    card = ModelCard.model_validate(release.metadata[CARD_KEY])
    manifests = {hashlib.sha256(path.read_bytes()).hexdigest(): path.name
                 for path in (demo_dir.parent / "e2").glob("SHA256SUMS*")}
    assert manifests.get(card.corpus_sha256) == "SHA256SUMS.first-generation"
    starts = {(p.start, p.num_train) for p in card.learning_curve.points}
    assert {(s, n) for s in ("this model", "mlfound from scratch", "MACE from scratch") for n in (10, 50)} <= starts
    assert release.model.config.correlation == 3 and release.heads[0] == "gfn2_xtb"


def test_finetuning_starts_from_the_default_release_unless_told_otherwise(demo_dir, tmp_path):
    from tests.test_finetune import run_finetune

    out = tmp_path / "ft.safetensors"
    done = run_finetune("--head", "hf_631g", "--train", str(demo_dir / "hf_631g.extxyz"), "--num-train", "5",
                        "--max-steps", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    default = load("default")
    assert load(out).metadata["heads"]["gfn2_xtb"]["data"] == default.metadata["heads"]["gfn2_xtb"]["data"]
