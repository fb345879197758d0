"""Train state: student, EMA teacher, optimiser state, step and the run's PRNG key.

One pytree, so a step is a pure function ``(state, batch) -> (state, metrics)``
that jit can donate, shard and checkpoint whole.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # the EMA teacher (self-training); unused leaves stay empty for CKD
    ema_batch_stats: Any
    key: jax.Array  # base key; step keys are fold_in(key, step)

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def ema_variables(self) -> dict[str, Any]:
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def merge_variables(base: dict, loaded: dict) -> dict:
    """``base`` with every leaf present in ``loaded`` replaced (an ImageNet backbone, say)."""
    if not isinstance(loaded, dict):
        return jnp.asarray(loaded, base.dtype) if hasattr(base, "dtype") else loaded
    merged = dict(base)
    for name, sub in loaded.items():
        if name not in base:
            raise KeyError(f"loaded variables have {name!r}, which the model lacks")
        merged[name] = merge_variables(base[name], sub)
    return merged


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Student and teacher start equal (the teacher's copy at iteration 0 of the reference)."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
        key=key,
    )


def ema_alpha(step: jax.Array, alpha_max: float) -> jax.Array:
    """The reference's ramp ``min(1 - 1/(it+1), alpha)``: 0 at step 0, i.e. a plain copy."""
    return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), alpha_max)


def ema_update(ema_params, params, step: jax.Array, alpha_max: float):
    """EMA over parameters only (BN running statistics are not averaged)."""
    alpha = ema_alpha(step, alpha_max)
    return jax.tree_util.tree_map(lambda e, p: alpha * e + (1.0 - alpha) * p, ema_params, params)


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


def student_forward(apply_fn, params, batch_stats, images: jax.Array, dropout_key: jax.Array):
    """The student in training mode: (logits, feature), and its updated BN statistics."""
    outputs, updates = apply_fn(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
    )
    return outputs, updates["batch_stats"]
