"""Stage 'supervised': plain CE on labelled images of ``config.data.source``.

The two reference points of every domain-adaptation table: the *source-only* model
(trained on the synthetic domain, evaluated on the target) and the *oracle* (trained
on the target's own labelled training set). Same optimiser, schedule, loop,
sharding and checkpoints as the DDB stages, so the rows are comparable.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import optax

from ddb_jax import losses
from ddb_jax.train.state import TrainState, apply_gradients, student_forward


def supervised_step(
    state: TrainState, batch: dict[str, jax.Array], *, apply_fn, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the CE of the labelled (source) batch."""
    dropout_key = jax.random.fold_in(state.key, state.step)

    def loss_fn(params):
        (logits, _), batch_stats = student_forward(
            apply_fn, params, state.batch_stats, batch["source_image"], dropout_key
        )
        loss = losses.cross_entropy(logits, batch["source_label"])
        accuracy = losses.pixel_accuracy(logits, batch["source_label"])
        return loss, (batch_stats, accuracy)

    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, batch_stats, tx)
    metrics = {"loss": loss, "acc_source": accuracy, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains on data.source with labels and evaluates on data.target, like every stage."""
    from ddb_jax.train import setup
    from ddb_jax.train.loop import check_workdir_config, train_loop

    check_workdir_config(workdir, config)
    run = setup.prepare_run(config)
    # No EMA teacher here: empty teacher fields keep the checkpoints small.
    state = run.state.replace(ema_params={}, ema_batch_stats={})
    step = functools.partial(supervised_step, apply_fn=run.model.apply, tx=run.tx)
    train_step = jax.jit(
        step,
        in_shardings=(run.replicated, run.batch_sharding),
        out_shardings=(run.replicated, run.replicated),
        donate_argnums=0,
    )
    return train_loop(
        config,
        workdir,
        state,
        train_step,
        run.make_batches,
        run.evaluate_student,
        lambda s: jax.device_get(s.variables()),
    )
