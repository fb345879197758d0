"""The train state in the layouts the step's compiler picks (``config.state_layouts``).

Row-major parameters are what checkpoints, exports and the PyTorch converters hold, but
not what every compiler computes with: XLA:GPU turns each row-major (HWIO) convolution
kernel into cuDNN's filter layout, so a step that takes and returns the state row-major
transposes every kernel, its gradient, its EMA and its optimiser moments every step
(docs/performance_notes.md, section 3.6). With ``state_layouts='compiler'`` the step is
jitted with ``Layout.AUTO`` for the state (:func:`ddb_jax.methods.base.make_train_step`),
compiled once from the shapes of the first batch, and the state is moved into the layouts
it asks for; the compiler keeps the donated state's output in those same layouts, so the
state stays in them from step to step. Arrays in any layout read back row-major on the
host, so checkpoints and exports are unchanged, and the evaluation's jit compiles for the
layouts it is given. On a CPU (and wherever the compiler's choice is row-major) the
program and its results are the row-major step's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

STATE_LAYOUTS = ("row_major", "compiler")


def abstract(tree: Any) -> Any:
    """``tree``'s arrays as ShapeDtypeStructs with their shardings: what a jit with
    ``Layout.AUTO`` arguments is lowered from (it refuses arrays of a concrete layout)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


def compile_and_place(step: Callable, state: Any, batch: Any, frozen: Any) -> tuple[Callable, Any]:
    """``step`` (jitted with the state's layout left to the compiler) compiled for these
    arguments' shapes, and ``state`` moved into the layouts the compiled step takes."""
    compiled = step.lower(abstract(state), abstract(batch), abstract(frozen)).compile()
    return compiled, place(state, compiled)


def place(state: Any, compiled: Any) -> Any:
    """``state`` moved into the layouts ``compiled`` (a step taking the state first) takes."""
    formats = compiled.input_formats[0][0]

    def put(x, fmt):  # a typed PRNG key's layout is its raw data's: it keeps its own
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, fmt.sharding)
        return jax.device_put(x, fmt)

    return jax.tree_util.tree_map(put, state, formats)
