"""mlfound.tracking without a training run: a backend asked for by name but not installed is a one-line config
error naming the extra to install; TensorBoard is on by default only where it is installed."""
import importlib.util

import pytest

from mlfound.config import ConfigError, LoggingConfig, WandbConfig
from mlfound.tracking import TENSORBOARD_DIR, WANDB_STATE, open_tracker


@pytest.fixture
def without_tracking_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("tensorboard", "wandb") else real(name, *args))


def test_a_backend_asked_for_but_not_installed_is_named(tmp_path, without_tracking_packages):
    with pytest.raises(ConfigError, match=r"logging.tensorboard is true but .* pip install 'mlfound\[tracking\]'"):
        open_tracker(tmp_path, LoggingConfig(tensorboard=True), {}, start_step=0)
    with pytest.raises(ConfigError, match=r"logging.wandb is set but the wandb package is missing"):
        open_tracker(tmp_path, LoggingConfig(tensorboard=False, wandb=WandbConfig(project="p")), {}, start_step=0)


def test_tensorboard_is_on_by_default_only_where_it_is_installed(tmp_path, without_tracking_packages):
    assert open_tracker(tmp_path, LoggingConfig(), {}, start_step=0).backends == []
    assert not (tmp_path / TENSORBOARD_DIR).exists()


@pytest.mark.parametrize("text", ['{"id": "a1b2c3d4", "last_st', '{"id": 7}', ""])
def test_a_truncated_or_edited_wandb_state_is_named_on_resume(tmp_path, text):
    """A resume continues the W&B run this file names; a file that is cut short or edited is refused with what to
    do, before W&B is started (new runs never read it)."""
    (tmp_path / WANDB_STATE).write_text(text)
    with pytest.raises(ConfigError, match=r"wandb_run.json is not the W&B state mlfound writes .* remove it"):
        open_tracker(tmp_path, LoggingConfig(tensorboard=False, wandb=WandbConfig(project="p", mode="offline")),
                     {}, start_step=4)
