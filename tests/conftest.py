"""Test-wide settings: 8 host CPU devices (sharding tests), quiet TensorFlow, one toy dataset
and one persistent compilation cache per session.

The tests' programs are tiny, so compiling them is most of their time: XLA's CPU backend
runs LLVM without its optimisation passes here (``--xla_backend_optimization_level=0``,
about 3x faster compiles). That changes the machine code, not what it computes: XLA's CPU
backend allows no reassociation of floating-point ops at any level (fast-math is off).
Not used: ``--xla_cpu_use_fusion_emitters=false`` compiles another 40% faster (jax 0.10.2)
but changes what some programs compute (eight parity tests fail, by whole units).
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist every core already runs a worker: one thread per XLA op (no
    # threads spinning for a core another worker holds). Same results: each test compares
    # runs made under the same flags, or bounds against float64.
    TEST_XLA_FLAGS += " --xla_cpu_multi_thread_eigen=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gs:// through gcsfs (not TensorFlow's client, which only talks to Google), without the
# gRPC bucket-type probe that gcsfs >= 2026.3 makes on every call (it stalls ~60 s against
# an emulator, which speaks only HTTP), and anonymous (the emulator checks no token). Read
# at import time, hence here.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("FSSPEC_GS_TOKEN", "anon")

import pytest  # noqa: E402

# The long integration tests, started first so that `make test`'s two workers (pytest-xdist,
# one test file per worker at a time) do not end on one of them alone. The SYNTHIA and
# Synscapes runs come after the demo pipeline's, whose compiled programs they reuse, and
# test_aot_measure.py's step after test_determinism.py's.
LONG_FIRST = (
    "test_demo_pipeline.py",
    "test_proda_pipeline.py", "test_synthia_settings.py", "test_hrda_pipeline.py",
    "test_daf_pipeline.py", "test_mtaf_pipeline.py", "test_mtaf_step.py", "test_determinism.py",
    "test_train_loop.py", "test_aot_measure.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session (shared by pytest-xdist's workers),
    inherited by the subprocesses the tests start (tests/support.py): a program that several
    tests or processes run is compiled once. Sound: XLA's cache key covers the program, the
    compile options, the devices and the jax/jaxlib versions, so a hit is the executable a
    compile would give; an entry read while another process writes it fails to deserialise
    and JAX compiles instead."""
    import jax

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers: their root
        path = str(tmp_path_factory.getbasetemp().parent / "jax_cache")
        os.makedirs(path, exist_ok=True)
    else:
        path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    yield path
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """The toy domains (input_pipeline/toy.py), generated once: toy/gta and toy/cityscapes
    (toy_source, toy_target: 12 training and 5 validation images per domain), and the 512x256
    toy/gta_hr and toy/cityscapes_hr (toy_hr_source, toy_hr_target: 8 training and 4
    validation images; input_pipeline/toy_hr.py) and toy/idd (toy_idd, as toy_target;
    input_pipeline/toy_idd.py). Tests must not modify it."""
    from input_pipeline import toy

    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "5",
              "--hr", "--hr-num-train", "8", "--hr-num-val", "4",
              "--extra-targets", "idd"])  # fmt: skip
    return root


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 for the session, every client pointed at it (also the
    subprocesses the tests start), and a bucket: yields the emulator."""
    import platform

    from tests.support import GcsEmulator, emulator_env

    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("fake-gcs-server ships a linux-amd64 binary only")
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    emulator.start()
    saved = {k: os.environ.get(k) for k in emulator_env(emulator.url)}
    os.environ.update(emulator_env(emulator.url))
    emulator.bucket = emulator.create_bucket("ddb-test")
    yield emulator
    emulator.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def bucket_toy_root(gcs, toy_root):
    """The toy domains copied into the emulated bucket: a data root at gs://ddb-test/data."""
    from tests.support import upload_tree

    root = f"{gcs.bucket}/data"
    upload_tree(str(toy_root), root)
    return root


@pytest.fixture
def emulator(tmp_path, toy_root):
    """A GCS emulator of this test's own, to stop and restart (``gcs`` is shared by other
    modules), holding the toy domains under gs://faults/data (the storage fault tests)."""
    from tests.storage_support import BUCKET, put_tree
    from tests.support import GcsEmulator

    emulator = GcsEmulator(tmp_path / "gcs")
    emulator.start()
    emulator.create_bucket(BUCKET)
    # The fault tests train on the toy domains; the high-resolution ones stay out (time).
    put_tree(emulator.url, str(toy_root), "data", skip_dirs=("gta_hr", "cityscapes_hr"))
    yield emulator
    emulator.stop()
