"""Class statistics for rare class sampling (RCS), in DAFormer's file format.

The converters write, next to each dataset:
- ``sample_class_stats.json``: a list of ``{"<train id>": pixels, ..., "file": label path}``;
- ``sample_class_stats_dict.json``: the same keyed by file;
- ``samples_with_class.json``: ``{"<train id>": [[label path, pixels], ...]}``.
Files written by the reference tools load unchanged: files are matched by base name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ddb_jax import paths
from ddb_jax.labels import IGNORE_LABEL as IGNORE

STATS_FILE = "sample_class_stats.json"
STATS_DICT_FILE = "sample_class_stats_dict.json"
SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"


def class_pixel_counts(train_ids: np.ndarray) -> dict[int, int]:
    """Pixels per train id present in a label (ignore excluded)."""
    counts = np.bincount(train_ids.reshape(-1), minlength=256)
    return {int(c): int(n) for c, n in enumerate(counts) if n > 0 and c != IGNORE}


def write_class_stats(out_dir: str, stats: Sequence[tuple[str, Mapping[int, int]]]) -> None:
    """Writes the three DAFormer stats files from ``(label file, {class: pixels})`` pairs."""
    listed = [{**{str(c): n for c, n in counts.items()}, "file": f} for f, counts in stats]
    by_file = {f: {str(c): n for c, n in counts.items()} for f, counts in stats}
    with_class: dict[str, list[list]] = {}
    for f, counts in stats:
        for c, n in counts.items():
            with_class.setdefault(str(c), []).append([f, n])
    for name, payload in (
        (STATS_FILE, listed),
        (STATS_DICT_FILE, by_file),
        (SAMPLES_WITH_CLASS_FILE, with_class),
    ):
        paths.write_json(paths.join(out_dir, name), payload)


def _load_json(path: str):
    if not paths.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: rare class sampling needs the class statistics that the dataset "
            "converter writes (tools/convert_datasets/*.py, see data/README.md)"
        )
    return paths.read_json(path)


def load_class_stats(dataset_dirs: Iterable[str]) -> list[dict[int, int]]:
    """Per-image class pixel counts of one or several datasets (``file`` key dropped)."""
    stats = []
    for d in dataset_dirs:
        for entry in _load_json(paths.join(d, STATS_FILE)):
            stats.append({int(c): int(n) for c, n in entry.items() if c != "file"})
    return stats


def class_probabilities(
    stats: Sequence[Mapping[int, int]], temperature: float
) -> tuple[list[int], np.ndarray]:
    """DAFormer's RCS distribution: ``softmax((1 - freq) / T)`` over the classes present.

    ``freq`` is each class's share of all labelled pixels. Classes are returned in order
    of increasing pixel count, as the reference does.
    """
    totals: dict[int, int] = {}
    for counts in stats:
        for c, n in counts.items():
            totals[c] = totals.get(c, 0) + n
    classes = sorted(totals, key=lambda c: totals[c])
    freq = np.array([totals[c] for c in classes], np.float64)
    freq /= freq.sum()
    logits = (1.0 - freq) / temperature
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum()


def samples_with_class(
    dataset_dirs: Iterable[str], classes: Sequence[int], min_pixels: int
) -> dict[int, list[str]]:
    """Label base names per class, keeping images with more than ``min_pixels`` of it."""
    dataset_dirs = list(dataset_dirs)
    result: dict[int, list[str]] = {c: [] for c in classes}
    for d in dataset_dirs:
        path = paths.join(d, SAMPLES_WITH_CLASS_FILE)
        for c, entries in _load_json(path).items():
            if int(c) in result:
                result[int(c)] += [paths.basename(f) for f, n in entries if n > min_pixels]
    empty = [c for c, files in result.items() if not files]
    if empty:
        raise ValueError(
            f"rare class sampling: classes {empty} have no image with more than {min_pixels} "
            f"pixels in {list(dataset_dirs)}; lower rcs_min_pixels"
        )
    return result
