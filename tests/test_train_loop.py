"""The training loop on the toy domains: a run killed between checkpoints resumes exactly."""

import jax
import numpy as np
import pytest

from configs import demo_r1_cu
from ddb_jax import checkpoints
from ddb_jax.train import loop
from ddb_jax.train import self_training as st
from input_pipeline import toy


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "4"])
    return root


def tiny_config(root):
    config = demo_r1_cu.get_config()
    config.data.root = str(root)
    config.model.head_channels = 16
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
