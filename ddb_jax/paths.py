"""One path layer for every file the project touches: local paths and URLs (``gs://``) alike.

Built on ``etils.epath``, which orbax already uses, with Google Cloud Storage through
``gcsfs`` (``EPATH_USE_TF=false``, set here unless the user set it: TensorFlow's own GCS
client cannot be pointed anywhere but Google's endpoint, so tests against an emulator
would exercise another client than production). Paths stay strings throughout the code.

Writes are atomic on both kinds of storage, by the means each has: locally a temporary
name and a rename; on an object store a single object upload, which becomes visible only
when complete (a bucket has no atomic rename, and a copy + delete is not one). A model
directory, several objects, is complete when its marker file exists, written last
(:func:`ddb_jax.checkpoints.save_model_dir`); train-state checkpoints use orbax's own
atomicity (a temporary directory renamed locally, a commit file on GCS).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

os.environ.setdefault("EPATH_USE_TF", "false")

import fsspec  # noqa: E402
from etils import epath  # noqa: E402  (reads EPATH_USE_TF)

# gcsfs caches directory listings for the life of the process by default: a stage would
# not see the files another process (or a resumed run) wrote since its first look.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

from ddb_jax import errors  # noqa: E402
from ddb_jax.runtime import deadline  # noqa: E402

# gcsfs logs each retry of a lost connection with its traceback: to absl's log at debug
# level, not the console (the last one is the cause the storage deadline's line names).
deadline.quiet_storage_logs()

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class PathError(errors.InputError, OSError):
    """A file or directory could not be read or written; the message names it."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/...``) rather than a local path."""
    return bool(_URL.match(str(path)))


def resolve(path: str) -> str:
    """An absolute local path, or the URL unchanged."""
    path = str(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(path, *parts)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def as_epath(path: str) -> epath.Path:
    return epath.Path(path)


def exists(path: str) -> bool:
    return os.path.exists(path) if not is_remote(path) else as_epath(path).exists()


def isdir(path: str) -> bool:
    """A directory; on an object store, a prefix with at least one object below it."""
    return os.path.isdir(path) if not is_remote(path) else as_epath(path).is_dir()


def isfile(path: str) -> bool:
    return os.path.isfile(path) if not is_remote(path) else as_epath(path).is_file()


def makedirs(path: str) -> None:
    """Creates a local directory (and its parents); nothing to do on an object store."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names in a directory (empty if it does not exist)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    p = as_epath(path)
    return sorted(child.name for child in p.iterdir()) if p.exists() else []


def find_files(folder: str) -> list[str]:
    """Every file below ``folder`` (recursively), sorted: on a bucket one prefix listing
    (epath refuses a recursive glob there)."""
    if not is_remote(folder):
        found = []
        for base, dirs, files in os.walk(folder):
            dirs.sort()
            found += [os.path.join(base, f) for f in sorted(files)]
        return found
    fs, root = fsspec.core.url_to_fs(str(folder).rstrip("/"))
    scheme = str(folder).split("://", 1)[0]
    return sorted(f"{scheme}://{name}" for name in fs.find(root))


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern`` (``*`` and ``?`` within a path component; no ``**``)."""
    if not is_remote(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(pattern))
    parts = str(pattern).split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = as_epath("/".join(parts[:first]))
    return sorted(str(p) for p in root.glob("/".join(parts[first:])))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    try:
        return as_epath(path).read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} does not exist") from err
    except Exception as err:
        raise PathError(f"reading {path} failed: {type(err).__name__}: {err}") from err


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str):
    return json.loads(read_bytes(path))


def bucket_of(path: str) -> str:
    """``gs://bucket`` of ``gs://bucket/a/b`` ('' for a local path)."""
    if not is_remote(path):
        return ""
    scheme, rest = str(path).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def check_bucket(path: str, what: str = "path") -> None:
    """Fails at once, naming ``path``, when its bucket does not exist or cannot be listed
    with these credentials (otherwise the first checkpoint write, hours later, would)."""
    bucket = bucket_of(path)
    if not bucket:
        return
    try:
        found = as_epath(bucket).exists()
    except Exception as err:  # permissions, network: gcsfs raises OSError and others
        raise PathError(f"{what} {path}: cannot reach bucket {bucket} ({err})") from err
    if not found:
        raise PathError(f"{what} {path}: bucket {bucket} does not exist (or is not visible)")


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` whole or not at all (locally a temporary name and a rename, per
    process; remotely one object upload). A failure names ``path``."""
    if is_remote(path):
        try:
            as_epath(path).write_bytes(data)
        except Exception as err:  # gcsfs names the request URL, not the gs:// path
            raise PathError(f"writing {path} failed: {type(err).__name__}: {err}") from err
        return
    makedirs(os.path.dirname(os.path.abspath(path)))
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(
        os.path.abspath(path)))  # fmt: skip
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def save_npz(path: str, **arrays) -> None:
    """``np.savez`` to ``path``, written whole (see :func:`write_bytes`)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def remove(path: str) -> None:
    """Deletes a file if it exists."""
    if not is_remote(path):
        if os.path.lexists(path):
            os.remove(path)
    elif as_epath(path).exists():
        as_epath(path).unlink()


def rmtree(path: str) -> None:
    """Deletes a directory tree if it exists."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    elif as_epath(path).exists():
        as_epath(path).rmtree()


def replace_dir(out: str, write: Callable[[str], None], marker: str) -> None:
    """(Re)writes the directory ``out`` with ``write(directory)``, whole or detectably not.

    Locally ``write`` fills a staging sibling that is then renamed into place (an existing
    ``out`` is swapped out only when the new one is complete). On an object store, where no
    rename is atomic, the old ``marker`` is deleted first, then the old contents, then
    ``write(out)`` writes the marker last: a reader that finds the marker finds a complete
    directory, and an interrupted write leaves one without it (refused when read).
    """
    if is_remote(out):
        remove(join(out, marker))
        rmtree(out)
        write(out)
        return
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write(staging)
        if os.path.exists(out):
            trash = f"{staging}.old"
            os.rename(out, trash)
            os.rename(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def local_copy(path: str) -> str:
    """A local file with ``path``'s bytes (``path`` itself when it is local)."""
    if not is_remote(path):
        return path
    handle, tmp = tempfile.mkstemp(prefix="ddb_jax_", suffix=f"_{basename(path)}")
    with os.fdopen(handle, "wb") as f:
        f.write(read_bytes(path))
    return tmp


def copy_file(source: str, target: str) -> None:
    write_bytes(target, read_bytes(source))
