"""Real 2-rank CPU DeepSpeed runs (torchrun, gloo) against serial references computed here by hand
on the same batches: Reptile at ZeRO 0/1/2, joint, resume, and config errors."""
import copy
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from mlfound.config import load_config
from mlfound.data.shard_stats import mean_neighbours
from mlfound.meta.loss import potential_loss
from mlfound.meta.outer_step import inner_loop, scale_task_heads
from mlfound.meta.sampling import TaskSampler
from mlfound.model import Potential
from mlfound.release import load
from mlfound.train import checkpoint
from mlfound.train.build import build_batchers, build_potential, load_manifests
from tests.distributed.conftest import TASKS

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path, shard_root, **sections) -> Path:
    raw = {"run_dir": str(tmp_path / "run"), "seed": 4,
           "data": {"shard_root": str(shard_root), "tasks": TASKS, "max_atoms_per_batch": 30},
           "model": {"channels": 8, "l_max": 1, "num_layers": 1, "cutoff_a": 4.0, "radial_hidden": 8,
                     "head_hidden": 8},
           "meta": {"method": "reptile_k5", "inner_steps": 2, "inner": {"lr": 1e-2}, "outer": {"lr": 0.8, "lr_final": 0.2},
                    "sampling": {"strategy": "uniform"}},
           "train": {"outer_steps": 4, "log_every": 2, "eval_every": 100, "save_every": 100}}
    for name, values in sections.items():
        if name == "meta" and "method" in values:  # another method: its own point, not the default's fields
            raw[name] = {"sampling": raw["meta"]["sampling"], **values}
        else:
            raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "pretrain.py"), "--config", str(config), *extra]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = checkpoint.latest_tag(run_dir)
    state = torch.load(checkpoint.checkpoint_dir(run_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return state["module"]


def serial_run(cfg, reptile: bool) -> dict[str, torch.Tensor]:
    """Reptile (Adam inside, SGD on θ0 − θk outside) or joint (the ranks' gradients averaged, Adam), written
    out in one process as they were before the general outer step: ranks one after another, averaged by hand."""
    torch.manual_seed(cfg.seed)
    model = build_potential(cfg, load_manifests(cfg))
    names = [n for n, _ in model.named_parameters()]
    batchers = [build_batchers(cfg, rank, 2) for rank in range(2)]
    sampler = TaskSampler({t: 1 for t in TASKS}, "uniform", seed=cfg.seed)
    weights = cfg.loss
    outer = (torch.optim.SGD if reptile else torch.optim.Adam)(model.parameters(), lr=cfg.meta.outer.lr)
    total, ratio = cfg.train.outer_steps, cfg.meta.outer.lr_final / cfg.meta.outer.lr
    for step in range(total):
        for group in outer.param_groups:
            group["lr"] = cfg.meta.outer.lr * (1.0 + (ratio - 1.0) * step / total)
        tasks = [sampler.draw(step, rank) for rank in range(2)]
        grads = []
        for rank, task in enumerate(tasks):
            if reptile:
                work = copy.deepcopy(model)
                inner = torch.optim.Adam(work.parameters(), lr=cfg.meta.inner.lr, betas=(0.0, 0.999))
                theta0 = [p.detach().clone() for p in model.parameters()]
                delta = inner_loop(work, theta0, batchers[rank][task], cfg.meta.inner_steps, inner,
                                   lambda m, b: potential_loss(m, b, weights)[0])
                scale_task_heads(delta, names, Potential.head_prefix(task), 2 / tasks.count(task))
                grads.append(delta)
            else:
                model.zero_grad()
                potential_loss(model, next(batchers[rank][task]), weights)[0].backward()
                grads.append([p.grad.detach().clone() for p in model.parameters()])
        outer.zero_grad()
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        outer.step()
    return dict(model.named_parameters())


def assert_same_parameters(distributed, serial, rtol=1e-5, atol=2e-6):
    for name, value in serial.items():
        torch.testing.assert_close(distributed[name].to(value.dtype), value.detach(), rtol=rtol, atol=atol,
                                   equal_nan=True, msg=name)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_reptile_two_ranks_equals_serial_reference(shard_root, tmp_path, zero_stage):
    config = write_config(tmp_path, shard_root, deepspeed={"zero_stage": zero_stage})
    cfg = load_config(config)
    tasks = [[TaskSampler({t: 1 for t in TASKS}, "uniform", seed=cfg.seed).draw(s, r) for r in range(2)]
             for s in range(cfg.train.outer_steps)]
    assert any(a != b for a, b in tasks) and any(a == b for a, b in tasks), \
        "the seed must give steps where ranks share a task and steps where each head is trained by one rank"
    done = torchrun(config)
    assert "step      2" in done.stdout and "E MAE" in done.stdout
    assert_same_parameters(final_parameters(cfg.run_dir), serial_run(cfg, reptile=True))
    if zero_stage == 1:
        assert_export_reproduces_the_run(cfg, tmp_path)


def assert_export_reproduces_the_run(cfg, tmp_path) -> None:
    """`mlfound export` of the run: the engine's weights exactly, the manifests' float64 references
    exactly, and the run's own final validation table when evaluated on the same held-out records."""
    from mlfound.cli import main as mlfound
    from mlfound.data.sets import load_records
    from mlfound.evaluate import evaluate

    out = tmp_path / "model.safetensors"
    assert mlfound(["export", str(cfg.run_dir), "--out", str(out)]) == 0
    release = load(out)
    for name, value in final_parameters(cfg.run_dir).items():
        torch.testing.assert_close(release.model.state_dict()[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    manifests = load_manifests(cfg)
    for task in TASKS:  # each head's references are its own manifest's, for exactly its own elements
        assert release.metadata["heads"][task]["references_ev"] == {
            str(z): e for z, e in manifests[task]["references_ev"].items()}
        assert release.metadata["heads"][task]["data"]["fingerprint"] == manifests[task]["fingerprint"]
    # the config left avg_num_neighbors unset: the release holds the number counted from the manifests
    assert release.model.config.avg_num_neighbors == mean_neighbours(manifests, cfg.model.cutoff_a)
    final = json.loads((cfg.run_dir / "validation.jsonl").read_text().splitlines()[-1])["tasks"]
    for task in TASKS:
        errors = evaluate(release, load_records(cfg.data.shard_root / task / "val", task), task)
        for key, value in final[task].items():
            assert errors[key] == pytest.approx(value, rel=1e-6, nan_ok=True), (task, key)


def test_reptile_bf16_matches_serial_fp32_to_bf16_precision(shard_root, tmp_path):
    """bf16 engine weights (the inner copy stays fp32): equal to the fp32 reference within bf16 rounding."""
    config = write_config(tmp_path, shard_root, deepspeed={"zero_stage": 1, "bf16": True})
    cfg = load_config(config)
    torchrun(config)
    params, serial = final_parameters(cfg.run_dir), serial_run(cfg, reptile=True)
    assert_same_parameters(params, serial, rtol=2e-2, atol=2e-2)
    worst = max((params[n].float() - v.detach()).abs().max().item() for n, v in serial.items())
    assert worst > 1e-5, "bf16 rounding must show: the run was not in bf16"
    # the release holds the fp32 master weights, of which the engine's bf16 weights are the rounding
    from mlfound.cli import main as mlfound

    assert mlfound(["export", str(cfg.run_dir), "--out", str(tmp_path / "m.safetensors")]) == 0
    exported = load(tmp_path / "m.safetensors").model.state_dict()
    assert all(exported[n].dtype == torch.float32 and torch.equal(exported[n].bfloat16(), params[n]) for n in serial)
    assert any(not torch.equal(exported[n], params[n].float()) for n in serial)
    assert exported["references_ev"].dtype == torch.float64


JOINT_LRS = {"lr": 1e-3, "lr_final": 1e-4}
# reptile_k1 moved to joint's point by hand: one plain SGD step at lr 1 inside, Adam outside, no head rescaling
K1_AS_JOINT = {"method": "reptile_k1", "inner": {"name": "sgd", "lr": 1.0}, "outer": {"name": "adam", **JOINT_LRS},
               "rescale_heads": False}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_joint_two_ranks_equals_serial_gradient_averaging_and_k1_at_its_point_is_joint_bit_for_bit(
        shard_root, tmp_path, zero_stage):
    """Joint runs through the general outer step (no code of its own): it equals the ranks' gradients averaged
    by hand, and reptile_k1 given joint's inner and outer optimizers equals it bit for bit."""
    (tmp_path / "joint").mkdir()
    (tmp_path / "k1").mkdir()
    joint = write_config(tmp_path / "joint", shard_root, meta={"method": "joint", "outer": JOINT_LRS},
                         deepspeed={"zero_stage": zero_stage})
    k1 = write_config(tmp_path / "k1", shard_root, meta=K1_AS_JOINT, deepspeed={"zero_stage": zero_stage})
    torchrun(joint)
    torchrun(k1)
    joint_params = final_parameters(load_config(joint).run_dir)
    assert_same_parameters(joint_params, serial_run(load_config(joint), reptile=False))
    k1_params = final_parameters(load_config(k1).run_dir)
    assert_same_parameters(k1_params, joint_params, rtol=0, atol=0)  # bit for bit (NaN references alike)


def test_on_one_rank_k1_at_joints_point_is_joint_bit_for_bit(shard_root, tmp_path):
    (tmp_path / "joint").mkdir()
    (tmp_path / "k1").mkdir()
    joint = write_config(tmp_path / "joint", shard_root, meta={"method": "joint", "outer": JOINT_LRS})
    k1 = write_config(tmp_path / "k1", shard_root, meta=K1_AS_JOINT)
    for config in (joint, k1):
        done = run_one_process(config)
        assert done.returncode == 0, done.stderr[-3000:]
    joint_params = final_parameters(load_config(joint).run_dir)
    k1_params = final_parameters(load_config(k1).run_dir)
    assert_same_parameters(k1_params, joint_params, rtol=0, atol=0)  # bit for bit (NaN references alike)


def test_resume_equals_uninterrupted_run(shard_root, tmp_path):
    """A job that hit its time limit at step 2 of 4 and was killed after logging step 3 (fake lines here),
    resumed with overrides before and after --resume: the parameters of an uninterrupted run (the inner
    optimizer's state persisted across outer steps, so it must come back from each rank's file), and logs
    that hold each step once."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    persist = {"inner": {"lr": 1e-2, "persist": True}}  # each rank's inner Adam state must travel too
    whole = write_config(tmp_path / "whole", shard_root, meta=persist, deepspeed={"zero_stage": 1})
    split = write_config(tmp_path / "split", shard_root, meta=persist, deepspeed={"zero_stage": 1},
                         train={"eval_every": 2})
    run_dir = load_config(split).run_dir
    torchrun(whole)
    torchrun(split, "train.stop_after_steps=2")
    assert checkpoint.latest_tag(run_dir) == "step00000002"
    for log in ("metrics_rank0.jsonl", "metrics_rank1.jsonl", "validation.jsonl"):
        with open(run_dir / log, "a") as f:
            f.write(json.dumps({"step": 3, "tasks": {}}) + "\n" + '{"step": 4, "ta')  # killed mid-line
    done = torchrun(split, "train.log_every=1", "--resume", "auto", "train.eval_every=4")
    assert f"resumed from {checkpoint.checkpoint_dir(run_dir) / 'step00000002'} (step 2)" in done.stdout
    assert checkpoint.latest_tag(run_dir) == "step00000004"
    assert_same_parameters(final_parameters(run_dir), final_parameters(load_config(whole).run_dir))
    for rank in range(2):
        assert logged_steps(run_dir / f"metrics_rank{rank}.jsonl") == [2, 3, 4]  # log_every 2, then 1
    assert logged_steps(run_dir / "validation.jsonl") == [2, 4]


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_step_is_saved_before_it_is_evaluated(tmp_path):
    """So a failing evaluation never costs the checkpoint of its step."""
    from mlfound.train.trainer import Trainer

    calls = []
    trainer = Trainer.__new__(Trainer)  # the loop alone: its parts are recorded, not run
    trainer.cfg = load_config(None, ["train.outer_steps=2", "train.eval_every=1", "train.save_every=1"],
                              base={"run_dir": str(tmp_path), "data": {"shard_root": "none", "tasks": TASKS}})
    trainer.rank, trainer.world_size, trainer.step, trainer.run_dir, trainer.resume_tag = 0, 1, 0, tmp_path, None
    trainer.manifests = {}
    trainer.tasks_of_step = lambda step: TASKS[:1]
    trainer.outer_step = lambda tasks: calls.append("step")
    trainer.save = lambda: calls.append(f"save {trainer.step}")
    trainer.evaluate = lambda: calls.append(f"evaluate {trainer.step}") or {}
    trainer.loader = types.SimpleNamespace(close=lambda: calls.append("close loader"))
    trainer.train()
    trainer.tracker.close()
    assert calls[:7] == ["step", "save 1", "evaluate 1", "step", "save 2", "evaluate 2", "close loader"]


@pytest.mark.parametrize("override, message", [
    ("meta.bogus=1", "meta.bogus: Extra inputs are not permitted"),
    ("deepspeed.zero_stage=3", "zero_stage 3 is not supported"),
    ("meta.inner_steps=0", "inner_steps (k) must be >= 1"),
    ("data.tasks=[gfn2_xtb,nope]", "nope/manifest.json: no manifest"),
    ("deepspeed.extra={zero_optimization: {stage: 3}}", "deepspeed.extra.zero_optimization: set deepspeed.zero_stage"),
    ("deepspeed.extra={bf16: {enabled: true}}", "deepspeed.extra.bf16: set the typed field deepspeed.bf16"),
    ("meta.inner_steps=[1", "override 'meta.inner_steps=[1', column 20: invalid YAML value"),
])
def test_bad_config_is_named(shard_root, tmp_path, override, message):
    done = run_one_process(write_config(tmp_path, shard_root), override)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def run_one_process(config: Path, *args: str) -> subprocess.CompletedProcess:
    """launch/pretrain.py in one process (no launcher), on a free port: other runs may share the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "PYTHONPATH": str(ROOT),
           "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(config), *args],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_errors_are_one_line(shard_root, tmp_path):
    config = write_config(tmp_path, shard_root)
    config.write_text(config.read_text() + "train: {outer_steps: 4\n")
    done = run_one_process(config)
    assert done.returncode == 2 and done.stderr.startswith(f"error: config file {config}, line ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_overrides_on_both_sides_of_resume(shard_root, tmp_path):
    done = run_one_process(write_config(tmp_path, shard_root), "meta.bogus=1", "--resume", "auto", "train.bogus=2")
    assert done.returncode == 2, done.stderr
    assert "meta.bogus: Extra inputs" in done.stderr and "train.bogus: Extra inputs" in done.stderr, done.stderr


def test_single_in_one_process_trains_only_its_task(shard_root, tmp_path):
    config = write_config(tmp_path, shard_root, meta={"method": "single", "single_task": "hf_sto3g",
                                                      "outer": {"lr": 1e-3, "lr_final": 1e-3}})
    done = run_one_process(config)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mixture gfn2_xtb=0.00 hf_sto3g=1.00" in done.stdout
    records = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics_rank0.jsonl").read_text().splitlines()]
    assert set(records[-1]["loss"]) == {"hf_sto3g"} and records[-1]["step"] == 4


def test_a_task_without_a_validation_split_is_named_not_silently_left_out(shard_root, tmp_path):
    import shutil

    from mlfound.data.shards import VALIDATION_DIR

    root = tmp_path / "shards"
    shutil.copytree(shard_root, root)
    shutil.rmtree(root / "hf_sto3g" / VALIDATION_DIR)
    config = write_config(tmp_path, root, train={"outer_steps": 2, "eval_every": 2})
    done = run_one_process(config)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tasks ['hf_sto3g'] have no validation split" in done.stderr and "never evaluated" in done.stderr
    evaluated = json.loads((load_config(config).run_dir / "validation.jsonl").read_text().splitlines()[-1])["tasks"]
    assert sorted(evaluated) == sorted(t for t in TASKS if t != "hf_sto3g")


def test_eval_and_log_every_none_mean_none_during_the_run_and_one_final_validation(shard_root, tmp_path):
    """What the paper experiment asks for its pretraining runs (no magic large step counts), said so in the run:
    no metrics lines, the final validation only; and the skipped shared-memory op is named on stderr."""
    config = write_config(tmp_path, shard_root, train={"outer_steps": 4, "eval_every": None, "log_every": None})
    done = run_one_process(config)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = load_config(config).run_dir
    assert [json.loads(line)["step"] for line in (run_dir / "validation.jsonl").read_text().splitlines()] == [4]
    assert not (run_dir / "metrics_rank0.jsonl").exists() or not (run_dir / "metrics_rank0.jsonl").read_text()
    assert "MLFOUND_NO_SHM_OP=1: DeepSpeed's shared-memory comm op was not built" in done.stderr


def test_a_task_with_no_data_derived_scale_says_its_scale_is_1_ev():
    from mlfound.train.build import task_scale_ev

    with pytest.warns(UserWarning, match="task one: no forces and no spread .* σ is 1 eV"):
        assert task_scale_ev({"task": "one", "stats": {"forces_rms_ev_a": 0.0, "residual_per_atom_std_ev": 0.0}}) == 1.0
    assert task_scale_ev({"task": "f", "stats": {"forces_rms_ev_a": 0.5, "residual_per_atom_std_ev": 0.0}}) == 0.5


def test_the_logged_loss_is_the_loss_the_step_optimises(shard_root, tmp_path):
    """The weighted loss of the step's batch at the initial weights (one task, one step), not a sum of parts."""
    config = write_config(tmp_path, shard_root, meta={"method": "single", "single_task": "hf_sto3g"},
                          loss={"energy_weight": 3.0, "forces_weight": 0.5},
                          train={"outer_steps": 1, "log_every": 1})
    done = run_one_process(config)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = load_config(config)
    torch.manual_seed(cfg.seed)
    model = build_potential(cfg, load_manifests(cfg))
    batch = next(build_batchers(cfg, 0, 1)["hf_sto3g"])
    expected = potential_loss(model, batch, cfg.loss)[0].item()
    logged = json.loads((cfg.run_dir / "metrics_rank0.jsonl").read_text().splitlines()[0])["loss"]["hf_sto3g"]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_interrupted_save_is_never_resumed(tmp_path):
    """A checkpoint folder without complete.json (a crash mid-save) is refused; `latest` still names the
    last complete one, because it is replaced only after every rank finished."""
    root = checkpoint.checkpoint_dir(tmp_path)
    (root / "step00000004").mkdir(parents=True)
    (root / "latest").write_text("step00000002")
    assert checkpoint.latest_tag(tmp_path) == "step00000002"
    with pytest.raises(FileNotFoundError, match="step00000004 is incomplete"):
        checkpoint.restore(None, tmp_path, "step00000004", rank=0)
