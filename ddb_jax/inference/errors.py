"""The two errors of inference, one of each of :mod:`ddb_jax.errors`' kinds.

Shared by every inference module (listing, decoding, the model, the outputs) so that the
tool tells them apart by class: a command line to change (exit 2) or one bad image (named,
skipped or, with ``--strict``, exit 1).
"""

from __future__ import annotations

from ddb_jax import errors


class InputError(errors.UsageError, ValueError):
    """The command line names something unusable (no such file, no images, a name clash)."""


class ImageError(errors.InputError, ValueError):
    """One image file cannot be read or decoded; the message names it."""
