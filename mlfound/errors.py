"""What every entry point does with the project's own errors: one line on stderr and exit code 2.

A user error (bad config, bad data, a file that is not a release, a run that cannot go on, a full disk, a folder
another process writes) is the user's to fix, so it never ends in a traceback; anything else is a bug in mlfound
and keeps its traceback. Every command (``mlfound`` and the repository's scripts) runs its ``main`` through ``run_main``; the
entry-point tests drive each with bad input.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types that mean "the input or the environment is wrong" (imported when one is raised)."""
    from mlfound.config import ConfigError
    from mlfound.data import DataError
    from mlfound.model.compiled import CompiledGraphError
    from mlfound.model_card import CardError
    from mlfound.release import ReleaseError
    from mlfound.train.guards import TrainingError

    # OSError: missing files, full disks (DiskFullError), folders in use (FolderInUseError), permissions
    return ConfigError, DataError, ReleaseError, CardError, TrainingError, CompiledGraphError, OSError


def run_main(main: Callable[..., int | None], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code, or 2 with ``error: <message>`` for a user error."""
    from pydantic import ValidationError

    try:
        return (main() if argv is None else main(argv)) or 0
    except ValidationError as err:  # typed options built from the command line (e.g. FinetuneConfig)
        from mlfound.config import describe

        return _one_line(f"invalid {err.title}: {describe(err)}")
    except user_errors() as err:
        return _one_line(str(err))


def _one_line(message: str) -> int:
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
    return 2
