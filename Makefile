# The README's two commands: `make run` (set up, build, run the main job) and `make test`.
# Both create .venv with the pinned requirements on first use and rebuild only what changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
export PYTHONPATH := $(CURDIR)/python
export MAX_JOBS ?= 2
CMAKE_BUILD := build/cmake

.PHONY: run test build cpp-test docs wheel bench clean

run: build
	$(PY) examples/explain_block.py

test: build cpp-test docs
	$(PY) -m pytest -q tests

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

# the extension, compiled in place into python/lrpcpp (ninja rebuilds only changed files)
build: $(DEPS)
	@mkdir -p build
	@echo "building lrpcpp (compiler log: build/ext.log)"
	@$(PY) setup.py build_ext --inplace >build/ext.log 2>&1 || { tail -n 60 build/ext.log; exit 1; }

# liblrpcpp and the C++ test program, through CMake, with no Python at run time
cpp-test: $(DEPS)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS) -- --no-print-directory >/dev/null
	$(CMAKE_BUILD)/lrpcpp_cpp_test

docs: build
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs

wheel: build
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

bench: build
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf build dist python/lrpcpp/_C*.so python/lrpcpp/_build_info.py
