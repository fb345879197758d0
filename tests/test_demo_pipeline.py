"""The real chain on the toy domains, a few steps per stage: every stage runs and hands its
deliverable to the next; a rerun skips finished stages; a deleted stage output is redone."""

import json
import os
import shutil

import numpy as np
import pytest

from ddb_jax import checkpoints, pipeline
from ddb_jax.offline import prototype_io
from tests.support import tiny_pipeline

# DDB's whole pipeline: make test-pipelines, with the other methods' (make demo runs it at
# its full 300 steps a stage).
pytestmark = pytest.mark.pipelines

STAGES = [
    "source_only", "r1_cu", "r1_ca", "r1_proto_cu", "r1_proto_ca", "r1_ckd",
    "r2_cu", "r2_ca", "r2_proto_cu", "r2_proto_ca", "r2_ckd",
]  # fmt: skip


class Spy:
    """Runs the real stage and records its name."""

    def __init__(self):
        from ddb_jax import stages

        self.names = []
        self._resolve = stages.resolve_stage

    def __call__(self, stage_cfg, stage_dir, devices=None):
        self.names.append(os.path.basename(stage_dir))
        return self._resolve(stage_cfg.stage)(stage_cfg, stage_dir, devices=devices)


def test_pipeline_runs_every_stage_and_resumes_stage_by_stage(toy_root, tmp_path):
    workdir = str(tmp_path / "ddb")
    spy = Spy()
    summary = pipeline.run(tiny_pipeline(toy_root), workdir, run_stage=spy)
    assert spy.names == STAGES
    for name in STAGES:
        if "proto" in name:
            table, counts = prototype_io.load_prototypes(
                os.path.join(workdir, name, "prototypes.npz"), 19, 8
            )
            assert counts.sum() > 0 and np.all(np.isfinite(table))
        else:
            variables, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, name, "export"))
            assert model_cfg.base_channels == 8
            with open(os.path.join(workdir, name, "result.json")) as f:
                result = json.load(f)
            assert result["step"] == 2 and 0.0 <= result["miou"] <= 1.0
    assert list(summary["stages"]) == [n for n in STAGES if "proto" not in n]
    assert os.path.exists(os.path.join(workdir, "summary.md"))

    again = Spy()
    pipeline.run(tiny_pipeline(toy_root), workdir, run_stage=again)
    assert again.names == []

    # A deleted stage reruns from scratch; a stage whose export alone was lost resumes at
    # its last checkpoint, re-evaluates and exports again.
    shutil.rmtree(os.path.join(workdir, "r2_ckd"))
    shutil.rmtree(os.path.join(workdir, "r1_ckd", "export"))
    os.remove(os.path.join(workdir, "r1_ckd", "result.json"))
    redo = Spy()
    summary_again = pipeline.run(tiny_pipeline(toy_root), workdir, run_stage=redo)
    assert redo.names == ["r1_ckd", "r2_ckd"]
    assert os.path.exists(os.path.join(workdir, "r2_ckd", "export", "model.json"))
    assert summary_again["stages"]["r1_ckd"] == summary["stages"]["r1_ckd"]
