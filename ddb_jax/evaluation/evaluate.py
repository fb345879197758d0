"""Inference (whole image, sliding window, flip) and confusion-matrix mIoU, as mmseg computes them.

mmseg semantics kept: logits are resized to the network input, softmaxed, flip
predictions averaged as probabilities, then resized to the label's size; IoU of a
class absent from both prediction and label is NaN and left out of the mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddb_jax import labels
from ddb_jax.labels import CITYSCAPES_CLASSES, IGNORE_LABEL
from ddb_jax.ops import resize_bilinear, resize_bilinear_corners

# whole | slide (mmseg) | whole_corners (ADVENT's family: see predict_probabilities)
EVAL_MODES = ("whole", "slide", "whole_corners")

# Forward pass: normalised NHWC images -> logits at the head's stride.
LogitsFn = Callable[[jax.Array], jax.Array]


def confusion_matrix(
    predictions: jax.Array, labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_LABEL
) -> jax.Array:
    """(num_classes, num_classes) counts, rows = label, columns = prediction; ignore skipped."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
    counts = jnp.bincount(
        index, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes * num_classes
    )
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """Per-class IoU/accuracy, mIoU and overall accuracy (mmseg: NaN classes excluded)."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    label_area = confusion.sum(axis=1)
    pred_area = confusion.sum(axis=0)
    union = label_area + pred_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        acc = intersection / label_area
    total = confusion.sum()
    return {
        "iou": iou,
        "acc": acc,
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "macc": float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan"),
        "aacc": float(intersection.sum() / total) if total else float("nan"),
    }


def merge_confusion(confusion: np.ndarray, group_of, num_groups: int) -> np.ndarray:
    """The confusion matrix of groups of classes: entry (a, b) sums every (label, prediction)
    pair whose label is in group a and whose prediction is in group b."""
    confusion = np.asarray(confusion, np.int64)
    onehot = np.zeros((len(group_of), num_groups), np.int64)
    onehot[np.arange(len(group_of)), np.asarray(group_of)] = 1
    return onehot.T @ confusion @ onehot


def protocol_scores(confusion: np.ndarray, names) -> dict[str, dict[str, Any]]:
    """The extra mIoUs ``names`` (:data:`ddb_jax.labels.MIOU_PROTOCOLS`) of one 19-class
    confusion matrix, JSON-friendly: ``{name: {'title', 'miou', 'iou': {group: IoU}}}`` with the
    IoU of every averaged group (NaN: a group absent from labels and predictions, left out of
    the mean as mmseg does)."""
    confusion = np.asarray(confusion)
    out = {}
    for name in names:
        protocol = labels.miou_protocol(name)
        if confusion.shape[0] != len(protocol.group_of):
            raise ValueError(
                f"config.eval.miou_protocols={name!r} needs the {len(protocol.group_of)} "
                f"Cityscapes classes; this confusion matrix has {confusion.shape[0]}"
            )
        merged = merge_confusion(confusion, protocol.group_of, len(protocol.group_names))
        iou = iou_from_confusion(merged)["iou"][list(protocol.averaged)]
        out[name] = {
            "title": protocol.title,
            "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
            "iou": {
                protocol.group_names[g]: float(v)
                for g, v in zip(protocol.averaged, iou, strict=True)
            },
        }
    return out


def protocol_scalars(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{'<target>/<protocol>': mIoU}`` of :func:`ddb_jax.evaluation.eval_stage.evaluate_targets`'
    results: what a training stage adds to its TensorBoard scalars and result.json."""
    return {
        f"{target}/{name}": score["miou"]
        for target, result in results.items()
        for name, score in result.get("protocols", {}).items()
    }


def logits_whole(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
    """Logits at input size from one forward pass over the whole image."""
    return resize_bilinear(logits_fn(images).astype(jnp.float32), images.shape[1:3])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg slide_inference window origins along one axis (last window flush with the edge)."""
    crop = min(crop, size)
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(count)})


def logits_slide(
    logits_fn: LogitsFn, images: jax.Array, crop: tuple[int, int], stride: tuple[int, int]
) -> jax.Array:
    """mmseg slide inference: overlapping windows (run as one batch), logits averaged."""
    n, h, w, _ = images.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    origins = [
        (y, x) for y in window_starts(h, ch, stride[0]) for x in window_starts(w, cw, stride[1])
    ]
    windows = jnp.concatenate([images[:, y : y + ch, x : x + cw] for y, x in origins], axis=0)
    window_logits = resize_bilinear(logits_fn(windows).astype(jnp.float32), (ch, cw))
    total = jnp.zeros((n, h, w, window_logits.shape[-1]), jnp.float32)
    count = jnp.zeros((1, h, w, 1), jnp.float32)
    for i, (y, x) in enumerate(origins):
        total = total.at[:, y : y + ch, x : x + cw].add(window_logits[i * n : (i + 1) * n])
        count = count.at[:, y : y + ch, x : x + cw].add(1.0)
    return total / count


def predict_probabilities(
    logits_fn: LogitsFn,
    images: jax.Array,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    flip: bool = False,
) -> jax.Array:
    """Class probabilities at ``out_size`` (the label's size), optionally flip-averaged.

    As mmseg: logits resized to the label size, softmax, then the flipped pass's
    probabilities (flipped back) averaged in. ``mode`` 'whole_corners' is ADVENT's
    evaluation: the logits of the whole image upsampled straight to the label's size with
    align_corners=True (mmseg's 'whole' goes through the input's size, corners not aligned).
    """
    if mode == "whole_corners":
        infer = lambda x: jax.nn.softmax(
            resize_bilinear_corners(logits_fn(x).astype(jnp.float32), out_size), axis=-1
        )
        probs = infer(images)
        if flip:
            probs = 0.5 * (probs + infer(images[:, :, ::-1])[:, :, ::-1])
        return probs
    if mode == "whole":
        base = lambda x: logits_whole(logits_fn, x)
    elif mode == "slide":
        base = lambda x: logits_slide(logits_fn, x, crop, stride)
    else:
        raise ValueError(f"config.eval.mode={mode!r}; use one of {list(EVAL_MODES)}")
    infer = lambda x: jax.nn.softmax(resize_bilinear(base(x), out_size), axis=-1)
    probs = infer(images)
    if flip:
        probs = 0.5 * (probs + infer(images[:, :, ::-1])[:, :, ::-1])
    return probs


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "mode", "crop", "stride", "flip", "num_classes")
)
def batch_prediction(
    variables, images, labels, *, apply_fn, mode, crop, stride, flip, num_classes
) -> tuple[jax.Array, jax.Array]:
    """(predicted train ids at the label's size, confusion matrix) of one batch."""
    logits_fn = lambda x: apply_fn(variables, x, train=False)["logits"]
    probs = predict_probabilities(logits_fn, images, labels.shape[1:3], mode, crop, stride, flip)
    prediction = jnp.argmax(probs, axis=-1)
    return prediction, confusion_matrix(prediction, labels, num_classes)


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "mode", "crop", "stride", "flip", "num_classes")
)
def batch_confusion(
    variables, images, labels, *, apply_fn, mode, crop, stride, flip, num_classes
) -> jax.Array:
    """Confusion matrix of one batch (the prediction stays on the device); jitted once per
    model and batch shape, across calls."""
    static = dict(apply_fn=apply_fn, mode=mode, crop=crop, stride=stride, flip=flip,
                  num_classes=num_classes)  # fmt: skip
    return batch_prediction(variables, images, labels, **static)[1]


def evaluate(
    apply_fn: Callable,
    variables: Mapping,
    batches: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    mode: str = "whole",
    crop=(512, 512),
    stride=(341, 341),
    flip: bool = False,
    on_prediction: Callable[[Mapping[str, np.ndarray], np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Accumulates the confusion matrix over ``batches`` ({'image', 'label'}) and scores it.

    ``on_prediction(batch, prediction)`` receives each batch's predicted train ids (at the
    label's size), e.g. to write them as images.
    """
    static = dict(
        apply_fn=apply_fn, mode=mode, crop=tuple(crop), stride=tuple(stride), flip=flip,
        num_classes=num_classes,
    )  # fmt: skip
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for batch in batches:
        if on_prediction is None:
            counts = batch_confusion(variables, batch["image"], batch["label"], **static)
        else:
            prediction, counts = batch_prediction(
                variables, batch["image"], batch["label"], **static
            )
            on_prediction(batch, np.asarray(prediction))
        confusion += np.asarray(counts)
    result = iou_from_confusion(confusion)
    result["confusion"] = confusion
    return result


def format_iou_table(result: Mapping[str, Any], class_names=CITYSCAPES_CLASSES, title="") -> str:
    """A markdown per-class IoU/Acc table (percent), mmseg-style, with the summary row; then a
    row per extra mIoU (``result['protocols']``) and a table per protocol of merged groups."""
    lines = [f"### {title}" if title else "", "| class | IoU | Acc |", "|---|---|---|"]
    for name, iou, acc in zip(class_names, result["iou"], result["acc"], strict=False):
        lines.append(f"| {name} | {100 * iou:.2f} | {100 * acc:.2f} |")
    lines.append(f"| **mean** | **{100 * result['miou']:.2f}** | {100 * result['macc']:.2f} |")
    protocols = result.get("protocols", {})
    for name, score in protocols.items():
        lines.append(f"| **{score['title']}** ({name}) | **{100 * score['miou']:.2f}** | |")
    lines.append(f"\naAcc {100 * result['aacc']:.2f}")
    for name, score in protocols.items():
        if labels.miou_protocol(name).group_names == tuple(class_names):
            continue  # a class subset: its IoUs are the rows above
        lines += ["", f"| {name} | IoU |", "|---|---|"]
        lines += [f"| {group} | {100 * iou:.2f} |" for group, iou in score["iou"].items()]
    return "\n".join(line for line in lines if line is not None).strip()
