"""Evaluation input: one dataset per target, whole images, labels at their stored size.

Images are resized keep-ratio to the dataset's eval scale (Cityscapes and Mapillary's
half-size copy: (1024, 512), as the reference test pipelines); the scale comes from
``datasets.DATASETS`` and can be overridden per name with ``config.data.resize_scales``.
The toy domains have no scale and keep their size. Labels are never resized: the model's
prediction is resized to the label (the reference's 2048x1024 for Cityscapes).

On several hosts, host ``p`` of ``P`` reads files ``p, p+P, ...``: every file exactly once
over all hosts, and the summed confusion matrices equal one host's over the whole set.
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline import datasets, transforms


def make_eval_dataset(
    data_cfg, name: str, split: str = "val", process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
    """Batches of one: {'image' (1,H,W,3) f32 normalised, 'label' (1,H0,W0) i32, 'name'}.

    ``process_index``/``process_count`` select this host's slice (files p, p+P, ...).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in 0..{process_count - 1}")
    files = datasets.with_scale_overrides(
        datasets.list_files(
            data_cfg.root, name, split, with_labels=True, label_set=data_cfg.get("label_set", "")
        ),
        data_cfg.get("resize_scales", None),
    )
    scale = tf.constant(files.scale or (0, 0), tf.int32)
    is_jpeg = [p.lower().endswith((".jpg", ".jpeg")) for p in files.images]

    def load(image_path, label_path, jpeg):
        image = transforms.read_image(image_path, jpeg)
        label = transforms.read_label(label_path)
        image, label = transforms.assert_same_size(image, label, image_path, label_path)
        resized, _ = transforms.resize_pair(image, None, scale, tf.constant(0))
        base = tf.strings.split(image_path, "/")[-1]
        return {
            "image": transforms.normalize(resized),
            "label": tf.cast(label, tf.int32),
            "name": base,
        }

    ds = tf.data.Dataset.from_tensor_slices((list(files.images), list(files.labels), is_jpeg))
    if process_count > 1:
        ds = ds.shard(process_count, process_index)
    parallel = data_cfg.num_parallel_calls
    ds = ds.map(transforms.plain(load), num_parallel_calls=parallel, deterministic=True)
    return transforms.finish(ds.batch(1))
