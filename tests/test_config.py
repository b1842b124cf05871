"""Config loading: the keys the typed config owns cannot be overridden through deepspeed.extra, and
broken YAML (file or override) is a one-line ConfigError that says where."""
import pytest

from mlfound.config import OWNED_DEEPSPEED_KEYS, ConfigError, load_config

BASE = {"run_dir": "run", "data": {"shard_root": "shards", "tasks": ["gfn2_xtb"]}}


def with_extra(extra: dict):
    return load_config(None, base={**BASE, "deepspeed": {"extra": extra}})


@pytest.mark.parametrize("extra, field", [
    ({"zero_optimization": {"stage": 3}}, "deepspeed.extra.zero_optimization: set deepspeed.zero_stage instead"),
    ({"bf16": {"enabled": True}}, "deepspeed.extra.bf16: set the typed field deepspeed.bf16"),
    ({"fp16": {"enabled": True}}, "deepspeed.extra.fp16: precision comes from the typed field deepspeed.bf16"),
    ({"gradient_clipping": 1.0}, "set deepspeed.gradient_clipping instead"),
    ({"optimizer": {"type": "Adam"}}, "come from meta.method and meta.outer"),
    ({"scheduler": {"type": "WarmupLR"}}, "deepspeed.extra.scheduler: the outer optimizer and its lr schedule"),
    ({"train_batch_size": 8}, "deepspeed.extra.train_batch_size: batches are atom-budget graphs"),
])
def test_deepspeed_extra_cannot_override_the_typed_config(extra, field):
    with pytest.raises(ConfigError) as err:
        with_extra(extra)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_extra_passes_through_what_the_typed_config_does_not_own():
    from mlfound.train.engine import deepspeed_config

    monitors = {"tensorboard": {"enabled": True, "output_path": "tb"}, "comms_logger": {"enabled": True},
                "wall_clock_breakdown": True, "flops_profiler": {"enabled": False}}
    ds = deepspeed_config(with_extra(monitors))
    assert all(ds[key] == value for key, value in monitors.items())
    assert set(ds) - set(monitors) <= set(OWNED_DEEPSPEED_KEYS), "every key deepspeed_config sets is owned"


def test_invalid_yaml_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: run\ndata:\n  tasks: [a, b\n  shard_root: shards\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 4, column 13: invalid YAML: expected ',' or ']'"):
        load_config(path)


@pytest.mark.parametrize("override, where", [
    ("meta.inner_steps=[1", "override 'meta.inner_steps=[1', column 20: invalid YAML value"),
    ("meta.single_task=@x", "override 'meta.single_task=@x', column 18: invalid YAML value: found character '@'"),
])
def test_invalid_yaml_override_names_override_and_column(override, where):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], base=BASE)
    assert str(err.value).startswith(where)


@pytest.mark.parametrize("template, message", [
    ("http://host/{task}", "data.shard_url_template: shard URL template 'http://host/{task}' must contain {name}"),
    ("http://host/{task}/{split}/{name}", "data.shard_url_template: shard URL template "
                                          "'http://host/{task}/{split}/{name}' has {split}; only {task} and {name}"),
])
def test_shard_url_template_is_checked_when_the_config_loads(template, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.shard_url_template='{template}'"], base=BASE)
    assert message in str(err.value) and "\n" not in str(err.value)
    good = "pipe:aws s3 cp s3://bucket/corpus/{task}/{name} -"
    assert load_config(None, [f"data.shard_url_template='{good}'"], base=BASE).data.shard_url_template == good

def test_loader_settings(recwarn):
    cfg = load_config(None, ["data.loader_workers=2", "data.loader_prefetch=4"], base=BASE)
    assert (cfg.data.loader_workers, cfg.data.loader_prefetch, cfg.data.neighbours_on_device) == (2, 4, False)
    assert not recwarn.list
    with pytest.raises(ConfigError, match="data.loader_workers: Input should be greater than or equal to 0"):
        load_config(None, ["data.loader_workers=-1"], base=BASE)
    with pytest.warns(UserWarning, match="data.loader_prefetch does nothing with data.loader_workers=0"):
        load_config(None, ["data.loader_workers=0", "data.loader_prefetch=4"], base=BASE)


@pytest.mark.faults
def test_a_task_listed_twice_is_refused():
    with pytest.raises(ConfigError, match=r"data.tasks: tasks \['a'\] are listed more than once"):
        load_config(None, base={**BASE, "data": {"shard_root": "shards", "tasks": ["a", "b", "a"]}})


def test_a_method_is_a_point_whose_fields_a_config_may_still_set():
    joint = load_config(None, ["meta.method=joint"], base=BASE).meta
    assert (joint.inner_steps, joint.inner.name, joint.inner.lr, joint.outer.name) == (1, "sgd", 1.0, "adam")
    tuned = load_config(None, ["meta.method=reptile_k20", "meta.inner.lr=1e-2", "meta.outer.lr=0.5"], base=BASE).meta
    assert (tuned.inner_steps, tuned.inner.name, tuned.inner.lr, tuned.outer.name, tuned.outer.lr,
            tuned.outer.lr_final) == (20, "adam", 1e-2, "interpolation", 0.5, 0.0)
    with pytest.raises(ConfigError, match="unknown method 'reptile_k7': use one of .*'joint'"):
        load_config(None, ["meta.method=reptile_k7"], base=BASE)
    with pytest.raises(ConfigError, match="meta.method 'single' needs meta.single_task"):
        load_config(None, ["meta.method=single"], base=BASE)


def test_an_older_configs_meta_reads_as_the_point_it_ran():
    """Checkpoints and releases of older runs hold meta.mode and flat learning rates, with the old defaults
    (k 10, inner Adam 1e-3, outer 1 -> 0); joint's inner_steps and inner_lr never did anything."""
    reptile = load_config(None, base={**BASE, "meta": {"mode": "reptile", "inner_steps": 2, "inner_lr": 1e-2,
                                                       "outer_lr": 0.8, "outer_lr_final": 0.2}}).meta
    assert (reptile.inner_steps, reptile.inner.name, reptile.inner.lr, reptile.inner.betas, reptile.outer.name,
            reptile.outer.lr, reptile.outer.lr_final, reptile.rescale_heads) == (
        2, "adam", 1e-2, (0.0, 0.999), "interpolation", 0.8, 0.2, True)
    assert load_config(None, base={**BASE, "meta": {"mode": "reptile"}}).meta.inner_steps == 10
    joint = load_config(None, base={**BASE, "meta": {"mode": "joint", "inner_steps": 5, "inner_lr": 3e-3,
                                                     "outer_lr": 1e-3, "outer_lr_final": 1e-4}}).meta
    assert (joint.method, joint.inner_steps, joint.inner.name, joint.inner.lr, joint.outer.name, joint.outer.lr,
            joint.outer.lr_final, joint.rescale_heads) == ("joint", 1, "sgd", 1.0, "adam", 1e-3, 1e-4, False)
    with pytest.raises(ConfigError, match="older form of meta.method.*use one form, not both"):
        load_config(None, ["meta.method=joint"], base={**BASE, "meta": {"mode": "reptile"}})
