"""The two-teacher target of cross-path distillation (docs/method.md §1.5).

Reference: DDB ``dass/models/uda/ckd.py``. Each frozen path model (cut path "cu", class
path "ca") gives logits at image size and, with prototype rectification, a weight per
class (:func:`ddb_jax.uda.prototypes.prototype_weights`); the student learns the ensemble's
argmax (or, with soft distillation, the ensemble's logits). Pure array functions: the
models that produce the inputs live in :mod:`ddb_jax.methods.ckd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddb_jax.ops import upcast
from ddb_jax.uda import losses


def rectified_ensemble(
    logits_a: jax.Array,
    weights_a: jax.Array,
    logits_b: jax.Array,
    weights_b: jax.Array,
    on_probabilities: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Two rectified teachers -> (pseudo-label int32 (N, H, W), ensemble confidence).

    On probabilities (default): ``0.5 W_a softmax(l_a) + 0.5 W_b softmax(l_b)``, not
    renormalised. On logits (the reference's other option): ``0.5 softmax(W_a l_a) +
    0.5 softmax(W_b l_b)``. Logits and weights (N, H, W, K) at the same size. The
    confidence (max of the ensemble) feeds the ``use_pl_weight`` option through
    :func:`ddb_jax.uda.losses.confident_fraction`.
    """
    logits_a, logits_b = upcast(logits_a), upcast(logits_b)
    if on_probabilities:
        probs_a = weights_a * jax.nn.softmax(logits_a, -1)
        probs_b = weights_b * jax.nn.softmax(logits_b, -1)
    else:
        probs_a = jax.nn.softmax(weights_a * logits_a, -1)
        probs_b = jax.nn.softmax(weights_b * logits_b, -1)
    ensemble = 0.5 * probs_a + 0.5 * probs_b
    return jnp.argmax(ensemble, -1).astype(jnp.int32), jnp.max(ensemble, -1)


def rectified_logit_average(
    logits_a: jax.Array, weights_a: jax.Array, logits_b: jax.Array, weights_b: jax.Array
) -> jax.Array:
    """Soft-distillation target logits: ``(W_a l_a + W_b l_b) / 2`` (pass weights of 1 to skip
    rectification); :func:`ddb_jax.uda.losses.distillation_kl` divides by T."""
    return 0.5 * (weights_a * logits_a + weights_b * logits_b)


def ensemble_targets(
    logits: tuple[jax.Array, jax.Array],
    weights: tuple[jax.Array, jax.Array] | None,
    *,
    soft: bool,
    on_probabilities: bool,
    use_confidence_weight: bool,
    threshold: float,
) -> dict[str, jax.Array]:
    """Pseudo-labels, pixel weights (and the soft target) from the two teachers.

    ``logits``: both teachers' logits at image size; ``weights``: their prototype weights,
    or None without rectification (the plain 0.5/0.5 softmax ensemble). Hard labels (the
    reference's default): argmax of the (rectified) ensemble, weight 1, or with
    ``use_confidence_weight`` the batch fraction of ensemble maxima >= ``threshold``. Soft:
    the target logits ``(W_a l_a + W_b l_b) / 2``. Also two diagnostics: how often the
    teachers agree and, with rectification, the share of labels the prototypes changed.
    """
    l_a, l_b = upcast(logits[0]), upcast(logits[1])
    w_a, w_b = weights if weights is not None else (jnp.ones((), l_a.dtype),) * 2
    agree = jnp.argmax(l_a, -1) == jnp.argmax(l_b, -1)
    out = {"teacher_agreement": jnp.mean(agree, dtype=l_a.dtype)}
    if soft:
        target = rectified_logit_average(l_a, w_a, l_b, w_b)
        out["soft_target"] = target
        out["pseudo_labels"] = jnp.argmax(target, -1).astype(jnp.int32)
        out["pseudo_weight"] = jnp.ones(l_a.shape[:3], l_a.dtype)
    else:
        labels, confidence = rectified_ensemble(
            l_a, w_a, l_b, w_b, on_probabilities=on_probabilities or weights is None
        )
        weight = (
            losses.confident_fraction(confidence, threshold)
            if use_confidence_weight
            else jnp.ones((), l_a.dtype)
        )
        out["pseudo_labels"] = labels
        out["pseudo_weight"] = jnp.broadcast_to(weight, labels.shape).astype(l_a.dtype)
    if weights is not None:
        if soft:
            plain = jnp.argmax(l_a + l_b, -1)
        else:
            plain = jnp.argmax(jax.nn.softmax(l_a, -1) + jax.nn.softmax(l_b, -1), -1)
        out["rectify_changed"] = jnp.mean(plain != out["pseudo_labels"], dtype=l_a.dtype)
    return out
