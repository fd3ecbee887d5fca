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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
