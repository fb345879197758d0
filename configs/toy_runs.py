"""What the toy-domain configs share: the cadence of a stage of a few hundred steps (log six
times, evaluate and draw once at the end, checkpoint halfway, one device), their ``:ARG``
(a stage name, or a number of steps per stage for the whole pipeline), and the ADVENT
family's toy network and whole-image input (ADVENT, MTAF and DAF/IDA demos)."""

from collections.abc import Callable

import ml_collections

from ddb_jax.graph import stage_graph


def cadence(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """``config`` with ``steps`` per stage and the toy runs' logging and checkpoints."""
    config.mesh_devices = 1
    config.num_steps = steps
    config.log_every = max(1, steps // 6)
    config.eval_every = steps
    config.checkpoint_every = max(1, steps // 2)
    config.image_summary_every = steps
    return config


def config_for_arg(
    setting: Callable[..., ml_collections.ConfigDict], name: str, arg: str | None
) -> ml_collections.ConfigDict:
    """``arg``: a stage name, or a number of steps per stage (the whole pipeline)."""
    if arg and arg.isdigit():
        return stage_graph.config_for(setting(int(arg)), "pipeline", f"runs/{name}")
    return stage_graph.config_for(setting(), arg or "pipeline", f"runs/{name}")


def caffe_resnet_toy(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The ADVENT family's toy run: its Caffe-style DeepLabV2 at toy size (one block per
    stage, width 16) from random weights on whole 128x256 toy images, batch 4, no flip, at
    1e-2 with the poly schedule over the run (the reference's 2.5e-4 learns nothing in a few
    hundred steps), evaluated as ADVENT's (corners aligned). The method's own keys (its
    discriminators' horizons, its graph) are the caller's."""
    config.model.advent_blocks = (1, 1, 1, 1)
    config.model.base_channels = 16
    config.model.conv_impl = "im2col"
    config.optim.lr = 1e-2
    config.optim.max_iters = 0  # poly over the run
    config.data.crop_size = (128, 256)
    config.data.flip_prob = 0.0
    config.data.cat_max_ratio = 1.0
    config.batch_size = 4
    cadence(config, steps)
    config.eval.mode = "whole_corners"
    return config
