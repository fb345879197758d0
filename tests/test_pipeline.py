"""The one-command pipeline: stage order, wiring between stages, skipping, subsets, errors.

The stages themselves are replaced by a recorder that writes each stage's deliverable
(their own tests cover them); tests/test_demo_pipeline.py runs the real chain.
"""

import json
import os
import shutil

import numpy as np
import pytest

from configs import demo
from ddb_jax import pipeline, prototype_io

DDB_ORDER = [
    "source_only", "oracle", "r1_cu", "r1_ca", "r1_proto_cu", "r1_proto_ca", "r1_ckd",
    "r2_cu", "r2_ca", "r2_proto_cu", "r2_proto_ca", "r2_ckd",
]  # fmt: skip


class Recorder:
    """Stands in for the stages: records (name, config) and writes the deliverable."""

    def __init__(self):
        self.calls = []

    def __call__(self, stage_cfg, stage_dir):
        name = os.path.basename(stage_dir)
        self.calls.append((name, stage_cfg))
        os.makedirs(stage_dir, exist_ok=True)
        if stage_cfg.stage == "prototypes":
            prototype_io.save_prototypes(
                os.path.join(stage_dir, "prototypes.npz"), np.zeros((19, 32)), np.ones(19)
            )
            return
        os.makedirs(os.path.join(stage_dir, "export"), exist_ok=True)
        with open(os.path.join(stage_dir, "export", "model.json"), "w") as f:
            json.dump({}, f)
        score = 0.1 + 0.01 * len(self.calls)
        with open(os.path.join(stage_dir, "result.json"), "w") as f:
            json.dump({"step": stage_cfg.num_steps, "toy_target": score, "miou": score}, f)

    @property
    def names(self):
        return [name for name, _ in self.calls]


def test_runs_every_stage_in_order_with_its_inputs_wired(tmp_path):
    workdir = str(tmp_path / "run")
    recorder = Recorder()
    summary = pipeline.run(demo.get_config("2"), workdir, run_stage=recorder)
    assert recorder.names == DDB_ORDER
    cfg = dict(recorder.calls)

    def out(stage, *rest):
        return os.path.join(workdir, stage, *rest)

    assert cfg["r1_cu"].init_from == "" and cfg["r1_ca"].st.mask == "class"
    assert cfg["r1_proto_cu"].checkpoint == out("r1_cu", "export")
    assert cfg["r1_proto_ca"].checkpoint == out("r1_ca", "export")
    assert cfg["r1_ckd"].ckd.teacher_cu == out("r1_cu", "export")
    assert cfg["r1_ckd"].ckd.teacher_ca == out("r1_ca", "export")
    assert cfg["r1_ckd"].ckd.prototypes_cu == out("r1_proto_cu", "prototypes.npz")
    assert cfg["r1_ckd"].ckd.prototypes_ca == out("r1_proto_ca", "prototypes.npz")
    # Round 2: both paths start from the round-1 student, at a tenth of the learning rate.
    for path in ("cu", "ca"):
        assert cfg[f"r2_{path}"].init_from == out("r1_ckd", "export")
        assert cfg[f"r2_{path}"].optim.lr == pytest.approx(cfg[f"r1_{path}"].optim.lr / 10)
    assert cfg["r2_ckd"].ckd.teacher_cu == out("r2_cu", "export")
    assert cfg["r2_ckd"].ckd.prototypes_ca == out("r2_proto_ca", "prototypes.npz")
    assert cfg["r2_ckd"].init_from == ""  # the CKD student starts afresh in every round
    assert cfg["oracle"].data.source == ("toy_target",)
    # The summary: every training stage, none of the prototype stages.
    assert list(summary["stages"]) == [n for n in DDB_ORDER if "proto" not in n]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    table = open(os.path.join(workdir, "summary.md")).read()
    assert "| r2_ckd | ckd | 2 |" in table and "proto" not in table


def test_rerun_skips_finished_stages_and_redoes_a_deleted_one(tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(demo.get_config("2"), workdir, run_stage=Recorder())
    again = Recorder()
    pipeline.run(demo.get_config("2"), workdir, run_stage=again)
    assert again.names == []
    shutil.rmtree(os.path.join(workdir, "r2_ckd", "export"))
    os.remove(os.path.join(workdir, "r1_proto_ca", "prototypes.npz"))
    redo = Recorder()
    pipeline.run(demo.get_config("2"), workdir, run_stage=redo)
    assert redo.names == ["r1_proto_ca", "r2_ckd"]


def test_subset_of_stages(tmp_path):
    workdir = str(tmp_path / "run")
    config = demo.get_config("2")
    config.stages = "r1_cu, r1_ca"
    recorder = Recorder()
    summary = pipeline.run(config, workdir, run_stage=recorder)
    assert recorder.names == ["r1_cu", "r1_ca"]
    assert list(summary["stages"]) == ["r1_cu", "r1_ca"]
    config.stages = "r1_proto_cu,r1_proto_ca,r1_ckd"
    recorder = Recorder()
    pipeline.run(config, workdir, run_stage=recorder)
    assert recorder.names == ["r1_proto_cu", "r1_proto_ca", "r1_ckd"]


def test_missing_inputs_name_the_producing_stage_before_anything_runs(tmp_path):
    config = demo.get_config("2")
    config.stages = "r1_ca,r1_ckd"
    recorder = Recorder()
    with pytest.raises(pipeline.PipelineError, match=r"r1_ckd needs .*r1_cu.*run r1_cu first"):
        pipeline.run(config, str(tmp_path / "run"), run_stage=recorder)
    assert recorder.calls == []


def test_bad_pipeline_configs_are_refused(tmp_path):
    config = demo.get_config("2")
    config.stages = "r1_cu,r3_cu"
    with pytest.raises(pipeline.PipelineError, match="r3_cu"):
        pipeline.run(config, str(tmp_path / "a"), run_stage=Recorder())
    config = demo.get_config("2")
    config.pipeline.r1_cu.stage = "ckd"
    with pytest.raises(pipeline.PipelineError, match="pipeline.r1_cu.stage='ckd'"):
        pipeline.run(config, str(tmp_path / "b"), run_stage=Recorder())
    config = demo.get_config("2")
    with config.pipeline.unlocked():
        config.pipeline.round1 = config.pipeline.r1_cu
    with pytest.raises(pipeline.PipelineError, match="config.pipeline.round1"):
        pipeline.run(config, str(tmp_path / "c"), run_stage=Recorder())


def test_every_config_file_loads_and_names_a_stage():
    import glob
    import importlib

    from ddb_jax import models, stages

    pipelines = 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(demo.__file__), "*.py"))):
        module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
        if not hasattr(module, "get_config"):
            continue
        config = module.get_config()
        assert config.stage in stages.STAGES, path
        models.build_model(config.model)
        if config.stage == "pipeline":
            pipelines += 1
            names = pipeline.stage_order(list(config.pipeline.keys()))
            assert [n for n in names if n.startswith("r")] == DDB_ORDER[2:], path
            for name in names:
                pipeline.wire(name, config.pipeline[name], "runs/x")
    assert pipelines == 4  # gta2cs, gtasyn2cs, gta2csmap and the demo
