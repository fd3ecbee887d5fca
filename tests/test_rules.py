"""Every rule against its float64 transcription in reference.py (RULES.md section 1).

Each case runs the lrpcpp op in the given dtype, seeds its backward with a
relevance R, and compares the inputs' .grad with the reference evaluated in
float64 on the same (upcast) inputs. Rules that divide by an output use the
op's own output, as the rule does.
"""

import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_relevance_close


def make(shape, dtype, contiguous=True, scale=1.0, offset=0.0):
    """A leaf tensor of `shape` in `dtype`; non-contiguous ones are strided views."""
    if contiguous:
        t = torch.randn(shape, dtype=torch.float64) * scale + offset
        return t.to(dtype).requires_grad_()
    wide = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64) * scale + offset
    t = wide.to(dtype)[..., ::2]
    assert not t.is_contiguous()
    return t.requires_grad_()


def d64(t):
    return t.detach().double()


def seed(y, random):
    """Random relevance, or the output itself (the usual seed). Low-precision cases seed with y:
    R / stab(y) with a random R can exceed the float16 range where y is near 0."""
    return torch.randn_like(y) if random and y.dtype in (torch.float64, torch.float32) else y.detach().clone()


params = pytest.mark.parametrize("dtype", DTYPES, ids=str)
layouts = pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])


@params
@layouts
@pytest.mark.parametrize("bias", [True, False])
def test_linear_epsilon(dtype, contiguous, bias):
    x = make((2, 3, 16), dtype, contiguous)
    w = torch.randn(8, 16, dtype=torch.float64).to(dtype)
    b = torch.randn(8, dtype=torch.float64).to(dtype) if bias else None
    y = lf.linear_epsilon(x, w, b, epsilon=1e-6)
    assert torch.equal(y, F.linear(x.detach(), w, b))  # torch's own kernel
    R = seed(y, random=True)
    y.backward(R)
    expected = ref.linear_epsilon(d64(x), d64(w), None if b is None else d64(b), d64(R), 1e-6, y=d64(y))
    assert_relevance_close(x.grad, expected, dtype)


def test_linear_epsilon_1d_input():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64)
    y = lf.linear_epsilon(x, w)
    R = torch.randn_like(y)
    y.backward(R)
    assert_relevance_close(x.grad, ref.linear_epsilon(d64(x), w, None, R, 1e-6), torch.float64)


@params
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_epsilon(dtype, stride, padding, dilation):
    x = make((2, 3, 9, 9), dtype)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).to(dtype)
    b = torch.randn(4, dtype=torch.float64).to(dtype)
    y = lf.conv2d_epsilon(x, w, b, stride, padding, dilation)
    assert torch.equal(y, F.conv2d(x.detach(), w, b, stride, padding, dilation))
    R = seed(y, random=True)
    y.backward(R)
    expected = ref.conv2d_epsilon(d64(x), d64(w), d64(b), d64(R), stride, padding, dilation, 1e-6, y=d64(y))
    assert_relevance_close(x.grad, expected, dtype)


def test_conv2d_epsilon_groups_against_per_group_reference():
    x = make((1, 4, 6, 6), torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    y = lf.conv2d_epsilon(x, w, None, 1, 1, 1, 2)
    R = torch.randn_like(y)
    y.backward(R)
    for g in range(2):  # a grouped convolution is two independent convolutions
        expected = ref.conv2d_epsilon(
            d64(x)[:, 2 * g : 2 * g + 2],
            w[3 * g : 3 * g + 3],
            None,
            R[:, 3 * g : 3 * g + 3],
            1,
            1,
            1,
            1e-6,
            y=d64(y)[:, 3 * g : 3 * g + 3],
        )
        assert_relevance_close(x.grad[:, 2 * g : 2 * g + 2], expected, torch.float64)


@params
@layouts
@pytest.mark.parametrize(
    "shapes", [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (1, 3, 1))], ids=["same", "bcast-b", "bcast-both"]
)
def test_add2(dtype, contiguous, shapes):
    a = make(shapes[0], dtype, contiguous)
    b = make(shapes[1], dtype)
    y = lf.add2(a, b)
    assert torch.equal(y, a.detach() + b.detach())
    R = seed(y, random=True)
    if R.dtype in (torch.float16, torch.bfloat16):
        R = R * torch.rand_like(R)  # not proportional to y, yet bounded by it
    y.backward(R)
    ra, rb = ref.add2(d64(a), d64(b), d64(R), 1e-8)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert_relevance_close(a.grad, ra, dtype, scale=float(ra.abs().max() + rb.abs().max()))
    assert_relevance_close(b.grad, rb, dtype, scale=float(ra.abs().max() + rb.abs().max()))


@params
@layouts
@pytest.mark.parametrize("b_relevant", [True, False])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (1, 4))], ids=["same", "bcast"])
def test_mul2(dtype, contiguous, b_relevant, shapes):
    a = make(shapes[0], dtype, contiguous)
    b = make(shapes[1], dtype).requires_grad_(b_relevant)
    y = lf.mul2(a, b)
    assert torch.equal(y, a.detach() * b.detach())
    R = seed(y, random=True)
    y.backward(R)
    ra, rb = ref.mul2(d64(a), d64(b), d64(R), True, b_relevant)
    assert_relevance_close(a.grad, ra, dtype)
    if b_relevant:
        assert_relevance_close(b.grad, rb, dtype)
    else:
        assert b.grad is None


def test_mul2_saves_no_operands():
    # the uniform rule reads only the operands' shapes: the forward keeps neither a nor b for the backward
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(1, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = lf.mul2(a, b)
    assert saved == []
    R = torch.randn(2, 3, 4)
    y.backward(R)
    ra, rb = ref.mul2(a.detach().double(), b.detach().double(), R.double(), True, True)
    torch.testing.assert_close(a.grad, ra.float())
    torch.testing.assert_close(b.grad, rb.float())


@params
@layouts
@pytest.mark.parametrize("relevant", [(True, True), (True, False), (False, True)], ids=["both", "a", "b"])
@pytest.mark.parametrize(
    "shapes",
    [((5, 6), (6, 4)), ((2, 3, 5, 6), (2, 3, 6, 4)), ((2, 3, 5, 6), (6, 4)), ((3, 1, 5, 6), (2, 6, 4))],
    ids=["2d", "batched", "bcast-b", "bcast-both"],
)
def test_matmul(dtype, contiguous, relevant, shapes):
    a = make(shapes[0], dtype, contiguous).requires_grad_(relevant[0])
    b = make(shapes[1], dtype).requires_grad_(relevant[1])
    y = lf.matmul(a, b)
    assert torch.equal(y, torch.matmul(a.detach(), b.detach()))
    R = seed(y, random=True)
    y.backward(R)
    ra, rb = ref.matmul(d64(a), d64(b), d64(R), 1e-8, *relevant, o=d64(y))
    for t, r, on in ((a, ra, relevant[0]), (b, rb, relevant[1])):
        if on:
            assert t.grad.shape == t.shape
            assert_relevance_close(t.grad, r, dtype)
        else:
            assert t.grad is None


@params
@layouts
@pytest.mark.parametrize("dim", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_softmax_every_dim(dtype, contiguous, dim):
    x = make((2, 3, 4, 5), dtype, contiguous, scale=2.0)
    s = lf.softmax(x, dim)
    assert torch.equal(s, torch.softmax(x.detach(), dim))
    R = torch.randn_like(s)
    s.backward(R)
    assert_relevance_close(x.grad, ref.softmax(d64(x), d64(R), dim), dtype)


@params
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_softmax_temperature_and_mask(dtype, temperature):
    x0 = torch.randn(2, 4, 6, dtype=torch.float64) * 2
    x0.masked_fill_(torch.rand(2, 4, 6) < 0.3, float("-inf"))
    x0[..., 0] = 0.5  # every row keeps one finite entry
    x = x0.to(dtype).requires_grad_()
    s = lf.softmax(x, -1, temperature)
    assert torch.equal(s, torch.softmax(x.detach() / temperature if temperature != 1.0 else x.detach(), -1))
    R = torch.randn_like(s)
    s.backward(R)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[x0 == float("-inf")] == 0).all()  # masked logits carry no relevance
    assert_relevance_close(x.grad, ref.softmax(d64(x), d64(R), -1, temperature), dtype)


@params
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_softmax_finite_mask(dtype, temperature):
    """A finite mask value (the dtype's lowest, as many models add) acts as -inf: its softmax weight is
    0, so its relevance is 0, also where x / T overflows and where R is not 0."""
    x0 = torch.randn(2, 4, 6, dtype=torch.float64) * 2
    mask = torch.rand(2, 4, 6) < 0.3
    mask[..., 0] = False  # every row keeps one unmasked entry
    x = x0.to(dtype).masked_fill(mask, torch.finfo(dtype).min).requires_grad_()
    s = lf.softmax(x, -1, temperature)
    assert (s.detach()[mask] == 0).all()
    R = torch.randn_like(s)
    s.backward(R)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[mask] == 0).all()
    # the op's own output: a weight that rounds to 0 in float16 masks its logit too
    assert_relevance_close(x.grad, ref.softmax(d64(x), d64(R), -1, temperature, s=d64(s)), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_dtype_argument(dtype):
    x = make((3, 7), dtype)
    s = lf.softmax(x, -1, dtype=torch.float32)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.softmax(x.detach(), -1, dtype=torch.float32))
    R = torch.randn_like(s)
    s.backward(R)
    assert x.grad.dtype == dtype
    assert_relevance_close(x.grad, ref.softmax(d64(x), d64(R), -1), dtype)


@params
@layouts
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_epsilon(dtype, contiguous, affine):
    x = make((2, 3, 16), dtype, contiguous, scale=2.0, offset=0.5)
    w = torch.randn(16, dtype=torch.float64).to(dtype) if affine != "none" else None
    b = torch.randn(16, dtype=torch.float64).to(dtype) if affine == "both" else None
    y = lf.layer_norm(x, [16], w, b, 1e-5)
    assert torch.equal(y, F.layer_norm(x.detach(), [16], w, b, 1e-5))
    R = seed(y, random=True)
    y.backward(R)
    expected = ref.layer_norm(
        d64(x), [16], None if w is None else d64(w), None if b is None else d64(b), 1e-5, d64(R), 1e-6
    )
    assert_relevance_close(x.grad, expected, dtype)


def test_layer_norm_epsilon_two_normalized_dims():
    x = make((2, 3, 4, 5), torch.float64)
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = lf.layer_norm(x, [4, 5], w, b)
    R = torch.randn_like(y)
    y.backward(R)
    assert_relevance_close(x.grad, ref.layer_norm(d64(x), [4, 5], w, b, 1e-5, R, 1e-6), torch.float64)


@params
@layouts
@pytest.mark.parametrize("dim,keepdim", [(None, False), ([-1], False), ([1], True), ([0, 2], False)])
def test_mean(dtype, contiguous, dim, keepdim):
    x = make((3, 4, 6), dtype, contiguous, offset=0.3)
    y = lf.mean(x, dim, keepdim)
    assert torch.equal(y, torch.mean(x.detach(), dim, keepdim) if dim is not None else torch.mean(x.detach()))
    R = torch.randn_like(y)
    y.backward(R)
    assert_relevance_close(x.grad, ref.mean(d64(x), dim, keepdim, d64(R), 1e-6), dtype)


IDENTITY_OPS = [
    (lf.silu, F.silu),
    (lf.gelu, F.gelu),
    (lambda x: lf.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh")),
    (lf.tanh, torch.tanh),
    (lf.relu, F.relu),
    (lf.sigmoid, torch.sigmoid),
    (lambda x: lf.layer_norm_identity(x, [8]), lambda x: F.layer_norm(x, [8])),
    (lambda x: lf.normalize_identity(x, 2.0, -1), lambda x: F.normalize(x, 2.0, -1)),
]


@params
@layouts
@pytest.mark.parametrize(
    "ops",
    IDENTITY_OPS,
    ids=["silu", "gelu", "gelu-tanh", "tanh", "relu", "sigmoid", "layer_norm_identity", "normalize_identity"],
)
def test_identity_rule(dtype, contiguous, ops):
    ours, theirs = ops
    x = make((3, 8), dtype, contiguous)
    y = ours(x)
    assert torch.equal(y, theirs(x.detach()))  # torch's own kernel, bitwise
    R = torch.randn_like(y)
    y.backward(R)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, R)


@params
@layouts
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_identity(dtype, contiguous, weight):
    x = make((2, 3, 8), dtype, contiguous)
    w = torch.randn(8, dtype=torch.float64).to(dtype) if weight else None
    y = lf.rms_norm_identity(x, [8], w, 1e-6)
    assert torch.equal(y, ref.rms_norm_hf(x.detach(), w, 1e-6))  # the LLaMA-style formula, bitwise
    torch.testing.assert_close(y, F.rms_norm(x.detach(), [8], w, 1e-6))  # torch's within dtype tolerance
    R = torch.randn_like(y)
    y.backward(R)
    assert torch.equal(x.grad, R)


def test_rms_norm_identity_mixed_dtype_weight():
    x = make((2, 8), torch.bfloat16)
    w = torch.randn(8)  # fp32 weight, bf16 activations: the output is promoted
    y = lf.rms_norm_identity(x, [8], w)
    assert y.dtype == torch.float32
    y.backward(y)
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, y.detach().to(torch.bfloat16))


def test_rms_norm_default_eps_is_machine_eps():
    x = make((4, 8), torch.float32)
    torch.testing.assert_close(lf.rms_norm_identity(x, [8]), F.rms_norm(x.detach(), [8]))


@params
def test_stop_relevance(dtype):
    x = make((3, 4), dtype)
    y = lf.stop_relevance(x)
    assert torch.equal(y, x.detach()) and y.data_ptr() != x.data_ptr()
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@params
def test_stab_div(dtype):
    r = torch.randn(50, dtype=torch.float64).to(dtype)
    z = torch.randn(50, dtype=torch.float64).to(dtype)
    z[:5] = 0
    out = lf.stab_div(r, z, 1e-3, 2.0)
    assert out.dtype == dtype
    assert_relevance_close(out, d64(r) / ref.stab(2 * d64(z), 1e-3), dtype)
    assert lf.stab_div(r, z, 1e-3, dtype=torch.float32).dtype == torch.float32


def test_stabiliser_is_sign_aware():
    # z just below zero: LXT's z + eps would divide by ~0; stab(z) = z - eps keeps |stab(z)| >= eps
    z = torch.tensor([-1e-6, 0.0, 1e-6], dtype=torch.float64)
    out = lf.stab_div(torch.ones_like(z), z, 1e-6)
    torch.testing.assert_close(out, torch.tensor([-1 / 2e-6, 1 / 1e-6, 1 / 2e-6], dtype=torch.float64))
