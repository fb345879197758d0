"""What the step benchmarks share: synthetic inputs, our jitted step, the PyTorch reference
step, matmul peaks, load averages and the import audit.

Imports only what a GPU image without TensorFlow, tensorflow-datasets or CLU has (plus
ml-collections, which travels as a wheel: benchmarks/device_check.sh): no data pipeline,
no training loop, synthetic batches. ``imported_modules()`` reports what was imported, so
the smoke run (tests/test_device_check.py) can check it.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402
from ddb_jax import models  # noqa: E402
from ddb_jax.methods import assemble  # noqa: E402
from ddb_jax.train import setup, state_layouts  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Modules the benchmark must never import (the GPU image has none of them).
FORBIDDEN_MODULES = ("tensorflow", "tensorflow_datasets", "clu")
# Top-level import names of the GPU machine image's Python packages (its package list, read
# 2026-11-17), and of the wheels that travel with the kit (benchmarks/device_check.sh). A
# third-party module the kit imports outside both would be missing there: the smoke test
# fails on it.
DEVICE_IMAGE_MODULES = set(
    """absl accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attr
    attrs botorch build certifi charset_normalizer chex click cloudpickle cmake colorama
    contourpy coverage cuda cupy cycler Cython cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fontTools formulaic frozenlist fsspec gpytorch grpc h11
    h5py hf_xet httpcore httpx huggingface_hub humanize hypothesis idna imageio iniconfig
    interface_meta jax jax_plugins jaxlib jaxtyping jinja2 joblib kiwisolver lazy_loader
    lightning lightning_utilities linear_operator lineax llvmlite lxml markdown markdown_it
    markupsafe matplotlib mdurl mesonbuild ml_dtypes psutil mpi4py mpmath msgpack multidict
    multipledispatch mypy_extensions nanobind narwhals networkx ninja numba numpy numpyro
    nvidia onnx onnx_ir
    onnxruntime onnxscript cv2 optax opt_einsum opt_einsum_fx optimistix orbax packaging
    pandas pathspec patsy peft PIL pip pluggy portalocker prometheus_client propcache google
    pyarrow pybind11 cpuinfo pygments pyparsing pyproject_hooks pyre_extensions pytest
    pytest_benchmark pytest_cov pytest_mock pytest_timeout xdist dateutil pytorch_lightning
    yaml regex requests rich sacrebleu safetensors scikit_build_core skimage sklearn scipy
    seaborn sentencepiece sentence_transformers setuptools pkg_resources _distutils_hack
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard_data_server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch functorch torchgen torchaudio torchdiffeq torch_geometric torchmetrics torchvision
    tqdm transformers treescope triton typer typing_extensions typing_inspect urllib3 uvloop
    wadler_lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# Imported only when installed (torch's optional pytree backend), or not packages at all.
OPTIONAL_MODULES = {"optree", "cython_runtime"}
TRAVELLING_MODULES = {"ml_collections"}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def imported_modules() -> dict:
    """Which forbidden modules are imported, and every third-party top-level module."""
    top = {name.split(".")[0] for name in list(sys.modules)}
    stdlib = set(sys.stdlib_module_names) | {"__main__", "__mp_main__", "builtins"}
    ours = {"ddb_jax", "configs", "input_pipeline", "torch_ref", "bench_common"}
    third = sorted(
        m
        for m in top
        if m not in stdlib and m not in ours and not m.startswith("_") and "editable" not in m
    )
    return {
        "forbidden": sorted(m for m in FORBIDDEN_MODULES if m in top),
        "third_party": third,
        "not_on_device": sorted(
            set(third) - DEVICE_IMAGE_MODULES - TRAVELLING_MODULES - OPTIONAL_MODULES
        ),
    }


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring (any jitted function)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == COMPILE_EVENT:
            self.count += 1


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n jnp.dot calls (the practical peak)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def torch_sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def torch_matmul_peak(n: int, device: str, dtype: str = "float32", repeats: int = 5) -> float:
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    torch.mm(a, b)
    torch_sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        torch_sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def st_config(
    backbone: str = "resnet101_v1c",
    size: int = 512,
    batch: int = 4,
    dtype: str = "float32",
    conv_impl: str = "lax",
    remat: bool = False,
    head: str | None = None,
    base_channels: int = 64,
    head_channels: int = 256,
):
    """The self-training stage config (configs/default.py) of one benchmark row, one device."""
    config = default.get_config()
    config.model.backbone = backbone
    config.model.head = head or ("dlv2" if backbone.startswith("resnet") else "daformer")
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    config.model.remat = remat
    config.model.base_channels = base_channels
    config.model.head_channels = head_channels
    config.batch_size = batch
    config.mesh_devices = 1  # one chip, whatever XLA_FLAGS says about host devices
    config.data.crop_size = (size, size)
    return config


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 19, size=(batch, size, size)).astype(np.int32)
    labels[:, : size // 16] = 255
    return {
        "source_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "source_label": labels,
        "target_image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
    }


def resnet_depth(config) -> int:
    family, depth = models.parse_backbone(config.model.backbone)
    if family != "resnet":
        raise ValueError(f"{config.model.backbone} has no PyTorch reference step here")
    return depth


def torch_models(config, seed: int = 3):
    """The PyTorch reference student and teacher (torch_ref, mmseg-style ResNetV1c + DLV2)."""
    import copy

    from torch_ref.resnet_dlv2 import Segmentor, randomize

    student = Segmentor(
        resnet_depth(config),
        num_classes=config.model.num_classes,
        dropout=config.model.dropout_ratio,
        base_channels=config.model.base_channels,
        channels=config.model.head_channels,
    )
    student = randomize(student, seed=seed)
    return student, copy.deepcopy(student)


def random_variables(model, seed: int = 0) -> dict:
    """Random variables drawn with NumPy from the model's variable shapes: kernels
    N(0, 1/fan_in), norm scales 1, biases and running means 0, running variances 1.

    Only for timing: no XLA compilation (``models.init_variables`` compiles an init program
    that costs more than a tiny model's step on the CPU), activations of O(1).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean") or len(leaf.shape) < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        values = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(values.astype(leaf.dtype))

    shapes = models.variable_shapes(model)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def initial_variables(config, torch_student=None):
    """The torch student's weights (the same model on both sides), or random ones (MiT)."""
    model = models.build_model(config.model)
    if torch_student is None:
        return model, random_variables(model)
    from ddb_jax.convert import resnet as resnet_names
    from ddb_jax.convert.common import convert_state_dict
    from torch_ref.common import numpy_state_dict

    shapes = models.variable_shapes(model)
    variables = convert_state_dict(numpy_state_dict(torch_student), shapes, resnet_names.torch_name)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


class JaxStep:
    """Our self-training step exactly as ``train_and_evaluate`` jits it (``make_train_step``
    with the mesh, donated state); compiled once, then each call runs one step to the end."""

    def __init__(self, config, batch_np, torch_student=None, counter: CompileCounter | None = None):
        _, variables = initial_variables(config, torch_student)
        stage = assemble.assemble(config, variables, jax.random.key(0))
        mesh = setup.make_mesh(config)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        compiler_layouts = config.get("state_layouts", "row_major") == "compiler"
        self.step = assemble.train_step(stage, mesh, compiler_state_layouts=compiler_layouts)
        self.state = jax.device_put(stage.state, replicated)
        self.batch = jax.device_put(batch_np, sharded)
        self.counter = counter
        start = time.perf_counter()
        if compiler_layouts:  # as the loop does: the state moved into the compiled layouts
            self.compiled, self.state = state_layouts.compile_and_place(
                self.step, self.state, self.batch, None
            )
            self.run = self.compiled
        else:
            self.compiled = self.step.lower(self.state, self.batch, None).compile()
            self.run = self.step
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        self.times: list[float] = []
        self.dispatch: list[float] = []
        self.loss = float("nan")
        self.recompiled = 0
        self._watch = False

    def memory_analysis(self) -> dict:
        stats = self.compiled.memory_analysis()
        return {
            "xla_argument_bytes": int(stats.argument_size_in_bytes),
            "xla_temp_bytes": int(stats.temp_size_in_bytes),
            "xla_output_bytes": int(stats.output_size_in_bytes),
        }

    def _cache_size(self) -> int:
        """Entries in the jitted step's cache (a private jax API: 0 where it is gone)."""
        size = getattr(self.step, "_cache_size", None)
        return size() if callable(size) else 0

    def __call__(self, record: bool = True) -> float:
        compiles, cache = (self.counter.count if self.counter else 0), self._cache_size()
        start = time.perf_counter()
        self.state, metrics = self.run(self.state, self.batch, None)
        dispatched = time.perf_counter()
        jax.block_until_ready((self.state, metrics))
        end = time.perf_counter()
        self.loss = float(metrics["loss"])
        if self._watch:  # XLA compilations during this very call, or a new cache entry
            self.recompiled += self._cache_size() - cache
            self.recompiled += (self.counter.count - compiles) if self.counter else 0
        if record:
            self.times.append(end - start)
            self.dispatch.append(dispatched - start)
        return end - start

    def warm_up(self, steps: int = 1) -> None:
        """Untimed steps (the first reuses the compilation); later calls watch for
        recompilation (``recompiles()``, asserted 0 by the scripts)."""
        for _ in range(steps):
            self(record=False)
        self._watch = True

    def recompiles(self) -> int:
        return self.recompiled

    def summary(self) -> dict:
        step_s = statistics.median(self.times)
        return {
            "step_s": step_s,
            "step_times_s": [round(t, 4) for t in self.times],
            "dispatch_s": statistics.median(self.dispatch),
            "compile_s": self.compile_s,
            "flops": self.flops,
            "loss": self.loss,
            "recompiles": self.recompiles(),
        }


def _blur_on_device(img, sigma: float):
    """torch_ref.augment.blur with its kernel built on the image's device (same values)."""
    import torch
    import torch.nn.functional as F

    data = img.unsqueeze(0)
    sizes = [
        int(np.floor(np.ceil(0.1 * data.shape[d]) - 0.5 + np.ceil(0.1 * data.shape[d]) % 2))
        for d in (1, 2)
    ]

    def gauss(size):
        x = torch.arange(size, dtype=img.dtype, device=img.device) - size // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        return g / g.sum()

    kernel = torch.matmul(gauss(sizes[0]).unsqueeze(-1), gauss(sizes[1]).unsqueeze(-1).t())
    kh, kw = kernel.shape
    padded = F.pad(data, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    return F.conv2d(padded, kernel.expand(3, 1, kh, kw), groups=3)[0]


def strong_on_device(img, p: dict):
    """torch_ref.augment.strong on a (3, H, W) tensor where it lies (GPU), as DACS does."""
    import torch

    from torch_ref.augment import IMAGE_MEAN, IMAGE_STD, color_jitter

    mean = torch.as_tensor(IMAGE_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.as_tensor(IMAGE_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    if bool(p["jitter"]):
        img = (img * std + mean) / 255.0
        img = color_jitter(img.unsqueeze(0), p).squeeze(0)
        img = (img * 255.0 - mean) / std
    if bool(p["blur"]):
        img = _blur_on_device(img, float(p["sigma"]))
    return img


def torch_step(
    student, teacher, opt, it, batch, masks, augs, config, amp_dtype=None, augment_on_device=False
):
    """torch_ref.self_training.torch_reference_step (fp32, augmentation on the host), with two
    options for the GPU rows: ``amp_dtype`` (torch.autocast over the forward passes and
    losses, e.g. torch.bfloat16) and ``augment_on_device`` (the strong augmentation on the
    GPU tensors, as DAFormer's DACS does, instead of the transcription's per-image host
    round trip). With neither it computes what the reference step does, op for op
    (checked by tests/test_device_check.py). Returns (source loss, mixed loss)."""
    import contextlib

    import torch

    from torch_ref.augment import strong
    from torch_ref.common import nchw, to_torch
    from torch_ref.losses import resize, seg_ce
    from torch_ref.optim import set_learning_rates

    device = next(student.parameters()).device
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else contextlib.nullcontext
    )
    set_learning_rates(opt, it, config.optim, config.num_steps)
    with torch.no_grad():
        alpha = min(1 - 1 / (it + 1), config.st.ema_alpha)
        for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
            t_param.mul_(alpha).add_((1 - alpha) * s_param)
    opt.zero_grad()
    xs, xt = nchw(batch["source_image"]).to(device), nchw(batch["target_image"]).to(device)
    ys = to_torch(batch["source_label"]).to(device)
    size = tuple(ys.shape[1:])
    with autocast():
        src_loss = seg_ce(student(xs)[0].float(), ys)
    src_loss.backward()
    with torch.no_grad(), autocast():
        t_logits = resize(teacher(xt)[0].float(), size)
        probs = torch.softmax(t_logits, dim=1)
        prob, pseudo = probs.max(dim=1)
        weight = (prob >= config.st.pseudo_threshold).to(prob.dtype).mean()
    m = to_torch(masks).to(device)
    mixed = torch.where(m[:, None], xs, xt)
    if augment_on_device:
        mixed = torch.stack([strong_on_device(mixed[i], augs[i]) for i in range(len(augs))])
    else:
        mixed = mixed.cpu()
        mixed = torch.stack(
            [
                to_torch(strong(mixed[i].numpy().transpose(1, 2, 0), augs[i]).transpose(2, 0, 1))
                for i in range(len(augs))
            ]
        ).to(device)
    mixed_label = torch.where(m, ys.long(), pseudo)
    mixed_weight = torch.where(m, torch.ones_like(prob), weight * torch.ones_like(prob))
    with autocast():
        mix_loss = seg_ce(student(mixed)[0].float(), mixed_label, mixed_weight)
    mix_loss.backward()
    opt.step()
    return float(src_loss.detach()), float(mix_loss.detach())


class TorchStep:
    """The PyTorch reference step on ``device`` with fixed draws (jitter and blur on), the
    same inputs as ours; each call runs one step to the end (synchronised)."""

    def __init__(
        self,
        config,
        batch_np,
        device: str = "cpu",
        amp_dtype: str | None = None,
        augment_on_device: bool = False,
        threads: int | None = None,
    ):
        import torch

        from ddb_jax.uda import bridging
        from torch_ref.augment import random_draw
        from torch_ref.optim import make_optimizer

        self.threads = threads
        self._set_threads()
        self.config, self.batch, self.device = config, batch_np, device
        self.amp_dtype = getattr(torch, amp_dtype) if amp_dtype else None
        self.augment_on_device = augment_on_device
        self.masks = np.asarray(
            bridging.make_masks(jax.random.key(1), batch_np["source_label"], config.st.mask)
        )
        self.augs = [random_draw(10 + i, jitter=True, blur=True) for i in range(config.batch_size)]
        self.student, self.teacher = torch_models(config)
        self.student.to(device).train()
        self.teacher.to(device).train()
        self.opt = make_optimizer(self.student, config.optim)
        self.it = 0
        self.times: list[float] = []
        self.losses = (float("nan"), float("nan"))

    def _set_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def __call__(self, record: bool = True) -> float:
        self._set_threads()
        start = time.perf_counter()
        self.losses = torch_step(
            self.student, self.teacher, self.opt, self.it, self.batch, self.masks, self.augs,
            self.config, self.amp_dtype, self.augment_on_device,
        )  # fmt: skip
        torch_sync(self.device)
        elapsed = time.perf_counter() - start
        self.it += 1
        if record:
            self.times.append(elapsed)
        return elapsed

    def summary(self) -> dict:
        import torch

        return {
            "step_s": statistics.median(self.times),
            "step_times_s": [round(t, 4) for t in self.times],
            "threads": torch.get_num_threads(),
            "loss": sum(self.losses),
        }


def alternate(runners: dict[str, Callable[[], float]], rounds: int, log=print) -> None:
    """Runs one step of each runner per round, in turn, ``rounds`` times."""
    for r in range(rounds):
        for name, run in runners.items():
            seconds = run()
            log(f"round {r + 1}/{rounds} {name}: {1e3 * seconds:.0f} ms (load {load_average()})")
