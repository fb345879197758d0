"""Toy domains: deterministic, shared layout statistics, shifted appearance, readable."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets, toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """Its own toy domains (4 validation images, seed 0), not the session's: the tests
    below compare files with a generation of known arguments."""
    root = tmp_path_factory.mktemp("data")
    toy.generate(str(root / "toy"), seed=0, num_train=12, num_val=4)
    return root


def _pairs(root, name, split="train"):
    files = datasets.list_files(str(root), name, split)
    return [
        (np.asarray(Image.open(i)), np.asarray(Image.open(lab)))
        for i, lab in zip(files.images, files.labels, strict=True)
    ]


def test_layouts_are_readable(toy_root):
    assert len(datasets.list_files(str(toy_root), "toy_source")) == 12
    assert len(datasets.list_files(str(toy_root), "toy_target", "train")) == 12
    assert len(datasets.list_files(str(toy_root), "toy_target", "val")) == 4
    image, label = _pairs(toy_root, "toy_source")[0]
    assert image.shape == (128, 256, 3) and label.shape == (128, 256)


def test_same_seed_same_files_other_seed_differs(toy_root, tmp_path):
    toy.generate(str(tmp_path / "a"), seed=0, num_train=12, num_val=4)
    toy.generate(str(tmp_path / "b"), seed=1, num_train=12, num_val=4)
    name = "gta/images/00003.png"
    same = open(toy_root / "toy" / name, "rb").read() == open(tmp_path / "a" / name, "rb").read()
    assert same
    assert open(tmp_path / "b" / name, "rb").read() != open(tmp_path / "a" / name, "rb").read()


def _class_shares(pairs):
    labels = np.stack([lab for _, lab in pairs])
    counts = np.bincount(labels.reshape(-1), minlength=256)[:19]
    return counts / counts.sum()


def test_same_layout_statistics_different_appearance(toy_root):
    source, target = _pairs(toy_root, "toy_source"), _pairs(toy_root, "toy_target")
    s_share, t_share = _class_shares(source), _class_shares(target)
    assert {0, 1, 2, 8, 10, 13} <= set(np.nonzero(s_share)[0])  # road ... car present
    assert np.abs(s_share - t_share).max() < 0.08
    # Road, sky and car colours move by a large amount between the domains.
    for cls in (0, 10, 13):
        s_mean = np.mean([img[lab == cls].mean(0) for img, lab in source if (lab == cls).any()], 0)
        t_mean = np.mean([img[lab == cls].mean(0) for img, lab in target if (lab == cls).any()], 0)
        assert np.linalg.norm(s_mean - t_mean) > 25, (cls, s_mean, t_mean)
    # The target's ego-vehicle rows are ignored, the source has no ignore.
    assert (target[0][1][-4:] == 255).all() and not (source[0][1] == 255).any()


def test_converters_reproduce_the_written_train_ids(toy_root, tmp_path):
    import shutil

    shutil.copytree(toy_root / "toy" / "gta", tmp_path / "gta")
    for f in (tmp_path / "gta" / "labels").glob("*_labelTrainIds.png"):
        f.unlink()
    subprocess.run(
        [sys.executable, "tools/convert_datasets/gta.py", str(tmp_path / "gta"), "--nproc", "1"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    ours = np.asarray(Image.open(tmp_path / "gta/labels/00005_labelTrainIds.png"))
    theirs = np.asarray(Image.open(toy_root / "toy/gta/labels/00005_labelTrainIds.png"))
    np.testing.assert_array_equal(ours, theirs)
