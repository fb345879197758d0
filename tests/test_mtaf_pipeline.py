"""MTAF's pipeline on the toy domains (configs/mtaf_demo.py: the toy target and the toy
IDD), two steps per stage: the multi-target baseline, MDis and MTKT
run in the graph's order, each on a batch key per target, and export a model directory;
MTKT's holds its 1 + 2 heads; each stage's config.json holds what the graph set; a rerun
skips them all."""

import json
import os

import pytest

from configs import mtaf_demo
from ddb_jax import checkpoints, pipeline
from ddb_jax.graph import stage_graph
from tests.test_demo_pipeline import Spy

pytestmark = pytest.mark.pipelines  # make test-pipelines

STAGES = ["baseline", "mdis", "mtkt"]
KINDS = {"baseline": "mtaf_baseline", "mdis": "mtaf_mdis", "mtkt": "mtaf_mtkt"}
HEADS = {"baseline": 1, "mdis": 1, "mtkt": 1 + len(mtaf_demo.TARGETS)}


def tiny(root):
    """Two steps per stage (MTKT's teachers alone for the first, distilled from the second),
    64x64 crops of the toy's 256x128 images, no source-only row."""
    config = stage_graph.pipeline_config(mtaf_demo.setting(2))
    config.data.root = str(root)
    config.data.crop_size = (64, 64)
    config.batch_size = 2
    config.baselines = ()
    config.mtaf.teacher_iters = 1
    config.eval_every = config.checkpoint_every = 2
    config.image_summary_every = 0
    return config


def stage_file(workdir: str, stage: str, name: str) -> dict:
    with open(os.path.join(workdir, stage, name)) as f:
        return json.load(f)


def test_every_stage_runs_in_order_and_exports_with_the_graphs_settings(toy_root, tmp_path):
    workdir = str(tmp_path / "mtaf")
    spy = Spy()
    summary = pipeline.run(tiny(toy_root), workdir, run_stage=spy)
    assert spy.names == STAGES
    assert list(summary["stages"]) == STAGES and summary["targets"] == list(mtaf_demo.TARGETS)
    targets = list(mtaf_demo.TARGETS)
    for stage in STAGES:
        export = os.path.join(workdir, stage, "export")
        _, model_cfg = checkpoints.load_model_dir(export)
        assert (model_cfg.backbone, model_cfg.head) == ("resnet101_caffe", "advent_aspp")
        with open(os.path.join(export, checkpoints.MODEL_JSON)) as f:
            assert json.load(f)["model"]["advent_heads"] == HEADS[stage]
        assert stage_file(workdir, stage, "result.json")["step"] == 2
        config = stage_file(workdir, stage, "config.json")
        assert config["stage"] == KINDS[stage]
        assert config["model"]["advent_heads"] == HEADS[stage]
        assert config["data"]["target"] == targets and config["data"]["per_target_streams"]
        assert config["mtaf"]["teacher_iters"] == 1
        assert config.get("init_from") in (None, "")  # independent stages: ImageNet or random
        row = summary["stages"][stage]  # every target evaluated on its own (MTKT: head 0)
        assert row["stage"] == KINDS[stage] and all(0 <= row[t] <= 100 for t in targets)
    again = Spy()
    pipeline.run(tiny(toy_root), workdir, run_stage=again)
    assert again.names == []
