"""Test-wide settings: 8 host CPU devices (sharding tests), quiet TensorFlow, one toy dataset
and one persistent compilation cache per session.

The tests' programs are tiny, so compiling them is most of their time: XLA's CPU backend
runs LLVM without its optimisation passes here (``--xla_backend_optimization_level=0``,
about 3x faster compiles). That changes the machine code, not what it computes: XLA's CPU
backend allows no reassociation of floating-point ops at any level (fast-math is off).
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session, inherited by the subprocesses the
    tests start (tests/support.py): a program that several tests or processes run is
    compiled once. Sound: XLA's cache key covers the program, the compile options, the
    devices and the jax/jaxlib versions, so a hit is the executable a compile would give."""
    import jax

    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    yield path
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """The toy domains (input_pipeline/toy.py), generated once: 12 training and 5 validation
    images per domain. Tests must not modify it."""
    from input_pipeline import toy

    root = tmp_path_factory.mktemp("data")
    toy.main(["--out", str(root / "toy"), "--num-train", "12", "--num-val", "5"])
    return root
