"""Train state: the student, its optimiser state, the step and the run's PRNG key.

One pytree, so a step is a pure function ``(state, batch) -> (state, metrics)`` that jit
can donate, shard and checkpoint whole. A method that carries more (self-training's EMA
teacher) subclasses it (:mod:`ddb_jax.methods.self_training`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # base key; step keys are fold_in(key, step)

    def variables(self) -> dict[str, Any]:
        """The student's variables, as ``model.apply`` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def fields(self) -> dict[str, Any]:
        """The base fields by name (a subclass is built from them plus its own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainState)}


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=key,
    )


def apply_gradients(
    state: TrainState, grads: Any, batch_stats: Any, tx: optax.GradientTransformation
) -> TrainState:
    """One optimiser update of the student and its new BN statistics; the step advances."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
