"""The largest-batch search of the compile-only check (ddb_jax.runtime.aot_search): the
search against closed-form memory limits, the per-device batch it compiles, and the TPU
compiler's own out-of-memory verdict read as "does not fit"."""

from __future__ import annotations

import math

import pytest

from ddb_jax.runtime import aot, aot_search
from tests.test_aot import needs_libtpu


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 64, 100])
def test_search_finds_the_largest_fitting_batch_in_logarithmic_compiles(limit):
    for largest in range(0, limit + 3):
        found, tried = aot_search.search(lambda n, t=largest: n <= t, limit)
        assert found == min(largest, limit)
        # Each probe is consistent with the limit; no size is compiled twice.
        assert all(fits == (n <= largest) for n, fits in tried)
        assert len({n for n, _ in tried}) == len(tried)
        assert all(1 <= n <= limit for n, _ in tried)
        assert len(tried) <= 2 * math.ceil(math.log2(limit + 1)) + 1


def test_search_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        aot_search.search(lambda n: True, 0)


def tiny_supervised():
    from configs import demo

    config = demo.get_config("source_only")
    config.model.base_channels = 8
    config.model.head_channels = 8
    config.model.conv_impl = "lax"
    config.mesh_devices = 0
    config.image_summary_every = 0
    return config


@pytest.mark.parametrize(("target", "mesh_devices", "devices"), [
    ("v5e-8", 0, 8), ("v5p-8", 0, 4), ("v5e-8", 1, 8),
])  # fmt: skip
def test_the_batch_compiled_is_per_device_times_the_targets_devices(
    monkeypatch, target, mesh_devices, devices
):
    """The compile-only mesh spans every device of the target, whatever mesh_devices says
    (the toy configs' 1 included)."""
    compiled = []

    def fake_compile(config, name):
        compiled.append((config.batch_size, name))
        total = 1000 * config.batch_size // devices
        return {"memory": {"total": total, "fits": total <= 3000}, "traffic": {"total": 7 * total}}

    monkeypatch.setattr(aot, "compile_stage", fake_compile)
    config = tiny_supervised()
    config.mesh_devices = mesh_devices
    result = aot_search.largest_batch(config, target, limit=16)
    assert result["largest_per_device"] == 3
    assert [b for b, _ in compiled] == [n * devices for n in (1, 2, 4, 3)]
    assert {name for _, name in compiled} == {target}
    assert result["report"]["memory"]["total"] == 3000
    assert [t["hbm_traffic"] for t in result["tried"]] == [7000, 14000, 28000, 21000]
    assert config.batch_size == demo_batch()  # the caller's config is left as it was
    rows = dict(aot_search.markdown_rows(result))
    assert rows["largest batch / device"] == "3"


def demo_batch() -> int:
    from configs import demo

    return demo.get_config("source_only").batch_size


@needs_libtpu
def test_the_compilers_out_of_memory_is_does_not_fit():
    """512 pairs of 512x512 crops per chip: the TPU compiler itself refuses the program
    (RESOURCE_EXHAUSTED, its temporaries above the chip's HBM) before the report exists."""
    config = tiny_supervised()
    config.data.crop_size = (512, 512)
    fits, report = aot_search.per_device_fits(config, "v5e-8", 512)
    assert (fits, report) == (False, None)
