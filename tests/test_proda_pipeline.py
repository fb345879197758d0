"""ProDA's whole pipeline on the toy domains, two steps per stage: every stage runs in the
graph's order and hands its deliverable to the next (warm-up model -> soft labels and
prototypes -> stage 1 -> pseudo-labels -> stage 2 -> pseudo-labels -> stage 3); a rerun
skips everything; a released warm-up model replaces the warm-up stage."""

import json
import os

import numpy as np
import pytest

from configs import proda_demo, proda_gta2cs
from ddb_jax import checkpoints, pipeline
from ddb_jax.graph import proda as proda_graph
from ddb_jax.graph import stage_graph
from ddb_jax.offline import proda_labels, prototype_io
from tests.test_demo_pipeline import Spy

STAGES = ["warmup", "soft", "protos", "stage1", "labels1", "stage2", "labels2", "stage3"]
TRAINED = {"warmup": "proda_warmup", "stage1": "proda", "stage2": "proda_distill",
           "stage3": "proda_distill"}  # fmt: skip
TARGET_TRAIN_IMAGES = 12  # tests/conftest.py's toy_root


def tiny(root) -> object:
    config = stage_graph.pipeline_config(proda_demo.setting(2))
    config.data.root = str(root)
    config.eval_every = 2
    config.checkpoint_every = 2
    config.image_summary_every = 0
    return config


@pytest.mark.pipelines  # make test-pipelines: the whole chain (about a minute of both cores)
def test_the_pipeline_runs_every_stage_in_order_and_a_rerun_skips_them(toy_root, tmp_path):
    workdir = str(tmp_path / "proda")
    spy = Spy()
    summary = pipeline.run(tiny(toy_root), workdir, run_stage=spy)
    assert spy.names == STAGES
    for name, kind in TRAINED.items():
        _, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, name, "export"))
        assert model_cfg.backbone == "resnet101_proda"
        with open(os.path.join(workdir, name, "result.json")) as f:
            assert json.load(f)["step"] == 2
        with open(os.path.join(workdir, name, "config.json")) as f:
            assert json.load(f)["stage"] == kind
    assert list(summary["stages"]) == list(TRAINED)

    soft = os.path.join(workdir, "soft", proda_graph.SOFT_LABELS)
    assert proda_graph.SOFT_LABELS == proda_labels.FOLDERS["proda_soft_labels"]
    assert proda_graph.PSEUDO_LABELS == proda_labels.FOLDERS["proda_pseudo_labels"]
    files = sorted(f for f in os.listdir(soft) if f.endswith(".npy"))
    assert len(files) == TARGET_TRAIN_IMAGES and os.path.exists(os.path.join(soft, "done"))
    probabilities = np.load(os.path.join(soft, files[0])).astype(np.float64)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=19 * 2**-11)  # float16 rows
    for labels in ("labels1", "labels2"):
        folder = os.path.join(workdir, labels, proda_graph.PSEUDO_LABELS)
        pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
        assert len(pngs) == TARGET_TRAIN_IMAGES
    table, counts = prototype_io.load_prototypes(
        os.path.join(workdir, "protos", stage_graph.PROTOTYPES), 19
    )
    assert counts.sum() > 0 and np.all(np.isfinite(table))

    # Each stage read what the graph wired to it.
    with open(os.path.join(workdir, "stage3", "config.json")) as f:
        stage3 = json.load(f)
    assert stage3["init_from"] == os.path.join(workdir, "stage2", "export")
    assert stage3["proda"]["teacher"] == os.path.join(workdir, "stage2", "export")
    assert stage3["proda"]["pseudo_labels"] == os.path.join(workdir, "labels2", "pseudo_labels")

    again = Spy()
    pipeline.run(tiny(toy_root), workdir, run_stage=again)
    assert again.names == []


def test_a_released_warmup_model_replaces_the_warmup_stage():
    setting = proda_gta2cs.setting()
    setting.proda.warmup_from = "pretrained/proda_gta_warmup"
    names = [stage.name for stage in stage_graph.graph_of(setting)]
    assert names == STAGES[1:]
    stage1 = stage_graph.config_for(setting, "stage1", "runs/x")
    assert stage1.init_from == "pretrained/proda_gta_warmup"
    assert stage1.proda.soft_labels == "runs/x/soft/soft_labels"
    assert stage_graph.config_for(setting, "soft", "runs/x").checkpoint == setting.proda.warmup_from
    stage2 = stage_graph.config_for(setting, "stage2", "runs/x")
    assert (stage2.optim.lr, stage2.optim.head_lr_mult) == (6e-4, 10.0)
    assert stage2.init_from == setting.proda.student_init
    assert (stage1.optim.lr, stage1.optim.head_lr_mult, stage1.optim.listed_times) == (
        1e-4,
        1.0,
        "",
    )
