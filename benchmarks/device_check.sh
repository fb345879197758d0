#!/usr/bin/env bash
# The device check in one command: benchmarks/device_check.py on the GPU machine, writing
# device_check.json / device_check.md to $OUT (the device tool's folder) or, elsewhere, to
# runs/benchmarks/device_check/ (runs/ is git-ignored). Extra arguments go to
# device_check.py (--smoke, --parts, --budget).
#
# The GPU image (Python 3.12, jax 0.11 with CUDA, flax, optax, orbax, torch 2.11) has no
# ml-collections, which configs/default.py and ddb_jax.models/methods import; it has no
# TensorFlow, tensorflow-datasets or CLU either, which the kit never imports (checked by
# tests/test_benchmarks.py). ml-collections (pure Python; needs absl-py and PyYAML, both
# in the image) travels as a wheel in .whl/ (git-ignored), made once on a machine with pip:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl ml-collections==1.1.0
#
# then one device call runs everything (device tool `run`, carry [".whl"], timeout_s 560):
#
#   set -o pipefail; bash benchmarks/device_check.sh 2>&1 | tee $OUT/device_check.log
#
# The parts run in priority order within --budget (450 s by default); a part that no longer
# fits is reported as skipped, and `--parts r101_bf16_remat,mit_bf16_remat` reruns some.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Device memory grows as used (so peak_bytes_in_use is the step's, and PyTorch fits beside).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec "$PYTHON" benchmarks/device_check.py --out "${OUT:-runs/benchmarks/device_check}" "$@"
