"""ExplicitRules: unmodified torch code under the explicit rules (RULES.md sections 1 and 4).

Each mapped function is checked against the same computation written with lrpcpp.functional ops,
or against the float64 formula in reference.py; forward values against plain torch.
"""

import math
import threading
import warnings

import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import TOL, assert_relevance_close, fails_in_torch_before_2_13, needs_redispatch
from lrpcpp.models.explicit import RULES, ExplicitRules, UnruledOperationWarning, identity_rule, run_plain
from torch import nn

f64 = torch.float64
EPS = 1e-12  # the stabiliser where a test compares with a formula that has none


def leaf(*shape, dtype=f64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def explain(fn, *inputs, epsilon=EPS, seed=None):
    """Run fn under ExplicitRules, seed the backward with `seed` (default: the output); return
    (output, relevance of each input)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with ExplicitRules(epsilon=epsilon):
        y = fn(*inputs)
    y.backward(y.detach() if seed is None else seed)
    return y.detach(), [t.grad for t in inputs]


def direct(fn, *inputs, seed=None):
    """The same with lrpcpp.functional ops written out in fn (no mode)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    y.backward(y.detach() if seed is None else seed)
    return y.detach(), [t.grad for t in inputs]


def is_lrpcpp(t):
    """Whether t was made by an lrpcpp op (its backward is an lrpcpp relevance rule)."""
    return t.grad_fn is not None and "lrpcpp" in t.grad_fn.name()


# ----------------------------------------------------------------------------- the table
def test_the_table_maps_every_listed_spelling():
    spellings = [
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.bmm,
        F.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        torch.add,
        torch.sub,
        torch.Tensor.__add__,
        torch.Tensor.__radd__,
        torch.Tensor.__sub__,
        torch.Tensor.__rsub__,
        torch.Tensor.__iadd__,
        torch.Tensor.add,
        torch.mul,
        torch.Tensor.__mul__,
        torch.div,
        torch.Tensor.__truediv__,
        torch.neg,
        F.linear,
        torch.addmm,
        F.layer_norm,
        F.silu,
        F.gelu,
        torch.tanh,
        torch.Tensor.tanh,
        F.relu,
        torch.sigmoid,
        torch.sum,
        torch.Tensor.sum,
        torch.mean,
        torch.Tensor.mean,
        F.scaled_dot_product_attention,
        torch.Tensor.index_add,
        torch.Tensor.index_add_,
        torch.index_add,
        torch.Tensor.scatter_add,
        torch.Tensor.scatter_add_,
    ]
    missing = [getattr(f, "__qualname__", repr(f)) for f in spellings if f not in RULES]
    assert not missing
    with pytest.raises(TypeError):
        RULES[torch.exp] = None  # read-only


# ----------------------------------------------------------------------------- matrix products
MATMULS = {
    "torch.matmul": lambda a, b: torch.matmul(a, b),
    "Tensor.matmul": lambda a, b: a.matmul(b),
    "@": lambda a, b: a @ b,
    "__rmatmul__": lambda a, b: b.__rmatmul__(a),
    "torch.bmm": lambda a, b: torch.bmm(a, b),
}


@pytest.mark.parametrize("spelling", sorted(MATMULS))
@pytest.mark.parametrize("relevant", ["both", "a", "b"])
def test_matmul_spellings(spelling, relevant):
    a, b = torch.randn(2, 3, 4, dtype=f64), torch.randn(2, 4, 5, dtype=f64)
    fn = MATMULS[spelling]
    ra_on, rb_on = relevant in ("both", "a"), relevant in ("both", "b")

    def run(a_, b_):
        return fn(a_ if ra_on else a_.detach(), b_ if rb_on else b_.detach())

    y, (ra, rb) = explain(run, a, b)
    assert torch.equal(y, a @ b)
    ea, eb = ref.matmul(a, b, y, EPS, a_relevant=ra_on, b_relevant=rb_on)
    for got, want in ((ra, ea), (rb, eb)):
        if want is None:
            assert got is None
        else:
            assert_relevance_close(got, want, f64)


def test_matmul_vectors_and_mm():
    a, b, v = torch.randn(3, 4, dtype=f64), torch.randn(4, 5, dtype=f64), torch.randn(4, dtype=f64)
    y, (ra, rb) = explain(lambda a_, b_: torch.mm(a_, b_), a, b)
    assert_relevance_close(ra, ref.matmul(a, b, y, EPS)[0], f64)
    y, (ra, rv) = explain(lambda a_, v_: a_ @ v_, a, v)
    torch.testing.assert_close(y, a @ v)
    ea, ev = ref.matmul(a, v.unsqueeze(-1), y.unsqueeze(-1), EPS)
    assert_relevance_close(ra, ea, f64)
    assert_relevance_close(rv, ev.squeeze(-1), f64)


def test_einsum_is_the_matmul_rule():
    a, b = torch.randn(2, 3, 4, dtype=f64), torch.randn(2, 4, 5, dtype=f64)
    y, (ra, rb) = explain(lambda a_, b_: torch.einsum("bij,bjk->bik", a_, b_), a, b)
    torch.testing.assert_close(y, a @ b)
    ea, eb = ref.matmul(a, b, y, EPS)
    assert_relevance_close(ra, ea, f64)
    assert_relevance_close(rb, eb, f64)
    # one constant operand: the other takes everything
    y, (ra,) = explain(lambda a_: torch.einsum("bij,bjk->bik", a_, b), a)
    assert_relevance_close(ra, ref.matmul(a, b, y, EPS, b_relevant=False)[0], f64)


def test_a_parameter_operand_is_a_constant():
    # parameters get no relevance: x @ W with W a Parameter gives all of it to x
    x, w = torch.randn(3, 4, dtype=f64), nn.Parameter(torch.randn(4, 5, dtype=f64))
    y, (rx,) = explain(lambda x_: x_ @ w, x)
    assert_relevance_close(rx, ref.matmul(x, w.detach(), y, EPS, b_relevant=False)[0], f64)
    assert w.grad is None
    # x * gamma (LayerScale): the identity rule, not the uniform split of two carriers
    g = nn.Parameter(torch.randn(4, dtype=f64))
    y, (rx,) = explain(lambda x_: x_ * g, x)
    assert torch.equal(rx, y)


def test_tensors_computed_from_parameters_are_constants():
    x = torch.randn(3, 4, dtype=f64)
    w = nn.Parameter(torch.randn(5, 4, dtype=f64))
    g = nn.Parameter(torch.randn(4, dtype=f64))
    # a tied head written as x @ W.T; Gemma's (1 + weight) scaling; a projection of a detached input
    y, (rx,) = explain(lambda x_: x_ @ w.T, x)
    assert_relevance_close(rx, ref.linear_epsilon(x, w.detach(), None, y, EPS), f64)
    y, (rx,) = explain(lambda x_: x_ * (1.0 + g), x)
    assert torch.equal(rx, y)
    y, (rx,) = explain(lambda x_: F.linear(x_.detach(), w) @ F.linear(x_, w).T, x)
    r_right = ref.matmul(F.linear(x, w.detach()), F.linear(x, w.detach()).T, y, EPS, a_relevant=False)[1]
    assert_relevance_close(rx, ref.linear_epsilon(x, w.detach(), None, r_right.T, EPS), f64)
    assert w.grad is None and g.grad is None


def test_writing_relevance_into_a_parameter_derived_tensor_makes_it_carry():
    x = torch.randn(2, 4, dtype=f64)
    w = nn.Parameter(torch.randn(2, 4, dtype=f64))

    def fn(x_):
        buf = w * 1.0  # computed from a parameter: a constant
        buf.add_(x_)  # now it holds x's relevance too
        return buf * 2.0

    y, (rx,) = explain(fn, x)
    z = w.detach() + x
    assert_relevance_close(rx, 2 * x * z / ref.stab(z, EPS), f64)


def test_a_leaf_made_inside_the_block_carries_relevance():
    w = nn.Parameter(torch.randn(2, 3, dtype=f64))
    with ExplicitRules(epsilon=EPS):
        x = torch.randn(4, 3, dtype=f64).requires_grad_()
        y = F.linear(x, w).sum()
    y.backward(y.detach())
    torch.testing.assert_close(x.grad.sum(), y.detach())


# ----------------------------------------------------------------------------- addition
ADDS = {
    # name: (function of (a, b), the two summands as a function of (a, b))
    "a + b": (lambda a, b: a + b, lambda a, b: (a, b)),
    "torch.add": (lambda a, b: torch.add(a, b), lambda a, b: (a, b)),
    "torch.add alpha": (lambda a, b: torch.add(a, b, alpha=2.5), lambda a, b: (a, 2.5 * b)),
    "Tensor.add": (lambda a, b: a.add(b), lambda a, b: (a, b)),
    "b + a (radd)": (lambda a, b: b.__radd__(a), lambda a, b: (a, b)),
    "a - b": (lambda a, b: a - b, lambda a, b: (a, -b)),
    "torch.sub alpha": (lambda a, b: torch.sub(a, b, alpha=3.0), lambda a, b: (a, -3.0 * b)),
    "rsub": (lambda a, b: b.__rsub__(a), lambda a, b: (a, -b)),
    "torch.rsub": (lambda a, b: torch.rsub(b, a), lambda a, b: (a, -b)),
}


@pytest.mark.parametrize("name", sorted(ADDS))
@pytest.mark.parametrize("b_relevant", [True, False])
def test_add_and_sub_spellings(name, b_relevant):
    fn, parts = ADDS[name]
    a, b = torch.randn(3, 4, dtype=f64), torch.randn(4, dtype=f64)  # b broadcasts
    if b_relevant:
        y, (ra, rb) = explain(fn, a, b)
    else:
        y, (ra,) = explain(lambda a_: fn(a_, b), a)
    torch.testing.assert_close(y, fn(a, b), rtol=0, atol=1e-14)
    s1, s2 = parts(a, b)
    e1, e2 = ref.add2(s1, s2, y, EPS)
    assert_relevance_close(ra, e1, f64)
    if b_relevant:
        # b's relevance is the share of its summand (-b for a subtraction)
        assert_relevance_close(rb, e2, f64)


NUMBER_ADDS = {
    # name: (function, the summand that a contributes)
    "a + 2.5": (lambda a: a + 2.5, lambda a: a),
    "2.5 + a": (lambda a: 2.5 + a, lambda a: a),
    "a - 0.5": (lambda a: a - 0.5, lambda a: a),
    "1 - a": (lambda a: 1 - a, lambda a: -a),
    "torch.add(a, 2, alpha=3)": (lambda a: torch.add(a, 2.0, alpha=3), lambda a: a),
}


@pytest.mark.parametrize("name", sorted(NUMBER_ADDS))
def test_add_of_a_number_is_a_bias(name):
    fn, summand = NUMBER_ADDS[name]
    a = torch.randn(3, 4, dtype=f64)
    y, (ra,) = explain(fn, a)
    assert torch.equal(y, fn(a))
    # the number absorbs its share: R_a = s * R / stab(y) with s = ±a, R = y
    assert_relevance_close(ra, summand(a) * y / ref.stab(y, EPS), f64)


def test_add_of_a_mask_tensor_is_a_bias():
    scores = torch.randn(2, 4, 4, dtype=f64)
    mask = torch.zeros(4, 4, dtype=torch.float32).masked_fill(torch.ones(4, 4).triu(1).bool(), -1e4)
    y, (rs,) = explain(lambda s: s + mask.to(f64), scores)
    assert_relevance_close(rs, ref.add2(scores, mask.to(f64), y, EPS)[0], f64)
    # mixed dtypes are promoted as torch promotes them
    s32 = scores.float()
    y, (rs,) = explain(lambda s: s + mask.double(), s32)
    assert y.dtype == f64 and rs.dtype == torch.float32


def test_inplace_add_keeps_inplace_semantics():
    a, b = torch.randn(3, 4, dtype=f64), torch.randn(3, 4, dtype=f64)

    def fn(a_, b_):
        acc = torch.zeros(3, 4, dtype=f64)
        view = acc[1:]
        acc += a_
        acc.add_(b_)
        assert view.requires_grad  # the view sees the in-place update
        return acc * 1.0

    y, (ra, rb) = explain(fn, a, b)
    assert torch.equal(y, a + b)
    # chained epsilon over 0 + a + b: each summand its share of the total
    assert_relevance_close(ra, a * y / ref.stab(y, EPS), f64)
    assert_relevance_close(rb, b * y / ref.stab(y, EPS), f64)


# ----------------------------------------------------------------------------- products with constants
CONSTANT_PRODUCTS = {
    "x * c": lambda x, c: x * c,
    "c * x": lambda x, c: c * x,
    "torch.mul": lambda x, c: torch.mul(x, c),
    "x * 0.125": lambda x, c: x * 0.125,
    "x / c": lambda x, c: x / c,
    "x / 3": lambda x, c: x / 3.0,
    "torch.div": lambda x, c: torch.div(x, c),
    "x.div(c)": lambda x, c: x.div(c),
    "-x": lambda x, c: -x,
    "neg": lambda x, c: torch.neg(x),
    "x.mul_(c)": lambda x, c: (x * 1.0).mul_(c),
    "x.div_(c)": lambda x, c: (x * 1.0).div_(c),
}


@pytest.mark.parametrize("name", sorted(CONSTANT_PRODUCTS))
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
def test_products_with_constants_pass_relevance_unchanged(name, dtype):
    fn = CONSTANT_PRODUCTS[name]
    x = torch.randn(3, 4, dtype=dtype)
    c = (torch.rand(4) + 0.5).to(dtype)  # broadcast over x's rows
    y, (rx,) = explain(lambda x_: fn(x_, c), x)
    assert torch.equal(y, fn(x, c))  # bitwise torch's own value
    assert torch.equal(rx, y)  # R passes unchanged


def test_a_constant_broadcast_up_sums_relevance_back():
    x, c = torch.randn(4, dtype=f64), torch.randn(3, 4, dtype=f64)
    y, (rx,) = explain(lambda x_: x_ * c, x)
    assert torch.equal(y, x * c)
    torch.testing.assert_close(rx, y.sum(0))


def test_product_of_two_carriers_is_uniform():
    a, b = torch.randn(3, 4, dtype=f64), torch.randn(4, dtype=f64)
    R = torch.randn(3, 4, dtype=f64)
    y, (ra, rb) = explain(lambda a_, b_: a_ * b_, a, b, seed=R)
    assert torch.equal(y, a * b)
    ea, eb = ref.mul2(a, b, R)
    assert_relevance_close(ra, ea, f64)
    assert_relevance_close(rb, eb, f64)


def test_division_by_a_carrier_holds_the_denominator_constant():
    a, b = torch.randn(3, 4, dtype=f64), torch.rand(3, 4, dtype=f64) + 1
    y, (ra, rb) = explain(lambda a_, b_: a_ / b_, a, b)
    assert torch.equal(y, a / b)
    assert torch.equal(ra, y)
    assert rb is None


def test_rope_is_the_epsilon_rule_over_its_linear_map():
    t, d = 5, 8
    q = torch.randn(2, t, d, dtype=f64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=f64) / d))
    freqs = torch.outer(torch.arange(t, dtype=f64), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()

    def rotate_half(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def rope(x):
        return x * cos + rotate_half(x) * sin

    R = torch.randn(2, t, d, dtype=f64)
    y, (rq,) = explain(rope, q, seed=R)
    assert torch.equal(y, rope(q))
    _, (want,) = direct(lambda q_: lf.epsilon(rope, q_, epsilon=EPS), q, seed=R)
    assert_relevance_close(rq, want, f64)


# ----------------------------------------------------------------------------- softmax, norms, activations
SOFTMAXES = {
    "F.softmax": lambda x: F.softmax(x, dim=-1),
    "torch.softmax": lambda x: torch.softmax(x, 1),
    "Tensor.softmax": lambda x: x.softmax(-1),
    "nn.Softmax": lambda x: nn.Softmax(dim=1)(x),
    "F.softmax dtype": lambda x: F.softmax(x.float(), dim=-1, dtype=f64),
}


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
def test_softmax_spellings(name):
    fn = SOFTMAXES[name]
    x = torch.randn(2, 5, 5, dtype=f64)
    R = torch.randn(2, 5, 5, dtype=f64)
    y, (rx,) = explain(fn, x, seed=R)
    assert torch.equal(y, fn(x))
    dim = 1 if name in ("torch.softmax", "nn.Softmax") else -1
    want = ref.softmax(x.float().double() if "dtype" in name else x, R, dim)
    assert_relevance_close(rx, want, torch.float32 if "dtype" in name else f64)


def test_layer_norm_and_rms_norm():
    x, w, b = torch.randn(2, 3, 6, dtype=f64), torch.randn(6, dtype=f64), torch.randn(6, dtype=f64)
    R = torch.randn(2, 3, 6, dtype=f64)
    y, (rx,) = explain(lambda x_: F.layer_norm(x_, (6,), w, b, 1e-5), x, seed=R, epsilon=1e-9)
    assert torch.equal(y, F.layer_norm(x, (6,), w, b, 1e-5))
    assert_relevance_close(rx, ref.layer_norm(x, (6,), w, b, 1e-5, R, 1e-9), f64)
    ln = nn.LayerNorm(6, dtype=f64)
    y, (rx,) = explain(ln, x, seed=R, epsilon=1e-9)
    want = ref.layer_norm(x, (6,), ln.weight.detach(), ln.bias.detach(), 1e-5, R, 1e-9)
    assert_relevance_close(rx, want, f64)
    y, (rx,) = explain(lambda x_: F.rms_norm(x_, (6,), w, 1e-6), x, seed=R)
    torch.testing.assert_close(y, F.rms_norm(x, (6,), w, 1e-6))
    assert torch.equal(rx, R)
    y, (rx,) = explain(lambda x_: F.normalize(x_, dim=-1), x, seed=R)
    assert torch.equal(y, F.normalize(x, dim=-1))
    assert torch.equal(rx, R)


ACTIVATIONS = {
    "F.silu": F.silu,
    "F.gelu": F.gelu,
    "F.gelu tanh": lambda x: F.gelu(x, approximate="tanh"),
    "torch.tanh": torch.tanh,
    "Tensor.tanh": lambda x: x.tanh(),
    "F.tanh": F.tanh,
    "F.relu": F.relu,
    "torch.relu": torch.relu,
    "F.relu inplace": lambda x: F.relu(x * 1.0, inplace=True),
    "torch.sigmoid": torch.sigmoid,
    "F.sigmoid": F.sigmoid,
    "nn.GELU": nn.GELU(),
    "nn.SiLU": nn.SiLU(),
    "F.leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "F.elu inplace": lambda x: F.elu(x * 1.0, 1.0, True),
    "F.softplus": F.softplus,
    "F.mish": F.mish,
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_take_the_identity_rule(name):
    fn = ACTIVATIONS[name]
    x = torch.randn(3, 7, dtype=f64)
    R = torch.randn(3, 7, dtype=f64)
    y, (rx,) = explain(fn, x, seed=R)
    assert torch.equal(y, fn(x.clone()))
    assert torch.equal(rx, R)


# ----------------------------------------------------------------------------- reductions
REDUCTIONS = {
    "torch.sum dim": (lambda x: torch.sum(x, dim=1), [1], False),
    "Tensor.sum": (lambda x: x.sum(), None, False),
    "Tensor.sum keepdim": (lambda x: x.sum((0, 2), keepdim=True), [0, 2], True),
    "torch.mean": (lambda x: torch.mean(x, -1), [-1], False),
    "Tensor.mean keepdim": (lambda x: x.mean(1, keepdim=True), [1], True),
    "Tensor.mean all": (lambda x: x.mean(), None, False),
    "Tensor.mean dtype": (lambda x: x.mean(1, dtype=f64), [1], False),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_sums_and_means_take_the_epsilon_rule(name):
    fn, dims, keepdim = REDUCTIONS[name]
    x = torch.randn(2, 3, 4, dtype=f64)
    y, (rx,) = explain(fn, x)
    assert torch.equal(y, fn(x))
    # R_x = x * R / stab(sum x): with the seed R = y the input relevance sums to y
    assert_relevance_close(rx, ref.mean(x, dims, keepdim, y, EPS), f64)
    torch.testing.assert_close(rx.sum(), y.sum())


def test_backward_inside_the_block():
    x = torch.randn(3, 4, dtype=f64).requires_grad_()
    with ExplicitRules(epsilon=EPS):
        y = x.sum(-1)
        y.backward(y)  # the generic rule recomputes its function here, with the rules suspended
    assert_relevance_close(x.grad, ref.mean(x.detach(), [-1], False, y.detach(), EPS), f64)


# ----------------------------------------------------------------------------- affine maps
def test_linear_and_module():
    x, w, b = torch.randn(2, 3, 4, dtype=f64), torch.randn(5, 4, dtype=f64), torch.randn(5, dtype=f64)
    y, (rx,) = explain(lambda x_: F.linear(x_, w, b), x, epsilon=1e-6)
    assert torch.equal(y, F.linear(x, w, b))
    _, (want,) = direct(lambda x_: lf.linear_epsilon(x_, w, b, 1e-6), x)
    assert torch.equal(rx, want)
    lin = nn.Linear(4, 5, dtype=f64)
    y, (rx,) = explain(lin, x, epsilon=1e-6)
    assert_relevance_close(rx, ref.linear_epsilon(x, lin.weight.detach(), lin.bias.detach(), y, 1e-6), f64)
    assert lin.weight.grad is None


def test_addmm_gpt2_conv1d():
    # Hugging Face GPT-2's Conv1D: addmm(bias, x.view(-1, nx), weight) with weight [nx, nf]
    x = torch.randn(2, 3, 4, dtype=f64)
    w, b = nn.Parameter(torch.randn(4, 5, dtype=f64)), nn.Parameter(torch.randn(5, dtype=f64))

    def conv1d(x_):
        return torch.addmm(b, x_.view(-1, 4), w).view(2, 3, 5)

    y, (rx,) = explain(conv1d, x, epsilon=1e-6)
    assert torch.equal(y, conv1d(x))
    assert_relevance_close(rx, ref.linear_epsilon(x, w.detach().T, b.detach(), y, 1e-6), f64)


def test_conv1d_and_batch_norm():
    x, w = torch.randn(2, 3, 7, dtype=f64), torch.randn(4, 3, 3, dtype=f64)
    y, (rx,) = explain(lambda x_: F.conv1d(x_, w, padding="same"), x, epsilon=1e-6)
    assert torch.equal(y, F.conv1d(x, w, padding="same"))
    _, (want,) = direct(lambda x_: lf.epsilon(lambda t: F.conv1d(t, w, padding="same"), x_, epsilon=1e-6), x)
    assert torch.equal(rx, want)
    bn = nn.BatchNorm1d(3, dtype=f64).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    y, (rx,) = explain(bn, x, epsilon=1e-6)
    assert torch.equal(y, bn(x))
    # eval-mode batch norm is an affine map per channel: the epsilon rule, its shift a bias
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[:, None]
    assert_relevance_close(rx, x * scale * y / ref.stab(y, 1e-6), f64)


def test_conv2d_and_pooling():
    x, w, b = torch.randn(1, 2, 6, 6, dtype=f64), torch.randn(3, 2, 3, 3, dtype=f64), torch.randn(3, dtype=f64)
    y, (rx,) = explain(lambda x_: F.conv2d(x_, w, b, padding=1), x, epsilon=1e-6)
    assert torch.equal(y, F.conv2d(x, w, b, padding=1))
    assert_relevance_close(rx, ref.conv2d_epsilon(x, w, b, y, 1, 1, 1, 1e-6), f64)
    y, (rx,) = explain(lambda x_: F.adaptive_avg_pool2d(x_, 1), x)
    assert_relevance_close(rx, ref.mean(x, [2, 3], True, y, EPS), f64)


# ----------------------------------------------------------------------------- attention
def eager_attention(q, k, v, mask=None, bool_mask=None, scale=None):
    """Attention as Hugging Face's eager implementations write it."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    if bool_mask is not None:
        scores = scores.masked_fill(bool_mask.logical_not(), float("-inf"))
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) if q.dtype != f64 else F.softmax(scores, -1)
    return torch.matmul(p, v)


def direct_attention(q, k, v, mask=None, bool_mask=None, scale=None):
    """The same with lrpcpp ops written out."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = lf.identity(lambda s: s * scale, lf.matmul(q, k.transpose(-1, -2), EPS))
    if mask is not None:
        scores = lf.add2(scores, mask, EPS)
    if bool_mask is not None:
        scores = scores.masked_fill(bool_mask.logical_not(), float("-inf"))
    return lf.matmul(lf.softmax(scores, -1), v, EPS)


def qkv(b=2, h=2, t=5, d=4, hk=None):
    hk = h if hk is None else hk
    return (
        torch.randn(b, h, t, d, dtype=f64),
        torch.randn(b, hk, t, d, dtype=f64),
        torch.randn(b, hk, t, d, dtype=f64),
    )


def position_bias(t=5):
    """A learned-bias style float mask (T5, ALiBi): every entry a real summand."""
    return torch.linspace(-2.0, 1.5, t * t, dtype=f64).reshape(t, t)


def additive_mask(t=5):
    return torch.zeros(t, t, dtype=f64).masked_fill(torch.ones(t, t).triu(1).bool(), torch.finfo(f64).min)


@pytest.mark.parametrize("masking", ["none", "float", "bias", "bool"])
def test_eager_attention_matches_the_direct_ops(masking):
    q, k, v = qkv()
    kwargs = {
        "none": {},
        "float": {"mask": additive_mask()},
        "bias": {"mask": position_bias()},
        "bool": {"bool_mask": torch.ones(5, 5, dtype=torch.bool).tril()},
    }[masking]
    R = torch.randn(2, 2, 5, 4, dtype=f64)
    y, rel = explain(lambda *t: eager_attention(*t, **kwargs), q, k, v, seed=R)
    torch.testing.assert_close(y, eager_attention(q, k, v, **kwargs))
    _, want = direct(lambda *t: direct_attention(*t, **kwargs), q, k, v, seed=R)
    for got, exp in zip(rel, want):
        assert torch.isfinite(got).all()
        assert_relevance_close(got, exp, f64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_block_in_lower_precision(dtype):
    # an attention block with a residual, against the float64 ops written out
    q, k, v = qkv()
    x = torch.randn(2, 2, 5, 4, dtype=f64)
    mask = additive_mask()

    def block(x_, q_, k_, v_):
        return x_ + eager_attention(q_, k_, v_, mask=mask.to(q_.dtype))

    def block_direct(x_, q_, k_, v_):
        return lf.add2(x_, direct_attention(q_, k_, v_, mask=mask), EPS)

    low = [t.to(dtype) for t in (x, q, k, v)]
    y, rel = explain(block, *low, epsilon=1e-6)  # seeded with the output itself
    y64, want = direct(block_direct, x, q, k, v)
    torch.testing.assert_close(y.double(), y64, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    for got, exp in zip(rel, want):
        assert got.dtype == dtype
        assert_relevance_close(got, exp, dtype, scale=float(y64.abs().max()))


SDPA_CASES = {
    "plain": ({}, {}),
    "causal": ({"is_causal": True}, {"bool_mask": torch.ones(5, 5, dtype=torch.bool).tril()}),
    "float mask": ({"attn_mask": additive_mask()}, {"mask": additive_mask()}),
    "float bias": ({"attn_mask": position_bias()}, {"mask": position_bias()}),
    "bool mask": (None, None),
    "scale": ({"scale": 0.3}, {"scale": 0.3}),
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_decomposition(case):
    sdpa_kwargs, eager_kwargs = SDPA_CASES[case]
    if eager_kwargs is None:
        mask = torch.rand(5, 5) > 0.3
        mask[:, 0] = True  # no fully masked row
        sdpa_kwargs, eager_kwargs = {"attn_mask": mask}, {"bool_mask": mask}
    q, k, v = qkv()
    R = torch.randn(2, 2, 5, 4, dtype=f64)
    y, rel = explain(lambda *t: F.scaled_dot_product_attention(*t, **sdpa_kwargs), q, k, v, seed=R)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs))
    # relevance: the eager formulation under the same rules
    _, want = explain(lambda *t: eager_attention(*t, **eager_kwargs), q, k, v, seed=R)
    for got, exp in zip(rel, want):
        assert_relevance_close(got, exp, f64)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_are_zero_and_finite(kind):
    q, k, v = qkv()
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    keep[2] = False  # a query with no position to attend to (a padded row)
    mask = keep if kind == "bool" else torch.zeros(5, 5, dtype=f64).masked_fill(~keep, float("-inf"))
    y, rel = explain(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(y, want)
    assert torch.equal(y[..., 2, :], torch.zeros_like(y[..., 2, :]))
    for r in rel:
        assert torch.isfinite(r).all()
    assert torch.equal(rel[0][..., 2, :], torch.zeros_like(rel[0][..., 2, :]))


def test_sdpa_float32_forward():
    q, k, v = (t.float() for t in qkv())
    mask = additive_mask().float()
    with ExplicitRules():
        y = F.scaled_dot_product_attention(q.requires_grad_(), k, v, attn_mask=mask)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-6)


def test_sdpa_gqa():
    q, k, v = qkv(h=4, hk=2)
    R = torch.randn(2, 4, 5, 4, dtype=f64)

    def gqa(*t):
        return F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)

    y, rel = explain(gqa, q, k, v, seed=R)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

    def repeated(q_, k_, v_):  # Hugging Face's repeat_kv, then eager attention
        k_, v_ = k_.repeat_interleave(2, dim=1), v_.repeat_interleave(2, dim=1)
        return eager_attention(q_, k_, v_, bool_mask=torch.ones(5, 5, dtype=torch.bool).tril())

    _, want = explain(repeated, q, k, v, seed=R)
    for got, exp in zip(rel, want):
        assert got.shape == exp.shape
        assert_relevance_close(got, exp, f64)


# torch before 2.13 ends the process with SIGFPE, a division by zero in its own
# F.scaled_dot_product_attention, for zero key heads with enable_gqa
_NO_KEY_HEADS = pytest.param(
    0, marks=fails_in_torch_before_2_13("torch's own SDPA crashes (SIGFPE) for zero key heads")
)


@pytest.mark.parametrize("hk", [_NO_KEY_HEADS, 3])
def test_sdpa_heads_that_do_not_group_are_torchs_case(hk):
    """Key heads that do not divide the query heads (none at all included): torch's own answer, its
    error or its output, never a division by zero in the rules."""
    q, k, v = qkv(h=4, hk=hk)
    try:
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match="heads"), ExplicitRules():
            F.scaled_dot_product_attention(q.requires_grad_(), k, v, enable_gqa=True)
        assert "heads" in str(e)
        return
    # torch's output, with its plain gradient: the rules say so (no relevance rule for these heads)
    with ExplicitRules(), pytest.warns(UnruledOperationWarning, match="scaled_dot_product_attention"):
        got = F.scaled_dot_product_attention(q.requires_grad_(), k, v, enable_gqa=True)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_sdpa_dropout_is_off():
    """As F.dropout in explicit mode: dropout_p is ignored, the eval-mode forward and its relevance."""
    q, k, v = qkv()
    results = []
    for p in (0.0, 0.5):
        q_ = q.clone().requires_grad_()
        with ExplicitRules():
            y = F.scaled_dot_product_attention(q_, k, v, dropout_p=p)
        y.backward(y)
        results.append((y.detach(), q_.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- mixture of experts
@pytest.mark.parametrize("spelling", ["index_add_", "index_add", "scatter_add_"])
def test_moe_sum_of_expert_outputs(spelling):
    tokens, d, experts = 6, 4, 3
    x = torch.randn(tokens, d, dtype=f64)
    weights = [torch.randn(d, d, dtype=f64) for _ in range(experts)]
    routes = [torch.tensor([0, 2, 3]), torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4, 5])]
    gates = torch.rand(tokens, experts, dtype=f64)  # router weights, held constant here

    def moe(x_):
        out = torch.zeros(tokens, d, dtype=f64)
        alias = out.view(-1)
        for e in range(experts):
            idx = routes[e]
            h = F.linear(x_[idx], weights[e]) * gates[idx, e, None]
            if spelling == "index_add_":
                out.index_add_(0, idx, h)
            elif spelling == "index_add":
                out = out.index_add(0, idx, h)
            else:
                out.scatter_add_(0, idx[:, None].expand_as(h), h)
        if spelling != "index_add":  # written in place: a view made before sees the update
            assert alias.requires_grad == x_.requires_grad and torch.equal(alias, out.view(-1))
        return out

    y, (rx,) = explain(moe, x)
    torch.testing.assert_close(y, moe(x))
    # reference: every expert output s_e takes s_e * R / stab(y) of its tokens, then the linear rule
    want = torch.zeros_like(x)
    for e in range(experts):
        idx = routes[e]
        s0 = F.linear(x[idx], weights[e])
        s = s0 * gates[idx, e, None]
        r_s = s * y[idx] / ref.stab(y[idx], EPS)  # passes the gate unchanged (identity rule)
        want[idx] += ref.linear_epsilon(x[idx], weights[e], None, r_s, EPS, y=s0)
    assert_relevance_close(rx, want, f64)
    torch.testing.assert_close(rx.sum(), y.sum())


# ----------------------------------------------------------------------------- what is left alone
def test_calls_without_grad_are_untouched():
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    with ExplicitRules():
        mask = torch.full((3, 3), float("-inf")).triu(1) + a  # no grad anywhere
        y = a @ b
        c = leaf(3, 3, dtype=torch.float32)
        with torch.no_grad():
            z = c @ b
    assert mask.grad_fn is None and y.grad_fn is None and z.grad_fn is None
    assert torch.equal(y, a @ b) and torch.equal(z, c.detach() @ b)


def test_the_mode_is_scoped():
    a, b = leaf(3, 3), torch.randn(3, 3, dtype=f64)
    with ExplicitRules():
        inside = a @ b
    outside = a @ b
    assert is_lrpcpp(inside)
    assert type(outside.grad_fn).__name__ == "MmBackward0"
    # another thread does not see this thread's mode
    seen = {}
    with ExplicitRules():
        th = threading.Thread(target=lambda: seen.update(y=a @ b))
        th.start()
        th.join()
    assert type(seen["y"].grad_fn).__name__ == "MmBackward0"


def test_unknown_functions_keep_their_gradient_with_a_warning():
    x = torch.randn(3, 4, dtype=f64)
    with pytest.warns(UnruledOperationWarning) as record:
        y, (rx,) = explain(lambda x_: torch.cumsum(x_.exp(), -1), x, seed=torch.ones(3, 4, dtype=f64))
    assert {str(w.message).split()[1] for w in record} == {"Tensor.exp", "torch.cumsum"}
    xx = x.clone().requires_grad_()
    torch.cumsum(xx.exp(), -1).backward(torch.ones(3, 4, dtype=f64))
    assert torch.equal(rx, xx.grad)
    # views, reshapes, cat, where: exact, and without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        y, (rx,) = explain(lambda x_: torch.cat([x_.T.reshape(-1), torch.where(x_ > 0, x_, 0.0)[0]]), x)
    want = x.clone()  # the transposed copy returns each value to its element
    want[0] += torch.where(x[0] > 0, x[0], 0.0)  # row 0 of the selection
    torch.testing.assert_close(rx, want)


def test_run_plain_and_suspended():
    a, b = leaf(3, 3), leaf(3, 3)
    with ExplicitRules():
        plain = run_plain(torch.matmul, a, b)
        with ExplicitRules.suspended():
            also_plain = a @ b
        mapped = a @ b
    assert type(plain.grad_fn).__name__ == "MmBackward0"
    assert type(also_plain.grad_fn).__name__ == "MmBackward0"
    assert is_lrpcpp(mapped)


def test_nested_modes_apply_the_rules_once():
    a, b = torch.randn(3, 4, dtype=f64), torch.randn(4, 5, dtype=f64)
    with ExplicitRules(epsilon=EPS):
        y1, (ra1, rb1) = explain(lambda a_, b_: torch.softmax(a_ @ b_, -1) * 2 + a_.sum(), a, b)
    y2, (ra2, rb2) = explain(lambda a_, b_: torch.softmax(a_ @ b_, -1) * 2 + a_.sum(), a, b)
    assert torch.equal(y1, y2) and torch.equal(ra1, ra2) and torch.equal(rb1, rb2)


@needs_redispatch
def test_python_level_functions_are_mapped_inside():
    # nn.MultiheadAttention's functional body (in_proj, SDPA, out_proj) runs under the rules
    mha = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, dtype=f64).eval()
    x = torch.randn(2, 5, 8, dtype=f64)
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    wo = mha.out_proj.weight.detach()

    def by_hand(x_):
        def heads(t):
            return t.view(2, 5, 2, 4).transpose(1, 2)

        q, k, v = heads(F.linear(x_, wq)), heads(F.linear(x_, wk)), heads(F.linear(x_, wv))
        o = eager_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8)
        return F.linear(o, wo)

    for need_weights in (False, True):
        y, (rx,) = explain(lambda x_: mha(x_, x_, x_, need_weights=need_weights)[0], x)  # noqa: B023  (called at once)
        torch.testing.assert_close(y, mha(x, x, x)[0])
        _, (want,) = explain(by_hand, x)
        assert_relevance_close(rx, want, f64)


# ----------------------------------------------------------------------------- identity_rule
def hf_rms_norm(weight, eps=1e-6):
    def forward(h):
        dtype = h.dtype
        h32 = h.to(torch.float32)
        var = h32.pow(2).mean(-1, keepdim=True)
        return weight * (h32 * torch.rsqrt(var + eps)).to(dtype)

    return forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_rule_for_a_norm_written_as_a_formula(dtype):
    w = nn.Parameter(torch.randn(6, dtype=dtype))
    x = torch.randn(2, 3, 6, dtype=dtype).requires_grad_()
    R = torch.randn(2, 3, 6, dtype=dtype)
    with ExplicitRules():
        y = identity_rule(hf_rms_norm(w), x)
    assert torch.equal(y, hf_rms_norm(w)(x.detach()))
    y.backward(R)
    assert torch.equal(x.grad, R)
    assert w.grad is None


def test_identity_rule_picks_the_carrier_of_the_output_shape():
    x, scale = leaf(2, 3), leaf(3)
    y = identity_rule(lambda a, s: a * s, x, scale)
    y.backward(torch.ones(2, 3, dtype=f64))
    assert torch.equal(x.grad, torch.ones(2, 3, dtype=f64)) and scale.grad is None
    with pytest.raises(ValueError, match="exactly one"):
        identity_rule(lambda a, b: a + b, leaf(3), leaf(3))
    with pytest.raises(ValueError, match="shape"):
        identity_rule(lambda a: a.sum(-1), leaf(2, 3))
    with pytest.raises(TypeError, match="one tensor"):
        identity_rule(lambda a: (a, a), leaf(2))
    # without a carrier, or without grad: just the call
    assert identity_rule(torch.exp, torch.zeros(2)).grad_fn is None


def test_epsilon_must_be_non_negative():
    with pytest.raises(ValueError, match="epsilon"):
        ExplicitRules(epsilon=-1.0)
    assert "1e-06" in repr(ExplicitRules())


# ----------------------------------------------------------------------------- conservation
class TinyTransformer(nn.Module):
    """Bias-free: linear layers without bias, LayerNorm without bias, residual adds, softmax
    attention written by hand, a gated MLP, mean pooling and a linear readout."""

    def __init__(self, d=8, heads=2, constant_attention=False):
        super().__init__()
        self.d, self.heads, self.constant_attention = d, heads, constant_attention
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False, dtype=f64) for _ in range(4))
        self.norm = nn.LayerNorm(d, bias=False, dtype=f64)
        self.gate = nn.Linear(d, 2 * d, bias=False, dtype=f64)
        self.up = nn.Linear(d, 2 * d, bias=False, dtype=f64)
        self.down = nn.Linear(2 * d, d, bias=False, dtype=f64)
        self.readout = nn.Linear(d, 1, bias=False, dtype=f64)
        self.retained = {}

    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.d // self.heads).transpose(1, 2)

    def forward(self, x):
        b, n, d = x.shape
        src = x.detach() if self.constant_attention else x  # CP-LRP: the attention pattern is a constant
        q, k, v = self.split(self.q(src)), self.split(self.k(src)), self.split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        p = scores.softmax(-1)
        if scores.requires_grad:
            scores.retain_grad()
            p.retain_grad()
        self.retained = {"scores": scores, "p": p}
        h = x + self.o((p @ v).transpose(1, 2).reshape(b, n, d))
        z = self.norm(h)
        h = h + self.down(F.silu(self.gate(z)) * self.up(z))
        return self.readout(h.mean(1)).squeeze(-1)


def test_conservation_with_constant_attention_is_exact():
    torch.manual_seed(1)
    model = TinyTransformer(constant_attention=True)
    x = torch.randn(3, 6, 8, dtype=f64)
    y, (rx,) = explain(model, x, epsilon=1e-12)
    # every rule on the path conserves: sum of input relevance = explained output, per sample
    torch.testing.assert_close(rx.sum((1, 2)), y, rtol=1e-8, atol=1e-10)


def test_conservation_up_to_the_softmax_bias_term():
    torch.manual_seed(2)
    model = TinyTransformer()
    x = torch.randn(3, 6, 8, dtype=f64).requires_grad_()
    with ExplicitRules(epsilon=1e-12):
        y = model(x)
    y.backward(y.detach())
    scores, p = model.retained["scores"], model.retained["p"]
    # what the softmax rule keeps for its bias (Prop. 3.1) is the only leak
    absorbed = p.grad.sum((1, 2, 3)) - scores.grad.sum((1, 2, 3))
    assert absorbed.abs().max() > 1e-6  # the check below would notice it
    torch.testing.assert_close(x.grad.sum((1, 2)), y.detach() - absorbed, rtol=1e-8, atol=1e-10)
