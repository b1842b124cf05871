"""Progress of long commands: tqdm's bar on a terminal; in a log file (a batch job's stderr), a plain line at
most every ``LOG_INTERVAL_S`` seconds and one at the end, instead of a bar redrawn with carriage returns."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def progress(iterable=None, *, desc: str, unit: str = "it", total: int | None = None, enabled: bool = True,
             file=None) -> tqdm:
    """A progress bar over ``iterable``, or nothing shown when ``enabled`` is False; ``file``: stderr."""
    file = file or sys.stderr
    if not enabled or file.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, file=file, disable=not enabled)
    return _LogLines(iterable, desc=desc, unit=unit, total=total, file=file, mininterval=LOG_INTERVAL_S,
                     bar_format=LOG_FORMAT)


@contextmanager
def stages(names: Sequence[str], *, desc: str, enabled: bool = True, file=None) -> Iterator:
    """Progress of a command made of a few long steps rather than a loop (export, deploy): each call of the
    yielded ``start(name)`` ends the step before it and shows ``name`` while the next one runs."""
    bar = progress(desc=desc, unit="step", total=len(names), enabled=enabled, file=file)
    started = []

    def start(name: str) -> None:
        if started:
            bar.update()
        started.append(name)
        bar.set_postfix(step=name)
        bar.refresh()

    try:
        yield start
        if started:
            bar.update()
    finally:
        bar.close()


class _LogLines(tqdm):
    """tqdm writing each refresh as its own line, never the same line twice."""

    def display(self, msg=None, pos=None):
        line = self.__str__() if msg is None else msg
        if not line:  # tqdm clearing its bar: nothing to clear here
            return False
        if line != getattr(self, "_last_line", None):
            self.fp.write(line + "\n")
            self.fp.flush()
            self._last_line = line
        return True

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """Shown with the next line: a forced refresh would print the count tqdm last synced, not the current one."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def close(self):
        if not self.disable:
            self.display()  # the final count, whatever the interval
        self.leave = False  # tqdm's own close would redraw the bar and end it with a blank line
        super().close()
