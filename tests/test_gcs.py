"""Everything in a bucket: the path layer and the stages against a real GCS emulator
(gcp-storage-emulator on 127.0.0.1, tests/support.py).

Exercised against the emulator: the path layer (gcsfs through etils.epath), orbax's
train-state checkpoints and model directories (TensorStore's GCS driver for the arrays,
epath for the metadata), the tf.data readers (file bytes through the path layer), the
prototypes, CKD and evaluate stages with data root and workdir in the bucket, predictions
and tables written there, TensorBoard events copied there. Not exercised: TensorFlow's own
GCS client (it cannot be pointed at an emulator; the project does not use it), real GCS
permissions (the emulator has none). Runs with real processes (a stage killed with SIGKILL
and resumed in the bucket; two processes sharing only the bucket) are tests/test_processes.py.
"""

import os

import jax
import numpy as np
import pytest

from ddb_jax import checkpoints, models, paths
from ddb_jax.evaluation import eval_stage
from ddb_jax.offline import prototype_io, prototype_stage
from ddb_jax.train import loop
from tests.support import tiny_stage


def test_path_layer_against_the_emulator(gcs):
    root = f"{gcs.bucket}/paths"
    paths.write_json(paths.join(root, "a", "x.json"), {"v": 1})
    paths.write_text(paths.join(root, "a", "y.txt"), "y")
    assert paths.read_json(paths.join(root, "a", "x.json")) == {"v": 1}
    assert paths.exists(paths.join(root, "a", "y.txt")) and paths.isdir(paths.join(root, "a"))
    assert paths.glob(paths.join(root, "a", "*.json")) == [paths.join(root, "a", "x.json")]
    assert paths.listdir(paths.join(root, "a")) == ["x.json", "y.txt"]
    with pytest.raises(FileNotFoundError, match="paths/a/missing.txt"):
        paths.read_bytes(paths.join(root, "a", "missing.txt"))

    # A directory rewritten in place: the marker goes first and comes back last, so an
    # interrupted rewrite leaves a directory a reader refuses (no marker), never a mix.
    out = paths.join(root, "model")

    def write(text):
        def into(directory):
            paths.write_text(paths.join(directory, "data.txt"), text)
            paths.write_text(paths.join(directory, "model.json"), "{}")

        return into

    paths.replace_dir(out, write("one"), "model.json")
    paths.replace_dir(out, write("two"), "model.json")
    assert paths.read_text(paths.join(out, "data.txt")) == "two"

    def dies(directory):
        paths.write_text(paths.join(directory, "data.txt"), "three")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        paths.replace_dir(out, dies, "model.json")
    assert not paths.exists(paths.join(out, "model.json"))
    with pytest.raises(checkpoints.CheckpointError, match="not a model directory"):
        checkpoints.read_model_config(out)
    paths.rmtree(root)
    assert not paths.exists(paths.join(root, "a", "x.json"))


def test_a_bucket_that_does_not_exist_is_named_before_any_work(gcs, bucket_toy_root):
    config = tiny_stage(bucket_toy_root, "r1_cu", num_steps=1)
    with pytest.raises(paths.PathError, match="--workdir gs://no-such-bucket/run: bucket"):
        loop.train_and_evaluate(config, "gs://no-such-bucket/run")
    config.data.root = "gs://no-such-bucket/data"
    with pytest.raises(paths.PathError, match="config.data.root gs://no-such-bucket/data"):
        loop.train_and_evaluate(config, f"{gcs.bucket}/never")


def random_model_dir(out: str, config, seed: int) -> None:
    """A tiny random segmentor with a spread classifier (several classes predicted)."""
    model = models.build_model(config.model)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(seed)))
    conv_seg = variables["params"]["decode_head"]["conv_seg"]
    conv_seg["kernel"] = conv_seg["kernel"] * 50.0
    checkpoints.save_model_dir(out, variables, config.model, {"kind": "segmentor"})


def test_prototypes_ckd_and_evaluation_in_a_bucket(gcs, bucket_toy_root):
    """Data root and every workdir in the bucket; each stage's files land there."""
    run = f"{gcs.bucket}/run"
    base = tiny_stage(bucket_toy_root, "r1_ckd")
    for path, seed in (("cu", 1), ("ca", 2)):
        random_model_dir(f"{run}/r1_{path}/export", base, seed)

    proto = tiny_stage(bucket_toy_root, "r1_proto_cu", checkpoint=f"{run}/r1_cu/export")
    proto.prototypes.num_passes = 1
    proto.prototypes.batch_size = 4
    written = prototype_stage.run(proto, f"{run}/r1_proto_cu")
    assert written == f"{run}/r1_proto_cu/prototypes.npz"
    table, counts = prototype_io.load_prototypes(written, 19, 16)
    assert counts.sum() > 0 and np.isfinite(table).all()
    assert paths.exists(f"{run}/r1_proto_cu/prototypes_summary.txt")
    prototype_io.save_prototypes(f"{run}/r1_proto_ca/prototypes.npz", table, counts)

    ckd = tiny_stage(
        bucket_toy_root, "r1_ckd", batch_size=2, num_steps=2, checkpoint_every=1,
        eval_every=2, log_every=1, image_summary_every=2,
    )  # fmt: skip
    ckd.ckd.teacher_cu, ckd.ckd.teacher_ca = f"{run}/r1_cu/export", f"{run}/r1_ca/export"
    ckd.ckd.prototypes_cu = f"{run}/r1_proto_cu/prototypes.npz"
    ckd.ckd.prototypes_ca = f"{run}/r1_proto_ca/prototypes.npz"
    workdir = f"{run}/r1_ckd"
    state, result = loop.train_and_evaluate(ckd, workdir)
    assert int(state.step) == 2 and np.isfinite(result["miou"])
    listing = paths.listdir(workdir)
    for name in ("config.json", "result.json", "export", "best", "checkpoints"):
        assert name in listing, listing
    assert any(name.startswith("events.out.tfevents") for name in listing)  # copied up
    assert paths.listdir(f"{workdir}/checkpoints") == ["1", "2"]
    assert paths.read_json(f"{workdir}/result.json")["miou"] == result["miou"]

    evaluate = tiny_stage(bucket_toy_root, "r1_ckd")
    evaluate.stage = "evaluate"
    evaluate.checkpoint = f"{workdir}/export"
    evaluate.eval.save_predictions = True
    summary = eval_stage.run(evaluate, f"{run}/eval")
    assert summary["toy_target"]["miou"] == result["miou"]  # the same student, the same data
    stored = paths.read_json(f"{run}/eval/eval_results.json")
    assert stored["toy_target"]["miou"] == summary["toy_target"]["miou"]
    assert paths.exists(f"{run}/eval/eval_toy_target.md")
    predictions = paths.listdir(f"{run}/eval/predictions/toy_target")
    val_images = paths.glob(f"{bucket_toy_root}/toy/cityscapes/leftImg8bit/val/*/*.png")
    assert len(predictions) == len(val_images) > 0
    assert all(os.path.splitext(p)[1] == ".png" for p in predictions)
