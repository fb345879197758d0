"""Inference on image files without labels: the evaluate stage's prediction, written as images.

The run that ties the inference modules together: files listed by
:mod:`~ddb_jax.inference.image_files`, read and resized by
:mod:`~ddb_jax.inference.image_input` in worker threads, predicted by a
:class:`~ddb_jax.inference.predictor.Predictor` in batches of one size
(:mod:`~ddb_jax.inference.batching`), written by an
:class:`~ddb_jax.inference.outputs.OutputLayout`. Kept apart so that the pieces stay
usable alone (the demo's pictures predict images already in memory) and the threading lives
in one place. A prediction is the evaluate stage's, pixel for pixel, at each image's size.
Each wait on a read or a write of a bucket is bounded by the storage deadline
(:mod:`ddb_jax.runtime.deadline`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

from ddb_jax.inference.batching import Item, predict_stream
from ddb_jax.inference.errors import ImageError
from ddb_jax.inference.image_files import ImageFile
from ddb_jax.inference.image_input import prepare, read_image
from ddb_jax.inference.outputs import OutputLayout
from ddb_jax.inference.predictor import Predictor
from ddb_jax.runtime import deadline


@dataclasses.dataclass
class Counts:
    """What a run did: images written, and one message per image it skipped."""

    written: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # one message per image


def _ahead(pool, fn, args: Iterable, depth: int) -> Iterator[tuple]:
    """``(a, pool.submit(fn, a))`` for each ``a``, at most ``depth`` ahead of the consumer."""
    pending: collections.deque = collections.deque()
    for arg in args:
        pending.append((arg, pool.submit(fn, arg)))
        if len(pending) >= depth:
            yield pending.popleft()
    yield from pending


def _written(future: concurrent.futures.Future, out: str) -> None:
    """Waits for a write (a failed one raises here, naming its file), under the storage
    deadline when ``out`` is a bucket."""
    with deadline.storage(out, "writing the predictions"):
        future.result()


def predict_files(
    predictor: Predictor,
    files: Sequence[ImageFile],
    layout: OutputLayout,
    scale: tuple[int, int] | None = None,
    batch_size: int = 1,
    strict: bool = False,
    workers: int = 4,
    on_skip: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Counts:
    """Predicts every file and writes its images (``layout``). Reading, decoding, resizing
    and PNG encoding run in ``workers`` threads around the device. A file that cannot be
    read or decoded is reported to ``on_skip`` and counted; with ``strict`` its
    :class:`ImageError` is raised instead. ``progress(n)``: n more images done."""
    layout.check_names(files)
    counts = Counts()
    progress = progress or (lambda n: None)

    def load(image_file: ImageFile):
        try:
            image = read_image(image_file.path)
        except ImageError as err:
            return image_file, err, None
        return image_file, image, prepare(image, scale)

    def save(result) -> None:
        image_file, image, train_ids = result
        layout.write(image_file.name, image, train_ids)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

        def loaded() -> Iterator[Item]:
            for image_file, future in _ahead(pool, load, files, depth=2 * batch_size + workers):
                with deadline.storage(image_file.path, "reading the image"):
                    image_file, image, prepared = future.result()
                if isinstance(image, ImageError):
                    if strict:
                        raise image
                    counts.skipped.append(str(image))
                    if on_skip:
                        on_skip(str(image))
                    progress(1)
                    continue
                yield image_file, image, prepared

        writes: collections.deque = collections.deque()
        for result in predict_stream(predictor, loaded(), batch_size):
            writes.append(pool.submit(save, result))
            while writes and (writes[0].done() or len(writes) > 2 * workers):
                _written(writes.popleft(), layout.out)
                counts.written += 1
                progress(1)
        for future in writes:
            _written(future, layout.out)
            counts.written += 1
            progress(1)
    return counts
