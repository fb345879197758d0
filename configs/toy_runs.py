"""What the toy-domain configs share: the cadence of a stage of a few hundred steps (log six
times, evaluate and draw once at the end, checkpoint halfway, one device) and their ``:ARG``
(a stage name, or a number of steps per stage for the whole pipeline)."""

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
