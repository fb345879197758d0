"""Pipelines as data: every method's stage graph (:mod:`~ddb_jax.graph.stage_graph`: what a graph
is, and the stage configs derived from it; one module per method's graph, each registering
itself under its ``config.graph`` name)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
