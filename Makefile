# Two commands do everything on a fresh machine: `make demo` and `make test`.
# PY: the interpreter for the virtualenv (Python 3.11 to 3.13; the first one found);
# EXTRAS: what to install with it, e.g. `make venv EXTRAS=test,cuda12` on a GPU machine.
PY ?= $(shell for p in python3.11 python3.12 python3.13; do \
	$$p -c "" 2>/dev/null && { echo $$p; break; }; done)
EXTRAS ?= test
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-bench test-processes test-pipelines test-faults bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || test -n "$(PY)" || { echo "error: no python3.11, python3.12 \
	or python3.13 on PATH; pass one with make PY=/path/to/python3.12" >&2; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ddb_jax.demo

# Two workers, one test file each at a time (files share their module fixtures); the
# compilation cache is shared. Files are started in tests/conftest.py's order (the long ones
# first), not xdist's default of the most tests first. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		-m "not bench and not processes and not faults and not pipelines" tests

# The device check's smoke run: every part of the benchmark kit on tiny models, on this CPU
# (about 2 minutes): .ci/run runs it after `test`.
test-bench: $(STAMP)
	$(BIN)/python -m pytest -q -m bench tests/test_device_check.py

# Real processes and real signals (tests/test_processes.py): SIGTERM and SIGKILL during a
# concurrent round and the resumed runs, and four processes of a multi-host job running a
# round's paths on two processes each (about 4 minutes on 2 cores, the machine's both
# cores for itself): .ci/run runs it after `test`.
test-processes: $(STAMP)
	$(BIN)/python -m pytest -q -m processes tests/test_processes.py

# Whole pipelines of the methods on the toy domains, a few steps per stage at tiny sizes
# (DDB's two rounds with resumption, its first round on the SYNTHIA and Synscapes settings,
# ProDA's chain, HRDA's comparison, DDB's first round on an HRDA student, MTAF's three
# stages, DAF/IDA's chain: about 7 minutes on 2 cores): .ci/run runs it after `test`.
test-pipelines: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		-m pipelines tests

# Storage faults under real runs (a GCS emulator on 127.0.0.1, stopped and restarted, and a
# fault-injecting proxy in front of it: 429/503/stalls that recover, hangs during exports,
# prototype reads, predict's writes, the converters' reads, one process of two losing its
# bucket): one line and exit 1 within the storage deadline, then the rerun ends with the
# undisturbed run's model (about 8 minutes on 2 cores): .ci/run runs it after `test-processes`.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults tests/test_storage_faults.py \
		tests/test_storage_fault_injection.py

# The benchmark kit on this machine's CPU (minutes): the device check's smoke run, our step vs
# the PyTorch reference step alternated (DLV2-R18, 128x128, batch 4), the DDB ops and the
# input pipeline. The idle-machine comparison at full size (DLV2-R101, 512x512, batch 2, ~10 min):
# `$(BIN)/python benchmarks/train_step.py --preset cpu-idle`; the GPU check:
# benchmarks/device_check.sh. Results: benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/device_check.py --smoke
	$(BIN)/python benchmarks/train_step.py --depth 18 --size 128 --batch 4 --steps 3 \
		--conv-impl matmul,lax
	$(BIN)/python benchmarks/ops.py
	$(BIN)/python benchmarks/input_pipeline.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layering.py

clean:
	rm -rf $(VENV) build *.egg-info
