"""Training streams: determinism, host sharding, multi-source, RCS, target-only, eval, mesh."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import evaluation, rcs, sharding, train, transforms
from tests.support import (
    data_config,
    identities,
    save_gray,
    save_rgb,
    write_cityscapes,
    write_identity_gta,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_identity_gta(str(root))
    write_cityscapes(str(root), n=3)
    return root


def _first(ds, n=1):
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


def test_batches_have_the_contract_types_and_values(root):
    (batch,) = _first(train.make_train_dataset(data_config(root), 4, seed=0))
    assert batch["source_image"].shape == (4, 16, 16, 3)
    assert batch["source_image"].dtype == np.uint8  # normalised on the device
    np.testing.assert_array_equal(batch["source_image_size"], np.full((4, 2), 16, np.int32))
    assert batch["source_label"].dtype == np.uint8 and batch["source_label"].shape == (4, 16, 16)
    assert set(np.unique(batch["source_label"])) <= {0, 1}
    # Red channel = 50 * label in every source image: image and label stay aligned.
    np.testing.assert_array_equal(batch["source_image"][..., 0], 50 * batch["source_label"])
    assert batch["target_image"].shape == (4, 16, 16, 3)
    assert batch["target_image_size"].dtype == np.int32
    (normalised,) = _first(
        train.make_train_dataset(data_config(root, image_transfer="float32"), 4, seed=0)
    )
    assert normalised["source_image"].dtype == np.float32 and "source_image_size" not in normalised
    assert normalised["source_label"].dtype == np.int32
    np.testing.assert_array_equal(normalised["source_label"], batch["source_label"])
    red = np.round(normalised["source_image"][..., 0] * 58.395 + 123.675)
    np.testing.assert_array_equal(red, 50 * normalised["source_label"])


def test_same_seed_same_stream_other_seed_differs(root):
    a = _first(train.make_train_dataset(data_config(root), 2, seed=3), 3)
    b = _first(train.make_train_dataset(data_config(root), 2, seed=3), 3)
    c = _first(train.make_train_dataset(data_config(root), 2, seed=4), 3)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(
        not np.array_equal(x["target_image"], z["target_image"]) for x, z in zip(a, c, strict=True)
    )


def test_each_epoch_is_a_permutation_and_hosts_take_disjoint_slices(root):
    cfg = data_config(root, cat_max_ratio=1.0)
    (whole,) = _first(train.make_train_dataset(cfg, 8, seed=1))
    assert sorted(identities(whole["source_image"])) == list(range(8))  # one epoch, all files
    hosts = [
        _first(train.make_train_dataset(cfg, 4, seed=1, process_index=p, process_count=2))[0]
        for p in range(2)
    ]
    for p, batch in enumerate(hosts):
        for k in batch:  # host p holds the p-th contiguous block of the global batch
            np.testing.assert_array_equal(batch[k], whole[k][4 * p : 4 * (p + 1)])
    assert not set(identities(hosts[0]["source_image"])) & set(identities(hosts[1]["source_image"]))


def test_multi_source_is_the_concatenation(root, tmp_path):
    write_identity_gta(str(tmp_path), n=3, name="gta")
    write_identity_gta(str(tmp_path), n=2, name="synthia_like", offset=10)
    syn = tmp_path / "synscapes"
    for i, f in enumerate(sorted(os.listdir(tmp_path / "synthia_like" / "images"))):
        os.renames(tmp_path / "synthia_like" / "images" / f, syn / "img" / "rgb" / f"{i}.png")
        os.renames(
            tmp_path / "synthia_like" / "labels" / f.replace(".png", "_labelTrainIds.png"),
            syn / "img" / "class" / f"{i}_gt_labelTrainIds.png",
        )
    write_cityscapes(str(tmp_path), n=2)
    cfg = data_config(tmp_path, source=("gta", "synscapes"), cat_max_ratio=1.0)
    (batch,) = _first(train.make_train_dataset(cfg, 5, seed=0))
    assert sorted(identities(batch["source_image"])) == [0, 1, 2, 10, 11]


def test_per_target_streams_keep_each_target_apart(root, tmp_path):
    """One stream per target (batch keys 'target_image_<name>'), each from its own files;
    the default keeps DDB's one stream over the union."""
    write_identity_gta(str(tmp_path), n=3, name="gta")
    write_identity_gta(str(tmp_path), n=2, name="synthia_like", offset=10)
    syn = tmp_path / "synscapes"
    for i, f in enumerate(sorted(os.listdir(tmp_path / "synthia_like" / "images"))):
        os.renames(tmp_path / "synthia_like" / "images" / f, syn / "img" / "rgb" / f"{i}.png")
    cfg = data_config(tmp_path, target=("gta", "synscapes"), cat_max_ratio=1.0)
    cfg.source = ("gta",)
    union = _first(train.make_train_dataset(cfg, 6, seed=0), 4)
    assert set(union[0]) == {"source_image", "source_label", "target_image",
                             "source_image_size", "target_image_size"}  # fmt: skip
    seen = {i for b in union for i in identities(b["target_image"])}
    assert seen & {0, 1, 2} and seen & {10, 11}  # drawn from both targets' files
    cfg.per_target_streams = True
    assert train.target_stream_keys(cfg) == ("target_image_gta", "target_image_synscapes")
    apart = _first(train.make_train_dataset(cfg, 6, seed=0), 4)
    images = ("source_image", *train.target_stream_keys(cfg))
    assert set(apart[0]) == {"source_label", *images, *(f"{k}_size" for k in images)}
    assert {i for b in apart for i in identities(b["target_image_gta"])} <= {0, 1, 2}
    assert {i for b in apart for i in identities(b["target_image_synscapes"])} == {10, 11}
    for a, b in zip(union, apart, strict=True):  # the source stream does not move
        np.testing.assert_array_equal(a["source_image"], b["source_image"])


def _write_rcs_stats(d, counts_per_file):
    stats = [(f"labels/{f}_labelTrainIds.png", c) for f, c in counts_per_file.items()]
    rcs.write_class_stats(d, stats)


def test_rcs_class_frequencies_follow_the_softmax(root, tmp_path):
    d = write_identity_gta(str(tmp_path), n=4)
    write_cityscapes(str(tmp_path), n=1)
    counts = {
        "00000": {0: 900, 1: 50},
        "00001": {0: 800, 2: 40},
        "00002": {1: 60},
        "00003": {2: 30},
    }
    _write_rcs_stats(d, counts)
    cfg = data_config(tmp_path, rare_class_sampling=True, rcs_temperature=0.3, rcs_min_pixels=35)
    files = train._list(cfg, cfg.source, True)
    sampler = train._RareClassSampler(cfg, files)
    totals = np.array([1700, 110, 70], np.float64)  # classes 0, 1, 2
    expected = np.exp((1 - totals / totals.sum()) / 0.3)
    expected /= expected.sum()
    assert sampler.classes == [2, 1, 0]
    np.testing.assert_allclose(sampler.probs, expected[::-1], rtol=1e-9)

    n = 3000
    draws = tf.data.Dataset.range(n).map(
        lambda k: sampler.sample(transforms.fold_seed(tf.constant([0, 9], tf.int64), k))
    )
    files_drawn, classes_drawn = map(np.array, zip(*draws.as_numpy_iterator(), strict=True))
    for c, p in zip([0, 1, 2], expected, strict=True):
        freq = np.mean(classes_drawn == c)
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (c, freq, p)
    # Only files with more than rcs_min_pixels of the class: class 2 -> file 1 (40 > 35).
    assert set(files_drawn[classes_drawn == 2]) == {1}
    assert set(files_drawn[classes_drawn == 1]) == {0, 2}


def test_rcs_recrops_until_the_class_is_in_the_crop(tmp_path):
    d = os.path.join(tmp_path, "gta")
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 2
    label[:8, :8] = 6  # the rare class, in one corner: a random 24x24 crop holds > 20
    save_rgb(f"{d}/images/00000.png", np.zeros((32, 32, 3)))  # of it with p = 26/81
    save_gray(f"{d}/labels/00000_labelTrainIds.png", label)
    rcs.write_class_stats(d, [("labels/00000_labelTrainIds.png", {0: 448, 2: 512, 6: 64})])
    write_cityscapes(str(tmp_path), n=1)
    cfg = data_config(
        tmp_path,
        crop_size=(24, 24),
        rare_class_sampling=True,
        rcs_temperature=0.01,
        rcs_min_pixels=40,
        rcs_min_crop_ratio=0.5,
        cat_max_ratio=1.0,
    )
    (batch,) = _first(train.make_train_dataset(cfg, 32, seed=0))
    with_recrop = np.sum((batch["source_label"] == 6).sum((1, 2)) > 20)
    cfg.rcs_min_crop_ratio = 0.0
    (plain,) = _first(train.make_train_dataset(cfg, 32, seed=0))
    without = np.sum((plain["source_label"] == 6).sum((1, 2)) > 20)
    # Expected 32 * (1 - (55/81)^11) = 31.6 vs 32 * 26/81 = 10.3.
    assert with_recrop >= 29 and without <= 17, (with_recrop, without)


def test_missing_rcs_stats_names_the_file(root, tmp_path):
    write_identity_gta(str(tmp_path), n=2)
    write_cityscapes(str(tmp_path), n=1)
    with pytest.raises(FileNotFoundError, match="gta/sample_class_stats.json"):
        train.make_train_dataset(data_config(tmp_path, rare_class_sampling=True), 2, 0)


def test_target_train_dataset_epochs_are_permutations(root):
    cfg = data_config(root, target=("gta",), crop_size=(16, 16))
    batches = list(
        train.make_target_train_dataset(cfg, 4, seed=0, num_epochs=2).as_numpy_iterator()
    )
    assert len(batches) == 4
    ids = [i for b in batches for i in identities(b["image"])]
    assert sorted(ids[:8]) == list(range(8)) and sorted(ids[8:]) == list(range(8))
    halves = [
        list(train.make_target_train_dataset(cfg, 2, 0, p, 2, num_epochs=1).as_numpy_iterator())
        for p in range(2)
    ]
    seen = [i for h in halves for b in h for i in identities(b["image"])]
    assert sorted(seen) == list(range(8))


def test_eval_dataset_resizes_image_keeps_label(root):
    cfg = data_config(root, resize_scales={"cityscapes": (16, 8)})
    items = list(evaluation.make_eval_dataset(cfg, "cityscapes", "val").as_numpy_iterator())
    assert len(items) == 3
    first = items[0]
    assert first["image"].shape == (1, 8, 16, 3) and first["label"].shape == (1, 16, 32)
    assert first["name"][0] == b"valcity_000000_000019_leftImg8bit.png"
    assert first["label"][0, 0, 0] == 255 and first["label"][0, -1, -1] == 13
    # Red channel of the top rows encodes label 10 (sky) -> 100 after resizing.
    np.testing.assert_allclose(first["image"][0, 1, 4, 0] * 58.395 + 123.675, 100, atol=0.5)


def test_to_global_shards_the_batch_axis():
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": len(jax.devices())} and len(jax.devices()) == 8
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "name": np.array(["a"] * 8)}
    out = sharding.to_global(batch, mesh)
    assert out["x"].shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    shards = sorted(out["x"].addressable_shards, key=lambda s: s.index[0].start)
    np.testing.assert_array_equal(shards[3].data, batch["x"][3:4])
    assert isinstance(out["name"], np.ndarray)


def test_stats_files_are_in_daformer_format(tmp_path):
    rcs.write_class_stats(str(tmp_path), [("a.png", {0: 5, 13: 2}), ("b.png", {13: 7})])
    listed = json.load(open(tmp_path / "sample_class_stats.json"))
    assert listed == [{"0": 5, "13": 2, "file": "a.png"}, {"13": 7, "file": "b.png"}]
    with_class = json.load(open(tmp_path / "samples_with_class.json"))
    assert with_class == {"0": [["a.png", 5]], "13": [["a.png", 2], ["b.png", 7]]}


@pytest.mark.parametrize("process_count", [1, 2])
def test_start_batch_equals_skipping_batches(root, process_count):
    """A resumed run reads from start_batch on: the same batches as .skip(start_batch)."""
    cfg = data_config(root, cat_max_ratio=1.0)
    start = 3  # with 2 per host x 2 hosts: global elements 12.. (second epoch of 8 files)
    for p in range(process_count):
        make = functools.partial(
            train.make_train_dataset, cfg, 2, seed=5, process_index=p, process_count=process_count
        )
        skipped = _first(make().skip(start), 2)
        started = _first(make(start_batch=start), 2)
        for a, b in zip(skipped, started, strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        (first,) = _first(make())
        assert not np.array_equal(first["target_image"], started[0]["target_image"])
    with pytest.raises(ValueError, match="start_batch"):
        train.make_train_dataset(cfg, 2, seed=5, start_batch=-1)


def test_every_stream_runs_without_the_autotuner_in_file_order(root):
    # tf.data's autotuner made deleting a finished stage's iterator wait for its model
    # thread (seconds after every stage; transforms.finish).
    config = data_config(root)
    streams = [
        train.make_train_dataset(config, 2, seed=0),
        train.make_target_train_dataset(config, 2, seed=0, num_epochs=1),
        evaluation.make_eval_dataset(config, "cityscapes"),
    ]
    for ds in streams:
        assert ds.options().autotune.enabled is False
        assert ds.options().deterministic is True


@pytest.mark.parametrize("stage", ["self_training", "ckd", "advent", "minent"])
def test_methods_of_one_target_stream_refuse_per_target_streams(stage):
    from configs import default
    from ddb_jax import methods

    config = default.get_config()
    config.stage = stage
    config.data.per_target_streams = True
    with pytest.raises(methods.MethodConfigError, match="config.data.per_target_streams=True"):
        methods.check_config(config)
