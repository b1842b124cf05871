"""Fine-tuning: zero steps change no prediction (existing head, new head), head scores equal a
least-squares refit done by hand, training improves validation and restores the best step,
freezing and replay touch exactly the parameters they should, and the CLI end to end."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlfound.data.record import DataError
from mlfound.config import LoggingConfig
from mlfound.data.sets import subset, write_extxyz
from mlfound.finetune import (
    FinetuneConfig,
    ReplayConfig,
    _lr_factor,
    data_scale_ev,
    finetune,
    head_scores,
    reinitialised,
)
from mlfound.model import Potential
from mlfound.predict import network_energy, predict
from mlfound.release import load, save_release
from mlfound.tracking import TENSORBOARD_DIR, open_tracker
from tests.data.helpers import demo_slice, http_server, move_shards, shard
from tests.data.test_files import small_disk  # noqa: F401  (a fixture)

HEADS = ["gfn2_xtb", "hf_sto3g"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tiny_release_path):
    return load(tiny_release_path)


@pytest.fixture(scope="module")
def splits(paracetamol):
    return subset(paracetamol[:150], 20, seed=0), subset(paracetamol[150:], 10, seed=1)


def predictions(model, records, heads):
    return {h: predict(model, records, h) for h in heads}


def assert_identical(a, b):
    energy_a, forces_a = a
    energy_b, forces_b = b
    assert np.array_equal(energy_a, energy_b)
    assert all(np.array_equal(x, y) for x, y in zip(forces_a, forces_b))


def test_zero_steps_on_an_existing_head_change_nothing(base, splits, tmp_path):
    train, val = splits
    result = finetune(base, train, val, FinetuneConfig(head="hf_sto3g", max_steps=0), progress=False)
    reloaded = load(save_release(result.release.model, result.release.metadata, tmp_path / "ft.safetensors"))
    before = predictions(base.model, val, HEADS)
    for model in (result.release.model, reloaded.model):
        after = predictions(model, val, HEADS)
        for head in HEADS:
            assert_identical(after[head], before[head])


@pytest.mark.parametrize("head", ["hf_sto3g", "hf_631g"])
def test_a_head_scale_from_the_data_changes_no_prediction(base, splits, head):
    """σ becomes the training set's RMS force (by hand here) and the head's last layer absorbs the ratio."""
    train, val = splits
    kept, rescaled = (finetune(base, train, val, FinetuneConfig(head=head, max_steps=0, head_scale=scale),
                               progress=False).release.model for scale in ("source", "data"))
    rms_force_ev_a = np.sqrt(np.mean(np.concatenate([r.forces_ev_a for r in train]) ** 2))
    index = rescaled.task_names.index(head)
    assert float(rescaled.scales_ev[index]) == pytest.approx(rms_force_ev_a, rel=1e-12)
    assert float(kept.scales_ev[index]) != pytest.approx(rms_force_ev_a, rel=1e-3)
    for (energy_a, forces_a), (energy_b, forces_b) in zip(predictions(kept, val, [head]).values(),
                                                          predictions(rescaled, val, [head]).values()):
        np.testing.assert_allclose(energy_a, energy_b, rtol=1e-9)
        np.testing.assert_allclose(np.concatenate(forces_a), np.concatenate(forces_b), rtol=1e-4, atol=1e-6)


def test_data_scale_without_forces_is_the_residual_energy_spread(splits):
    energy_only = [dataclasses.replace(r, forces_ev_a=None) for r in splits[0]]
    assert 0 < data_scale_ev(energy_only) < data_scale_ev(splits[0])
    relaxed = [dataclasses.replace(r, forces_ev_a=np.zeros_like(r.forces_ev_a)) for r in splits[0]]
    assert data_scale_ev(relaxed) == data_scale_ev(energy_only)  # never a zero scale to divide the head by


def test_a_reinitialised_start_is_the_same_architecture_with_fresh_seeded_weights(base):
    fresh, again, other = reinitialised(base, 0), reinitialised(base, 0), reinitialised(base, 1)
    state, base_state = fresh.model.state_dict(), base.model.state_dict()
    assert state.keys() == base_state.keys() and fresh.model.task_names == base.model.task_names
    for key in ("references_ev", "scales_ev"):
        assert torch.equal(state[key], base_state[key])
    weights = [k for k, v in state.items() if v.is_floating_point() and v.numel() and "mask" not in k
               and k not in ("references_ev", "scales_ev")]
    assert not any(torch.equal(state[k], base_state[k]) for k in weights if "embedding" in k or "heads" in k)
    assert all(torch.equal(state[k], again.model.state_dict()[k]) for k in weights)
    assert not all(torch.equal(state[k], other.model.state_dict()[k]) for k in weights)
    assert fresh.metadata["history"] == [{"stage": "reinitialised", "seed": 0}]


def test_zero_steps_on_a_new_head_change_nothing(base, splits, tmp_path):
    """Old heads are untouched; the new head predicts its source head's network part and forces exactly,
    with its own references fitted to the training set."""
    train, val = splits
    result = finetune(base, train, val, FinetuneConfig(head="hf_631g", init="gfn2_xtb", max_steps=0), progress=False)
    reloaded = load(save_release(result.release.model, result.release.metadata, tmp_path / "ft.safetensors"))
    before = predictions(base.model, val, HEADS)
    for model in (result.release.model, reloaded.model):
        after = predictions(model, val, HEADS + ["hf_631g"])
        for head in HEADS:
            assert_identical(after[head], before[head])
        assert all(np.array_equal(a, b) for a, b in zip(after["hf_631g"][1], before["gfn2_xtb"][1]))
        np.testing.assert_allclose(network_energy(model, val, "hf_631g"), network_energy(base.model, val, "gfn2_xtb"),
                                   rtol=0, atol=1e-9)
    assert reloaded.metadata["heads"]["hf_631g"]["initialised_from"] == "gfn2_xtb"
    assert reloaded.metadata["heads"]["hf_631g"]["finetune_data"]["num_train"] == 20
    assert reloaded.heads == HEADS + ["hf_631g"]
    assert reloaded.model.references_ev.dtype == torch.float64


def test_head_scores_equal_a_least_squares_refit_by_hand(base, splits):
    train, _ = splits
    scores = head_scores(base.model, train)
    elements = [1, 6, 7, 8]
    counts = np.array([[np.count_nonzero(r.z == z) for z in elements] for r in train], float)
    atoms = counts.sum(1)
    for head in HEADS:
        target = np.array([r.energy_ev for r in train]) - network_energy(base.model, train, head)
        refs, *_ = np.linalg.lstsq(counts, target, rcond=None)
        expected = 1e3 * np.sqrt((((target - counts @ refs) / atoms) ** 2).mean())
        assert scores[head]["energy_rmse_mev_atom"] == pytest.approx(expected, rel=1e-6)
    auto = finetune(base, train, None, FinetuneConfig(head="hf_631g", max_steps=0), progress=False)
    best = min(HEADS, key=lambda h: scores[h]["energy_rmse_mev_atom"])
    assert auto.release.metadata["heads"]["hf_631g"]["initialised_from"] == best


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.9}, {"amsgrad": True, "weight_decay": 1e-4}])
def test_training_improves_validation_and_keeps_the_best_step(base, splits, options):
    """With EMA, validation scores the averaged weights, and those are the weights the release keeps; MACE's
    optimizer (AMSGrad, weight decay) trains too."""
    train, val = splits
    cfg = FinetuneConfig(head="hf_631g", lr=3e-3, max_steps=60, eval_every=10, patience=None, **options)
    result = finetune(base, train, val, cfg, progress=False)
    losses = {h["step"]: h["loss"] for h in result.history}
    assert min(losses.values()) < losses[0]
    assert losses[result.best_step] == min(losses.values())
    again = finetune(result.release, train, val, FinetuneConfig(head="hf_631g", max_steps=0), progress=False)
    assert again.history[0]["loss"] == pytest.approx(losses[result.best_step], rel=1e-6)


def test_cosine_schedule_decays_from_lr_to_the_final_ratio_at_max_steps():
    cfg = FinetuneConfig(head="x", max_steps=100, lr_final_ratio=0.01)
    factors = [_lr_factor(cfg)(step) for step in range(121)]
    assert factors[0] == 1.0 and factors[50] == pytest.approx(0.505) and factors[100] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(factors[:100], factors[1:101])) and set(factors[100:]) == {factors[100]}
    assert _lr_factor(cfg.model_copy(update={"lr_schedule": "constant"}))(77) == 1.0


def test_warmup_rises_linearly_then_the_cosine_takes_over():
    cfg = FinetuneConfig(head="x", max_steps=100, warmup_steps=10, lr_final_ratio=0.01)
    plain = _lr_factor(cfg.model_copy(update={"warmup_steps": 0}))
    factors = [_lr_factor(cfg)(step) for step in range(101)]
    assert factors[:10] == pytest.approx([(step + 1) / 10 * plain(step) for step in range(10)])
    assert factors[10:] == [plain(step) for step in range(10, 101)]
    constant = cfg.model_copy(update={"lr_schedule": "constant"})
    assert [_lr_factor(constant)(step) for step in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])


def test_ema_result_is_the_moving_average_of_the_trained_weights(base, splits):
    """Reference by hand: the online weights after t = 1..4 steps (constant lr, so a run of t steps is the
    first t steps of a longer one), averaged with ema-pytorch's documented decay 1 - t^(-2/3)."""
    train, _ = splits
    cfg = FinetuneConfig(head="hf_631g", lr=3e-3, lr_schedule="constant", max_steps=4, patience=None)
    online = [dict(finetune(base, train, None, cfg.model_copy(update={"max_steps": t}), progress=False)
                   .release.model.named_parameters()) for t in range(1, 5)]
    expected = {name: value.detach().clone() for name, value in online[0].items()}
    for t, weights in enumerate(online[1:], start=2):
        decay = min(1 - t ** (-2 / 3), 0.95)
        for name in expected:
            expected[name] = decay * expected[name] + (1 - decay) * weights[name].detach()
    averaged = finetune(base, train, None, cfg.model_copy(update={"ema_decay": 0.95}), progress=False)
    got = dict(averaged.release.model.named_parameters())
    trained = [name for name in expected if not torch.equal(online[0][name], online[-1][name])]
    assert trained and not torch.equal(got[trained[0]], online[-1][trained[0]])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


def test_ema_on_a_new_head_of_the_default_trunk_at_product_l_max_3_averages_the_weights(splits):
    """A new head's model is built afresh (add_head), while ema-pytorch's copy of it is a deepcopy, which registers
    e3nn's constants of the product basis's l >= 2 paths as buffers: pairing buffers by position failed on the
    first update (the recipe the from-scratch comparison runs: the shipped trunk at product_l_max 3, a new LoT)."""
    from mlfound.finetune import reinitialised
    from mlfound.release import load

    train, _ = splits
    start = reinitialised(load("default"), seed=0, product_l_max=3)
    cfg = FinetuneConfig(head="hf_631g", lr=3e-3, max_steps=2, ema_decay=0.9, patience=None)
    averaged = finetune(start, train[:5], None, cfg, progress=False).release.model
    online = finetune(start, train[:5], None, cfg.model_copy(update={"ema_decay": None}), progress=False).release.model
    online_weights = dict(online.named_parameters())
    assert any(not torch.equal(p, online_weights[n]) for n, p in averaged.named_parameters())  # steps 1, 2 averaged


def test_frozen_trunk_and_replay_train_exactly_the_chosen_parts(base, splits, demo_dir, tmp_path):
    train, val = splits
    shard(demo_slice(demo_dir, "gfn2_xtb", 20, tmp_path), tmp_path / "shards")
    replay = ReplayConfig(shard_root=tmp_path / "shards", tasks=["gfn2_xtb"], every=2)
    cfg = FinetuneConfig(head="hf_sto3g", freeze="trunk", lr=1e-2, max_steps=4, replay=replay)
    after = dict(finetune(base, train, None, cfg, progress=False).release.model.named_parameters())
    for name, value in base.model.named_parameters():
        changed = not torch.equal(after[name], value)
        trained = name.startswith((Potential.head_prefix("hf_sto3g"), Potential.head_prefix("gfn2_xtb")))
        assert changed == trained, name
    # the replayed shards streamed from a mirror over HTTP train exactly as the local ones
    move_shards(tmp_path / "shards", tmp_path / "mirror")
    with http_server(tmp_path / "mirror") as (url, served):
        remote = replay.model_copy(update={"shard_url_template": url + "/{task}/{name}"})
        streamed = finetune(base, train, None, cfg.model_copy(update={"replay": remote}), progress=False)
    assert served and all(torch.equal(after[n], v) for n, v in streamed.release.model.named_parameters())


def test_elements_the_model_does_not_know_are_an_error(base, splits):
    train, _ = splits
    alien = [dataclasses.replace(train[0], z=np.where(train[0].z == 8, 16, train[0].z))]
    with pytest.raises(DataError, match=r"elements \[16\].*knows only \[1, 6, 7, 8\]"):
        finetune(base, alien, None, FinetuneConfig(head="x"), progress=False)


def run_finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_finetune_command_writes_a_release_keeping_every_head(tiny_release_path, demo_dir, tmp_path, capsys):
    from mlfound.cli import main as mlfound

    out = tmp_path / "ft.safetensors"
    done = run_finetune("--model", str(tiny_release_path), "--head", "hf_631g", "--train",
                        str(demo_dir / "hf_631g.extxyz"), "--num-train", "10", "--max-steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(references only)" in done.stdout and "chosen:" in done.stdout
    assert "fine-tune hf_631g: 3/3 step (100%)" in done.stderr and "\r" not in done.stderr  # a log: plain lines
    assert mlfound(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "HF/6-31G (pyscf)" in shown and "initialised from" in shown and "gfn2_xtb" in shown
    pickle = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    done = run_finetune("--model", str(pickle), "--head", "h", "--train", str(demo_dir / "hf_631g.extxyz"),
                        "--out", str(out))
    assert done.returncode == 2 and "pickled torch file" in done.stderr


def test_finetune_logs_each_evaluation_to_tensorboard(base, splits, tiny_release_path, tmp_path):
    """The library's tracker gets every validation the history holds (read back with TensorBoard's reader); the
    command logs beside --out by default, and a second fine-tune to the same --out hides the first's events."""
    train, val = splits
    cfg = FinetuneConfig(head="hf_631g", max_steps=4, eval_every=2, patience=None)
    tracker = open_tracker(tmp_path / "lib", LoggingConfig(tensorboard=True), {"config": {}}, start_step=0)
    result = finetune(base, train[:10], val, cfg, progress=False, tracker=tracker)
    tracker.close()
    logged = scalars(tmp_path / "lib" / TENSORBOARD_DIR)
    assert logged["val/loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in result.history]
    assert [step for step, _ in logged["val/hf_631g/forces_mae_mev_a"]] == [0, 2, 4]
    assert [step for step, _ in logged["train/loss"]] == [2, 4] and [s for s, _ in logged["train/lr"]] == [0, 2, 4]
    out, files = tmp_path / "ft.safetensors", {name: tmp_path / f"{name}.extxyz" for name in ("train", "val")}
    write_extxyz(train[:10], files["train"]), write_extxyz(val, files["val"])
    for max_steps in ("2", "4"):
        done = run_finetune("--model", str(tiny_release_path), "--head", "hf_631g", "--train", str(files["train"]),
                            "--val", str(files["val"]), "--max-steps", max_steps, "--eval-every", "2",
                            "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    assert [step for step, _ in scalars(tmp_path / "ft.logs" / TENSORBOARD_DIR)["val/loss"]] == [0, 2, 4]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_finetune_from_scratch_starts_from_fresh_weights_of_the_same_architecture(tiny_release_path, demo_dir,
                                                                                  tmp_path):
    out = tmp_path / "scratch.safetensors"
    done = run_finetune("--model", str(tiny_release_path), "--head", "hf_631g", "--train",
                        str(demo_dir / "hf_631g.extxyz"), "--num-train", "10", "--max-steps", "0", "--from-scratch",
                        "--head-scale", "data", "--seed", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    base, scratch = load(tiny_release_path), load(out)
    assert scratch.metadata["history"][0] == {"stage": "reinitialised", "seed": 3}
    assert scratch.model.config == base.model.config
    assert torch.equal(scratch.model.state_dict()["trunk.embedding.weight"],
                       reinitialised(base, 3).model.state_dict()["trunk.embedding.weight"])
    assert not torch.equal(scratch.model.state_dict()["trunk.embedding.weight"],
                           base.model.state_dict()["trunk.embedding.weight"])


def test_data_at_another_lot_cannot_retrain_an_existing_head(base, splits):
    train, _ = splits
    with pytest.raises(DataError, match="the data is at HF/6-31G but head 'gfn2_xtb' is GFN2-xTB; give a new head"):
        finetune(base, train, None, FinetuneConfig(head="gfn2_xtb", lot={"lot_method": "HF", "lot_basis": "6-31G"}),
                 progress=False)


def write_in_hartree(demo_dir: Path, path: Path, unit_key: str | None) -> Path:
    """40 paracetamol frames in Hartree and Hartree/Å, declaring ``unit_key`` or no unit."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write
    from ase.units import Hartree

    frames = read(demo_dir / "hf_631g.extxyz", index=":40")
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() / Hartree,
                                           forces=atoms.get_forces() / Hartree)
        del atoms.info["energy_unit"], atoms.info["forces_unit"]
        if unit_key:
            atoms.info.update(energy_unit=unit_key, forces_unit=f"{unit_key}/Ang")
    write(path, frames, format="extxyz")
    return path


@pytest.mark.faults
def test_energies_in_hartree_are_refused_naming_the_unit(tiny_release_path, demo_dir, tmp_path):
    """A Hartree file used to train without a word (validation MAE 671,148 meV/atom) and write a release."""
    out = tmp_path / "ft.safetensors"
    args = ["--model", str(tiny_release_path), "--head", "hf_631g", "--max-steps", "0", "--out", str(out)]
    undeclared = write_in_hartree(demo_dir, tmp_path / "undeclared.extxyz", None)
    done = run_finetune(*args, "--train", str(undeclared))
    assert done.returncode == 2 and "likely in hartree (give --energy-unit hartree)" in done.stderr, done.stderr[-2000:]
    assert "training data" in done.stderr and not out.exists()
    assert run_finetune(*args, "--train", str(undeclared), "--energy-unit", "hartree").returncode == 0
    declared = write_in_hartree(demo_dir, tmp_path / "declared.extxyz", "Hartree")  # the file says so
    assert run_finetune(*args, "--train", str(declared)).returncode == 0
    out.unlink()
    done = run_finetune(*args, "--train", str(undeclared), "--no-unit-check")  # the user insists
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]


@pytest.mark.faults
@pytest.mark.parametrize("unit", ["kcal/mol", "hartree"])
def test_the_unit_guard_names_the_unit_when_forces_are_scaled_too(paracetamol, unit):
    """All-electron energies and forces both in another unit: the ratio to the free atoms gives it away."""
    from mlfound.data.plausibility import check_units
    from mlfound.data.units import energy_factor

    check_units(paracetamol, "demo")  # real eV data passes
    scaled = [dataclasses.replace(r, energy_ev=r.energy_ev / energy_factor(unit),
                                  forces_ev_a=r.forces_ev_a / energy_factor(unit)) for r in paracetamol[:30]]
    with pytest.raises(DataError, match=f"demo: .*likely in {unit}"):
        check_units(scaled, "demo")


@pytest.mark.faults
def test_finetune_never_writes_over_its_own_input(tiny_release_path, demo_dir, tmp_path):
    """--out equal to --model (as given, through another spelling, or a registry name's file) is refused before
    any work, and the input stays byte for byte."""
    from mlfound.data.files import sha256_file
    from mlfound.release import resolve

    model = tmp_path / "model.safetensors"
    model.write_bytes(tiny_release_path.read_bytes())
    before = sha256_file(model)
    train = ["--head", "hf_631g", "--train", str(demo_dir / "hf_631g.extxyz"), "--num-train", "5", "--max-steps", "2"]
    for out in (model, tmp_path / "." / "model.safetensors"):
        done = run_finetune("--model", str(model), *train, "--out", str(out))
        assert done.returncode == 2, done.stderr[-2000:]
        assert "refusing to overwrite it" in done.stderr and "Traceback" not in done.stderr
    assert sha256_file(model) == before
    default = resolve("default")
    done = run_finetune("--model", "default", *train, "--out", str(default))
    assert done.returncode == 2 and f"is the input --model ({default})" in done.stderr


@pytest.mark.faults
def test_a_diverging_finetune_stops_and_writes_nothing(base, splits, tmp_path):
    from mlfound.train.guards import TrainingError

    train, val = splits
    with pytest.raises(TrainingError, match=r"fine-tuning head 'hf_631g', step \d+: the loss is (nan|inf)"):
        finetune(base, train, val, FinetuneConfig(head="hf_631g", lr=1e12, max_steps=50, eval_every=100,
                                                  patience=None, check_units=False), progress=False)


@pytest.mark.faults
def test_validation_data_that_is_the_training_data_is_refused(tiny_release_path, demo_dir, tmp_path):
    data = str(demo_dir / "hf_631g.extxyz")
    done = run_finetune("--model", str(tiny_release_path), "--head", "hf_631g", "--train", data, "--val", data,
                        "--out", str(tmp_path / "x.safetensors"))
    assert done.returncode == 2 and "is the training data: early stopping would choose on" in done.stderr


@pytest.mark.faults
def test_export_and_finetune_on_a_full_disk_name_it_and_keep_the_previous_release(tiny_release_path, demo_dir,
                                                                                   small_disk):  # noqa: F811
    """The release each command would write does not fit: one line with the path, the bytes needed and "no space
    left"; the release already there is untouched and no temporary is left."""
    from mlfound.cli import main as mlfound
    from tests.data.test_files import fill

    out = small_disk / "model.safetensors"
    out.write_bytes(b"the previous release")
    fill(small_disk, leave_bytes=8192)
    done = run_finetune("--model", str(tiny_release_path), "--head", "hf_631g", "--train",
                        str(demo_dir / "hf_631g.extxyz"), "--num-train", "5", "--max-steps", "1", "--out", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: no space left on device writing {out}: it needs " in done.stderr
    assert mlfound(["export", str(tiny_release_path), "--out", str(out)]) == 2
    assert out.read_bytes() == b"the previous release"
    # the fine-tune's TensorBoard log (kilobytes, written as it trained) stays: the record of what ran
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model.logs", "model.safetensors"]
