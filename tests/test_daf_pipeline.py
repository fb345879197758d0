"""DAF/IDA's whole pipeline on the toy domains, two steps per stage: DAF -> pseudo-labels ->
ISL round 1 -> pseudo-labels -> ISL round 2 -> ranking -> IDA, each stage reading what the
graph wires to it; a rerun skips everything. Also the offline stages' rules."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import daf_demo, daf_synthia2cs
from ddb_jax import checkpoints, pipeline
from ddb_jax.graph import daf as daf_graph
from ddb_jax.graph import stage_graph
from ddb_jax.offline import daf_labels
from input_pipeline import daf as daf_data
from input_pipeline import toy
from tests.test_demo_pipeline import Spy

pytestmark = pytest.mark.pipelines

STAGES = ["daf", "labels1", "isl1", "labels2", "isl2", "rank", "ida"]
TRAINED = {"daf": "daf", "isl1": "daf_isl", "isl2": "daf_isl", "ida": "daf_ida"}
TARGET_TRAIN_IMAGES = 6


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", str(TARGET_TRAIN_IMAGES),
              "--num-val", "2", "--extra-sources", "synthia"])  # fmt: skip
    return root


def tiny(root):
    config = stage_graph.pipeline_config(daf_demo.setting(2))
    config.data.root = str(root)
    config.batch_size = 2
    config.eval_every = 2
    config.checkpoint_every = 2
    config.image_summary_every = 0
    config.baselines = ()  # the demo's source-only row: a plain supervised stage (time)
    config.daf.isl_threshold = 0.0  # every pixel labelled: the toy model is never confident
    return config


def test_the_pipeline_runs_every_stage_in_order_and_a_rerun_skips_them(depth_root, tmp_path):
    workdir = str(tmp_path / "daf")
    spy = Spy()
    pipeline.run(tiny(depth_root), workdir, run_stage=spy)
    assert spy.names == STAGES
    for name, kind in TRAINED.items():
        _, model_cfg = checkpoints.load_model_dir(os.path.join(workdir, name, "export"))
        assert model_cfg.backbone == "resnet101_daf"
        with open(os.path.join(workdir, name, "config.json")) as f:
            assert json.load(f)["stage"] == kind
        with open(os.path.join(workdir, name, "result.json")) as f:
            assert json.load(f)["step"] == 2
    for labels in ("labels1", "labels2"):
        folder = os.path.join(workdir, labels, daf_graph.PSEUDO_LABELS)
        pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
        assert len(pngs) == TARGET_TRAIN_IMAGES
    rank = os.path.join(workdir, "rank", daf_graph.RANK)
    easy = daf_data.read_split(os.path.join(rank, daf_data.EASY))
    hard = daf_data.read_split(os.path.join(rank, daf_data.HARD))
    cut = int(TARGET_TRAIN_IMAGES * 0.66)  # 3 of 6: int() as entropy.py
    assert (len(easy), len(hard)) == (cut, TARGET_TRAIN_IMAGES - cut)
    assert len(os.listdir(os.path.join(rank, daf_data.EASY_LABELS))) == len(easy)
    with open(os.path.join(rank, "scores.json")) as f:
        scores = json.load(f)
    assert [scores[i] for i in easy] == sorted(scores[i] for i in easy)
    assert max(scores[i] for i in easy) <= min(scores[i] for i in hard)

    with open(os.path.join(workdir, "isl2", "config.json")) as f:
        isl2 = json.load(f)
    assert isl2["init_from"] == os.path.join(workdir, "isl1", "export")
    assert isl2["daf"]["isl_labels"] == os.path.join(workdir, "labels2", "pseudo_labels")
    with open(os.path.join(workdir, "labels1", "config.json")) as f:
        assert json.load(f)["checkpoint"] == os.path.join(workdir, "daf", "best")
    with open(os.path.join(workdir, "ida", "config.json")) as f:
        ida = json.load(f)
    assert ida["init_from"] == os.path.join(workdir, "isl2", "best")
    assert ida["daf"]["rank"] == rank

    again = Spy()
    pipeline.run(tiny(depth_root), workdir, run_stage=again)
    assert again.names == []


def test_the_reference_setting_has_three_isl_rounds():
    setting = daf_synthia2cs.setting()
    names = [stage.name for stage in stage_graph.graph_of(setting)]
    assert names == ["daf", "labels1", "isl1", "labels2", "isl2", "labels3", "isl3", "rank",
                     "ida"]  # fmt: skip
    steps = [stage_graph.config_for(setting, f"isl{k}", "runs/x").num_steps for k in (1, 2, 3)]
    assert steps == [10_001, 10_000, 5_000]
    ida = stage_graph.config_for(setting, "ida", "runs/x")
    assert (ida.num_steps, ida.optim.max_iters) == (120_000, 250_000)
    assert stage_graph.config_for(setting, "isl2", "runs/x").optim.max_iters == 90_000


def test_pseudo_labels_threshold_and_the_ranking_split():
    probs = jnp.array([[[[0.95, 0.05], [0.6, 0.4], [0.1, 0.9]]]])
    np.testing.assert_array_equal(daf_labels.thresholded(probs, 0.9), [[[0, 255, 1]]])
    easy, hard = daf_labels.split(["a", "b", "c"], [3.0, 1.0, 2.0], 0.66)
    assert (easy, hard) == (["b"], ["c", "a"])
    depth = jnp.full((1, 1, 3), 2.0)
    info = -probs * jnp.log2(probs + 1e-30)  # log2(2) = 1
    np.testing.assert_allclose(daf_labels.depth_aware_score(probs, depth),
                               [float(jnp.mean(info * 2.0))], rtol=1e-6)  # fmt: skip
