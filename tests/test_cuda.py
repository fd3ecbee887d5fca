"""Every op on CUDA against the float64 CPU result (itself checked against the reference formulas),
opcheck on CUDA, and torch.compile on CUDA. Skipped, with the reason, where no CUDA device exists."""

import pytest
import torch
from torch.library import opcheck

import lrpcpp  # noqa: F401  (registers the ops)
import reference as ref
from block import Head, relevance
from conftest import DTYPES, TOL
from test_gradient_input import gi_block, gi_inputs, input_gradient
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
    # the reference sees the same inputs, rounded to dtype, so that only the arithmetic is compared
    args = to(SAMPLES[name](name not in RELEVANCE_OPS), "cpu", dtype)
    expected = run(name, to(args, "cpu", torch.float64))
    got = run(name, to(args, "cuda", dtype))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        scale = max(float(e.detach().abs().max()), 1.0) if e.numel() else 1.0
        # ops with a dtype argument return that dtype in both runs: compare the values in float64
        torch.testing.assert_close(g.double().cpu(), e.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


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


# ----------------------------------------------------------------------------- gradient-times-input
def close_to(got, expected, dtype):
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_shape,factor_shape", [((2, 3, 12), ()), ((2, 3, 12), (12,)), ((5, 7), (7,)),
                                                     ((2, 3, 12), (1, 3, 12)), ((2, 3, 12), (3, 1)),
                                                     ((2, 3, 12), (2, 3, 12)), ((4, 1), (1,))],
                         ids=str)
def test_gi_scale_backward_on_cuda(dtype, grad_shape, factor_shape):
    """Factors that repeat along grad (read in place), and other broadcasts (expanded first)."""
    grad = torch.randn(grad_shape, dtype=torch.float64).to(dtype).double()
    factor = torch.randn(factor_shape, dtype=torch.float64).to(dtype).double()
    out = torch.ops.lrpcpp.gi_scale_backward(grad.to("cuda", dtype), factor.to("cuda", dtype), dtype)
    assert out.dtype == dtype and out.shape == grad.shape
    close_to(out, grad * factor, dtype)
    wide = torch.ops.lrpcpp.gi_scale_backward(grad.to("cuda", dtype), factor.to("cuda", dtype), torch.float32)
    assert wide.dtype == torch.float32
    close_to(wide, grad * factor, torch.float32)


def test_gi_scale_backward_expanded_grad_and_mixed_dtypes_on_cuda():
    grad = torch.ones(1, device="cuda", dtype=torch.bfloat16).expand(4, 6)  # the gradient of a sum
    scale = torch.full((6,), 1.0 / 3.0, device="cuda")
    out = torch.ops.lrpcpp.gi_scale_backward(grad, scale, torch.bfloat16)
    assert torch.equal(out, (grad.float() * scale).to(torch.bfloat16))


def test_gi_identity_fp16_factor_is_finite_on_cuda():
    x = torch.tensor([0.0, 1.0, 0.0, float("nan")], device="cuda", dtype=torch.float16, requires_grad=True)
    y = torch.sigmoid(x.detach())
    y[2] = -y[2]
    out = torch.ops.lrpcpp.gi_identity(x, y, 1e-10)
    torch.testing.assert_close(out, y, rtol=0, atol=0, equal_nan=True)
    out.backward(torch.ones_like(out))
    assert x.grad[0] == 65504 and x.grad[2] == -65504 and torch.isfinite(x.grad[:3]).all()
    assert torch.isnan(x.grad[3])


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=str)
def test_gi_identity_mixed_dtypes_on_cuda(x_dtype, y_dtype):
    x0 = torch.randn(5, 33, dtype=torch.float64)
    x = x0.to("cuda", x_dtype).requires_grad_()
    y = torch.nn.functional.silu(x.detach().to(y_dtype))
    g = torch.randn(5, 33, dtype=torch.float64)
    out = torch.ops.lrpcpp.gi_identity(x, y, 1e-10)
    assert out.dtype == y_dtype and torch.equal(out, y)
    out.backward(g.to("cuda", y_dtype))
    assert x.grad.dtype == x_dtype
    expected = ref.gi_identity(x.detach().double().cpu(), y.double().cpu(), g.to(y_dtype).double(), 1e-10)
    tol = max(TOL[x_dtype], TOL[y_dtype])
    torch.testing.assert_close(x.grad.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", [((3, 2500), [2500]), ((2, 3, 4, 5), [4, 5]), ((7, 33), [33])], ids=str)
def test_gi_layer_norm_backward_on_cuda(dtype, shape, ns):
    x = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    g = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    w = torch.randn(ns, dtype=torch.float64).to(dtype).double()
    out = torch.ops.lrpcpp.gi_layer_norm_backward(g.to("cuda", dtype), x.to("cuda", dtype), ns,
                                                   w.to("cuda", dtype), 1e-5)
    assert out.dtype == dtype
    close_to(out, ref.gi_layer_norm(x, ns, w, g, 1e-5), dtype)


def test_gi_compile_on_cuda():
    x, w, scale = (t.cuda() for t in gi_inputs())
    expected = input_gradient(gi_block, x, w, scale)
    torch._dynamo.reset()
    got = input_gradient(torch.compile(gi_block, fullgraph=True), x, w, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attribute_on_cuda_matches_cpu(family, dtype):
    pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
    from models import build, inputs

    model = build(family, dtype=torch.float32)
    kw = inputs(family, dtype=torch.float32)
    expected = lrpcpp.attribute(model, **kw)
    model = model.to("cuda", dtype)
    got = lrpcpp.attribute(model, target=expected.target.cuda(), **{
        k: v.to("cuda", dtype) if v.is_floating_point() else v.cuda() for k, v in kw.items()})
    assert torch.isfinite(got.relevance).all()
    a, b = got.token_relevance.double().cpu().flatten(), expected.token_relevance.double().flatten()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    else:
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
