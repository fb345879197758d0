"""Images of different sizes through one :class:`Predictor`, batched by size.

Only images of one size share a batch (padding would change what the border pixels see),
a partial batch runs at the next power of two (repeating its last image) so each size
compiles at most ``log2(batch) + 1`` programs, and every image is computed independently
of its batch mates: the batching never changes a prediction.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ddb_jax.inference.errors import InputError
from ddb_jax.inference.image_input import prepare
from ddb_jax.inference.predictor import Predictor

# (key, RGB image at its own size, network input); key: the caller's handle of the image.
Item = tuple[Any, np.ndarray, np.ndarray]
# (key, RGB image, train ids at the image's size).
Result = tuple[Any, np.ndarray, np.ndarray]


def _run_batch(predictor: Predictor, items: list[Item], batch_size: int) -> Iterator[Result]:
    """Runs one same-size batch, padded (repeating its last image) to a power of two or
    ``batch_size``: a few compiled programs per size, not one per partial batch length."""
    padded = min(1 << (len(items) - 1).bit_length(), batch_size)
    inputs = [item[2] for item in items]
    inputs += [inputs[-1]] * (padded - len(items))
    ids = predictor(np.stack(inputs), items[0][1].shape[:2])
    for (key, image, _), train_ids in zip(items, ids, strict=False):
        yield key, image, train_ids


def predict_stream(
    predictor: Predictor, items: Iterable[Item], batch_size: int = 1
) -> Iterator[Result]:
    """(key, image, train ids at the image's size) for every item, in batches of up to
    ``batch_size`` images of one size. Items wait in a bucket per size; when more than
    ``4 * batch_size`` wait, the bucket of the oldest runs as it is (memory stays bounded
    for folders of many sizes). Results come in completion order, not input order."""
    if batch_size < 1:
        raise InputError(f"--batch-size={batch_size}; use 1 or more")
    buckets: collections.OrderedDict[tuple, list[Item]] = collections.OrderedDict()
    waiting = 0
    for item in items:
        size = (item[1].shape[:2], item[2].shape[:2])
        buckets.setdefault(size, []).append(item)
        waiting += 1
        if len(buckets[size]) == batch_size:
            waiting -= batch_size
            yield from _run_batch(predictor, buckets.pop(size), batch_size)
        elif waiting > 4 * batch_size:
            _, oldest = buckets.popitem(last=False)
            waiting -= len(oldest)
            yield from _run_batch(predictor, oldest, batch_size)
    for bucket in buckets.values():
        yield from _run_batch(predictor, bucket, batch_size)


def predict_images(
    predictor: Predictor,
    images: Sequence[np.ndarray],
    scale: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> list[np.ndarray]:
    """Train ids of RGB uint8 images (in their order), each at its own size."""
    items = ((i, image, prepare(image, scale)) for i, image in enumerate(images))
    out: list[np.ndarray | None] = [None] * len(images)
    for i, _, train_ids in predict_stream(predictor, items, batch_size):
        out[i] = train_ids
    return out  # type: ignore[return-value]
