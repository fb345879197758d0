"""The path layer on local paths (tests/test_gcs.py runs the same calls against a GCS
emulator): joins, atomic writes that leave nothing half-written, directories replaced
whole, globbing."""

import os

import numpy as np
import pytest

from ddb_jax import paths


def test_urls_and_local_paths_are_told_apart():
    assert paths.is_remote("gs://bucket/run") and paths.is_remote("s3://b/x")
    assert not paths.is_remote("/tmp/run") and not paths.is_remote("runs/gs:/x")
    assert paths.join("gs://b/run/", "r1_cu", "export") == "gs://b/run/r1_cu/export"
    assert paths.join("runs", "r1_cu") == os.path.join("runs", "r1_cu")
    assert paths.resolve("gs://b/x") == "gs://b/x"
    assert paths.resolve("x") == os.path.abspath("x")
    assert paths.basename("gs://b/run/model.json") == "model.json"
    assert paths.dirname("gs://b/run/model.json") == "gs://b/run"


def test_writes_are_whole_and_leave_no_temporary_files(tmp_path, monkeypatch):
    target = str(tmp_path / "sub" / "result.json")
    paths.write_json(target, {"miou": 0.5})
    assert paths.read_json(target) == {"miou": 0.5}
    paths.write_text(target, "new")
    assert paths.read_text(target) == "new"
    assert os.listdir(tmp_path / "sub") == ["result.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask  # as open() would create it

    class Boom(Exception):
        pass

    def dies(*args):
        raise Boom

    monkeypatch.setattr(os, "replace", dies)  # the write dies before it is in place
    with pytest.raises(Boom):
        paths.write_bytes(target, b"partial")
    monkeypatch.undo()
    assert paths.read_text(target) == "new"
    assert os.listdir(tmp_path / "sub") == ["result.json"]


def test_npz_round_trip(tmp_path):
    target = str(tmp_path / "t.npz")
    paths.save_npz(target, a=np.arange(3.0))
    with np.load(target) as data:
        np.testing.assert_array_equal(data["a"], np.arange(3.0))


def test_replace_dir_swaps_whole_directories(tmp_path):
    out = str(tmp_path / "export")

    def writer(text):
        def write(directory):
            paths.makedirs(directory)
            paths.write_text(paths.join(directory, "data.txt"), text)
            paths.write_text(paths.join(directory, "model.json"), "{}")

        return write

    paths.replace_dir(out, writer("one"), "model.json")
    paths.replace_dir(out, writer("two"), "model.json")
    assert paths.read_text(paths.join(out, "data.txt")) == "two"

    def dies(directory):
        paths.write_text(paths.join(directory, "data.txt"), "three")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        paths.replace_dir(out, dies, "model.json")
    assert paths.read_text(paths.join(out, "data.txt")) == "two"  # the old one, whole
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging directory left


def test_glob_listdir_exists_rmtree(tmp_path):
    for name in ("a.png", "b.png", "c.txt"):
        paths.write_text(str(tmp_path / "d" / name), name)
    assert paths.glob(str(tmp_path / "d" / "*.png")) == [
        str(tmp_path / "d" / "a.png"),
        str(tmp_path / "d" / "b.png"),
    ]
    assert paths.listdir(str(tmp_path / "d")) == ["a.png", "b.png", "c.txt"]
    assert paths.listdir(str(tmp_path / "missing")) == []
    assert paths.isdir(str(tmp_path / "d")) and paths.isfile(str(tmp_path / "d" / "a.png"))
    paths.rmtree(str(tmp_path / "d"))
    assert not paths.exists(str(tmp_path / "d"))
