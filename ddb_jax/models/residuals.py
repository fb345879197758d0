"""Activations a training forward keeps for its backward pass: what remat and bfloat16 cut.

Traced only (nothing is allocated), so the figure is the model's own, the same on any
backend, independent of how a compiler later schedules and fuses the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Private in jax 0.10 (pinned); the public print_saved_residuals only prints this list.
from jax._src.ad_checkpoint import saved_residuals

from ddb_jax import models


def kept_for_backward_bytes(model, image_shape: tuple[int, ...]) -> int:
    """Bytes of the residuals of one train-mode forward of ``model`` on float32 images of
    ``image_shape`` (N, H, W, 3), the parameters and the images themselves excluded."""
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)

    def loss(params, batch_stats, x):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        return outputs["logits"].astype(jnp.float32).sum()

    saved = saved_residuals(loss, shapes["params"], shapes["batch_stats"], images)
    return int(
        sum(np.prod(a.shape) * a.dtype.itemsize for a, why in saved if "argument" not in why)
    )
