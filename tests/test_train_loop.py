"""The training loop: a killed run resumes exactly; a NaN loss or a failed checkpoint write
stops the run with the last good checkpoint kept; image summaries reach TensorBoard."""

import errno
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler

from configs import demo_r1_cu
from ddb_jax import checkpoints
from ddb_jax.train import loop
from ddb_jax.train import self_training as st
from ddb_jax.train.state import create_train_state
from input_pipeline import toy


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "4"])
    return root


def tiny_config(root):
    config = demo_r1_cu.get_config()
    config.data.root = str(root)
    config.model.base_channels = 8
    config.model.head_channels = 16
    config.model.conv_impl = "lax"  # compiles in half the time of im2col
    config.data.crop_size = (32, 32)
    config.batch_size = 2
    config.num_steps = 4
    config.checkpoint_every = 2
    config.log_every = 1
    config.eval_every = 0
    return config


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_params(toy_root, tmp_path, monkeypatch):
    config = tiny_config(toy_root)
    _, _ = st.train_and_evaluate(config, str(tmp_path / "straight"))
    straight, _ = checkpoints.load_model_dir(str(tmp_path / "straight" / loop.EXPORT_DIR))

    # Kill after step 3 (checkpoint at step 2 written, step 3 lost), then rerun.
    real_loop = loop.train_loop

    def dying_loop(config, workdir, state, train_step, make_batches, *args, **kwargs):
        def batches(start):
            for i, batch in enumerate(make_batches(start)):
                if i == 3 - start:
                    raise Killed
                yield batch

        return real_loop(config, workdir, state, train_step, batches, *args, **kwargs)

    workdir = str(tmp_path / "killed")
    monkeypatch.setattr(loop, "train_loop", dying_loop)
    with pytest.raises(Killed):
        st.train_and_evaluate(config, workdir)
    monkeypatch.setattr(loop, "train_loop", real_loop)
    assert loop.make_checkpoint_manager(workdir, 3).latest_step() == 2
    st.train_and_evaluate(config, workdir)
    resumed, _ = checkpoints.load_model_dir(str(tmp_path / "killed" / loop.EXPORT_DIR))
    for a, b in zip(
        jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_workdir_of_another_config_is_refused(toy_root, tmp_path):
    config = tiny_config(toy_root)
    loop.check_workdir_config(str(tmp_path), config)
    config.st.mask = "class"
    config.optim.lr = 1.0
    with pytest.raises(loop.WorkdirMismatchError, match="st.mask") as err:
        loop.check_workdir_config(str(tmp_path), config)
    assert "optim.lr" in str(err.value)
    config.st.mask, config.optim.lr = "cut", tiny_config(toy_root).optim.lr
    config.log_every = 7  # does not change the result: allowed on resume
    loop.check_workdir_config(str(tmp_path), config)


# --- Bad input: a NaN loss, a failed checkpoint write (fake step, tiny state) ------------


def fake_run(root, **overrides):
    """A loop run around a trivial jitted step: params += batch['x'], loss = mean(params)."""
    config = tiny_config(root)
    config.num_steps, config.checkpoint_every, config.log_every = 6, 2, 100
    config.keep_checkpoints = 1  # the strictest case: a single good checkpoint to keep
    for key, value in overrides.items():
        setattr(config, key, value)
    tx = optax.sgd(0.1)
    variables = {"params": {"w": jnp.ones((3,))}, "batch_stats": {"mean": jnp.zeros((3,))}}
    state = create_train_state(variables, tx, jax.random.key(0))

    @jax.jit
    def step(state, batch):
        params = jax.tree_util.tree_map(lambda p: p + batch["x"], state.params)
        loss = jnp.mean(params["w"])
        return state.replace(step=state.step + 1, params=params), {"loss": loss}

    return config, state, step


def batches_with_nan_at(nan_step):
    def make_batches(start):
        for step in itertools.count(start + 1):
            yield {"x": np.float32(np.nan if step == nan_step else 1.0)}

    return make_batches


def run_fake(config, workdir, state, step, make_batches):
    return loop.train_loop(
        config, workdir, state, step, make_batches, None, lambda s: jax.device_get(s.variables())
    )


def restore_latest(workdir, like):
    # A plain manager: the loop's removes temporary directories in a background thread,
    # which would race with the rerun's own clean-up of the same directories.
    manager = ocp.CheckpointManager(loop.checkpoint_dir(workdir))
    latest = manager.latest_step()
    restored = manager.restore(latest, args=ocp.args.StandardRestore(like))
    manager.close()
    return latest, restored


def step_dirs(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(toy_root, tmp_path):
    config, state, step = fake_run(toy_root)
    workdir = str(tmp_path / "nan")
    # NaN at step 3, metrics only checked at the checkpoint of step 4 (log_every 100).
    with pytest.raises(loop.NonFiniteLossError, match="at step 3"):
        run_fake(config, workdir, state, step, batches_with_nan_at(3))
    assert step_dirs(workdir) == ["2"]  # nothing at or after step 3, no half-written dir
    latest, restored = restore_latest(workdir, state)
    assert latest == 2 and int(restored.step) == 2
    np.testing.assert_array_equal(restored.params["w"], [3.0, 3.0, 3.0])  # 1 + 2 steps of +1
    assert not os.path.exists(os.path.join(workdir, loop.EXPORT_DIR))

    # Parameters that went non-finite with a finite loss are refused as well.
    config, state, _ = fake_run(toy_root)

    @jax.jit
    def inf_params(state, batch):
        params = {"w": state.params["w"].at[0].set(jnp.where(state.step == 3, jnp.inf, 1.0))}
        return state.replace(step=state.step + 1, params=params), {"loss": jnp.float32(0.5)}

    workdir = str(tmp_path / "inf")
    with pytest.raises(loop.NonFiniteLossError, match="not finite at step 4"):
        run_fake(config, workdir, state, inf_params, batches_with_nan_at(None))
    assert step_dirs(workdir) == ["2"]


def test_failed_checkpoint_write_keeps_the_previous_one_and_a_rerun_finishes(
    toy_root, tmp_path, monkeypatch
):
    """Disk full while writing the checkpoint of step 4 (after its arrays were written)."""
    config, state, step = fake_run(toy_root)
    workdir = str(tmp_path / "full")
    handler = base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler
    real_write = handler._write_metadata_file

    async def full_disk(self, directory, **kwargs):
        if "checkpoints/4." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_write(self, directory, **kwargs)

    monkeypatch.setattr(handler, "_write_metadata_file", full_disk)
    with pytest.raises(loop.CheckpointWriteError) as err:
        run_fake(config, workdir, state, step, batches_with_nan_at(None))
    message = str(err.value)
    assert "step 4" in message and os.path.join(workdir, "checkpoints") in message
    assert "No space left on device" in message and "latest: step 2" in message
    # The half-written step 4 stays in its temporary directory (arrays written, never
    # renamed): not a checkpoint. Step 2 is still the latest and restores.
    assert [d for d in step_dirs(workdir) if d != "2"][0].startswith("4.orbax-checkpoint-tmp")
    latest, restored = restore_latest(workdir, state)
    assert latest == 2 and int(restored.step) == 2
    np.testing.assert_array_equal(restored.params["w"], [3.0, 3.0, 3.0])
    assert not os.path.exists(os.path.join(workdir, loop.EXPORT_DIR))

    monkeypatch.setattr(handler, "_write_metadata_file", real_write)  # space freed
    final, _ = run_fake(config, workdir, state, step, batches_with_nan_at(None))
    assert int(final.step) == 6
    np.testing.assert_array_equal(final.params["w"], [7.0, 7.0, 7.0])  # resumed at 2, not 0
    assert step_dirs(workdir) == ["6"]  # temporary directories cleaned up, keep 1
    exported, _ = checkpoints.load_model_dir(os.path.join(workdir, loop.EXPORT_DIR))
    np.testing.assert_array_equal(exported["params"]["w"], [7.0, 7.0, 7.0])


# --- Image summaries ----------------------------------------------------------------------


def test_image_summaries_are_written_every_step(toy_root, tmp_path):
    config = tiny_config(toy_root)
    config.num_steps, config.image_summary_every = 2, 1
    workdir = str(tmp_path / "images")
    st.train_and_evaluate(config, workdir)
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    images = {}
    for name in events:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    images[(value.tag, event.step)] = value.tensor.string_val
    assert set(images) == {("bridging", 1), ("bridging", 2)}
    for string_val in images.values():
        width, height, *pngs = string_val  # TF2 image summaries: width, height, PNG each
        panels = len(st.PREVIEW_PANELS)
        assert (int(width), int(height)) == (panels * 32 + (panels - 1) * 2, 32)
        assert len(pngs) == config.batch_size
        decoded = tf.io.decode_png(pngs[0]).numpy()
        assert decoded.shape == (32, int(width), 3)
