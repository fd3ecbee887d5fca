import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LRPCPP_TEST_INSTALLED=1 tests the installed package (a wheel) instead of the in-place build
INSTALLED = os.environ.get("LRPCPP_TEST_INSTALLED") == "1"
if not INSTALLED:
    sys.path.insert(0, os.path.join(ROOT, "python"))


def subprocess_env():
    """Environment for a fresh Python process that imports the same lrpcpp as these tests."""
    env = dict(os.environ)
    if not INSTALLED:
        env["PYTHONPATH"] = os.path.join(ROOT, "python")
    return env


import lrpcpp  # noqa: E402,F401  (loads torch.ops.lrpcpp)
from lrpcpp.models import tracking as _tracking  # noqa: E402

# The rules run the body of a torch function written in Python (F.pad, F.interpolate,
# F.multi_head_attention_forward) through torch.overrides.redispatch_function, which older torch
# releases lack: there such a function is one call, reported as unruled (a warning, or an error with strict).
needs_redispatch = pytest.mark.skipif(
    _tracking.redispatch_function is None,
    reason="this torch has no torch.overrides.redispatch_function: the rules cannot see into a Python torch function",
)

# torch releases before 2.13 (2.11 seen) fail a few tests inside torch itself; each such
# test says what fails there and is skipped on those releases (it runs on the pinned torch)
OLD_TORCH = tuple(int(n) for n in torch.__version__.split(".")[:2]) < (2, 13)


def fails_in_torch_before_2_13(what):
    return pytest.mark.skipif(OLD_TORCH, reason=f"torch < 2.13: {what}")


def _inductor_cache_per_build() -> None:
    """torch.compile's on-disk cache keys a compiled graph by the graph, not by the library behind an
    operator: after a rebuild that changes what an lrpcpp composite decomposes into, a cached graph
    would call the old operators. The tests (and the subprocesses they start) use a cache of their own
    per build of the extension, unless TORCHINDUCTOR_CACHE_DIR is set."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    here = os.path.dirname(lrpcpp.__file__)
    libraries = sorted(os.path.join(here, f) for f in os.listdir(here) if f.startswith("_C") and f.endswith(".so"))
    stats = [os.stat(f) for f in libraries]
    key = "-".join(f"{st.st_size}-{int(st.st_mtime)}" for st in stats) or "none"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(ROOT, "build", "inductor-cache", key)


_inductor_cache_per_build()

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# relative tolerance of a relevance against the float64 reference, per dtype
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_relevance_close(actual, expected, dtype, scale=None):
    """Compare with the float64 reference; atol is relative to the largest reference value."""
    expected = expected.double()
    scale = float(expected.abs().max()) if scale is None and expected.numel() else (scale or 1.0)
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(scale, 1e-30))


# Markers (registered in pyproject.toml): `slow` (builds, subprocesses, command-line runs, compilation:
# about 80% of the suite's time; `make test-fast`, pytest -m "not slow", leaves them out for the edit loop),
# `subprocess` (starts a Python or C++ process) and `compile` (torch.compile or torch.export).
# The test files whose every test has a marker are listed here; in other files the tests are marked
# one by one with the decorator.
FILE_MARKERS = {
    "test_deploy.py": {"slow"},
    "test_cli.py": {"slow", "subprocess"},
    "test_cli_files.py": {"slow", "subprocess"},
    "test_wheel.py": {"slow", "subprocess"},
    "test_gpu_check.py": {"slow", "subprocess"},
    "test_benchmarks.py": {"slow", "subprocess"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in sorted(FILE_MARKERS.get(item.path.name, ())):
            item.add_marker(getattr(pytest.mark, name))


@contextlib.contextmanager
def checkout_lock(name):
    """Holds build/<name>.lock exclusively: the test processes that build in the same directory of the
    checkout (CMake's build/cmake, pip's in-tree wheel build; `make test` runs two pytest-xdist
    workers) build one at a time."""
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", f"{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _configured_for_this_torch(build_dir):
    """A build directory that CMake configured, successfully, against this torch."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    generated = any(os.path.exists(os.path.join(build_dir, f)) for f in ("Makefile", "build.ninja"))
    if not (os.path.exists(cache) and generated):
        return False
    with open(cache) as f:
        found = re.search(r"^Torch_DIR:PATH=(.*)$", f.read(), re.M)
    want = os.path.join(torch.utils.cmake_prefix_path, "Torch")
    return bool(found) and os.path.realpath(found.group(1)) == os.path.realpath(want)


def cmake_build(*targets):
    """Brings ``targets`` of the CMake build up to date and returns its directory: build/cmake
    (``make cpp-test`` configures it), or against another torch than that build's, a build directory
    of its own. Skips where there is no cmake or C++ compiler, or (testing an installed wheel) where
    CMake cannot configure against this torch."""
    cmake = shutil.which("cmake")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cmake is None or compiler is None:
        pytest.skip("the C++ build needs cmake and a C++ compiler on PATH")
    with checkout_lock("cmake"):
        return _cmake_build(cmake, targets)


def _cmake_build(cmake, targets):
    build_dir = os.path.join(ROOT, "build", "cmake")
    if os.path.exists(os.path.join(build_dir, "CMakeCache.txt")) and not _configured_for_this_torch(build_dir):
        build_dir = os.path.join(ROOT, "build", f"cmake-torch-{torch.__version__}")
    if not _configured_for_this_torch(build_dir):
        configure = [cmake, "-S", ROOT, "-B", build_dir, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
        proc = subprocess.run(configure, capture_output=True, text=True)
        if proc.returncode != 0 and build_dir != os.path.join(ROOT, "build", "cmake"):
            shutil.rmtree(build_dir, ignore_errors=True)  # no half-configured directory left behind
        if proc.returncode != 0 and INSTALLED:
            # e.g. a CUDA build of torch, whose CMake package needs the CUDA libraries: the C++ build
            # is checked against the in-place build (make test's first pytest run)
            errors = re.findall(r"CMake Error[^\n]*\n((?:  [^\n]*\n)+)", proc.stderr)
            why = " ".join(errors[-1].split()) if errors else proc.stderr.strip()[-300:]
            pytest.skip(f"CMake cannot build against the installed torch {torch.__version__}: {why}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    proc = subprocess.run(
        [cmake, "--build", build_dir, "-j", jobs, "--target", *targets], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build_dir


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _sigint_state():
    return signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture(autouse=True)
def _keeps_ctrl_c():
    """Every test leaves Ctrl-C as it found it (handler, and whether SIGINT is blocked): processes the
    later tests start inherit an ignored or blocked SIGINT, and one that must be interrupted then is not."""
    before = _sigint_state()
    yield
    after = _sigint_state()
    if after != before:
        signal.signal(signal.SIGINT, before[0])
        signal.pthread_sigmask(signal.SIG_BLOCK if before[1] else signal.SIG_UNBLOCK, {signal.SIGINT})
        pytest.fail(f"the test changed SIGINT's handling: {before} -> {after}")


@pytest.fixture
def float64_default():
    """torch's default dtype is float64 for the test. transformers 4.x builds CLIP's causal text mask
    with ``torch.full(..., torch.finfo(dtype).min)`` in the default dtype, which overflows float32 for
    a float64 model (the plain forward fails, with or without lrpcpp); transformers 5 does not."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def recording_backend(seen: list):
    """A torch.compile backend (AOTAutograd, no code generation) that appends the target of every
    call in the compiled backward graph to ``seen``."""

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def bw(g, _):
            seen.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g)

        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g), bw_compiler=bw)

    return backend
