"""Hostile inputs not covered elsewhere: each fails with an error naming the file or key,
before any long work, and damages nothing written earlier.

Covered by other tests (not repeated here):
truncated PNG/JPEG images and labels (test_input_transforms: test_truncated_*), RGB label
(test_colour_label_error_names_file), labels with unknown ids (test_input_transforms:
test_unknown_label_ids_error_names_file; test_input_convert: test_unknown_ids_fail_naming_the_file),
image/label size mismatch (test_size_mismatch_error_names_both_files), empty and missing
directories (test_input_layouts: test_empty_split_names_directory,
test_missing_directory_names_dir_layout_and_readme), a .pth that is not a checkpoint or is
truncated, and a .pth with missing or extra tensors (test_convert_checkpoint:
test_bad_input_fails_clearly_and_writes_nothing; test_resnet_dlv2:
test_conversion_rejects_unexpected_key), a workdir holding another config
(test_train_loop: test_workdir_of_another_config_is_refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from ddb_jax import checkpoints, models
from ddb_jax.train import checkpointing, setup
from ddb_jax.train import workdir as workdir_lib
from input_pipeline import evaluation, toy, transforms
from tests.support import ROOT, tiny_stage


def tiny_model_config():
    return tiny_stage("data")


# --- images and labels ------------------------------------------------------------------


def _corrupt_middle(path: str) -> None:
    """Garbage in the middle, intact start and end marker: passes the truncation check."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[40:middle] = np.random.default_rng(1).integers(0, 255, middle - 40, np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_corrupt_image_error_names_file(tmp_path, suffix):
    path = str(tmp_path / f"corrupt{suffix}")
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    encode = tf.io.encode_png if suffix == ".png" else tf.io.encode_jpeg
    tf.io.write_file(path, encode(image))
    _corrupt_middle(path)
    with pytest.raises(tf.errors.OpError, match=f"corrupt{suffix}"):
        transforms.read_image(tf.constant(path), suffix == ".jpg")


def test_garbage_with_an_image_name_names_the_file(tmp_path):
    for suffix, head in ((".png", b"\x89PNG\r\n\x1a\n"), (".jpg", b"\xff\xd8\xff")):
        path = str(tmp_path / f"garbage{suffix}")
        open(path, "wb").write(head + bytes(range(256)) * 2)
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"(?s)corrupt.*garbage{suffix}"):
            transforms.read_image(tf.constant(path), suffix == ".jpg")


def test_16_bit_label_error_names_file(tmp_path):
    path = str(tmp_path / "deep_labelTrainIds.png")
    tf.io.write_file(path, tf.io.encode_png(np.array([[1, 2], [3, 400]], np.uint16)[..., None]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)16-bit.*deep_labelTrainIds"):
        transforms.read_label(tf.constant(path))


def test_size_mismatch_in_the_eval_pipeline_names_both_files(tmp_path):
    toy.main(["--out", str(tmp_path / "toy"), "--num-train", "2", "--num-val", "2"])
    config = tiny_stage(tmp_path)
    images, labels = _val_files(config)
    image_path, label_path = images[0], labels[0]
    label = tf.io.decode_png(tf.io.read_file(label_path))
    tf.io.write_file(label_path, tf.io.encode_png(label[:-1]))  # one row short
    dataset = evaluation.make_eval_dataset(config.data, "toy_target", "val")
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)sizes differ") as err:
        list(dataset.as_numpy_iterator())
    assert os.path.basename(image_path) in str(err.value)
    assert os.path.basename(label_path) in str(err.value)


def _val_files(config):
    from input_pipeline import datasets

    files = datasets.list_files(config.data.root, "toy_target", "val", with_labels=True)
    return list(files.images), list(files.labels)


# --- model directories (init_from) ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    config = tiny_model_config()
    model = models.build_model(config.model)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(3)))
    out = str(tmp_path_factory.mktemp("models") / "whole")
    checkpoints.save_model_dir(out, variables, config.model)
    return out, variables


def _edited_copy(src_variables, model_cfg, out: str, edit) -> str:
    variables = jax.tree_util.tree_map(np.asarray, src_variables)
    edit(variables)
    checkpoints.save_model_dir(out, variables, model_cfg)
    return out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "missing tensors (1): ['params']['decode_head']['conv_seg']['bias']"),
        ("extra", "unexpected tensors (1): ['params']['decode_head']['extra']"),
        ("shape", "['params']['decode_head']['conv_seg']['bias'] (7,) vs model (19,)"),
    ],
)
def test_init_from_with_missing_or_extra_tensor_names_dir_and_key(
    tiny_model_dir, tmp_path, case, needle
):
    good_dir, variables = tiny_model_dir
    config = tiny_model_config()

    def edit(v):
        head = v["params"]["decode_head"]
        if case == "missing":
            del head["conv_seg"]["bias"]
        elif case == "extra":
            head["extra"] = np.zeros(3, np.float32)
        else:
            head["conv_seg"]["bias"] = np.zeros(7, np.float32)

    bad = _edited_copy(variables, config.model, str(tmp_path / case), edit)
    config.init_from = bad
    model = models.build_model(config.model)
    with pytest.raises(checkpoints.CheckpointError) as err:
        setup.initial_variables(config, model, jax.random.PRNGKey(0))
    assert bad in str(err.value) and needle in str(err.value)
    # Nothing damaged: both directories still load as written.
    restored, _ = checkpoints.load_model_dir(good_dir)
    for a, b in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    checkpoints.load_model_dir(bad)


def test_init_from_the_exact_model_loads_it(tiny_model_dir):
    good_dir, variables = tiny_model_dir
    config = tiny_model_config()
    config.init_from = good_dir
    model = models.build_model(config.model)
    loaded = setup.initial_variables(config, model, jax.random.PRNGKey(0))
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# --- orbax checkpoints cut off during a save --------------------------------------------


def _save_step(workdir: str, step: int, state) -> None:
    manager = checkpointing.Checkpoints(workdir, 3).manager
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()


def test_half_written_orbax_save_is_skipped_and_the_last_good_one_restored(tmp_path):
    workdir = str(tmp_path)
    state = {"w": jnp.arange(6.0), "step": jnp.int32(2)}
    _save_step(workdir, 2, state)
    ckpt = os.path.join(workdir, "checkpoints")
    # A save killed part-way leaves orbax's temporary directory, partly written.
    partial = os.path.join(ckpt, "4.orbax-checkpoint-tmp-1795328000")
    shutil.copytree(os.path.join(ckpt, "2"), partial)
    os.remove(os.path.join(partial, "_CHECKPOINT_METADATA"))
    manager = checkpointing.Checkpoints(workdir, 3).manager
    assert manager.latest_step() == 2
    restored = manager.restore(2, args=ocp.args.StandardRestore(state))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    # The next save (step 4 again) succeeds and keeps step 2.
    manager.save(4, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]
    manager.close()


def test_step_directory_without_metadata_is_not_resumed_from(tmp_path):
    workdir = str(tmp_path)
    state = {"w": jnp.arange(6.0), "step": jnp.int32(2)}
    _save_step(workdir, 2, state)
    os.makedirs(os.path.join(workdir, "checkpoints", "6", "default"))  # e.g. a cut-off copy
    assert checkpointing.latest_complete_step(checkpointing.Checkpoints(workdir, 3).manager) == 2


# --- configs and workdirs ---------------------------------------------------------------


def test_unknown_config_key_fails_naming_it_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "ddb_jax.main", "--config=configs/demo_r1_cu.py",
            f"--workdir={workdir}", "--config.batchsize=2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        "error: config key 'batchsize' does not exist; did you mean 'batch_size'? (see --helpfull)"
    )
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_unwritable_workdir_fails_naming_it_and_keeps_earlier_files(tmp_path):
    config = tiny_model_config()
    blocker = tmp_path / "results"
    blocker.write_text("an earlier output that must survive\n")
    workdir = str(blocker / "run")  # below a regular file: cannot be created, even by root
    with pytest.raises(OSError, match="results"):
        workdir_lib.record_config(workdir, config)
    assert blocker.read_text() == "an earlier output that must survive\n"
    if os.geteuid() != 0:  # permissions bind only non-root users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="locked"):
            workdir_lib.record_config(str(locked), config)
