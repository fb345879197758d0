"""Stage 'prototypes' and tools/calc_prototypes.py against a sequential per-image reference."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import default
from ddb_jax import checkpoints, models
from ddb_jax.offline import prototype_io, prototype_stage
from input_pipeline import toy
from input_pipeline import train as train_data
from tests.support import data_config, identities, write_identity_gta
from tools import calc_prototypes
from torch_ref.prototypes import sequential_table

NUM_IMAGES, PASSES, CROP, NUM_CLASSES, CHANNELS = 6, 2, (64, 64), 19, 16


@pytest.fixture(scope="module")
def toy6_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", str(NUM_IMAGES), "--num-val", "1"])
    return root


def tiny_model_cfg(num_classes: int = NUM_CLASSES):
    cfg = default.get_model_config()
    cfg.backbone, cfg.head_channels, cfg.conv_impl = "resnet18_v1c", CHANNELS, "im2col"
    cfg.base_channels, cfg.num_classes = 16, num_classes
    return cfg


def random_variables(cfg, seed: int = 0):
    """Variables of ``init_variables``' shapes: He-normal kernels, random biases and BN
    statistics (running the init itself costs ~15 s of compilation on this CPU). Logits come
    out O(1), so the argmax is far from ties (see the conditioning check below)."""
    rng = np.random.default_rng(seed)
    shapes = models.variable_shapes(models.build_model(cfg))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight segmentor in <tmp>/run/export (a stage's layout)."""
    out = tmp_path_factory.mktemp("models") / "run" / "export"
    cfg = tiny_model_cfg()
    checkpoints.save_model_dir(str(out), random_variables(cfg), cfg, {"kind": "segmentor"})
    return out


def stage_config(root, model, cap=3000, batch_size=4, mesh_devices=2):
    config = default.get_config()
    config.stage = "prototypes"
    config.checkpoint = str(model)
    config.data.root = str(root)
    config.data.target = ("toy_target",)
    config.data.crop_size = CROP
    config.data.num_parallel_calls = 2
    config.prototypes.num_passes = PASSES
    config.prototypes.batch_size = batch_size
    config.prototypes.count_cap = cap
    config.mesh_devices = mesh_devices
    return config


@pytest.fixture(scope="module")
def reference_outputs(toy6_root, model_dir):
    """Per valid image, in stream order: torch-resized logits and features (C, H, W)."""
    config = stage_config(toy6_root, model_dir)
    apply_fn, variables = prototype_stage.load_model(str(model_dir), config)
    forward = jax.jit(
        lambda v, x: tuple(apply_fn(v, x, train=False)[k] for k in ("logits", "feature"))
    )
    indices, outputs = [], []
    for batch in prototype_stage.make_batches(config).as_numpy_iterator():
        logits, feature = (
            torch.from_numpy(np.array(a)) for a in forward(variables, batch["image"])
        )
        resized = [
            F.interpolate(a.permute(0, 3, 1, 2), size=CROP, mode="bilinear", align_corners=False)
            for a in (logits, feature)
        ]
        for i in np.flatnonzero(batch["valid"]):
            indices.append(int(batch["index"][i]))
            outputs.append((resized[0][i], resized[1][i]))
    return indices, outputs


def sequential_reference(outputs, cap, min_pixels=10):
    """The reference's ClassFeatures: image by image, class by class, running mean + cap."""
    return sequential_table(outputs, NUM_CLASSES, CHANNELS, cap, min_pixels)


def test_reference_stream_counts_every_image_once_in_order(reference_outputs):
    indices, outputs = reference_outputs
    assert indices == list(range(NUM_IMAGES * PASSES))
    # Well-conditioned: every pixel's top-2 logits differ by more than 1e-6 of the logit
    # scale (the rounding gap between two XLA programs), so the stage's argmax is the same.
    top2 = [torch.topk(logits, 2, dim=0).values for logits, _ in outputs]
    scale = max(float(logits.abs().max()) for logits, _ in outputs)
    assert min(float((t[0] - t[1]).min()) for t in top2) > 1e-6 * scale


def test_stage_matches_sequential_reference_with_capped_ema(
    toy6_root, model_dir, tmp_path, reference_outputs, capsys
):
    config = stage_config(toy6_root, model_dir, cap=3)
    path = prototype_stage.run(config, str(tmp_path / "work"))
    assert path == str(tmp_path / "work" / "prototypes.npz")
    table, counts = prototype_io.load_prototypes(path, NUM_CLASSES, CHANNELS)
    ref_table, ref_counts = sequential_reference(reference_outputs[1], cap=3)
    # Several classes are present and some get more than 3 vectors: the EMA branch is taken.
    uncapped = sequential_reference(reference_outputs[1], cap=3000)[1]
    assert (uncapped > 3).sum() >= 2 and (ref_counts > 0).sum() >= 3
    np.testing.assert_allclose(counts, ref_counts)
    np.testing.assert_allclose(table, ref_table, rtol=1e-5, atol=1e-5)
    summary = open(prototype_stage.summary_path(path)).read()
    assert "count cap 3" in summary and summary.strip() in capsys.readouterr().out
    with np.load(path) as data:
        assert str(data["model_dir"]) == str(model_dir)


def test_step_follows_stream_index_and_ignores_padding():
    """Images arrive permuted (as from several hosts) with a padded slot: the update follows
    'index' and skips invalid images, as the sequential reference over the valid ones."""
    rng = np.random.default_rng(1)
    w_logits = rng.normal(size=(3, NUM_CLASSES)).astype(np.float32)
    w_feature = rng.normal(size=(3, CHANNELS)).astype(np.float32)

    def apply_fn(variables, images, train):
        return {"logits": images @ variables["logits"], "feature": images @ variables["feature"]}

    images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    index = np.array([4, 1, 5, 0, 3, 2], np.int32)
    valid = index != 3
    step = prototype_stage.make_update_step(apply_fn, min_pixels=2, cap=2)
    table, counts = step(
        {"logits": w_logits, "feature": w_feature},
        np.zeros((NUM_CLASSES, CHANNELS), np.float32),
        np.zeros(NUM_CLASSES, np.float32),
        {"image": images, "valid": valid, "index": index},
    )
    order = [i for i in np.argsort(index) if valid[i]]
    outputs = [
        (torch.from_numpy(images[i] @ w_logits).permute(2, 0, 1),
         torch.from_numpy(images[i] @ w_feature).permute(2, 0, 1))
        for i in order
    ]  # fmt: skip
    ref_table, ref_counts = sequential_reference(outputs, cap=2, min_pixels=2)
    assert ref_counts.max() == 2 and (sequential_reference(outputs, 99, 2)[1] > 2).any()
    np.testing.assert_allclose(counts, ref_counts)
    np.testing.assert_allclose(table, ref_table, rtol=1e-5, atol=1e-5)


def test_cli_default_output_matches_reference(toy6_root, model_dir, reference_outputs):
    batch = jax.device_count()  # one image per device: the mesh spans all of them
    argv = (
        f"--model {model_dir} --data-root {toy6_root} --target toy_target --passes {PASSES} "
        f"--batch-size {batch} --crop 64,64"
    ).split()
    assert calc_prototypes.main(argv) == 0
    out = model_dir.parent / "prototypes.npz"
    table, counts = prototype_io.load_prototypes(str(out), NUM_CLASSES, CHANNELS)
    ref_table, ref_counts = sequential_reference(reference_outputs[1], cap=3000)
    np.testing.assert_allclose(counts, ref_counts)
    np.testing.assert_allclose(table, ref_table, rtol=1e-5, atol=1e-5)
    assert (model_dir.parent / "prototypes_summary.txt").exists()


def test_cli_converts_a_reference_pth(tmp_path):
    reference = torch.randn(NUM_CLASSES, CHANNELS)
    reference[3] = 0.0  # a class the reference never saw
    torch.save(reference, tmp_path / "cu.pth")
    out = tmp_path / "out" / "cu.npz"
    assert calc_prototypes.main(["--from-pth", str(tmp_path / "cu.pth"), "--out", str(out)]) == 0
    table, counts = prototype_io.load_prototypes(str(out), NUM_CLASSES, CHANNELS)
    np.testing.assert_array_equal(table, reference.numpy())
    expected = np.full(NUM_CLASSES, prototype_io.UNKNOWN_COUNT, np.float32)
    expected[3] = 0
    np.testing.assert_array_equal(counts, expected)


def _fails(argv, capsys, *needles, status=1):
    assert calc_prototypes.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_bad_input_fails_with_one_line_and_writes_nothing(
    toy6_root, model_dir, tmp_path, capsys
):
    out = tmp_path / "out" / "p.npz"
    batch = ["--batch-size", str(jax.device_count()), "--out", str(out)]
    common = ["--data-root", str(toy6_root), "--target", "toy_target", *batch]
    _fails(["--model", str(tmp_path / "nope"), *common], capsys, str(tmp_path / "nope"))
    odd = ["--data-root", str(toy6_root), "--target", "toy_target", "--out", str(out)]
    odd += ["--batch-size", str(jax.device_count() + 1)]
    _fails(
        ["--model", str(model_dir), *odd], capsys,
        f"config.prototypes.batch_size={jax.device_count() + 1}", "devices of the mesh",
        status=2,  # a setting, not a file
    )  # fmt: skip

    # Backbone-only (ImageNet) directory: by provenance, and by its variables alone.
    variables, cfg = checkpoints.load_model_dir(str(model_dir))
    backbone = {c: {"backbone": v["backbone"]} for c, v in variables.items()}
    for name, provenance in (("imnet", {"kind": "backbone"}), ("bare", {})):
        path = tmp_path / name
        checkpoints.save_model_dir(str(path), backbone, cfg, provenance)
        _fails(["--model", str(path), *common], capsys, str(path), "only a backbone")

    # Another class count (model.json says 5, the config 19).
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    meta = json.loads((wrong / "model.json").read_text())
    meta["model"]["num_classes"] = 5
    (wrong / "model.json").write_text(json.dumps(meta))
    _fails(["--model", str(wrong), *common], capsys, str(wrong), "5 classes", "num_classes is 19")

    # Missing data; a directory that is not a model; an unreadable or foreign .pth.
    missing = ["--data-root", str(tmp_path / "nodata"), "--target", "toy_target", *batch]
    _fails(["--model", str(model_dir), *missing], capsys, str(tmp_path / "nodata"))
    _fails(["--model", str(tmp_path), *common], capsys, str(tmp_path), "not a model directory")
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    _fails(["--from-pth", str(tmp_path / "bad.pth"), "--out", str(out)], capsys, "bad.pth")
    torch.save({"a": torch.zeros(2, 2)}, tmp_path / "dict.pth")
    _fails(["--from-pth", str(tmp_path / "dict.pth"), "--out", str(out)], capsys, "a dict")
    _fails(["--from-pth", str(tmp_path / "none.pth"), "--out", str(out)], capsys, "none.pth")
    assert not out.parent.exists()


def test_padded_ordered_target_stream(tmp_path):
    """shuffle=False: file order each epoch; pad_last: full batches, 'valid' marks the end."""
    write_identity_gta(str(tmp_path))  # 8 images whose green channel encodes the file index
    cfg = data_config(tmp_path, target=("gta",))
    ds = train_data.make_target_train_dataset(cfg, 3, 0, num_epochs=2, shuffle=False, pad_last=True)
    batches = list(ds.as_numpy_iterator())
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(18))
    np.testing.assert_array_equal(valid, index < 16)
    ids = [i for b in batches for i in identities(b["image"])]
    assert ids[:16] == list(range(8)) * 2
    # Two hosts of 3: each global batch holds stream positions [6s, 6s + 6).
    hosts = [
        list(
            train_data.make_target_train_dataset(
                cfg, 3, 0, p, 2, 1, False, True
            ).as_numpy_iterator()
        )
        for p in range(2)
    ]
    assert [len(h) for h in hosts] == [2, 2]
    for s in range(2):
        k = np.concatenate([hosts[p][s]["index"] for p in range(2)])
        np.testing.assert_array_equal(np.sort(k), np.arange(6 * s, 6 * s + 6))
        valid = np.concatenate([hosts[p][s]["valid"] for p in range(2)])
        np.testing.assert_array_equal(valid, k < 8)
    with pytest.raises(ValueError, match="pad_last"):
        train_data.make_target_train_dataset(cfg, 3, 0, pad_last=True)
