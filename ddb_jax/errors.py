"""The errors a user can cause, in two kinds, and how the command lines report them.

A :class:`UsageError` is a setting to change (a config key, a flag, values that do not fit
together): exit status 2. An :class:`InputError` is something wrong with what a run reads
or writes (a dataset, a checkpoint, a file, a bucket, a diverging loss): exit status 1.
Both end ``python -m ddb_jax.main`` and the tools in one line ``error: <message>`` (with
``--traceback``, the traceback). Anything else is a bug and keeps its traceback.
Every module's error classes derive from one of the two; this module imports nothing of
the project.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(Exception):
    """A setting the user can fix: exit status 2."""


class InputError(Exception):
    """A file, dataset, checkpoint or storage problem, or a failed run: exit status 1."""


def exit_status(err: BaseException) -> int | None:
    """2 for a usage error, 1 for an input error (or a file/OS/TensorFlow I/O error, which
    name their file), None for anything else (a bug: keep the traceback)."""
    if isinstance(err, UsageError):
        return 2
    if isinstance(err, InputError | OSError):
        return 1
    if type(err).__module__.startswith("tensorflow") and hasattr(err, "message"):
        return 1  # tf.data's errors: a corrupt or unreadable file, named in the message
    return None


def one_line(err: BaseException) -> str:
    """The message on one line (a multi-line message's lines joined by '; ')."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines)


def report(err: BaseException, traceback: bool = False) -> int:
    """Prints ``error: ...`` for a known error and returns its exit status; re-raises a
    bug (or anything, with ``traceback``)."""
    status = exit_status(err)
    if status is None or traceback:
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    return status


def command_line(flag_values, main: Callable[[list[str]], None], describe=one_line):
    """``(flags_parser, run)`` for absl's ``app.run`` of a command whose flags include
    ``--traceback`` (and maybe ``--config``): a flag or config mistake (a misspelt key, a
    value of the wrong type, a config file that fails) is one ``error:`` line, exit status
    2; an error of the run is :func:`report`'s one line; ``--traceback`` shows tracebacks."""

    def flags_parser(argv: list[str]) -> list[str]:
        try:
            args = flag_values(argv)
            config = flag_values["config"].value if "config" in flag_values else None
            if config is not None:
                config.stage  # noqa: B018  (a config file that failed to load fails here)
            return args
        except Exception as err:
            if "--traceback" in argv:
                raise
            print(f"error: {describe(err)} (see --helpfull)", file=sys.stderr)
            sys.exit(2)

    def run(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:  # known errors: one line; bugs: the traceback
            sys.exit(report(err, traceback=flag_values.traceback))

    return flags_parser, run
