"""The one way a training step is set up: segmentor, method, optimisers, state, step.

The training loop, the benchmarks and the tests all build their step here, so a method's
extra trees (ADVENT's discriminators), its optimisers and its state are made the same way
everywhere.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from ddb_jax import models
from ddb_jax.methods import base, optim
from ddb_jax.methods.state import MODEL, TrainState, create_train_state


@dataclasses.dataclass(frozen=True)
class Assembled:
    """What a training stage steps with."""

    model: Any  # the segmentor (flax module)
    method: base.Method
    txs: dict[str, optax.GradientTransformation]  # tree name -> its optimiser
    state: TrainState  # at step 0, on the host's default device


def optimizers(
    config: ml_collections.ConfigDict, method: base.Method
) -> dict[str, optax.GradientTransformation]:
    """``{tree: optimiser}``: ``config.optim`` for the segmentor, the method's own optimiser
    config for each of its other trees."""
    trees = {MODEL: config.optim, **method.other_trees}
    return {name: optim.make_optimizer(cfg, config.num_steps)[0] for name, cfg in trees.items()}


def initial_state(method: base.Method, txs: dict, variables: dict, key: jax.Array) -> TrainState:
    """The method's state at step 0: the segmentor's ``variables``, its other trees drawn from
    a key of their own (so the segmentor's draws do not move), every optimiser's state."""
    others = method.init_others(jax.random.fold_in(key, zlib.crc32(b"others") >> 1))
    return method.init_state(create_train_state(variables, txs, key, others))


def assemble(
    config: ml_collections.ConfigDict,
    variables: dict,
    key: jax.Array,
) -> Assembled:
    """Segmentor, method (``config.stage``), optimisers and initial state of a stage;
    ``variables``: the segmentor's initial variables, ``key``: the state's base key."""
    from ddb_jax import methods

    model = models.build_model(config.model)
    method = methods.create(config, model.apply)
    txs = optimizers(config, method)
    state = initial_state(method, txs, variables, key)
    return Assembled(model, method, txs, state)


def train_step(
    assembled: Assembled,
    mesh: Mesh | None = None,
    with_preview: bool = False,
    compiler_state_layouts: bool = False,
) -> Callable:
    """The jitted step of an assembled stage (:func:`ddb_jax.methods.base.make_train_step`)."""
    return base.make_train_step(
        assembled.method, assembled.txs, mesh, with_preview, compiler_state_layouts
    )
