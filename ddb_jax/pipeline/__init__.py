"""Stage 'pipeline': every stage of a method's graph (:mod:`ddb_jax.graph`) in one command,
resumable stage by stage.

:mod:`~ddb_jax.pipeline.plan` makes the plan (each stage of each seed with its complete
config) and checks it, :mod:`~ddb_jax.pipeline.schedule` decides what runs at once and on
which devices, :mod:`~ddb_jax.pipeline.runner` runs it, :mod:`~ddb_jax.pipeline.summary`
writes the table.
"""

from ddb_jax.pipeline.plan import PipelineError, Planned, plan_stages
from ddb_jax.pipeline.runner import PIPELINE_JSON, enable_compilation_cache, run
from ddb_jax.pipeline.schedule import device_groups, process_groups, waves
from ddb_jax.pipeline.summary import SUMMARY_JSON, SUMMARY_MD, format_summary, summarize

__all__ = [
    "PIPELINE_JSON", "SUMMARY_JSON", "SUMMARY_MD", "PipelineError", "Planned",
    "device_groups", "enable_compilation_cache", "format_summary", "plan_stages",
    "process_groups", "run", "summarize", "waves",
]  # fmt: skip
