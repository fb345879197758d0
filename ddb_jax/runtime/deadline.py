"""The storage deadline: no wait of a training stage on its storage lasts unboundedly.

A lost bucket does not fail fast: gcsfs retries a request for about a minute and then
raises, TensorStore (orbax's array writes) retries for much longer, and tf.data's iterator
destructor waits for the reads it has in flight. Every blocking wait of a training stage
on storage (a checkpoint save and its completion, the manager's close, the model
directories it exports, the copy of its summaries, the next input batch, the input
pipeline's shutdown) is therefore run under :func:`storage`, which bounds it by
:func:`timeout_s` seconds (``DDB_JAX_STORAGE_TIMEOUT_S``, default 180: a transient blip
of tens of seconds is ridden out, an outage is not waited for).

When a deadline expires, the wait is abandoned, not joined: the threads stuck on the
storage (orbax's background writers, tf.data's readers, gcsfs's event loop) cannot be
stopped from Python and would keep the interpreter from exiting. The watchdog thread
prints ONE line, ``error: storage <path> did not answer within N s (<the last storage
error seen>); the last complete checkpoint is step K; rerun to continue``, and ends the
process with ``os._exit(1)``: no ``finally`` block, ``atexit`` hook or buffered output of
the stage runs after it (the scratch folder of the TensorBoard events is left for the
next start to remove). If the interpreter cannot even run the watchdog (a thread holding
the GIL in a native wait), :mod:`faulthandler`'s native timer ends the process ``GRACE_S``
later, also with status 1, its thread dump written to a file in the temporary directory,
not to the console. The same native timer bounds the exit of a process that reports a
storage error raised in time (:func:`bound_exit`): the stage's error line is printed by
the command line as usual, and a teardown stuck on the storage is cut short.

gcsfs logs every retry with its traceback; those records are kept out of the console:
:func:`quiet_storage_logs` stops the gcsfs, fsspec and aiohttp loggers from propagating
to the console handler, keeps the last message (the "underlying error" of the line
above) and passes each on to absl's log at debug level; orbax's background writers log
each failed write with a traceback, which the console handler drops (the message stays).
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import logging as std_logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from absl import logging

ENV = "DDB_JAX_STORAGE_TIMEOUT_S"
DEFAULT_S = 180.0
GRACE_S = 10.0  # the native backstop fires this long after a deadline
_POLL_S = 0.2
QUIET_LOGGERS = ("gcsfs", "fsspec", "aiohttp", "google.auth", "urllib3")

_lock = threading.Lock()
_active: dict[int, tuple[float, str, str]] = {}  # token -> (expiry, path, doing)
_tokens = itertools.count()
_watchdog: threading.Thread | None = None
_last_error = ""
_last_step: dict[str, int] = {}  # checkpoint directory -> last complete step
_probes: dict[str, Callable[[], int | None]] = {}  # directory -> its newest committed step


def timeout_s() -> float:
    """Seconds a storage wait may last: ``DDB_JAX_STORAGE_TIMEOUT_S``, else 180."""
    value = os.environ.get(ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_S
    except ValueError:
        seconds = DEFAULT_S
    return seconds if seconds > 0 else DEFAULT_S


def record_checkpoint(
    directory: str, step: int | None, probe: Callable[[], int | None] | None = None
) -> None:
    """The newest complete checkpoint of ``directory`` (named in the deadline's line);
    ``probe``: asked when a deadline expires, the newest step committed since (None when
    it does not know), without waiting on the storage."""
    with _lock:
        if step is not None:
            _last_step[directory] = max(step, _last_step.get(directory, step))
        if probe is not None:
            _probes[directory] = probe


def forget_probe(directory: str) -> None:
    """Drops ``directory``'s probe (its manager closed); its recorded step stays."""
    with _lock:
        _probes.pop(directory, None)


def _ask(probe: Callable[[], int | None]) -> int | None:
    """``probe()``, or None if it raises or takes more than a second (abandoned)."""
    answer: list[int | None] = [None]

    def run():
        try:
            answer[0] = probe()
        except Exception:  # a failed save: nothing new is complete
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(1.0)
    return answer[0]


def last_checkpoint(path: str) -> int | None:
    """The newest complete checkpoint under (or of) ``path``: recorded, or probed; for a
    path of no checkpoints (a data root), those of the process's one checkpoint directory."""

    def related(directory: str) -> bool:
        a, b = directory.rstrip("/") + "/", path.rstrip("/") + "/"
        return a.startswith(b) or b.startswith(a)

    with _lock:
        directories = set(_last_step) | set(_probes)
        if not any(related(d) for d in directories) and len(directories) == 1:
            path = directories.pop()  # a data root: the checkpoints of this process's stage
        found = [s for d, s in _last_step.items() if related(d)]
        probes = [p for d, p in _probes.items() if related(d)]
    found += [_ask(p) for p in probes]
    return max((s for s in found if s is not None), default=None)


class _Keeper(std_logging.Handler):
    """Keeps the last storage-client message and forwards it to absl's log at debug."""

    def emit(self, record: std_logging.LogRecord) -> None:
        global _last_error
        try:
            message = record.getMessage().strip().splitlines()
        except Exception:  # a malformed record is not worth a traceback
            return
        if message and (record.levelno >= std_logging.WARNING or "exception" in message[0]):
            # gcsfs: "<call> retrying after exception: <error>"; keep the error itself
            _last_error = message[0].split("exception: ", 1)[-1][:300]
        if message:
            logging.debug("%s: %s", record.name, message[0])


_KEEPER = _Keeper()
STORAGE_CODE = ("/orbax/", "/gcsfs/", "/fsspec/", "/aiohttp/", "/tensorstore/")


class _OneLine(std_logging.Filter):
    """On the console handler: a record of the storage code (orbax's background writers
    log each failed write with its traceback) keeps its message, not the traceback."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.exc_info and any(part in record.pathname for part in STORAGE_CODE):
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _OneLine()


def quiet_storage_logs() -> None:
    """Keeps the storage clients' retry tracebacks out of the console (idempotent)."""
    for name in QUIET_LOGGERS:
        logger = std_logging.getLogger(name)
        if _KEEPER not in logger.handlers:
            logger.addHandler(_KEEPER)
        logger.propagate = False
    std_logging.getLogger("gcsfs").setLevel(std_logging.DEBUG)  # its retries are at debug
    handler = logging.get_absl_handler()
    if _ONE_LINE not in handler.filters:
        handler.addFilter(_ONE_LINE)


def last_error() -> str:
    return _last_error


def message(path: str, seconds: float, doing: str = "") -> str:
    """The one line; it names the last complete checkpoint when this process trains (has a
    checkpoint directory), and says nothing of checkpoints otherwise (evaluation,
    prototypes)."""
    cause = _last_error or f"no answer while {doing}" if doing else _last_error
    return (
        f"error: storage {path} did not answer within {seconds:g} s"
        + (f" ({cause})" if cause else "")
        + checkpoint_clause(path)
        + "; rerun to continue"
    )


def checkpoint_clause(path: str) -> str:
    """``"; the last complete checkpoint is step K"`` (or ``none yet``) when this process
    trains (has a checkpoint directory); empty otherwise (evaluation, prototypes, tools)."""
    step = last_checkpoint(path)
    with _lock:
        trains = bool(_last_step or _probes)
    if not trains:
        return ""
    return "; the last complete checkpoint is " + ("none yet" if step is None else f"step {step}")


def _dump_file():
    handle, _ = tempfile.mkstemp(prefix="ddb_jax_storage_timeout_", suffix=".txt")
    return os.fdopen(handle, "w")


_DUMP = None


def _arm_native(seconds: float) -> None:
    """faulthandler's native timer: ``_exit(1)`` after ``seconds``, GIL or not."""
    global _DUMP
    if _DUMP is None:
        _DUMP = _dump_file()
    faulthandler.dump_traceback_later(seconds, exit=True, file=_DUMP)


_exit_by: float | None = None  # bound_exit's deadline (monotonic)


def _rearm_native() -> None:
    """Arms the native timer for the latest active deadline + GRACE_S (or bound_exit's),
    or cancels it."""
    ends = [e + GRACE_S for e, _, _ in _active.values()]
    if _exit_by is not None:
        ends.append(_exit_by)
    if ends:
        _arm_native(max(max(ends) - time.monotonic(), 0.1))
    else:
        faulthandler.cancel_dump_traceback_later()


def _fresh_line() -> str:
    """A newline when a progress bar (tqdm) is open on the console: the line starts clean."""
    tqdm = sys.modules.get("tqdm")
    return "\n" if getattr(getattr(tqdm, "tqdm", None), "_instances", None) else ""


def _expire(path: str, seconds: float, doing: str) -> None:
    try:
        sys.stderr.write(_fresh_line() + message(path, seconds, doing) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def _watch() -> None:
    while True:
        time.sleep(_POLL_S)
        now = time.monotonic()
        with _lock:
            expired = [entry for entry in _active.values() if entry[0] <= now]
        if expired:
            expiry, path, doing = min(expired)
            _expire(path, _seconds.get(path, timeout_s()), doing)


_seconds: dict[str, float] = {}


@contextlib.contextmanager
def storage(path: str, doing: str, seconds: float | None = None):
    """Bounds the block, a wait on the storage at ``path`` (what it does: ``doing``, for
    the log), by ``seconds`` (:func:`timeout_s`); on expiry the process ends in one line
    with status 1 (the module's docstring). A local ``path`` is not bounded."""
    global _watchdog
    if "://" not in str(path):  # local disk: not bounded (a slow disk is not an outage)
        yield
        return
    quiet_storage_logs()
    seconds = timeout_s() if seconds is None else seconds
    token = next(_tokens)
    with _lock:
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch, name="storage-deadline", daemon=True)
            _watchdog.start()
        _seconds[path] = seconds
        _active[token] = (time.monotonic() + seconds, path, doing)
        _rearm_native()
    try:
        yield
    finally:
        with _lock:
            _active.pop(token, None)
            _rearm_native()


def bounded(items: Iterable, path: str, doing: str) -> Iterator:
    """``items`` (a stream read from ``path``: evaluation or prototype batches), each
    ``next`` bounded as :func:`storage` bounds a block, however long the whole stream
    takes."""
    iterator = iter(items)
    while True:
        with storage(path, doing):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def is_command_line() -> bool:
    """Whether this process is ``python -m ddb_jax.main`` or one of the tools (not a
    library caller, whose process an error of a stage does not end)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith(("ddb_jax.", "tools."))


def bound_exit(seconds: float | None = None) -> None:
    """After a storage error that will be reported and end the process: ends it with
    status 1 if it has not exited ``seconds`` (+ GRACE_S) later (a teardown stuck on the
    storage). Only for errors that end the run, and only in a command-line run
    (:func:`is_command_line`)."""
    global _exit_by
    if not is_command_line():
        return
    with _lock:
        _exit_by = time.monotonic() + (timeout_s() if seconds is None else seconds) + GRACE_S
        _rearm_native()
