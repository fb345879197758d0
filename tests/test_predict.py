"""tools/predict.py: the evaluate stage's predictions pixel for pixel, label-id files that map
back to the train ids, a .pth that predicts as its converted directory, folders of arbitrary
images of several sizes whatever the batching, bad files and flags named in one line, and an
output folder that the inputs reach, or that cannot be written, refused before any work."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from configs import default, eval_cityscapes
from ddb_jax import checkpoints, labels, models
from ddb_jax.evaluation import eval_stage
from ddb_jax.inference import label_images
from ddb_jax.inference.batching import predict_images
from ddb_jax.inference.errors import InputError
from ddb_jax.inference.image_files import list_images
from ddb_jax.inference.image_input import prepare, scale_of
from ddb_jax.inference.outputs import OutputLayout
from ddb_jax.inference.predictor import Predictor, load_model
from tests.support import save_rgb
from tools import convert_checkpoint
from tools import predict as predict_cli
from torch_ref.resnet_dlv2 import Segmentor, center_classifier, randomize

VAL = os.path.join("toy", "cityscapes", "leftImg8bit", "val")


def tiny_model_config() -> ml_collections.ConfigDict:
    model_cfg = eval_cityscapes.get_config().model
    model_cfg.backbone = "resnet18_v1c"
    model_cfg.base_channels = 8
    model_cfg.head_channels = 8
    return model_cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random model whose classifier is spread so that it predicts several classes
    (as tests/test_eval_stage.py does)."""
    model_cfg = tiny_model_config()
    variables = jax.device_get(
        models.init_variables(models.build_model(model_cfg), jax.random.PRNGKey(3))
    )
    conv_seg = variables["params"]["decode_head"]["conv_seg"]
    conv_seg["kernel"] = conv_seg["kernel"] * 50.0
    conv_seg["bias"] = conv_seg["bias"] * 0.0
    out = str(tmp_path_factory.mktemp("model") / "model")
    checkpoints.save_model_dir(out, variables, model_cfg)
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in args + ["--no-progress"]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def outputs(out, kind: str) -> dict[str, np.ndarray]:
    """{relative name: pixels} of every PNG under ``out/kind``."""
    found = {}
    for base, _, files in os.walk(os.path.join(out, kind)):
        for name in files:
            path = os.path.join(base, name)
            found[os.path.relpath(path, os.path.join(out, kind))] = read(path)
    return found


# --- the evaluate stage's predictions ---------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"mode": "slide", "crop_size": (64, 96), "stride": (48, 64), "flip": True},
    ],
    ids=["whole", "slide_flip"],
)
def test_predictions_equal_the_evaluate_stage_pixel_for_pixel(
    toy_root, model_dir, tmp_path, capsys, settings
):
    config = eval_cityscapes.get_config()
    config.data.root = str(toy_root)
    config.data.target = ("toy_target",)
    config.model = tiny_model_config()
    config.checkpoint = model_dir
    config.eval.save_predictions = True
    for key, value in settings.items():
        config.eval[key] = value
    eval_stage.run(config, str(tmp_path / "eval"))
    flags = [f"--mode={config.eval.mode}"]
    if config.eval.mode == "slide":
        flags += ["--crop=64,96", "--stride=48,64", "--flip"]
    out = tmp_path / "pred"
    args = [model_dir, toy_root / VAL, "--out", out, "--format=cityscapes", "--scale=toy_target"]
    code, stdout, _ = run_cli(args + flags + ["--batch-size=2"], capsys)
    assert code == 0 and "wrote 5 image(s)" in stdout and "skipped 0" in stdout

    expected = outputs(tmp_path / "eval" / "predictions", "toy_target")
    colours = {os.path.basename(k): v for k, v in outputs(out, "color").items()}
    train_ids = {os.path.basename(k): v for k, v in outputs(out, "trainIds").items()}
    assert sorted(colours) == sorted(expected) and len(expected) == 5
    classes = set()
    for name, eval_colours in expected.items():
        np.testing.assert_array_equal(colours[name], eval_colours, err_msg=name)
        np.testing.assert_array_equal(label_images.colorize(train_ids[name]), eval_colours)
        classes |= set(np.unique(train_ids[name]).tolist())
    assert len(classes) > 2  # several classes, not a constant map


def test_label_id_files_map_back_to_the_train_ids(toy_root, model_dir, tmp_path, capsys):
    """The server's layout: labelIds/<city>/<image name>.png, Cityscapes ids that the official
    id -> train id table maps back to the train-id files; overlays blend image and colour."""
    out = tmp_path / "pred"
    args = [model_dir, toy_root / VAL, "--out", out, "--format=cityscapes", "--scale=none"]
    assert run_cli(args, capsys)[0] == 0
    label_ids = outputs(out, "labelIds")
    assert sorted(label_ids) == sorted(
        f"toycity/toycity_{i:06d}_000019_leftImg8bit.png" for i in range(5)
    )
    to_train = labels.build_lut(labels.CITYSCAPES_ID_TO_TRAIN_ID, 256)
    train_ids = outputs(out, "trainIds")
    for name, ids in label_ids.items():
        assert ids.dtype == np.uint8 and ids.ndim == 2
        assert set(np.unique(ids)) <= set(labels.CITYSCAPES_ID_TO_TRAIN_ID)
        np.testing.assert_array_equal(to_train[ids], train_ids[name])
        image = read(toy_root / VAL / name)
        colour = label_images.colorize(train_ids[name]).astype(int)
        expected = (image.astype(int) + colour + 1) // 2  # alpha 0.5, rounded half up
        np.testing.assert_array_equal(read(out / "overlay" / name), expected)


def test_label_id_table_round_trips_every_class():
    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    ids = label_images.to_cityscapes_ids(train_ids)
    assert ids.tolist() == [[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31,
                             32, 33]]  # fmt: skip
    np.testing.assert_array_equal(
        labels.build_lut(labels.CITYSCAPES_ID_TO_TRAIN_ID, 256)[ids], train_ids
    )


# --- a .pth in memory ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddb_pth(tmp_path_factory, toy_root) -> str:
    """A DDB self-training checkpoint ({'state_dict'}, student under 'model.', teacher under
    'ema_model.') of the mmseg-named ResNetV1c-18 + DLV2 model, its classifier centred on
    the toy target images so that the argmax varies."""
    images = np.stack([read(p) for p in sorted((toy_root / VAL).rglob("*.png"))[:2]])
    normalised = (images - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    batch = torch.from_numpy(normalised.transpose(0, 3, 1, 2)).float()
    student = center_classifier(randomize(Segmentor(18, channels=16), seed=1).eval(), batch)
    teacher = center_classifier(randomize(Segmentor(18, channels=16), seed=2).eval(), batch)
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    path = tmp_path_factory.mktemp("pth") / "iter_40000.pth"
    torch.save({"state_dict": state, "meta": {"iter": 40000}}, path)
    return str(path)


def test_a_pth_predicts_as_its_converted_model_directory(toy_root, ddb_pth, tmp_path, capsys):
    arch = ["--backbone=resnet18_v1c", "--head-channels=16"]
    converted = tmp_path / "converted"
    assert convert_checkpoint.main([ddb_pth, str(converted), *arch]) == 0
    results = {}
    for name, model, flags in [
        ("pth", ddb_pth, arch),
        ("dir", converted, []),
        ("teacher", ddb_pth, [*arch, "--which=ema_model"]),
    ]:
        code, _, err = run_cli([model, toy_root / VAL, "--out", tmp_path / name, *flags], capsys)
        assert code == 0, err
        results[name] = outputs(tmp_path / name, "trainIds")
    assert "converted in memory" in err
    assert len(results["pth"]) == 5 and results["pth"].keys() == results["dir"].keys()
    for name, ids in results["pth"].items():
        np.testing.assert_array_equal(ids, results["dir"][name], err_msg=name)
    assert len(np.unique(np.concatenate([v.ravel() for v in results["pth"].values()]))) > 2
    differs = [not np.array_equal(results["teacher"][k], v) for k, v in results["pth"].items()]
    assert any(differs)  # --which reached the conversion
    assert not [p for p in os.listdir(tmp_path) if p not in ("converted", *results)]


# --- arbitrary files ------------------------------------------------------------------------------


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with edges (so the prediction has structure), uint8 RGB."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 64 * 4], -1)
    image[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


# The images of photo_folder: output name -> (height, width).
PHOTOS = {
    "img0": (40, 60), "img1": (33, 47), "img2": (40, 60), "street/img3": (64, 48),
    "street/img4": (33, 47), "street/img5": (64, 48), "grey": (40, 60), "rgba": (33, 47),
}  # fmt: skip


@pytest.fixture
def photo_folder(tmp_path) -> str:
    """PNGs and JPEGs of three sizes (img1, img3, img5 are JPEGs; a sub-folder too), a grey
    and an RGBA PNG, a truncated PNG, a text file named .jpg and a README (not listed)."""
    folder = tmp_path / "photos"
    for i, name in enumerate(n for n in PHOTOS if "img" in n):
        save_rgb(str(folder / f"{name}.{'jpg' if i % 2 else 'png'}"), photo(*PHOTOS[name], i))
    Image.fromarray(photo(*PHOTOS["grey"], 7)[..., 0]).save(folder / "grey.png")
    rgba = np.dstack([photo(*PHOTOS["rgba"], 8), np.full(PHOTOS["rgba"], 128, np.uint8)])
    Image.fromarray(rgba).save(folder / "rgba.png")
    data = (folder / "img0.png").read_bytes()
    (folder / "street" / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image")
    (folder / "README.txt").write_text("ignored: not an image extension")
    return str(folder)


def test_a_folder_of_arbitrary_images_does_not_depend_on_the_batching(
    model_dir, photo_folder, tmp_path, capsys
):
    results = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        code, stdout, err = run_cli(
            [model_dir, photo_folder, "--out", out, f"--batch-size={batch}"], capsys
        )
        assert code == 0, err
        last = stdout.strip().splitlines()[-1]
        assert last == f"wrote 8 image(s) to {out}; skipped 2 (named above)"
        assert f"{os.path.join(photo_folder, 'street', 'truncated.png')}: truncated" in err
        assert f"{os.path.join(photo_folder, 'notes.jpg')}: not a decodable image" in err
        results[batch] = outputs(out, "trainIds")
    assert sorted(results[1]) == sorted(f"{name}.png" for name in PHOTOS)
    for name, ids in results[1].items():
        assert ids.shape == PHOTOS[name[: -len(".png")]]
        np.testing.assert_array_equal(results[3][name], ids, err_msg=name)
    assert len(np.unique(np.concatenate([v.ravel() for v in results[1].values()]))) > 1


def test_library_batches_of_mixed_sizes_equal_one_by_one(model_dir):
    """Buckets per size, partial batches padded, oldest bucket flushed: same ids as singles."""
    variables, model_cfg, _ = load_model(model_dir)
    predictor = Predictor.from_model(variables, model_cfg)
    images = [photo(*size, seed=i) for i, size in enumerate([(40, 60), (33, 47)] * 3 + [(20, 20)])]
    singles = predict_images(predictor, images, batch_size=1)
    for batch in (2, 4):
        batched = predict_images(predictor, images, batch_size=batch)
        for a, b in zip(singles, batched, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [s.shape for s in singles] == [i.shape[:2] for i in images]


def test_scale_resizes_the_input_and_predicts_at_the_image_size(model_dir):
    """--scale 64,32 (long, short): a 40x60 image runs at 32x48 (mmcv imrescale), and the
    ids come back at 40x60."""
    image = photo(40, 60, 0)
    assert prepare(image, scale_of("64,32")).shape == (32, 48, 3)
    assert scale_of("cityscapes") == (1024, 512) and scale_of("none") is None
    variables, model_cfg, _ = load_model(model_dir)
    predictor = Predictor.from_model(variables, model_cfg)
    assert predict_images(predictor, [image], (64, 32))[0].shape == (40, 60)


def test_strict_stops_at_the_bad_file_in_one_line(model_dir, photo_folder, tmp_path, capsys):
    code, _, err = run_cli([model_dir, photo_folder, "--out", tmp_path / "out", "--strict"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--strict" in lines[-1]
    assert "notes.jpg" in lines[-1] or "truncated.png" in lines[-1]


# --- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_input", "nothing_here.png: no such file or folder"),
        ("empty_pattern", "*.jpeg: the pattern matches no image files"),
        ("bad_crop", "--crop"),
        ("bad_scale", "--scale='huge'"),
        ("missing_model", "no_model: no such model directory or .pth file"),
        ("model_in_missing_folder", "gone/iter_1.pth: no such model directory or .pth file"),
        ("not_cityscapes_names", "needs Cityscapes image names"),
        ("name_clash", "would both be written as img0"),
    ],
)
def test_usage_errors_exit_2_in_one_line_naming_the_input(
    model_dir, photo_folder, tmp_path, capsys, case, needle
):
    model, inputs, flags = model_dir, [photo_folder], []
    if case == "missing_input":
        inputs = [os.path.join(photo_folder, "nothing_here.png")]
    elif case == "empty_pattern":
        inputs = [os.path.join(photo_folder, "*.jpeg")]
    elif case == "bad_crop":
        flags = ["--crop=12"]
    elif case == "bad_scale":
        flags = ["--scale=huge"]
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "model_in_missing_folder":
        model = str(tmp_path / "gone" / "iter_1.pth")
    elif case == "not_cityscapes_names":
        flags = ["--format=cityscapes"]
    elif case == "name_clash":
        inputs = [os.path.join(photo_folder, "img0.png"), os.path.join(photo_folder, "*.jpg"),
                  str(tmp_path / "img0.png")]  # fmt: skip
        save_rgb(inputs[-1], photo(8, 8, 0))
    code, _, err = run_cli([model, *inputs, "--out", tmp_path / "out", *flags], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert needle in err
    assert not os.path.exists(tmp_path / "out")


def test_listing_files_folders_and_patterns(photo_folder):
    files = list_images(
        [photo_folder, os.path.join(photo_folder, "img0.png"), os.path.join(photo_folder, "s*")]
    )
    # img0 and street/ named twice are listed once; README.txt is not an image.
    assert [f.name for f in files] == [
        "grey", "img0", "img1", "img2", "notes", "rgba",
        "street/img3", "street/img4", "street/img5", "street/truncated",
    ]  # fmt: skip
    assert files[1].path == os.path.join(photo_folder, "img0.png")


# --- the output folder ---------------------------------------------------------------------------


def refuse_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("inside_input", "is inside the input folder"),
        ("equal_to_input", "is inside the input folder"),
        ("pattern_reaches_out", "reaches its output folder"),
        ("input_inside_out", "the input lies in the output folder"),
    ],
)
def test_out_that_an_input_reaches_is_refused_in_one_line_writing_nothing(
    model_dir, photo_folder, tmp_path, capsys, monkeypatch, case, needle
):
    """A run must never read its own outputs: with --out inside the input folder, the next
    run on that folder would predict the predictions."""
    monkeypatch.setattr("ddb_jax.inference.predictor.load_model", refuse_loading)
    inputs, out = [photo_folder], os.path.join(photo_folder, "preds")
    if case == "equal_to_input":
        out = photo_folder
    elif case == "pattern_reaches_out":
        inputs = [os.path.join(photo_folder, "*")]
    elif case == "input_inside_out":  # an earlier run's colour file given back as an input
        os.rename(photo_folder, tmp_path / "color")
        inputs, out = [str(tmp_path / "color" / "img0.png")], str(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, stdout, err = run_cli([model_dir, *inputs, "--out", out], capsys)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert needle in err and inputs[0] in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_outputs_apart_from_the_inputs_are_accepted_and_leave_nothing(photo_folder):
    """Patterns compare component by component, as the glob expands them: one that cannot
    match the output folders is no reason to refuse. The writability probe removes the
    folders it made."""
    layout = OutputLayout(os.path.join(photo_folder, "preds", "run1"))
    for inputs in (
        [os.path.join(photo_folder, "*.jpg")],
        [os.path.join(photo_folder, "street"), os.path.join(photo_folder, "img0.png")],
        [os.path.join(photo_folder, "*", "*.png")],
    ):
        layout.check_location(inputs)
    assert not os.path.exists(os.path.join(photo_folder, "preds"))
    with pytest.raises(InputError, match="reaches its output folder"):
        layout.check_location([os.path.join(photo_folder, "p*", "run?")])


@pytest.mark.parametrize("case", ["a_file", "below_a_file"])
def test_unwritable_out_is_refused_before_the_model_loads(
    model_dir, photo_folder, tmp_path, capsys, monkeypatch, case
):
    monkeypatch.setattr("ddb_jax.inference.predictor.load_model", refuse_loading)
    (tmp_path / "taken").write_text("a file where the output folder would be")
    out = tmp_path / "taken" if case == "a_file" else tmp_path / "taken" / "preds"
    code, _, err = run_cli([model_dir, photo_folder, "--out", out], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --out {out}")
    assert (tmp_path / "taken").read_text().startswith("a file")


@pytest.mark.parametrize("case", ["out", "input", "model"])
def test_a_missing_bucket_is_named_in_one_line_before_any_work(
    gcs, model_dir, photo_folder, capsys, monkeypatch, case
):
    monkeypatch.setattr("ddb_jax.inference.predictor.load_model", refuse_loading)
    missing = "gs://no-such-bucket/ddb"
    model, inputs, out = model_dir, [photo_folder], f"{gcs.bucket}/preds"
    if case == "out":
        out = f"{missing}/preds"
    elif case == "input":
        inputs = [f"{missing}/photos/*.png"]
    else:
        model = f"{missing}/export"
    code, _, err = run_cli([model, *inputs, "--out", out], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert missing in err and "bucket gs://no-such-bucket does not exist" in err


# --- a label set's palette ----------------------------------------------------------------------


def test_a_label_sets_palette_colours_every_file_and_the_default_is_cityscapes(
    model_dir, photo_folder, tmp_path, capsys
):
    """With ``config.data.label_set`` (tools/predict.py's --label-set) the colour and overlay
    files and the evaluate stage's saved predictions take that set's palette; the train ids
    are written as they are. A model of another class count is refused in one line (exit 2)."""
    ids = np.array([[0, 6, 255], [7, 18, 4]], np.uint8)
    seven = label_images.colorize(ids, "mtaf7")
    assert seven[0, :2].tolist() == [[128, 64, 128], [0, 0, 142]]  # flat, vehicle
    assert seven[1, 2].tolist() == [70, 130, 180]  # sky (Cityscapes' class 4 is a fence)
    np.testing.assert_array_equal(seven[[0, 1, 1], [2, 0, 1]], 0)  # ignore and ids >= 7
    np.testing.assert_array_equal(label_images.colorize(ids), labels.palette_256()[ids])
    image = np.full((2, 3, 3), 200, np.uint8)
    layout = OutputLayout(str(tmp_path / "out"), label_set="mtaf7")
    layout.write("a", image, ids)
    np.testing.assert_array_equal(read(layout.color("a")), seven)
    blended = label_images.overlay(image, ids, 0.5, "mtaf7")
    np.testing.assert_array_equal(read(layout.overlay("a")), blended)
    assert not np.array_equal(blended, label_images.overlay(image, ids, 0.5))
    np.testing.assert_array_equal(read(layout.train_ids("a")), ids)
    write = eval_stage.prediction_writer(str(tmp_path / "eval"), "mtaf7")
    write({"name": [b"x.jpg"]}, ids[None])
    np.testing.assert_array_equal(read(tmp_path / "eval" / "x.png"), seven)
    code, _, err = run_cli(
        [model_dir, photo_folder, "--out", tmp_path / "cli", "--label-set", "mtaf7"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1  # a flag that does not fit
    assert "--label-set mtaf7 has 7 classes" in err and model_dir in err


def test_models_without_a_decode_head_load_and_backbones_are_refused(tmp_path):
    """ADVENT's (and MTAF's, ProDA's, DAF's) networks name no 'decode_head': what makes a
    model directory backbone-only is the model's own predicate, not that name."""
    cfg = default.get_model_config()
    cfg.backbone, cfg.head, cfg.advent_blocks, cfg.base_channels = (
        "resnet101_caffe", "advent_aspp", (1, 1, 1, 1), 16,
    )  # fmt: skip
    variables = jax.device_get(models.init_variables(models.build_model(cfg), jax.random.key(0)))
    checkpoints.save_model_dir(str(tmp_path / "whole"), variables, cfg)
    assert "resnet101_caffe" in load_model(str(tmp_path / "whole"))[2]
    backbone = {k: {n: t for n, t in tree.items() if n not in ("layer5", "layer6")}
                for k, tree in variables.items()}  # fmt: skip
    checkpoints.save_model_dir(str(tmp_path / "backbone"), backbone, cfg)
    with pytest.raises(checkpoints.CheckpointError, match="holds only a backbone"):
        load_model(str(tmp_path / "backbone"))
