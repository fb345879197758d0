"""Where a run's outputs go: the files of each image, and a check of the folder first.

The layout (colour, overlay, train-id and, for the Cityscapes benchmark server, label-id
PNGs) is decided here once, and so is what makes an output folder unusable: one the run
cannot write, a bucket that does not exist, or one its own inputs reach (a later run on
the same inputs would read the predictions as images). Both are refused before any work.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

from ddb_jax import paths
from ddb_jax.inference import label_images
from ddb_jax.inference.errors import InputError
from ddb_jax.inference.image_files import ImageFile, is_pattern

# A Cityscapes image name: <city>_<sequence>_<frame>_leftImg8bit (the server's key).
CITYSCAPES_NAME = re.compile(r"^([a-z_]+)_(\d{6})_(\d{6})_leftImg8bit$")
# The folders a run writes below its output folder, one per kind of file.
FOLDERS = ("color", "overlay", "trainIds", "labelIds")


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """``out/color/NAME.png`` (Cityscapes palette, or ``label_set``'s: a name of
    :mod:`ddb_jax.label_sets`), ``out/overlay/NAME.png`` (colours over
    the image), ``out/trainIds/NAME.png`` (train ids, 255 = none); with ``cityscapes``,
    ``out/labelIds/CITY/NAME.png``: label ids, one file per test image named after it, the
    files the Cityscapes benchmark server takes (zip the labelIds folder alone: the server
    matches ``<city>_<seq>_<frame>*.png`` anywhere in the archive, and the colour files
    would match too)."""

    out: str
    cityscapes: bool = False
    alpha: float = 0.5
    label_set: str = ""

    def color(self, name: str) -> str:
        return paths.join(self.out, "color", f"{name}.png")

    def overlay(self, name: str) -> str:
        return paths.join(self.out, "overlay", f"{name}.png")

    def train_ids(self, name: str) -> str:
        return paths.join(self.out, "trainIds", f"{name}.png")

    def label_ids(self, name: str) -> str:
        stem = name.rsplit("/", 1)[-1]
        return paths.join(self.out, "labelIds", cityscapes_city(stem), f"{stem}.png")

    def check_names(self, files: Sequence[ImageFile]) -> None:
        """Refuses, before any work, names the chosen format cannot hold."""
        if not self.cityscapes:
            return
        bad = [f.path for f in files if not CITYSCAPES_NAME.match(f.name.rsplit("/", 1)[-1])]
        if bad:
            raise InputError(
                f"{bad[0]}: --format cityscapes needs Cityscapes image names "
                f"(<city>_<seq>_<frame>_leftImg8bit.png); {len(bad)} file(s) do not match"
            )
        stems = collections.Counter(f.name.rsplit("/", 1)[-1] for f in files)
        twice = [s for s, n in stems.items() if n > 1]
        if twice:
            raise InputError(f"{twice[0]}: given twice; the server takes one file per image")

    def check_location(self, inputs: Sequence[str]) -> None:
        """Refuses, before any work, an output folder that ``inputs`` (the command line's
        files, folders and patterns) reach (:class:`InputError`), one that cannot be created
        and written, or a ``gs://`` one whose bucket does not exist
        (:class:`ddb_jax.paths.PathError`, naming it)."""
        for argument in inputs:
            for folder in FOLDERS:
                _refuse_overlap(argument, paths.join(self.out, folder), self.out)
        if paths.is_remote(self.out):
            paths.check_bucket(self.out, "--out")
        else:
            _check_writable(self.out)

    def write(self, name: str, image: np.ndarray, train_ids: np.ndarray) -> None:
        colour = label_images.colorize(train_ids, self.label_set)
        label_images.write_png(self.color(name), colour)
        blended = label_images.overlay(image, train_ids, self.alpha, self.label_set)
        label_images.write_png(self.overlay(name), blended)
        label_images.write_png(self.train_ids(name), train_ids)
        if self.cityscapes:
            label_images.write_png(self.label_ids(name), label_images.to_cityscapes_ids(train_ids))


def cityscapes_city(stem: str) -> str:
    """The city of a Cityscapes image name (``berlin_000000_000019_leftImg8bit``)."""
    match = CITYSCAPES_NAME.match(stem)
    if not match:
        raise InputError(f"{stem}: not a Cityscapes image name")
    return match.group(1)


def _components(path: str) -> list[str]:
    """The components of a URL, or of an absolute local path with its links resolved (an
    output folder reached through a link is still inside the input)."""
    if paths.is_remote(path):
        return str(path).rstrip("/").split("/")
    return os.path.realpath(path).rstrip(os.sep).split(os.sep)


def _refuse_overlap(argument: str, folder: str, out: str) -> None:
    """Refuses an input argument and an output ``folder`` of which one holds the other:
    a folder argument (searched recursively) holding ``folder``, an input that is ``folder``
    or lies in it (the run would overwrite what it reads), or a pattern that matches
    ``folder``, a folder above it or files below it (compared component by component, as
    the glob expands it: a pattern has a fixed depth)."""
    given, written = _components(argument), _components(folder)
    depth = min(len(given), len(written))
    if is_pattern(argument):
        if all(fnmatch.fnmatchcase(written[i], given[i]) for i in range(depth)):
            raise InputError(
                f"--out {out}: the input pattern {argument} reaches its output folder "
                f"{folder}, so a run would read its own outputs; choose an --out outside "
                "what the inputs match"
            )
    elif given[:depth] == written[:depth]:
        if len(given) >= len(written):
            raise InputError(
                f"{argument}: the input lies in the output folder {folder}, which the run "
                "overwrites; choose another --out"
            )
        if paths.isdir(argument):  # below a file, the write probe names the problem
            raise InputError(
                f"--out {out} is inside the input folder {argument}: a later run on it would "
                "read these outputs as images; choose an --out outside it"
            )


def _check_writable(out: str) -> None:
    """Creates the local folder ``out``, writes and deletes a file in it, then removes the
    folders it created (a run refused later leaves nothing behind). A failure is a
    :class:`ddb_jax.paths.PathError` naming ``out``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise paths.PathError(f"--out {out}: exists and is not a folder")
    created = []
    folder = os.path.abspath(out)
    while not os.path.lexists(folder):
        created.append(folder)  # deepest first
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        where = f": {err.filename}" if err.filename and err.filename != out else ""
        raise paths.PathError(
            f"--out {out}: cannot be created or written ({err.strerror or err}{where})"
        ) from None
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break  # not created after all, or no longer empty: leave it and those above
