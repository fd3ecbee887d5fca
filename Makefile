# The README's two commands: `make run` (set up, build, run the main job) and `make test`.
# Both create .venv with the pinned requirements on first use and rebuild only what changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
export PYTHONPATH := $(CURDIR)/python
export MAX_JOBS ?= 2
CMAKE_BUILD := build/cmake

# the CUDA build check: a second environment with torch's CUDA build, and a copy of the sources
CUDA_VENV := .venv-cuda
CUDA_PY := $(CURDIR)/$(CUDA_VENV)/bin/python
CUDA_DEPS := $(CUDA_VENV)/.deps-installed
CUDA_DIR := build-cuda
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

# the transformers 4.x check: a third environment, the same torch with transformers 4.57.6
TF4_VENV := .venv-tf4
TF4_PY := $(TF4_VENV)/bin/python
TF4_DEPS := $(TF4_VENV)/.deps-installed
# the tests that build Hugging Face models
TF4_TESTS := tests/test_models.py tests/test_minilm.py tests/test_model_state.py tests/test_attribute_errors.py \
	tests/test_vision_models.py tests/test_explicit_coverage.py tests/test_operation_level.py tests/test_functional_model.py \
	tests/test_operation_families.py tests/test_operation_mamba.py tests/test_operation_mamba2.py tests/test_operation_moe.py \
	tests/test_operation_vision.py tests/test_multi_input.py

.PHONY: run test test-fast test-tf4 lint build cpp-test docs wheel bench cuda-check cuda-wheel-test clean tools

run: build
	$(PY) examples/explain_block.py
	$(PY) -m lrpcpp explain

# pytest's worker processes in `make test` (pytest-xdist), each taking whole test files (a file's
# models are built once); tests that build in the same directory of the checkout take turns (a lock,
# tests/conftest.py)
TEST_JOBS ?= 2
PARALLEL := -n $(TEST_JOBS) --dist loadfile

test: build lint cpp-test docs cuda-check test-tf4
	$(PY) -m pytest -q -rs $(PARALLEL) tests

# the edit loop: the in-place build and the tests not marked slow (no C++/CUDA/docs builds, no
# command-line runs, subprocesses or compilation; a few minutes)
test-fast: build
	$(PY) -m pytest -q -rs -m "not slow" tests

# the whole-model tests under transformers 4.x (requirements-tf4.txt), with the extension built in place
# for .venv (the same torch, so the same ABI)
test-tf4: build $(TF4_DEPS)
	$(TF4_PY) -m pytest -q -rs -m "not slow" $(TF4_TESTS) $(TF4_KNOWN_FAILURES)

# tests that fail under transformers 4.x for a known reason, each as --deselect FILE::TEST (none today)
TF4_KNOWN_FAILURES :=

$(TF4_DEPS): requirements-tf4.txt requirements-nodeps.txt
	test -x $(TF4_PY) || $(PYTHON) -m venv $(TF4_VENV)
	$(TF4_PY) -m pip install -q --disable-pip-version-check -r requirements-tf4.txt
	$(TF4_PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# the C++ and CUDA sources that clang-format checks
CPP_SOURCES = $(sort $(wildcard $(addprefix csrc/,*.h *.cpp ops/*.h ops/*.cpp ops/*/*.h ops/*/*.cpp ops/*/*.cu ops/*/*.cuh)) \
	$(wildcard $(addprefix tests/cpp/,*.h *.cpp */*.h */*.cpp) $(addprefix examples/cpp/,*.h *.cpp)))

# Lint, format and type checks (part of `make test`): ruff, mypy, clang-format, as pinned in
# requirements-dev.txt. `ruff format .` and `clang-format -i` fix what the format checks report.
lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror $(CPP_SOURCES)

# What the tests of the lrpcpp command need from Debian, installed once, before `make test` (.ci/run
# does): headless Chromium (the HTML heatmap is rendered in it) and pdflatex (the LaTeX heatmap is
# compiled). Needs root; without it, those tests are skipped and say why.
tools:
	@if [ -x /usr/bin/chromium ] && command -v pdflatex >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "not root: chromium and pdflatex are not installed (their tests are skipped)"; \
	else echo "installing chromium and pdflatex (apt-get)"; apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium texlive-latex-base >/dev/null; fi

$(DEPS): requirements-dev.txt requirements-test.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# the extension, compiled in place into python/lrpcpp (ninja rebuilds only changed files)
build: $(DEPS)
	@mkdir -p build
	@echo "building lrpcpp (compiler log: build/ext.log)"
	@$(PY) setup.py build_ext --inplace >build/ext.log 2>&1 || { tail -n 60 build/ext.log; exit 1; }
	@$(PY) scripts/checkout_path.py  # .venv/bin/python -m lrpcpp works in the checkout

# liblrpcpp and the C++ test program, through CMake, with no Python at run time
cpp-test: $(DEPS)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS) -- --no-print-directory >/dev/null
	$(CMAKE_BUILD)/lrpcpp_cpp_test

docs: build
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs

# the wheel, repaired by auditwheel into a manylinux wheel; torch's libraries (c10, torch_cpu, the
# OpenMP runtime torch ships) are loaded from torch at run time, never copied into the wheel
AUDITWHEEL_EXCLUDE := --exclude libc10.so --exclude libtorch_cpu.so --exclude libgomp.so.1

wheel: build
	@rm -rf build/wheel && mkdir -p build/wheel dist
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w build/wheel .
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/auditwheel repair -w dist $(AUDITWHEEL_EXCLUDE) build/wheel/lrpcpp-*.whl

bench: build
	$(PY) benchmarks/bench_cpu.py

$(CUDA_DEPS): requirements-cuda.txt requirements-test.txt requirements-nodeps.txt
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --disable-pip-version-check -r requirements-cuda.txt
	$(CUDA_PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

# Builds the wheel with the CUDA kernels (nvcc, no GPU needed), installs it into .venv-cuda and runs,
# against the installed package and torch 2.14.1, the tests not marked slow (every op's math, opcheck,
# the models, torchvision's) and the torch.compile/torch.export ones. The slow rest (command-line runs,
# builds, subprocesses) does not depend on the torch version and runs in .venv. Sources are copied
# with their timestamps, so only what changed is compiled again.
cuda-check:
	@if [ -x "$(CUDA_HOME)/bin/nvcc" ]; then $(MAKE) --no-print-directory cuda-wheel-test; \
	else echo "no nvcc at $(CUDA_HOME)/bin/nvcc: the CUDA build check is not run (set CUDA_HOME)"; fi

cuda-wheel-test: $(CUDA_DEPS)
	@rm -rf $(CUDA_DIR)/src/csrc $(CUDA_DIR)/src/python
	@mkdir -p $(CUDA_DIR)/src $(CUDA_DIR)/dist
	@git ls-files -co --exclude-standard | tar --ignore-failed-read -cf - -T - 2>/dev/null | tar -xf - -C $(CUDA_DIR)/src
	@rm -f $(CUDA_DIR)/dist/*.whl
	@echo "building the CUDA wheel for sm $(TORCH_CUDA_ARCH_LIST) (compiler log: $(CUDA_DIR)/wheel.log)"
	@cd $(CUDA_DIR)/src && LRPCPP_CUDA=1 $(CUDA_PY) -m pip wheel -v --no-build-isolation --no-deps \
		-w ../dist . >../wheel.log 2>&1 || { tail -n 60 ../wheel.log; exit 1; }
	$(CUDA_PY) -m pip install -q --disable-pip-version-check --no-deps --force-reinstall $(CUDA_DIR)/dist/lrpcpp-*.whl
	LRPCPP_TEST_INSTALLED=1 PYTHONPATH= $(CUDA_PY) -m pytest -q -rs $(PARALLEL) -m "not slow or compile" tests

clean:
	rm -rf build $(CUDA_DIR) dist python/lrpcpp/_C*.so python/lrpcpp/_build_info.py
