"""The training loop (ddb_jax/train/loop.py) on the tiny toy stage: a killed run resumes
exactly; a NaN loss, non-finite parameters or a failed checkpoint write stop the run with
the last good checkpoint kept; two stages side by side in one process save without
colliding; stages share a compiled step exactly when it is the same program; image
summaries reach TensorBoard; the workdir keeps its config."""

import dataclasses
import errno
import os
import threading
from concurrent import futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler

from ddb_jax import checkpoints, methods, models
from ddb_jax.methods import optim
from ddb_jax.methods.self_training import SelfTraining
from ddb_jax.train import checkpointing, loop, setup
from ddb_jax.train import workdir as workdir_lib
from tests.support import assert_same_leaves, export_leaves, image_summaries, tiny_stage


def tiny_config(root, **overrides):
    # One number of steps for every run: the schedule is part of the compiled step, so the
    # runs of this module share one program (tests/conftest.py's compilation cache).
    values = {"batch_size": 2, "num_steps": 6, "checkpoint_every": 2, "log_every": 1,
              "eval_every": 0, "image_summary_every": 0, **overrides}  # fmt: skip
    return tiny_stage(root, "r1_cu", **values)


class Killed(Exception):
    pass


def stream_spy(monkeypatch, edit=None):
    """Wraps the loop's batch stream: records each run's start step; ``edit(step, batch)``
    may change the batch of a step or raise."""
    starts = []
    real = setup.batch_stream

    def batch_stream(config, mesh):
        make_batches = real(config, mesh)

        def batches(start):
            starts.append(start)
            for step, batch in enumerate(make_batches(start), start + 1):
                yield edit(step, batch) if edit else batch

        return batches

    monkeypatch.setattr(setup, "batch_stream", batch_stream)
    return starts


def checkpoint_steps(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)))


def restore_latest(workdir, like):
    # A plain manager: the loop's removes temporary directories in a background thread,
    # which would race with a rerun's own clean-up of the same directories.
    manager = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir))
    latest = manager.latest_step()
    restored = manager.restore(latest, args=ocp.args.StandardRestore(like))
    manager.close()
    return latest, restored


@pytest.fixture(scope="module")
def straight(toy_root, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce: (workdir, state)."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    state, _ = loop.train_and_evaluate(tiny_config(toy_root), workdir)
    return workdir, jax.device_get(state)


def test_killed_run_resumes_to_the_same_params(toy_root, tmp_path, monkeypatch, straight):
    config = tiny_config(toy_root)
    workdir = str(tmp_path / "killed")

    def die_at_step_3(step, batch):  # checkpoint of step 2 written, step 3 lost
        if step == 3:
            raise Killed
        return batch

    stream_spy(monkeypatch, die_at_step_3)
    with pytest.raises(Killed):
        loop.train_and_evaluate(config, workdir)
    assert checkpoint_steps(workdir) == ["2"]
    assert not os.path.exists(os.path.join(workdir, workdir_lib.EXPORT_DIR))
    monkeypatch.undo()
    starts = stream_spy(monkeypatch)
    loop.train_and_evaluate(config, workdir)
    assert starts == [2]  # resumed from the checkpoint, not restarted
    assert_same_leaves(export_leaves(workdir), export_leaves(straight[0]))


def test_workdir_of_another_config_is_refused(toy_root, tmp_path):
    config = tiny_config(toy_root)
    workdir_lib.record_config(str(tmp_path), config)
    config.st.mask = "class"
    config.optim.lr = 1.0
    with pytest.raises(workdir_lib.WorkdirMismatchError, match="st.mask") as err:
        workdir_lib.record_config(str(tmp_path), config)
    assert "optim.lr" in str(err.value)
    config.st.mask, config.optim.lr = "cut", tiny_config(toy_root).optim.lr
    config.log_every = 7  # does not change the result: allowed on resume
    workdir_lib.record_config(str(tmp_path), config)


# --- bad input: a NaN loss, non-finite parameters, a failed checkpoint write ------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    toy_root, tmp_path, monkeypatch, straight
):
    # NaN images at step 3; metrics are checked only at the checkpoint of step 4.
    config = tiny_config(toy_root, log_every=100, keep_checkpoints=1)
    workdir = str(tmp_path / "nan")

    def nan_at_step_3(step, batch):
        if step == 3:
            batch = {**batch, "source_image": batch["source_image"] * jnp.nan}
        return batch

    stream_spy(monkeypatch, nan_at_step_3)
    with pytest.raises(loop.NonFiniteLossError, match="at step 3"):
        loop.train_and_evaluate(config, workdir)
    assert checkpoint_steps(workdir) == ["2"]  # nothing at or after step 3, no partial dir
    latest, restored = restore_latest(workdir, straight[1])
    assert latest == 2 and int(restored.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))
    assert not os.path.exists(os.path.join(workdir, workdir_lib.EXPORT_DIR))


def test_non_finite_parameters_with_a_finite_loss_are_refused(toy_root, tmp_path, monkeypatch):
    """Parameters that become inf in step 4 (loss still finite): no checkpoint of them."""
    config = tiny_config(toy_root, log_every=100, keep_checkpoints=1)
    workdir = str(tmp_path / "inf")
    real_create = methods.create

    class PoisonedAtStep4(SelfTraining):
        def finish(self, state, outputs):
            state = super().finish(state, outputs)
            poison = jnp.where(state.step == 4, jnp.inf, 0.0)
            return state.replace(params=jax.tree_util.tree_map(lambda p: p + poison, state.params))

    def create(config, student_apply):
        method = real_create(config, student_apply)
        fields = dataclasses.fields(method)
        return PoisonedAtStep4(**{f.name: getattr(method, f.name) for f in fields})

    monkeypatch.setattr(methods, "create", create)
    with pytest.raises(loop.NonFiniteLossError, match="not finite at step 4"):
        loop.train_and_evaluate(config, workdir)
    assert checkpoint_steps(workdir) == ["2"]


def test_failed_checkpoint_write_keeps_the_previous_one_and_a_rerun_finishes(
    toy_root, tmp_path, monkeypatch, straight
):
    """Disk full while writing the checkpoint of step 4 (after its arrays were written)."""
    config = tiny_config(toy_root, log_every=100, keep_checkpoints=1)
    workdir = str(tmp_path / "full")
    handler = base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler
    real_write = handler._write_metadata_file

    async def full_disk(self, directory, **kwargs):
        if "checkpoints/4." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_write(self, directory, **kwargs)

    monkeypatch.setattr(handler, "_write_metadata_file", full_disk)
    with pytest.raises(checkpointing.CheckpointWriteError) as err:
        loop.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "step 4" in message and os.path.join(workdir, "checkpoints") in message
    assert "No space left on device" in message and "latest: step 2" in message
    # The half-written step 4 stays in its temporary directory (arrays written, never
    # renamed): not a checkpoint. Step 2 is still the latest and restores.
    assert [d for d in checkpoint_steps(workdir) if d != "2"][0].startswith(
        "4.orbax-checkpoint-tmp"
    )
    latest, restored = restore_latest(workdir, straight[1])
    assert latest == 2 and int(restored.step) == 2
    assert not os.path.exists(os.path.join(workdir, workdir_lib.EXPORT_DIR))

    monkeypatch.undo()  # space freed
    starts = stream_spy(monkeypatch)
    final, _ = loop.train_and_evaluate(config, workdir)
    assert starts == [2] and int(final.step) == 6  # resumed at 2, not restarted
    assert checkpoint_steps(workdir) == ["6"]  # temporary directories cleaned up, keep 1
    assert export_leaves(workdir)


# --- image summaries --------------------------------------------------------------------------


def test_stages_side_by_side_save_at_the_same_moments_and_restore_their_own(tmp_path):
    # The pipeline's concurrent stages, reduced to their checkpoints: two threads start
    # every save at once and then export their model directory (best/), as a stage does
    # after an evaluation. orbax alone collides on its process-wide operation id here (a
    # FileExistsError on a temporary directory, or a wait of 300 s for a signal).
    start_together = threading.Barrier(2)

    def stage(name: str, offset: float) -> None:
        ckpt = checkpointing.Checkpoints(str(tmp_path / name), 2)
        try:
            for step in range(1, 9):
                start_together.wait(timeout=60)
                ckpt.save(step, {"w": jnp.arange(64.0) + offset + step})
                checkpoints.save_model_dir(
                    str(tmp_path / name / "best"),
                    {"params": {"w": np.arange(64.0) + offset + step}},
                    ml_collections.ConfigDict({"step": step}),
                    overwrite=True,
                )
            ckpt.wait()
        finally:
            ckpt.close()

    with futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(stage, "a", 0.0), pool.submit(stage, "b", 1000.0)]:
            done.result()
    for name, offset in (("a", 0.0), ("b", 1000.0)):
        step, restored = restore_latest(str(tmp_path / name), {"w": jnp.zeros(64)})
        assert step == 8
        np.testing.assert_array_equal(restored["w"], np.arange(64.0) + offset + 8)
        assert checkpoint_steps(str(tmp_path / name)) == ["7", "8"]
        best, model_cfg = checkpoints.load_model_dir(str(tmp_path / name / "best"))
        np.testing.assert_array_equal(best["params"]["w"], np.arange(64.0) + offset + 8)
        assert model_cfg.step == 8


def test_stages_share_a_step_only_when_its_program_is_the_same(toy_root):
    config = tiny_config(toy_root)
    mesh = setup.make_mesh(config)

    def step_for(cfg, method_class=None):
        method = methods.create(cfg, models.build_model(cfg.model).apply)
        if method_class is not None:
            fields = dataclasses.fields(method)
            method = method_class(**{f.name: getattr(method, f.name) for f in fields})
        tx, _ = optim.make_optimizer(cfg.optim, cfg.num_steps)
        return loop.shared_train_step(cfg, method, tx, mesh, False)

    first = step_for(config)
    elsewhere = {"seed": 3, "log_every": 5, "data.root": "/elsewhere", "eval.flip": True}
    assert step_for(tiny_config(toy_root, **elsewhere)) is first
    assert models.build_model(config.model) is models.build_model(tiny_config(toy_root).model)
    for changed in ({"optim.lr": 0.123}, {"num_steps": 7}, {"st.mask": "class"}):
        assert step_for(tiny_config(toy_root, **changed)) is not first, changed

    class Subclass(SelfTraining):
        pass

    assert step_for(config, Subclass) is not first
    assert step_for(config, Subclass) is step_for(config, Subclass)


def test_image_summaries_are_written_on_their_period(toy_root, tmp_path):
    config = tiny_config(toy_root, image_summary_every=3)
    workdir = str(tmp_path / "images")
    loop.train_and_evaluate(config, workdir)
    images = image_summaries(workdir)
    assert set(images) == {("bridging", 3), ("bridging", 6)}
    panels = len(SelfTraining.preview_panels)
    for string_val in images.values():
        width, height, *pngs = string_val  # TF2 image summaries: width, height, PNG each
        assert (int(width), int(height)) == (panels * 32 + (panels - 1) * 2, 32)
        assert len(pngs) == config.batch_size
        decoded = tf.io.decode_png(pngs[0]).numpy()
        assert decoded.shape == (32, int(width), 3)
