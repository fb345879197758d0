"""What every training method shares: the protocol, its loss terms, and the one jitted step.

A method (self-training, CKD, supervised, ADVENT...) is an object with

- ``update(txs, state, batch, frozen) -> (state, outputs, metrics)``: its whole iteration.
  Most methods sum named loss terms and train the segmentor alone:
  :func:`single_tree_update` over the parts below. A method that trains more trees
  (ADVENT's discriminators, each from its own loss and with its own optimiser) writes its
  own, differentiating each tree's loss and applying every update to the pre-step
  parameters with :func:`ddb_jax.methods.state.apply_updates`;
- ``other_trees``: ``{tree: optimiser config}`` of the trees it trains besides the segmentor
  and ``init_others(key)``, their initial parameters (``{}`` for one-tree methods);
- ``init_state(state)``: its train state (self-training adds the EMA teacher to
  :class:`~ddb_jax.methods.state.TrainState`);
- ``prepare(state, batch, keys, frozen)``: what the step computes without gradients
  (teacher pseudo-labels, the bridged images), a dict;
- ``terms``: its loss as a sequence of named terms, each ``term(method, params, ctx) ->
  (loss, ctx)``; ``ctx`` holds the batch, the keys, what ``prepare`` and earlier terms
  computed, and the student's running BN statistics (``ctx['batch_stats']``, updated by
  every student forward in term order, as the reference's successive forwards do). A new
  loss term is one such function and one config switch (see the self-training method);
- ``finish(state, outputs)``: what changes besides the optimiser update (the EMA teacher);
- ``preview(batch, outputs)``: image panels drawn from what the step computed.

``frozen`` is what a method reads but never trains (CKD's teachers and prototype tables):
an argument of the jitted step, replicated on the mesh, rather than constants baked into
the compiled program.
"""

from __future__ import annotations

import types
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddb_jax.methods import device_input, multires, previews
from ddb_jax.methods.state import MODEL, Optimizers, TrainState, apply_updates, as_optimizers
from ddb_jax.ops import resize_bilinear, upcast
from ddb_jax.uda import losses

Batch = Mapping[str, jax.Array]
Context = dict[str, Any]
Term = Callable[[Any, Any, Context], tuple[jax.Array, Context]]
# Entries of the context that are inputs, not outputs of the step.
_INPUTS = ("state", "batch", "keys", "frozen")


class Method(Protocol):
    name: str
    key_names: tuple[str, ...]
    terms: Sequence[tuple[str, Term]]
    metric_names: tuple[str, ...]
    preview_tag: str
    preview_panels: tuple[str, ...]
    student_apply: Callable
    other_trees: Mapping[str, Any]  # tree name -> its optimiser config

    def init_others(self, key: jax.Array) -> dict[str, Any]: ...

    def update(
        self, txs: Optimizers, state: TrainState, batch: Batch, frozen: Any
    ) -> tuple[TrainState, Context, dict[str, jax.Array]]: ...

    def init_state(self, state: TrainState) -> TrainState: ...

    def prepare(self, state: TrainState, batch: Batch, keys: StepKeys, frozen: Any) -> Context: ...

    def finish(self, state: TrainState, outputs: Context) -> TrainState: ...

    def preview(self, batch: Batch, outputs: Context) -> list[jax.Array]: ...


class StepKeys(Mapping):
    """The random keys of one step, by name.

    ``fold_in(state.key, state.step)`` is split over the method's ``key_names`` (a single
    name takes the step key itself); any other name (a loss term added later) folds its
    own CRC-32 into the step key, so adding a term never moves the existing draws.
    """

    def __init__(self, state: TrainState, names: tuple[str, ...]):
        self.step_key = jax.random.fold_in(state.key, state.step)
        self.names = names
        split = [self.step_key] if len(names) == 1 else jax.random.split(self.step_key, len(names))
        self._keys = dict(zip(names, split, strict=True))

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self._keys:
            self._keys[name] = jax.random.fold_in(self.step_key, zlib.crc32(name.encode()) >> 1)
        return self._keys[name]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def student_forward(
    apply_fn: Callable,
    params,
    batch_stats,
    images: jax.Array,
    dropout_key: jax.Array,
    with_backbone: bool = False,
):
    """The student in training mode: its named outputs, and its updated BN statistics.

    ``with_backbone``: with the backbone maps of the same forward, ``outputs['backbone']``
    (``EncoderDecoder.forward_with_features``). An HRDA student runs its training forward
    on a detail box drawn from ``dropout_key`` (:mod:`ddb_jax.methods.multires`); its
    outputs add 'detail_logits' and 'detail_box', and 'backbone' is the context's.
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if multires.segmentor(apply_fn) is not None:
        # HRDA: the context and a drawn detail crop (its training forward always returns
        # the context's backbone maps).
        outputs, updates = multires.training_forward(apply_fn, variables, images, dropout_key)
        return outputs, updates["batch_stats"]
    method = {"method": "forward_with_features"} if with_backbone else {}
    outputs, updates = apply_fn(
        variables,
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
        **method,
    )
    return outputs, updates["batch_stats"]


def prediction(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Train ids at ``size`` from logits at the head's stride (for previews)."""
    return jnp.argmax(resize_bilinear(upcast(logits), size), axis=-1)


def labelled_term(
    method: Method,
    params,
    ctx: Context,
    images: jax.Array,
    labels: jax.Array,
    dropout_key: jax.Array,
    weight: jax.Array | None = None,
    backbone_key: str | None = None,
    fused_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """``fused_scale`` x mmseg CE of the student (training mode) on ``images``; updates
    ``ctx['batch_stats']``.

    Returns (loss, logits at the head's stride). With ``backbone_key`` the backbone's maps
    of this forward are kept in ``ctx[backbone_key]``. An HRDA student's loss is HRDA's
    (fused and detail CE), and each forward's detail box is appended to
    ``ctx['detail_boxes']``; ``fused_scale`` then scales its fused term only.
    """
    outputs, ctx["batch_stats"] = student_forward(
        method.student_apply, params, ctx["batch_stats"], images, dropout_key,
        with_backbone=backbone_key is not None,
    )  # fmt: skip
    if backbone_key is not None:
        ctx[backbone_key] = outputs["backbone"]
    logits = outputs["logits"]
    if "detail_box" in outputs:  # HRDA: fused and detail CE; the boxes are step outputs
        ctx["detail_boxes"] = (*ctx.get("detail_boxes", ()), outputs["detail_box"])
        loss = multires.segmentation_loss(
            method.student_apply, outputs, labels, weight, fused_scale
        )
        return loss, logits
    return fused_scale * losses.cross_entropy(logits, labels, weight), logits


def source_term(method: Method, params, ctx: Context) -> tuple[jax.Array, Context]:
    """CE on the labelled source images (every method's first term).

    A method whose later terms read the backbone maps of this forward (DAFormer's feature
    distance) sets ``keep_source_backbone``; they are then ``ctx['source_backbone']``.
    """
    batch = ctx["batch"]
    keep = getattr(method, "keep_source_backbone", False)
    loss, logits = labelled_term(
        method, params, ctx, batch["source_image"], batch["source_label"],
        ctx["keys"]["dropout_source"], backbone_key="source_backbone" if keep else None,
    )  # fmt: skip
    ctx["acc_source"] = losses.pixel_accuracy(logits, batch["source_label"])
    ctx["source_prediction"] = prediction(logits, batch["source_label"].shape[1:3])
    return loss, ctx


def method_loss(
    method: Method, params, state: TrainState, batch: Batch, keys: StepKeys, frozen: Any
) -> tuple[jax.Array, Context]:
    """The sum of the method's terms; outputs: everything the step computed, by name
    (``loss_<term>`` for each term, and ``batch_stats``)."""
    ctx: Context = {"state": state, "batch": batch, "keys": keys, "frozen": frozen}
    ctx.update(method.prepare(state, batch, keys, frozen))
    ctx["batch_stats"] = state.batch_stats
    total = jnp.zeros((), jnp.result_type(float))
    for name, term in method.terms:
        value, ctx = term(method, params, ctx)
        ctx[f"loss_{name}"] = value
        total = total + value
    return total, {k: v for k, v in ctx.items() if k not in _INPUTS}


def loss_and_grads(
    method: Method, state: TrainState, batch: Batch, frozen: Any = None
) -> tuple[jax.Array, Context, Any]:
    """(loss, outputs, gradients w.r.t. the student's parameters) of one step."""
    keys = StepKeys(state, method.key_names)
    grad_fn = jax.value_and_grad(
        lambda p: method_loss(method, p, state, batch, keys, frozen), has_aux=True
    )
    (loss, outputs), grads = grad_fn(state.params)
    return loss, outputs, grads


def single_tree_update(
    method: Method, txs: Optimizers, state: TrainState, batch: Batch, frozen: Any = None
) -> tuple[TrainState, Context, dict[str, jax.Array]]:
    """The one-tree iteration: the sum of the method's terms, one optimiser update of the
    segmentor, then the method's own updates (``finish``). Returns (state, outputs,
    metrics)."""
    loss, outputs, grads = loss_and_grads(method, state, batch, frozen)
    new_state = apply_updates(state, {MODEL: grads}, outputs["batch_stats"], txs)
    new_state = method.finish(new_state, outputs)
    metrics = {"loss": loss, **{k: outputs[k] for k in method.metric_names if k in outputs}}
    metrics["grad_norm"] = optax.tree.norm(grads)
    return new_state, outputs, metrics


def train_step(
    method: Method,
    tx: optax.GradientTransformation | Optimizers,
    state: TrainState,
    batch: Batch,
    frozen: Any = None,
    with_preview: bool = False,
):
    """One iteration, as the method defines it (``method.update``).

    Returns ``(state, metrics)``, and with ``with_preview`` also ``{tag: panels}``, the
    method's preview of this very step (uint8, see :mod:`ddb_jax.methods.previews`).
    Images that crossed to the device as uint8 are normalised first
    (:func:`~ddb_jax.methods.device_input.network_input`): methods see float32 images.
    """
    batch = device_input.network_input(batch)
    new_state, outputs, metrics = method.update(as_optimizers(tx), state, batch, frozen)
    if not with_preview:
        return new_state, metrics
    panels = previews.panel_rows(method.preview(batch, outputs))
    return new_state, metrics, {method.preview_tag: panels}


def make_train_step(
    method: Method,
    tx: optax.GradientTransformation | Optimizers,
    mesh: Mesh | None = None,
    with_preview: bool = False,
    compiler_state_layouts: bool = False,
) -> Callable:
    """The jitted step ``(state, batch, frozen=None)``, state donated; stages, tests and
    benchmarks all use this one.

    With ``mesh`` the state and ``frozen`` are replicated and the batch is split over the
    'data' axis (BatchNorm statistics and gradients are then reduced over the global batch);
    without, jit places by its inputs. ``compiler_state_layouts``: the state in and out in
    the layouts the compiler picks (``Layout.AUTO``), not row-major; on a GPU that spares the
    per-step transposes of every conv kernel, its gradient, EMA and optimiser moments to
    cuDNN's filter layout (docs/performance_notes.md). The caller places the state in the
    compiled step's input formats (:mod:`ddb_jax.train.state_layouts`).
    """

    def step(state, batch, frozen=None):
        return train_step(method, tx, state, batch, frozen, with_preview)

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    state = Format(Layout.AUTO, replicated) if compiler_state_layouts else replicated
    outputs = (state,) + (replicated,) * (2 if with_preview else 1)
    return jax.jit(
        step,
        in_shardings=(state, data, replicated),
        out_shardings=outputs,
        donate_argnums=0,
    )


class OneTree:
    """What a method that trains the segmentor alone inherits: no other trees, and the
    iteration of :func:`single_tree_update` over its terms."""

    other_trees: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})

    def init_others(self, key: jax.Array) -> dict[str, Any]:
        return {}

    def update(self, txs: Optimizers, state: TrainState, batch: Batch, frozen: Any = None):
        return single_tree_update(self, txs, state, batch, frozen)


def check_one_target_stream(config) -> None:
    """A method reading ``batch['target_image']`` (one stream over the union of the targets)
    refuses ``data.per_target_streams``, which names the streams per target instead."""
    from ddb_jax.methods.registry import MethodConfigError

    if config.data.get("per_target_streams", False):
        raise MethodConfigError(
            f"config.data.per_target_streams=True: config.stage={config.stage!r} trains on one "
            "target stream over all targets; set it to False"
        )
