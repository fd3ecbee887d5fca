import os
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

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# relative tolerance of a relevance against the float64 reference, per dtype
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_relevance_close(actual, expected, dtype, scale=None):
    """Compare with the float64 reference; atol is relative to the largest reference value."""
    expected = expected.double()
    scale = float(expected.abs().max()) if scale is None and expected.numel() else (scale or 1.0)
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(scale, 1e-30))


# the test files that build, start processes, run the command line or compile: about 80% of the suite's
# time; `make test-fast` (pytest -m "not slow") leaves them out for the edit loop, `make test` runs all
SLOW_FILES = {
    "test_deploy.py",
    "test_cli.py",
    "test_cli_files.py",
    "test_wheel.py",
    "test_gpu_check.py",
    "test_benchmarks.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
