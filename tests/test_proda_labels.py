"""ProDA's offline stages on the toy target with a tiny ProDA model: 'proda_soft_labels' and
'proda_pseudo_labels' against the softmax / flip average / argmax / max computed with torch
from the stage's own logits program, the re-run that writes only what is missing, the done
marker, the one-line error for a missing model; and the 'proda' rule of the prototypes
stage against a sequential per-image transcription of calc_prototype.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import default
from ddb_jax import checkpoints, models
from ddb_jax.offline import proda_labels, prototype_io, prototype_stage
from ddb_jax.train import setup
from input_pipeline import proda as proda_data
from tests.support import run_cli
from torch_ref.prototypes import sequential_table

FULL = (64, 128)  # the toy's 128 x 256 images, resized: a quarter of the work
NUM_CLASSES = 19


def tiny_proda_cfg():
    cfg = default.get_model_config()
    cfg.backbone, cfg.head = "resnet101_proda", "proda_aspp"
    cfg.proda_blocks, cfg.base_channels, cfg.head_channels = (1, 1, 1, 1), 8, 32
    return cfg


def random_variables(cfg, seed: int = 0):
    """Variables of the model's shapes, drawn so that logits are O(1) and far from ties."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

    shapes = models.variable_shapes(models.build_model(cfg))
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "warmup" / "export"
    cfg = tiny_proda_cfg()
    checkpoints.save_model_dir(str(out), random_variables(cfg), cfg, {"kind": "segmentor"})
    return out


def stage_config(root, model, kind):
    config = default.get_config()
    config.stage, config.checkpoint = kind, str(model)
    config.model = tiny_proda_cfg()
    config.data.root, config.data.target = str(root), ("toy_target",)
    config.data.proda_full_size, config.data.num_parallel_calls = FULL, 2
    config.batch_size, config.mesh_devices = 4, 2
    return config


@pytest.fixture(scope="module")
def reference(toy_root, model_dir):
    """Per target image (file order): its logits and its mirror's from the stage's own
    program, and the torch reference of both stages' outputs."""
    config = stage_config(toy_root, model_dir, "proda_soft_labels")
    mesh = setup.make_mesh(config)
    apply_fn, variables = prototype_stage.load_model(str(model_dir), config)
    logits_fn = proda_labels.make_logits_fn(apply_fn, mesh)
    images = proda_data.target_images(config.data)
    batches = proda_data.make_full_image_dataset(config.data, images, 4).as_numpy_iterator()
    x = np.concatenate([b["image"] for b in batches])[: len(images)]
    logits = np.concatenate([np.asarray(logits_fn(variables, x[i : i + 4]))
                             for i in range(0, len(x), 4)])  # fmt: skip
    mirror = np.concatenate([np.asarray(logits_fn(variables, x[i : i + 4, :, ::-1]))
                             for i in range(0, len(x), 4)])  # fmt: skip
    soft = torch.softmax(torch.from_numpy(logits).permute(0, 3, 1, 2), 1)
    soft_mirror = torch.softmax(torch.from_numpy(mirror).permute(0, 3, 1, 2), 1)
    up = F.interpolate(soft, size=FULL, mode="bilinear", align_corners=True)
    up_mirror = F.interpolate(soft_mirror, size=FULL, mode="bilinear", align_corners=True)
    mean = (up + up_mirror.flip(-1)) / 2
    confidence, labels = mean.max(1)
    top2 = torch.topk(mean, 2, dim=1).values
    return {
        "images": images, "logits": logits, "soft": soft.permute(0, 2, 3, 1).numpy(),
        "labels": labels.numpy(), "confidence": confidence.numpy(),
        "clear": (top2[:, 0] - top2[:, 1] > 1e-5).numpy(),  # no near-tie of two classes
    }  # fmt: skip


def test_soft_labels_are_the_softmax_at_the_network_resolution(toy_root, model_dir, tmp_path,
                                                                reference):  # fmt: skip
    out = proda_labels.run(stage_config(toy_root, model_dir, "proda_soft_labels"), str(tmp_path))
    assert out == str(tmp_path / "soft_labels")
    for image, soft in zip(reference["images"], reference["soft"], strict=True):
        stored = np.load(f"{out}/{proda_data.label_stem(image)}.npy")
        assert stored.dtype == np.float16 and stored.shape == soft.shape
        assert soft.shape[-1] == NUM_CLASSES and soft.shape[:2] == reference["logits"].shape[1:3]
        np.testing.assert_allclose(stored.astype(np.float32), soft, atol=1e-3, rtol=0)
    assert (tmp_path / "soft_labels" / "done").exists()


def test_pseudo_labels_average_the_mirror_and_rerun_writes_what_is_missing(
    toy_root, model_dir, tmp_path, reference
):
    config = stage_config(toy_root, model_dir, "proda_pseudo_labels")
    out = proda_labels.run(config, str(tmp_path))
    assert reference["clear"].mean() > 0.99
    for i, image in enumerate(reference["images"]):
        stem = f"{out}/{proda_data.label_stem(image)}"
        labels = np.asarray(Image.open(f"{stem}.png"))
        confidence = np.load(f"{stem}_conf.npy")
        assert labels.dtype == np.uint8 and labels.shape == FULL
        assert confidence.dtype == np.float16 and confidence.shape == FULL
        clear = reference["clear"][i]
        np.testing.assert_array_equal(labels[clear], reference["labels"][i][clear])
        np.testing.assert_allclose(confidence, reference["confidence"][i], atol=1e-3, rtol=0)

    # A re-run with the marker does nothing; without it, only the missing images are made.
    stems = [f"{out}/{proda_data.label_stem(im)}" for im in reference["images"]]
    before = open(f"{stems[0]}.png", "rb").read()
    for ext in (".png", "_conf.npy"):
        (tmp_path / "pseudo_labels" / (stems[1].rsplit("/", 1)[1] + ext)).unlink()
    proda_labels.run(config, str(tmp_path))
    assert not (tmp_path / "pseudo_labels" / (stems[1].rsplit("/", 1)[1] + ".png")).exists()
    (tmp_path / "pseudo_labels" / "done").unlink()
    open(f"{stems[0]}.png", "wb").write(b"kept")  # written earlier: not recomputed
    proda_labels.run(config, str(tmp_path))
    assert open(f"{stems[0]}.png", "rb").read() == b"kept"
    rewritten = np.asarray(Image.open(f"{stems[1]}.png"))
    clear = reference["clear"][1]
    np.testing.assert_array_equal(rewritten[clear], reference["labels"][1][clear])
    assert (tmp_path / "pseudo_labels" / "done").exists()
    open(f"{stems[0]}.png", "wb").write(before)


def test_a_missing_model_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no_model"
    status, err = run_cli(capsys, "--config=configs/default.py",
                          "--config.stage=proda_pseudo_labels", f"--config.checkpoint={missing}",
                          f"--workdir={tmp_path / 'run'}")  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1, err
    assert lines[0] == f"error: config.checkpoint={missing} does not exist (a stage's export/ " \
                       "or a converted checkpoint)"  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_prototypes_in_proda_mode_follow_calc_prototype(toy_root, model_dir, tmp_path):
    config = stage_config(toy_root, model_dir, "prototypes")
    config.prototypes.mode, config.prototypes.num_passes = "proda", 2
    config.prototypes.count_cap, config.prototypes.min_pixels = 3, 4
    path = prototype_stage.run(config, str(tmp_path))
    table, counts = prototype_io.load_prototypes(path, NUM_CLASSES, 32)

    apply_fn, variables = prototype_stage.load_model(str(model_dir), config)
    forward = jax.jit(lambda v, x: apply_fn(v, x, train=False))
    images = proda_data.target_images(config.data)
    outputs = []
    for batch in proda_data.make_full_image_dataset(config.data, images, 4, num_passes=2):
        out = forward(variables, batch["image"].numpy())
        for i in np.flatnonzero(batch["valid"].numpy()):
            outputs.append(tuple(torch.from_numpy(np.array(out[k][i])).permute(2, 0, 1)
                                 for k in ("logits", "feature")))  # fmt: skip
    assert len(outputs) == 2 * len(images)
    ref_table, ref_counts = sequential_table(outputs, NUM_CLASSES, 32, cap=3, min_pixels=4)
    assert (ref_counts == 3).any() and (ref_counts > 0).sum() >= 2  # the EMA branch is taken
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(table, ref_table, rtol=1e-4, atol=1e-5)
