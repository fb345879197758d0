"""Train state: the segmentor, its optimiser state, the other trained trees, the step and key.

One pytree, so a step is a pure function ``(state, batch) -> (state, metrics)`` that jit
can donate, shard and checkpoint whole. The segmentor is the tree named :data:`MODEL`
(``params``, ``batch_stats``, ``opt_state``: what evaluation and exports read); a method
that trains more (ADVENT's discriminators) keeps each further tree, with its own optimiser
state, in ``others``. Non-gradient state (an EMA teacher, prototype tables updated by
momentum) belongs to the method: it subclasses the state
(:mod:`ddb_jax.methods.self_training`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import optax

MODEL = "model"  # the segmentor's tree (and optimiser) name
Optimizers = Mapping[str, optax.GradientTransformation]


@flax.struct.dataclass
class Trainable:
    """A trained tree besides the segmentor (a discriminator) and its optimiser state."""

    params: Any
    opt_state: Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array  # base key; step keys are fold_in(key, step)
    others: dict[str, Trainable]  # further trained trees by name ({} for one-tree methods)

    def variables(self) -> dict[str, Any]:
        """The segmentor's variables, as ``model.apply`` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def fields(self) -> dict[str, Any]:
        """The base fields by name (a subclass is built from them plus its own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainState)}

    def tree_params(self) -> dict[str, Any]:
        """Every trained tree's parameters by name, the segmentor's as :data:`MODEL`."""
        return {MODEL: self.params, **{k: v.params for k, v in self.others.items()}}


def as_optimizers(tx: optax.GradientTransformation | Optimizers) -> dict:
    """``{tree: transform}``; a single transform is the segmentor's."""
    if isinstance(tx, Mapping):
        return dict(tx)
    return {MODEL: tx}


def create_train_state(
    variables: dict[str, Any],
    tx: optax.GradientTransformation | Optimizers,
    key: jax.Array,
    others: Mapping[str, Any] | None = None,
) -> TrainState:
    """The state at step 0: the segmentor's ``variables`` and ``others``' parameters, each
    with its own optimiser's initial state (``tx``: one transform, or one per tree)."""
    txs = as_optimizers(tx)
    others = dict(others or {})
    missing = sorted((set(others) | {MODEL}) - set(txs))
    if missing:
        raise ValueError(f"no optimiser for the trained trees {missing}; have {sorted(txs)}")
    params = variables["params"]
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=txs[MODEL].init(params),
        key=key,
        others={name: Trainable(p, txs[name].init(p)) for name, p in others.items()},
    )


def apply_updates(
    state: TrainState,
    grads: Mapping[str, Any],
    batch_stats: Any,
    tx: optax.GradientTransformation | Optimizers,
) -> TrainState:
    """Each tree's optimiser on its own gradient, every update computed from the pre-step
    parameters (as PyTorch's ``opt_G.step(); opt_D.step()`` at the end of an iteration);
    the segmentor's new BN statistics; the step advances. ``grads``: ``{tree: gradient}``."""
    txs = as_optimizers(tx)
    updates, opt_state = txs[MODEL].update(grads[MODEL], state.opt_state, state.params)
    others = {}
    for name, tree in state.others.items():
        tree_updates, tree_opt = txs[name].update(grads[name], tree.opt_state, tree.params)
        others[name] = Trainable(optax.apply_updates(tree.params, tree_updates), tree_opt)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        others=others,
    )
