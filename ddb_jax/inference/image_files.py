"""Which files a run predicts: the command line's files, folders and patterns -> images.

Kept apart from reading them: listing touches no image, so a run can refuse a bad input
(nothing matched, two inputs with one output name) before any work. Each image gets its
output name here (the path below the folder it was found in), which the outputs keep.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from ddb_jax import paths
from ddb_jax.inference.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An input image and its output name: the path below the folder it was found in (for a
    folder argument), else its file name; without the extension."""

    path: str
    name: str


def is_pattern(argument: str) -> bool:
    """Whether an input argument is a glob pattern (``*``, ``?``, ``[``) to expand."""
    return any(c in argument for c in "*?[")


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _strip_extension(name: str) -> str:
    return os.path.splitext(name)[0]


def _relative(path: str, folder: str) -> str:
    return str(path)[len(str(folder).rstrip("/")) + 1 :]


def _from_folder(folder: str) -> list[ImageFile]:
    return [
        ImageFile(p, _strip_extension(_relative(p, folder)).replace(os.sep, "/"))
        for p in paths.find_files(folder)
        if _is_image_name(p)
    ]


def list_images(inputs: Sequence[str]) -> list[ImageFile]:
    """The images named by ``inputs``: files (taken whatever their extension), folders
    (searched recursively for IMAGE_EXTENSIONS) and glob patterns (``*``, ``?``, ``[``;
    matching folders are searched, matching files kept when they have an image extension).

    Raises :class:`InputError` for an argument that names nothing, a folder or pattern
    without images, or two inputs that would write the same output name.
    """
    files: list[ImageFile] = []
    for argument in inputs:
        if is_pattern(argument):
            found = []
            for match in paths.glob(argument):
                if paths.isdir(match):
                    found += _from_folder(match)
                elif _is_image_name(match):
                    found.append(ImageFile(match, _strip_extension(paths.basename(match))))
            if not found:
                raise InputError(f"{argument}: the pattern matches no image files")
        elif paths.isdir(argument):
            found = _from_folder(argument)
            if not found:
                raise InputError(f"{argument}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)}")
        elif paths.isfile(argument):
            found = [ImageFile(argument, _strip_extension(paths.basename(argument)))]
        else:
            raise InputError(f"{argument}: no such file or folder")
        files += found
    seen: dict[str, str] = {}
    listed: set[str] = set()
    unique = []
    for image in files:
        if paths.resolve(image.path) in listed:
            continue  # the same file named twice (e.g. a file and its folder): once
        listed.add(paths.resolve(image.path))
        if image.name in seen:
            raise InputError(
                f"{seen[image.name]} and {image.path} would both be written as {image.name}; "
                "pass their folders instead (outputs keep the path below the folder)"
            )
        seen[image.name] = image.path
        unique.append(image)
    return unique
