"""PyTorch transcriptions of the reference semantics (mmseg 0.x, DDB, DAFormer, kornia 0.5.8).

Shared by the tests (parity) and the benchmarks (the PyTorch side of every comparison);
nothing in ``ddb_jax/``, ``input_pipeline/`` or ``tools/`` imports it, and it imports
nothing of theirs. Module and parameter names follow the reference state dicts, so a
model here stands in for a real checkpoint. Each transcription works in the dtype of
its inputs (float32 for the benchmarks, float64 for the step-level parity tests).
"""
