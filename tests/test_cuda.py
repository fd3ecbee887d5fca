"""Every op on CUDA against the float64 CPU result (itself checked against the reference formulas),
opcheck on CUDA, and torch.compile on CUDA. Skipped, with the reason, where no CUDA device exists."""

import pytest
import torch
from torch.library import opcheck

import lrpcpp  # noqa: F401  (registers the ops)
from block import Head, relevance
from conftest import TOL
from test_opcheck import RELEVANCE_OPS, SAMPLES

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible (torch.cuda.is_available() is False); the CPU tests cover the "
                "shared per-element math", allow_module_level=True)
if torch.ops.lrpcpp.cuda_version() <= 0:
    pytest.skip("lrpcpp was built without CUDA kernels (LRPCPP_CUDA=0 or no nvcc at build time)",
                allow_module_level=True)

OPS = sorted(n for n in SAMPLES if n != "cuda_version")


def to(args, device, dtype):
    return tuple(a.detach().to(device=device, dtype=dtype).requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def run(name, args):
    """The op's outputs, and for a forward op the relevance of every input that requires grad."""
    out = getattr(torch.ops.lrpcpp, name)(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs = [o for o in outs if o is not None]
    if name in RELEVANCE_OPS or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return outs
    seed = torch.ones_like(outs[0]) if name == "softmax" else outs[0].detach()
    outs[0].backward(seed)
    return outs + [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_cpu_float64(name, dtype):
    torch.manual_seed(0)
    args = SAMPLES[name](name not in RELEVANCE_OPS)
    expected = run(name, to(args, "cpu", torch.float64))
    got = run(name, to(args, "cuda", dtype))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        scale = max(float(e.abs().max()), 1.0) if e.numel() else 1.0
        torch.testing.assert_close(g.double().cpu(), e, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("name", OPS)
def test_opcheck_cuda(name):
    args = to(SAMPLES[name](False), "cuda", torch.float32)
    opcheck(getattr(torch.ops.lrpcpp, name).default, args)


def test_cpu_cuda_mix_is_a_clear_error():
    x = torch.randn(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected weight to be on the same device as x \\(cuda:0\\), got cpu"):
        torch.ops.lrpcpp.linear_epsilon(x, torch.randn(3, 4), None, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_on_cuda(dtype):
    torch.manual_seed(0)
    model = Head(8).to("cuda", dtype)
    x = torch.randn(2, 5, 8, device="cuda", dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    expected = relevance(model, x)
    torch.testing.assert_close(relevance(compiled, x), expected, rtol=TOL[dtype], atol=TOL[dtype])
