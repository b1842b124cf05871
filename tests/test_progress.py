"""Progress of long commands: in a log (not a terminal) plain lines, no carriage returns, the final count always;
nothing at all when turned off."""
import io

from mlfound import progress as progress_module
from mlfound.progress import progress, stages


def test_in_a_log_each_refresh_is_a_plain_line_and_the_final_count_is_always_written(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 3600.0)  # no refresh between start and end
    for _ in progress(range(7), desc="fine-tune h", unit="step", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2, lines
    assert lines[0].startswith("fine-tune h: 0/7 step (0%)") and lines[-1].startswith("fine-tune h: 7/7 step (100%)")
    stopped = io.StringIO()
    bar = progress(range(7), desc="read", unit="file", file=stopped)
    for i in bar:
        if i == 2:
            break
    bar.close()
    # tqdm counts an item when the next one is asked for: the loop stopped in the third
    assert stopped.getvalue().splitlines()[-1].startswith("read: 2/7 file (29%)")


def test_a_postfix_waits_for_the_next_line_and_is_never_shown_with_a_stale_count(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 3600.0)
    bar = progress(range(100), desc="fine-tune h", unit="step", file=log)
    for step in bar:
        if step % 10 == 0:
            bar.set_postfix(val_F=step)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("fine-tune h: 100/100 step (100%)") and "val_F=90" in lines[-1]


def test_turned_off_it_writes_nothing():
    log = io.StringIO()
    assert list(progress(range(3), desc="x", file=log, enabled=False)) == [0, 1, 2] and log.getvalue() == ""


def test_steps_of_a_command_without_a_loop_are_named_as_they_start_and_counted_when_they_end():
    log = io.StringIO()
    with stages(["read the weights", "write the release"], desc="export ckpt", file=log) as start:
        start("read the weights")
        start("write the release")
    lines = log.getvalue().splitlines()  # the bar's first line, then one as each step starts, then the end
    assert len(lines) == 4, lines
    assert lines[1].startswith("export ckpt: 0/2 step (0%)") and "step=read the weights" in lines[1], lines
    assert lines[2].startswith("export ckpt: 1/2 step (50%)") and "step=write the release" in lines[2], lines
    assert lines[3].startswith("export ckpt: 2/2 step (100%)"), lines
    failed = io.StringIO()
    try:
        with stages(["script", "write"], desc="deploy h", file=failed) as start:
            start("script")
            raise RuntimeError("scripting failed")
    except RuntimeError:
        pass
    assert failed.getvalue().splitlines()[-1].startswith("deploy h: 0/2 step (0%)")  # no step counted as done
