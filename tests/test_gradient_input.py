"""The gradient-times-input ops (RULES.md section 2) against their float64 transcriptions in
reference.py. Here autograd carries g = R / x, seeded with 1, and relevance is x * x.grad: each
case seeds the op's output with a gradient g and compares x.grad with the reference gradient,
and x * x.grad with the relevance the explicit rule gives."""

import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import DTYPES, TOL, assert_relevance_close, recording_backend
from test_rules import d64, make

ops = torch.ops.lrpcpp
f64 = torch.float64

params = pytest.mark.parametrize("dtype", DTYPES, ids=str)
layouts = pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])


def rms_norm(x, w=None, eps=1e-6):
    """RMSNorm by hand (LLaMA style), an element-wise scaling of x once its norm is held constant."""
    return ref.rms_norm_hf(x, w, eps)


# f(x) computed without grad, and the explicit lrpcpp op with the identity rule for the same f
ACTIVATIONS = {
    "silu": (F.silu, lf.silu),
    "gelu": (F.gelu, lf.gelu),
    "tanh": (torch.tanh, lf.tanh),
    "sigmoid": (torch.sigmoid, lf.sigmoid),
    "rms_norm": (rms_norm, lambda x: lf.rms_norm_identity(x, [x.shape[-1]], None, 1e-6)),
}


# ----------------------------------------------------------------------------- gi_identity
@params
@layouts
@pytest.mark.parametrize("f", sorted(ACTIVATIONS))
def test_gi_identity_against_reference(dtype, contiguous, f):
    fn, _ = ACTIVATIONS[f]
    x = make((2, 3, 16), dtype, contiguous)
    y = fn(x.detach())
    out = lf.gi_identity(x, y)
    assert out.dtype == y.dtype and torch.equal(out, y) and out.data_ptr() == y.data_ptr()  # y itself, no copy
    g = torch.randn_like(out)
    out.backward(g)
    assert x.grad.dtype == dtype
    assert_relevance_close(x.grad, ref.gi_identity(d64(x), d64(y), d64(g), 1e-10), dtype)


@params
@layouts
@pytest.mark.parametrize("f", sorted(ACTIVATIONS))
def test_gi_identity_relevance_is_the_identity_rule(dtype, contiguous, f):
    """x * x.grad = y * g_y (up to epsilon, here ~0), and that is the relevance the explicit
    identity-rule op passes on when it is seeded with R = y * g_y."""
    fn, explicit = ACTIVATIONS[f]
    x = make((2, 3, 16), dtype, contiguous)
    y = fn(x.detach())
    g = torch.randn_like(y)
    lf.gi_identity(x, y, 1e-30).backward(g)
    relevance = x.detach() * x.grad
    R = y * g
    assert_relevance_close(relevance, d64(y) * d64(g), dtype)
    x2 = x.detach().clone().requires_grad_()
    explicit(x2).backward(R)
    assert_relevance_close(relevance, d64(x2.grad), dtype, scale=float(d64(R).abs().max()))


def test_gi_identity_relevance_is_exact_in_float64():
    x = make((4, 32), f64, offset=0.0)
    y = F.silu(x.detach())
    g = torch.randn_like(y)
    lf.gi_identity(x, y, 0.0).backward(g)
    torch.testing.assert_close(x.detach() * x.grad, y * g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gi_identity_factor_is_clamped_to_finite(dtype):
    """sigmoid(0) / stab(0) = 0.5 / 1e-10 = 5e9: beyond float16's range, so clamped to 65504."""
    x = torch.tensor([0.0, 0.0, 1.0, 0.0, float("nan")], dtype=dtype, requires_grad=True)
    y = torch.sigmoid(x.detach())
    y[3] = -y[3]  # a negative factor is clamped to the lowest finite value
    factor = ops.gi_identity_factor(x.detach(), y, 1e-10)
    assert factor.dtype == dtype
    big = torch.finfo(dtype).max
    expected = ref.gi_identity(d64(x), d64(y), torch.ones(5, dtype=f64), 1e-10, max_factor=big)
    assert torch.isfinite(factor[:4]).all() and torch.isnan(factor[4])
    assert_relevance_close(factor[:4], expected[:4], dtype)
    if dtype == torch.float16:
        assert factor[0] == 65504 and factor[3] == -65504
    lf.gi_identity(x, y).backward(torch.ones_like(y))
    assert torch.isfinite(x.grad[:4]).all() and torch.isnan(x.grad[4])
    torch.testing.assert_close(x.grad, factor, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "x_dtype,y_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, f64)], ids=str
)
def test_gi_identity_mixed_dtypes(x_dtype, y_dtype):
    x = make((3, 16), x_dtype)
    y = F.silu(x.detach().to(y_dtype))
    out = lf.gi_identity(x, y)
    assert out.dtype == y_dtype and torch.equal(out, y)
    g = torch.randn_like(out)
    out.backward(g)
    assert x.grad.dtype == x_dtype
    tol = max(TOL[x_dtype], TOL[y_dtype])
    expected = ref.gi_identity(d64(x), d64(y), d64(g), 1e-10)
    torch.testing.assert_close(d64(x.grad), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_gi_identity_y_takes_no_gradient_and_only_the_factor_is_saved():
    x = make((3, 8), torch.float32)
    y = torch.tanh(x.detach()).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lf.gi_identity(x, y)
    assert len(saved) == 1  # the factor y / stab(x): neither x nor y
    torch.testing.assert_close(saved[0], y.detach() / ref.stab(x.detach(), 1e-10))
    out.backward(torch.ones_like(out))
    assert y.grad is None and x.grad is not None
    with torch.no_grad():
        assert not lf.gi_identity(x, y).requires_grad
    assert not lf.gi_identity(x.detach(), y).requires_grad  # y itself, but detached
    assert not lf.gi_identity(x.detach(), y.detach()).requires_grad


# ----------------------------------------------------------------------------- gi_grad_scale
def qkv_scale(d, dtype):
    """[0.25] * q + [0.25] * k + [0.5] * v, the uniform shares of attention for a fused qkv projection."""
    return torch.tensor([0.25] * d + [0.25] * d + [0.5] * d, dtype=dtype)


SCALES = {
    "0-dim": lambda dtype: torch.tensor(0.5, dtype=dtype),
    "per-column": lambda dtype: qkv_scale(4, dtype),
    "zeros": lambda dtype: torch.zeros(12, dtype=dtype),
    "rows": lambda dtype: torch.randn(3, 1, dtype=f64).to(dtype),
    "full": lambda dtype: torch.randn(2, 3, 12, dtype=f64).to(dtype),
}


@params
@layouts
@pytest.mark.parametrize("kind", sorted(SCALES))
def test_gi_grad_scale(dtype, contiguous, kind):
    x = make((2, 3, 12), dtype, contiguous)
    scale = SCALES[kind](dtype)
    out = lf.gi_grad_scale(x, scale)
    assert torch.equal(out, x.detach()) and out.data_ptr() == x.data_ptr()  # x itself, no copy
    g = torch.randn_like(out)
    out.backward(g)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_relevance_close(x.grad, ref.gi_grad_scale(d64(g), d64(scale)), dtype)
    if kind == "zeros":
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (64,)], ids=["0-dim", "per-column"])
def test_gi_grad_scale_keeps_a_float32_scale(dtype, shape):
    """A float32 scale with low-precision x is applied in float32, not rounded to x's dtype first
    (torch's type promotion would round a 0-dim one)."""
    x = make((4, 64), dtype)
    scale = torch.full(shape, 1.0 / 3.0)
    g = torch.randn(4, 64, dtype=f64).to(dtype)
    lf.gi_grad_scale(x, scale).backward(g)
    assert torch.equal(x.grad, (g.float() * scale).to(dtype))
    assert not torch.equal(x.grad, g * scale.to(dtype))  # the two differ, so the check above means something


def test_gi_grad_scale_fused_qkv_shares():
    x = make((2, 5, 8), f64)
    w = torch.randn(12, 8, dtype=f64)
    qkv = lf.gi_grad_scale(F.linear(x, w), qkv_scale(4, f64))
    q, k, v = qkv.chunk(3, dim=-1)
    (q.sum() + 2 * k.sum() + 3 * v.sum()).backward()
    expected = torch.cat([torch.full((4,), 0.25), torch.full((4,), 0.5), torch.full((4,), 1.5)]).double() @ w
    torch.testing.assert_close(x.grad, expected.expand_as(x))


def test_gi_grad_scale_scale_takes_no_gradient():
    x = make((3, 4), f64)
    scale = torch.rand(4, dtype=f64, requires_grad=True)
    lf.gi_grad_scale(x, scale).sum().backward()
    assert scale.grad is None
    torch.testing.assert_close(x.grad, scale.detach().expand(3, 4))


# ----------------------------------------------------------------------------- no copies
def assert_is_view_of(out, t):
    """``out`` is ``t`` itself: the same memory and layout, the same version counter (autograd sees
    an in-place change of either)."""
    assert out.data_ptr() == t.data_ptr() and out.stride() == t.stride()
    before = out._version
    with torch.no_grad():
        t.add_(0)
    assert out._version == before + 1


def saving(f):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = f()
    return out, saved


@layouts
def test_gi_grad_scale_returns_x_itself_and_keeps_only_the_scale(contiguous):
    x = make((2, 3, 12), torch.float32, contiguous)
    scale = qkv_scale(4, torch.float32)
    out, saved = saving(lambda: lf.gi_grad_scale(x, scale))
    assert len(saved) == 1 and saved[0] is scale
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, scale.expand_as(x), rtol=0, atol=0)
    assert_is_view_of(out, x)
    with pytest.raises(RuntimeError, match="modified inplace"):  # x changed since: autograd knows
        out.sum().backward()
    with pytest.raises(RuntimeError, match="view"):
        lf.gi_grad_scale(x, scale).mul_(2)


@layouts
def test_gi_identity_returns_y_itself_and_keeps_only_the_factor(contiguous):
    x = make((2, 3, 12), torch.float32, contiguous)
    y = torch.tanh(x.detach())
    out, saved = saving(lambda: lf.gi_identity(x, y))
    assert_is_view_of(out, y)
    assert len(saved) == 1 and saved[0].data_ptr() not in (x.data_ptr(), y.data_ptr())
    with pytest.raises(RuntimeError, match="view"):
        lf.gi_identity(x, y).mul_(2)
    with torch.no_grad():
        out = lf.gi_identity(x, y)
    assert_is_view_of(out, y)
    assert_is_view_of(lf.gi_identity(x.detach(), y), y)


@params
@layouts
@pytest.mark.parametrize("f", sorted(ACTIVATIONS))
def test_gi_identity_keeping_its_inputs_keeps_x_and_y_and_gives_the_same_gradient(dtype, contiguous, f):
    fn, _ = ACTIVATIONS[f]
    x = make((2, 3, 16), dtype, contiguous)
    y = fn(x.detach())
    g = torch.randn(y.shape, dtype=f64).to(y.dtype)
    lf.gi_identity(x, y).backward(g)
    want, x.grad = x.grad, None
    out, saved = saving(lambda: lf.gi_identity(x, y, keep_inputs=True))
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), y.data_ptr()]  # no new tensor
    out.backward(g)
    assert torch.equal(x.grad, want)  # the factor computed in the backward: the same one, bitwise
    assert_is_view_of(out, y)
    with pytest.raises(RuntimeError, match="lrpcpp.gi_identity"):  # no double backward either
        torch.autograd.grad(lf.gi_identity(x, y, keep_inputs=True), x, g, create_graph=True)


# ----------------------------------------------------------------------------- gi_scale_backward
@params
def test_gi_scale_backward_broadcasts_and_casts(dtype):
    grad = torch.randn(2, 3, 8, dtype=f64).to(dtype)
    for factor in (
        torch.tensor(3.0, dtype=dtype),
        torch.randn(8, dtype=f64).to(dtype),
        torch.randn(3, 1, dtype=f64).to(dtype),
        torch.randn(2, 3, 8, dtype=f64).to(dtype),
        torch.randn(2, 3, 16, dtype=f64).to(dtype)[..., ::2],
    ):
        out = ops.gi_scale_backward(grad, factor, dtype)
        assert out.dtype == dtype and out.shape == grad.shape
        assert_relevance_close(out, d64(grad) * d64(factor), dtype)
        assert ops.gi_scale_backward(grad, factor, torch.float32).dtype == torch.float32
    expanded = torch.ones(1, dtype=dtype).expand(2, 3, 8)  # the gradient of a sum arrives expanded
    out = ops.gi_scale_backward(expanded, torch.arange(8, dtype=dtype), dtype)
    assert torch.equal(out, torch.arange(8, dtype=dtype).expand(2, 3, 8))


@params
def test_gi_scale_backward_keeps_the_gradients_layout(dtype):
    # F.scaled_dot_product_attention's CPU backward returns (batch, heads, seq, dim) gradients laid out
    # as (batch, seq, heads, dim): the scaled gradient keeps that layout, so the view back to
    # (batch, seq, heads * dim) copies nothing; its values are the float64 product, rounded once
    grad = torch.randn(2, 5, 3, 4, dtype=f64).to(dtype).transpose(1, 2)
    for factor in (
        torch.tensor(0.3, dtype=dtype),
        torch.randn(4, dtype=f64).to(dtype),
        torch.randn(3, 1, 4, dtype=f64).to(dtype),
    ):
        for out_dtype in (dtype, torch.float32):
            out = ops.gi_scale_backward(grad, factor, out_dtype)
            assert out.stride() == grad.stride()
            assert torch.equal(out, (d64(grad) * d64(factor)).to(out_dtype))
            meta = ops.gi_scale_backward(grad.to("meta"), factor.to("meta"), out_dtype)
            assert meta.stride() == out.stride() and meta.dtype == out.dtype


def test_gi_scale_backward_computes_half_types_in_float32():
    # 300 * 300 = 90000 overflows float16, but the result is returned in float32
    grad = torch.full((4,), 300.0, dtype=torch.float16)
    out = ops.gi_scale_backward(grad, torch.full((4,), 300.0, dtype=torch.float16), torch.float32)
    assert torch.equal(out, torch.full((4,), 90000.0))


# ----------------------------------------------------------------------------- gi_layer_norm
@params
@layouts
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_gi_layer_norm(dtype, contiguous, affine):
    x = make((2, 3, 16), dtype, contiguous, scale=2.0, offset=0.5)
    w = torch.randn(16, dtype=f64).to(dtype).requires_grad_() if affine != "none" else None
    b = torch.randn(16, dtype=f64).to(dtype).requires_grad_() if affine == "both" else None
    y = lf.gi_layer_norm(x, [16], w, b, 1e-5)
    assert torch.equal(y, F.layer_norm(x.detach(), [16], w, b, 1e-5))  # torch's own kernel, bitwise
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.dtype == dtype
    expected = ref.gi_layer_norm(d64(x), [16], None if w is None else d64(w), d64(g), 1e-5)
    assert_relevance_close(x.grad, expected, dtype)
    for p in (w, b):
        assert p is None or p.grad is None  # the weight and bias take no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gi_layer_norm_keeps_the_forwards_rstd_and_not_x(dtype):
    """The backward needs 1 / sigma per row, not x: only that and the weight are kept (a plain gradient
    of F.layer_norm keeps x), and the rstd is the one torch's layer norm computes."""
    x = make((2, 3, 16), dtype, True, scale=2.0, offset=0.5)
    w, b = torch.randn(16, dtype=f64).to(dtype), torch.randn(16, dtype=f64).to(dtype)
    _, saved = saving(lambda: lf.gi_layer_norm(x, [16], w, b, 1e-5))
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    (rstd,) = [t for t in saved if t is not w]
    assert len(saved) == 2 and rstd.shape == (2, 3, 1)
    assert torch.equal(rstd, torch.native_layer_norm(x.detach(), [16], w, b, 1e-5)[2])
    _, plain = saving(lambda: F.layer_norm(x, [16], w, b, 1e-5))
    assert any(t.data_ptr() == x.data_ptr() for t in plain)


def test_gi_layer_norm_two_normalized_dims_and_long_rows():
    for shape, ns in (((2, 3, 4, 5), [4, 5]), ((3, 2500), [2500])):
        x = make(shape, f64)
        w = torch.randn(ns, dtype=f64)
        y = lf.gi_layer_norm(x, ns, w, torch.randn(ns, dtype=f64))
        g = torch.randn_like(y)
        y.backward(g)
        assert_relevance_close(x.grad, ref.gi_layer_norm(d64(x), ns, w, g, 1e-5), f64)


def test_gi_layer_norm_is_the_gradient_with_sigma_detached():
    x = make((3, 7), f64)
    w, b = torch.randn(7, dtype=f64), torch.randn(7, dtype=f64)
    g = torch.randn(3, 7, dtype=f64)
    lf.gi_layer_norm(x, [7], w, b, 1e-5).backward(g)
    x2 = x.detach().clone().requires_grad_()
    mu = x2.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x2 - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    ((x2 - mu) / sigma.detach() * w + b).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_gi_layer_norm_matches_the_explicit_rule(affine):
    """x * x.grad equals the relevance of lrpcpp.layer_norm (epsilon -> 0) seeded with R = y * g."""
    x = make((2, 3, 16), f64, scale=2.0, offset=0.5)
    w = torch.randn(16, dtype=f64) if affine != "none" else None
    b = torch.randn(16, dtype=f64) if affine == "both" else None
    y = lf.gi_layer_norm(x, [16], w, b, 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    y2 = lf.layer_norm(x2, [16], w, b, 1e-5, epsilon=1e-300)
    y2.backward(y2.detach() * g)
    torch.testing.assert_close(x.detach() * x.grad, x2.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- round trips
def gi_block(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    h = lf.gi_layer_norm(x, [x.shape[-1]])
    h = lf.gi_grad_scale(torch.matmul(h, w.t()), scale)
    with torch.no_grad():
        a = F.silu(h)
    return lf.gi_identity(h, a).sum(-1)


def gi_block_scriptable(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    h = lf.gi_layer_norm(x, [8])
    h = lf.gi_grad_scale(torch.matmul(h, w.t()), scale)
    return lf.gi_identity(h, torch.tanh(h.detach()), 1e-10).sum(-1)


def gi_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 5, 8), torch.randn(12, 8), qkv_scale(4, torch.float32)


def input_gradient(fn, x, w, scale):
    x = x.detach().clone().requires_grad_()
    fn(x, w, scale).sum().backward()  # seeded with 1
    return x.grad


@pytest.mark.compile
def test_compile_fullgraph_backward_calls_gi_scale_backward():
    x, w, scale = gi_inputs()
    expected = input_gradient(gi_block, x, w, scale)
    seen = []
    backend = recording_backend(seen)

    torch._dynamo.reset()
    got = input_gradient(torch.compile(gi_block, backend=backend, fullgraph=True), x, w, scale)
    torch.testing.assert_close(got, expected)
    for op in ("gi_scale_backward", "gi_layer_norm_backward"):
        assert any(f"lrpcpp.{op}" in s for s in seen), op
    torch._dynamo.reset()
    got = input_gradient(torch.compile(gi_block, fullgraph=True), x, w, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_torchscript():
    x, w, scale = gi_inputs()
    scripted = torch.jit.script(gi_block_scriptable)
    torch.testing.assert_close(input_gradient(scripted, x, w, scale), input_gradient(gi_block_scriptable, x, w, scale))


@pytest.mark.parametrize(
    "build",
    [
        lambda x: lf.gi_identity(x, torch.tanh(x.detach())),
        lambda x: lf.gi_grad_scale(x, torch.tensor(0.5, dtype=f64)),
        lambda x: lf.gi_layer_norm(x, [4]),
    ],
    ids=["gi_identity", "gi_grad_scale", "gi_layer_norm"],
)
def test_empty_tensors(build):
    x = torch.randn(0, 4, dtype=f64, requires_grad=True)
    y = build(x)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
