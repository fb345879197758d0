"""The one-command pipeline: stage order, wiring between stages, skipping, subsets, errors.

The stages themselves are replaced by a recorder that writes each stage's deliverable
(their own tests cover them); tests/test_demo_pipeline.py runs the real chain.
"""

import collections
import json
import os
import shutil

import numpy as np
import pytest

from configs import demo
from ddb_jax import pipeline
from ddb_jax.graph import stage_graph
from ddb_jax.offline import prototype_io
from ddb_jax.train import workdir as workdir_lib

DDB_ORDER = [
    "source_only", "oracle", "r1_cu", "r1_ca", "r1_proto_cu", "r1_proto_ca", "r1_ckd",
    "r2_cu", "r2_ca", "r2_proto_cu", "r2_proto_ca", "r2_ckd",
]  # fmt: skip


def demo_config():
    """The demo pipeline, 2 steps per stage, its stages one after another (the order of
    the recorded calls is checked; tests below run waves at once)."""
    config = demo.get_config("2")
    config.concurrent_stages = False
    return config


class Recorder:
    """Stands in for the stages: records (name, config) and writes the deliverable."""

    def __init__(self):
        self.calls = []

    def __call__(self, stage_cfg, stage_dir, devices=None):
        name = os.path.basename(stage_dir)
        self.calls.append((name, stage_cfg))
        workdir_lib.record_config(stage_dir, stage_cfg)
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
    summary = pipeline.run(demo_config(), workdir, run_stage=recorder)
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
    pipeline.run(demo_config(), workdir, run_stage=Recorder())
    again = Recorder()
    pipeline.run(demo_config(), workdir, run_stage=again)
    assert again.names == []
    shutil.rmtree(os.path.join(workdir, "r2_ckd", "export"))
    os.remove(os.path.join(workdir, "r1_proto_ca", "prototypes.npz"))
    redo = Recorder()
    pipeline.run(demo_config(), workdir, run_stage=redo)
    assert redo.names == ["r1_proto_ca", "r2_ckd"]


def test_subset_of_stages(tmp_path):
    workdir = str(tmp_path / "run")
    config = demo_config()
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
    config = demo_config()
    config.stages = "r1_ca,r1_ckd"
    recorder = Recorder()
    with pytest.raises(pipeline.PipelineError, match=r"r1_ckd needs .*r1_cu.*run r1_cu first"):
        pipeline.run(config, str(tmp_path / "run"), run_stage=recorder)
    assert recorder.calls == []


def test_bad_pipeline_configs_are_refused(tmp_path):
    config = demo_config()
    config.stages = "r1_cu,r3_cu"
    with pytest.raises(pipeline.PipelineError, match="r3_cu"):
        pipeline.run(config, str(tmp_path / "a"), run_stage=Recorder())
    config = demo_config()
    with config.pipeline.r1_cu.unlocked():
        config.pipeline.r1_cu.stage = "ckd"
    with pytest.raises(pipeline.PipelineError, match=r"pipeline.r1_cu.stage .*stage kind"):
        pipeline.run(config, str(tmp_path / "b"), run_stage=Recorder())
    config = demo_config()
    with config.pipeline.unlocked():
        config.pipeline.round1 = stage_graph.placeholders(config)
    config.pipeline.round1.seed = 3
    with pytest.raises(pipeline.PipelineError, match="config.pipeline.round1"):
        pipeline.run(config, str(tmp_path / "c"), run_stage=Recorder())
    # An input the graph wires cannot be overridden per stage (it would be ignored).
    config = demo_config()
    config.pipeline.r2_cu.init_from = "elsewhere"
    with pytest.raises(pipeline.PipelineError, match="pipeline.r2_cu.init_from is wired"):
        pipeline.run(config, str(tmp_path / "d"), run_stage=Recorder())
    # A key the graph sets per stage, set at the top, would be ignored: refused, naming it.
    config = demo_config()
    config.st.mask = "class"
    with pytest.raises(pipeline.PipelineError, match=r"config.st.mask='class' is set per stage"):
        pipeline.run(config, str(tmp_path / "e"), run_stage=Recorder())


def test_top_level_overrides_reach_every_stage_and_stage_overrides_one(tmp_path):
    config = demo_config()
    config.seed = 7
    config.batch_size = 2
    config.optim.lr = 2e-3
    config.data.crop_size = (64, 64)
    config.pipeline.r1_ca.batch_size = 8
    config.pipeline.r2_cu.optim.lr = 1e-5
    recorder = Recorder()
    pipeline.run(config, str(tmp_path / "run"), run_stage=recorder)
    cfg = dict(recorder.calls)
    assert all(c.seed == 7 and tuple(c.data.crop_size) == (64, 64) for c in cfg.values())
    assert {n: c.batch_size for n, c in cfg.items() if c.batch_size != 2} == {"r1_ca": 8}
    assert cfg["r1_cu"].optim.lr == cfg["r1_ckd"].optim.lr == 2e-3
    assert cfg["r2_ca"].optim.lr == pytest.approx(2e-4)  # round 2: a tenth of the top-level lr
    assert cfg["r2_cu"].optim.lr == 1e-5  # its own override wins


def test_a_changed_config_is_refused_only_for_stages_that_ran(tmp_path):
    workdir = str(tmp_path / "run")
    config = demo_config()
    config.stages = "r1_cu"
    pipeline.run(config, workdir, run_stage=Recorder())
    config.pipeline.r1_ca.batch_size = 2  # has not run: accepted
    config.stages = "r1_cu,r1_ca"
    recorder = Recorder()
    pipeline.run(config, workdir, run_stage=recorder)
    assert recorder.names == ["r1_ca"]
    config.pipeline.r1_cu.batch_size = 2  # has run: refused, naming the key and the redo
    with pytest.raises(pipeline.PipelineError, match=r"batch_size: 4 -> 2") as err:
        pipeline.run(config, workdir, run_stage=Recorder())
    assert "delete " + os.path.join(workdir, "r1_cu") in str(err.value)


def test_every_config_file_loads_and_names_a_stage():
    import glob
    import importlib

    from ddb_jax import models, stages

    pipelines = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(demo.__file__), "*.py"))):
        name = os.path.basename(path)[:-3]
        module = importlib.import_module(f"configs.{name}")
        if not hasattr(module, "get_config"):
            continue
        config = module.get_config()
        assert config.stage in stages.known_stages(), path
        models.build_model(config.model)
        if config.stage == "pipeline":
            pipelines.append(name)
            plan = pipeline.plan_stages(config, "runs/x")
            if config.graph == "ddb":  # DDB's rounds, in order (other graphs: their tests)
                assert [p.name for p in plan if p.name.startswith("r")] == DDB_ORDER[2:], path
    assert set(pipelines) >= {"gta2cs", "gtasyn2cs", "gta2csmap", "demo", "gta2cs_ddb"}


@pytest.mark.parametrize(
    "setting, count", [("gta2cs", 6), ("gta2cs_ddb_daformer", 2), ("advent_gta2cs", 2)]
)
def test_per_stage_config_files_are_the_pipelines_stages(setting, count):
    """configs/<setting>_<stage>.py is the stage the pipeline runs in runs/<setting>."""
    import importlib

    module = importlib.import_module(f"configs.{setting}")
    plan = pipeline.plan_stages(module.get_config(), f"runs/{module.NAME}")
    checked = 0
    for planned in plan:
        try:
            stage_module = importlib.import_module(f"configs.{setting}_{planned.name}")
        except ModuleNotFoundError:
            # prototypes (tools/calc_prototypes.py by hand), or stages run from the setting
            continue
        assert stage_module.get_config().to_dict() == planned.config.to_dict(), planned.name
        checked += 1
    assert checked == count


def test_waves_group_the_independent_stages_of_every_seed():
    config = demo_config()
    config.seeds = (0, 1)
    plan = pipeline.plan_stages(config, "runs/x")
    assert [p.name for p in plan][:3] == ["seed0/source_only", "seed0/oracle", "seed0/r1_cu"]
    assert plan[3].config.seed == 0 and plan[-1].config.seed == 1
    assert plan[-1].dir == os.path.join("runs/x", "seed1", "r2_ckd")
    assert plan[-1].config.ckd.teacher_cu == os.path.join("runs/x", "seed1", "r2_cu", "export")
    waves = pipeline.waves(plan, slots=8)
    names = [sorted(p.name for p in wave) for wave in waves]
    assert names[0] == sorted(
        f"seed{s}/{n}" for s in (0, 1) for n in ("source_only", "oracle", "r1_cu", "r1_ca")
    )
    assert names[1] == sorted(f"seed{s}/r1_proto_{p}" for s in (0, 1) for p in ("cu", "ca"))
    assert names[2] == ["seed0/r1_ckd", "seed1/r1_ckd"]
    assert len(waves) == 6  # two rounds of (paths, prototypes, CKD)
    # Fewer devices than stages: a level is cut into chunks that each fit the devices.
    assert [len(w) for w in pipeline.waves(plan, slots=3)][:3] == [3, 3, 2]


def test_device_groups_are_disjoint_and_divide_every_batch():
    import jax

    config = demo_config()
    config.mesh_devices = 0
    plan = pipeline.plan_stages(config, "runs/x")
    paths_of_round1 = [p for p in plan if p.stage.name in ("r1_cu", "r1_ca")]
    devices = jax.devices()[:8]
    groups = pipeline.device_groups(paths_of_round1, devices)
    assert [len(g) for g in groups] == [4, 4]  # batch 4 over 4 devices each
    assert not set(groups[0]) & set(groups[1])
    config.batch_size = 2  # 4 devices would not divide the batch: 2 each
    plan = pipeline.plan_stages(config, "runs/x")
    groups = pipeline.device_groups([p for p in plan if p.level == 0][:2], devices)
    assert [len(g) for g in groups] == [2, 2]
    assert pipeline.device_groups(paths_of_round1[:1], devices) is None  # nothing to share
    assert pipeline.device_groups(paths_of_round1, devices[:1]) is None


def test_process_groups_are_whole_processes_with_equal_slices():
    """A multi-host job's wave: each stage gets whole processes, the same devices of each."""
    device = collections.namedtuple("device", "id process_index")
    devices = [device(2 * p + i, p) for p in range(4) for i in range(2)]  # 4 hosts x 2
    config = demo_config()
    config.mesh_devices = 0
    plan = pipeline.plan_stages(config, "runs/x")
    paths_of_round1 = [p for p in plan if p.stage.name in ("r1_cu", "r1_ca")]
    groups = pipeline.device_groups(paths_of_round1, devices)
    assert [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    config.batch_size = 2  # two processes each: one device of each divides the batch
    plan = pipeline.plan_stages(config, "runs/x")
    two = [p for p in plan if p.stage.name in ("r1_cu", "r1_ca")]
    assert [[d.id for d in g] for g in pipeline.device_groups(two, devices)] == [[0, 2], [4, 6]]
    # Three stages on six hosts: two hosts each; on four, a group would be one host.
    six = [device(p, p) for p in range(6)]
    three = [p for p in plan if p.level == 0][:3]
    groups = pipeline.device_groups(three, six)
    assert [{d.process_index for d in g} for g in groups] == [{0, 1}, {2, 3}, {4, 5}]
    assert pipeline.device_groups(three, devices) is None
    config.batch_size = 3  # no group of two processes divides it
    plan = pipeline.plan_stages(config, "runs/x")
    odd = [p for p in plan if p.stage.name in ("r1_cu", "r1_ca")]
    assert pipeline.device_groups(odd, devices) is None


def test_seeds_run_the_chain_each_and_summarise_mean_and_spread(tmp_path):
    config = demo_config()
    config.seeds = (0, 1, 2)
    config.stages = "r1_cu,r1_ca"
    recorder = Recorder()
    summary = pipeline.run(config, str(tmp_path / "run"), run_stage=recorder)
    assert recorder.names == ["r1_cu", "r1_ca"] * 3
    assert [c.seed for _, c in recorder.calls] == [0, 0, 1, 1, 2, 2]
    row = summary["stages"]["r1_cu"]
    scores = [row["seeds"][str(s)]["miou"] for s in (0, 1, 2)]
    assert row["miou"] == pytest.approx(np.mean(scores))
    assert row["std"]["miou"] == pytest.approx(np.std(scores)) and row["std"]["miou"] > 0
    table = open(tmp_path / "run" / "summary.md").read()
    assert "seed 2 mIoU" in table and " ± " in table


def test_a_wave_runs_at_once_in_threads_on_disjoint_devices(tmp_path):
    import threading

    config = demo.get_config("2")  # concurrent_stages on (the default)
    config.mesh_devices = 0
    config.stages = "r1_cu,r1_ca"
    seen = []
    barrier = threading.Barrier(2, timeout=30)  # both must be running at the same time

    def run_stage(stage_cfg, stage_dir, devices=None):
        seen.append((os.path.basename(stage_dir), tuple(d.id for d in devices)))
        barrier.wait()
        Recorder()(stage_cfg, stage_dir)

    pipeline.run(config, str(tmp_path / "run"), run_stage=run_stage)
    groups = dict(seen)
    assert set(groups) == {"r1_cu", "r1_ca"}
    assert len(groups["r1_cu"]) == len(groups["r1_ca"]) == 4
    assert not set(groups["r1_cu"]) & set(groups["r1_ca"])


def job(workdir, recorder=None, **keys):
    """One job of a pipeline split over several (a pod's slices): the demo pipeline with
    ``keys`` (``stages=...``, ``seeds=...``) on the shared ``workdir``."""
    config = demo_config()
    for key, value in keys.items():
        config[key] = value
    recorder = recorder or Recorder()
    return recorder, pipeline.run(config, workdir, run_stage=recorder)


def test_jobs_that_split_the_paths_share_one_workdir(tmp_path):
    # A multi-host run's stages use every host, one after another (README): slices run
    # a round's two paths at once as two jobs on one workdir, with disjoint stages.
    workdir = str(tmp_path / "run")
    path_cu, _ = job(workdir, stages="r1_cu,r1_proto_cu")
    assert path_cu.names == ["r1_cu", "r1_proto_cu"]
    # A job that needs what another has not produced yet stops before any work.
    early = Recorder()
    with pytest.raises(pipeline.PipelineError, match=r"r1_ckd needs .*run r1_ca first"):
        job(workdir, early, stages="r1_ckd")
    assert early.calls == []
    path_ca, _ = job(workdir, stages="r1_ca,r1_proto_ca")
    assert path_ca.names == ["r1_ca", "r1_proto_ca"]
    # The last job runs what is left, the round-1 stages skipped, and summarises them all.
    rest, summary = job(workdir)
    assert rest.names == [s for s in DDB_ORDER if not s.startswith("r1_") or s == "r1_ckd"]
    assert list(summary["stages"]) == [s for s in DDB_ORDER if "proto" not in s]


def test_jobs_that_split_the_seeds_share_one_workdir(tmp_path):
    workdir = str(tmp_path / "run")
    for seed in (0, 1):
        recorder, _ = job(workdir, seeds=(seed,), stages="r1_cu")
        assert [c.seed for _, c in recorder.calls] == [seed]
        assert os.path.exists(os.path.join(workdir, f"seed{seed}", "r1_cu", "result.json"))
    # Both seeds together: nothing to run, the summary holds each seed and their mean.
    recorder, summary = job(workdir, seeds=(0, 1), stages="r1_cu")
    assert recorder.calls == []
    row = summary["stages"]["r1_cu"]
    assert set(row["seeds"]) == {"0", "1"}
    assert row["miou"] == pytest.approx(np.mean([row["seeds"][s]["miou"] for s in "01"]))
