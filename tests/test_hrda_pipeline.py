"""HRDA's pipelines on the toy high-resolution domains, two steps per stage at tiny crops:
the HRDA comparison (single-resolution students at half resolution and at full resolution on
detail-sized crops, HRDA, MIC on HRDA) and
DDB's first round on an HRDA student (both paths, their prototypes, CKD with HRDA teachers);
every stage hands its deliverable on and writes what its graph says."""

import json
import os

import numpy as np
import pytest

from configs import ddb_hrda_demo, hrda_demo
from ddb_jax import checkpoints, pipeline
from ddb_jax.graph import stage_graph
from ddb_jax.offline import prototype_io
from tests.test_demo_pipeline import Spy

pytestmark = pytest.mark.pipelines  # make test-pipelines (about 3 minutes of both cores)

FULL, HALF = [512, 256], [256, 128]


def tiny(config, root):
    """Two steps per stage, 128x128 crops with a 64x64 detail crop."""
    config = stage_graph.pipeline_config(config)
    config.data.root = str(root)
    config.data.crop_size = (128, 128)
    config.model.hrda.detail_crop = (64, 64)
    config.mic.block_size = 16
    config.prototypes.batch_size = 4
    config.eval_every = config.checkpoint_every = 2
    config.image_summary_every = 0
    return config


def stage_file(workdir: str, stage: str, name: str) -> dict:
    with open(os.path.join(workdir, stage, name)) as f:
        return json.load(f)


def test_the_hrda_comparison_runs_single_single_hr_hrda_and_mic(toy_root, tmp_path):
    workdir = str(tmp_path / "hrda")
    config = tiny(hrda_demo.setting(2), toy_root)
    config.baselines = ()
    spy = Spy()
    summary = pipeline.run(config, workdir, run_stage=spy)
    stages = ["single", "single_hr", "hrda", "mic_hrda"]
    assert spy.names == stages
    for stage, hrda in zip(stages, (False, False, True, True), strict=True):
        _, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, stage, "export"))
        assert checkpoints.model_setting(model_cfg, "hrda.enabled") is hrda
        assert stage_file(workdir, stage, "result.json")["step"] == 2
    single = stage_file(workdir, "single", "config.json")
    assert single["data"]["resize_scales"] == {"toy_hr_source": HALF, "toy_hr_target": HALF}
    assert single["data"]["crop_size"] == [64, 64] and single["eval"]["mode"] == "whole"
    single_hr = stage_file(workdir, "single_hr", "config.json")  # HRDA's "HR-only" row
    assert single_hr["data"]["resize_scales"] == {"toy_hr_source": FULL, "toy_hr_target": FULL}
    assert single_hr["data"]["crop_size"] == [64, 64]  # the detail crop
    assert single_hr["data"]["target_pseudo_margins"] == [4, 16, 4, 4]
    assert single_hr["eval"]["mode"] == "whole"
    hrda = stage_file(workdir, "hrda", "config.json")
    assert hrda["data"]["resize_scales"]["toy_hr_target"] == FULL
    assert hrda["data"]["target_pseudo_margins"] == [4, 16, 4, 4]
    assert stage_file(workdir, "mic_hrda", "config.json")["mic"]["enabled"]
    assert set(summary["stages"]) == set(stages)


def test_ddb_round_one_trains_hrda_students_and_distils_hrda_teachers(toy_root, tmp_path):
    workdir = str(tmp_path / "ddb_hrda")
    config = tiny(ddb_hrda_demo.setting(2), toy_root)
    config.rounds = 1
    spy = Spy()
    pipeline.run(config, workdir, run_stage=spy)
    assert spy.names == ["r1_cu", "r1_ca", "r1_proto_cu", "r1_proto_ca", "r1_ckd"]
    for stage in ("r1_cu", "r1_ca", "r1_ckd"):
        _, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, stage, "export"))
        assert checkpoints.model_setting(model_cfg, "hrda.enabled")
    ckd = stage_file(workdir, "r1_ckd", "config.json")
    assert ckd["ckd"]["teacher_cu"] == os.path.join(workdir, "r1_cu", "export")
    for path in ("cu", "ca"):
        table, counts = prototype_io.load_prototypes(
            os.path.join(workdir, f"r1_proto_{path}", stage_graph.PROTOTYPES), 19
        )
        # The context head's features of the HRDA teacher (DDB's DLV2 head: 32 channels).
        assert table.shape == (19, 32) and counts.sum() > 0 and np.all(np.isfinite(table))
