"""Config loading: the keys the typed config owns cannot be overridden through deepspeed.extra."""
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
    ({"optimizer": {"type": "Adam"}}, "meta.mode (SGD for reptile, Adam for joint/single), meta.outer_lr"),
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

