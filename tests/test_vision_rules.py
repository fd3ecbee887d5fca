"""The rules of RULES.md section 3 (gamma, alpha-beta, z-plus, z-box, flat, w-square) on linear layers
and 2-D convolutions, against their float64 transcription in reference.py; the identities between
them; conservation; the gradient-times-input form; the cached weight transforms; the modules."""

import lrpcpp  # noqa: F401  (loads the ops)
import lrpcpp.functional as lf
import lrpcpp.modules as lm
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_relevance_close
from torch import nn

f64 = torch.float64
RULES = ["gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square"]
PARAMS = {"gamma": dict(gamma=0.3), "alpha_beta": dict(alpha=2.0, beta=1.0)}
EPS = 1e-6


def d64(t):
    return t.detach().double()


def bounds(x):
    """z-box bounds around x: lower <= x <= upper, per feature (last dim) or per channel."""
    shape = (x.shape[1], 1, 1) if x.dim() == 4 else (x.shape[-1],)
    lo = torch.full(shape, float(x.detach().min()) - 0.5, dtype=x.dtype)
    hi = torch.full(shape, float(x.detach().max()) + 0.25, dtype=x.dtype)
    return lo, hi


def linear_op(rule, x, w, b, lo=None, hi=None, eps=EPS, transform=None, gi=False):
    p = PARAMS.get(rule, {})
    if rule == "gamma":
        return lf.linear_gamma(x, w, b, p["gamma"], eps, transform, gi)
    if rule == "alpha_beta":
        pos, neg = transform if transform is not None else (None, None)
        return lf.linear_alpha_beta(x, w, b, p["alpha"], p["beta"], eps, pos, neg, gi)
    if rule == "z_plus":
        return lf.linear_z_plus(x, w, b, eps, transform, gi)
    if rule == "z_box":
        return lf.linear_z_box(x, w, b, lo, hi, eps, transform, gi)
    if rule == "flat":
        return lf.linear_flat(x, w, b, eps, gi)
    return lf.linear_w_square(x, w, b, eps, transform, gi)


def conv_op(rule, x, w, b, stride, padding, dilation, groups=1, lo=None, hi=None, eps=EPS, transform=None, gi=False):
    p = PARAMS.get(rule, {})
    geo = (stride, padding, dilation, groups)
    if rule == "gamma":
        return lf.conv2d_gamma(x, w, b, *geo, p["gamma"], eps, transform, gi)
    if rule == "alpha_beta":
        pos, neg = transform if transform is not None else (None, None)
        return lf.conv2d_alpha_beta(x, w, b, *geo, p["alpha"], p["beta"], eps, pos, neg, gi)
    if rule == "z_plus":
        return lf.conv2d_z_plus(x, w, b, *geo, eps, transform, gi)
    if rule == "z_box":
        return lf.conv2d_z_box(x, w, b, lo, hi, *geo, eps, transform, gi)
    if rule == "flat":
        return lf.conv2d_flat(x, w, b, *geo, eps, gi)
    return lf.conv2d_w_square(x, w, b, *geo, eps, transform, gi)


def input_for(rule, shape, dtype, contiguous=True):
    """Inputs of both signs (z-plus included: it is alpha-beta with alpha = 1, beta = 0)."""
    base = torch.randn(*shape[:-1], shape[-1] * (1 if contiguous else 2), dtype=f64)
    t = base.to(dtype)
    if not contiguous:
        t = t[..., ::2]
        assert not t.is_contiguous()
    return t.requires_grad_()


def seed(y):
    """Random relevance in float64/float32; the output itself in float16/bfloat16, whose range a
    random R divided by a small denominator may exceed."""
    if y.dtype in (torch.float64, torch.float32):
        return torch.randn_like(y)
    return y.detach().clone()


# ----------------------------------------------------------------------------- against the formulas
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rule", RULES)
def test_linear_rule_matches_reference(rule, bias, contiguous, dtype):
    x = input_for(rule, (2, 3, 12), dtype, contiguous)
    w = torch.randn(7, 12, dtype=f64).to(dtype)
    b = torch.randn(7, dtype=f64).to(dtype) if bias else None
    lo, hi = bounds(x)
    y = linear_op(rule, x, w, b, lo, hi)
    assert torch.equal(y, F.linear(x.detach(), w, b))  # torch's own forward, bitwise
    R = seed(y)
    y.backward(R)
    expected = ref.vision_rule(
        rule,
        d64(x),
        d64(w),
        None if b is None else d64(b),
        d64(R),
        EPS,
        lower=d64(lo).expand(x.shape),
        upper=d64(hi).expand(x.shape),
        **PARAMS.get(rule, {}),
    )
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_relevance_close(x.grad, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)], ids=["plain", "s2p1", "p2d2"])
@pytest.mark.parametrize("rule", RULES)
def test_conv2d_rule_matches_reference(rule, stride, padding, dilation, dtype):
    x = input_for(rule, (2, 3, 9, 9), dtype)
    w = torch.randn(4, 3, 3, 3, dtype=f64).to(dtype)
    b = torch.randn(4, dtype=f64).to(dtype)
    lo, hi = bounds(x)
    y = conv_op(rule, x, w, b, stride, padding, dilation, lo=lo, hi=hi)
    assert torch.equal(y, F.conv2d(x.detach(), w, b, stride, padding, dilation))
    R = seed(y)
    y.backward(R)
    expected = ref.conv2d_vision_rule(
        rule,
        d64(x),
        d64(w),
        d64(b),
        d64(R),
        stride,
        padding,
        dilation,
        EPS,
        lower=d64(lo),
        upper=d64(hi),
        **PARAMS.get(rule, {}),
    )
    assert_relevance_close(x.grad, expected, dtype)


@pytest.mark.parametrize("rule", RULES)
def test_conv2d_rule_groups_against_per_group_reference(rule):
    x = input_for(rule, (1, 4, 6, 6), f64)
    w = torch.randn(6, 2, 3, 3, dtype=f64)
    b = torch.randn(6, dtype=f64)
    lo, hi = bounds(x)
    y = conv_op(rule, x, w, b, 1, 1, 1, groups=2, lo=lo, hi=hi)
    R = torch.randn_like(y)
    y.backward(R)
    for g in range(2):  # a grouped convolution is two independent convolutions
        ins, outs = slice(2 * g, 2 * g + 2), slice(3 * g, 3 * g + 3)
        expected = ref.conv2d_vision_rule(
            rule,
            d64(x)[:, ins],
            w[outs],
            b[outs],
            R[:, outs],
            1,
            1,
            1,
            EPS,
            lower=lo[ins],
            upper=hi[ins],
            **PARAMS.get(rule, {}),
        )
        assert_relevance_close(x.grad[:, ins], expected, f64)


def test_linear_rule_on_a_1d_input():
    x = torch.randn(6, dtype=f64, requires_grad=True)
    w = torch.randn(3, 6, dtype=f64)
    y = lf.linear_gamma(x, w, None, 0.2)
    R = torch.randn_like(y)
    y.backward(R)
    assert_relevance_close(x.grad, ref.vision_rule("gamma", d64(x), w, None, R, EPS, gamma=0.2), f64)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("gi", [False, True], ids=["explicit", "gradient"])
def test_gamma_zero_equals_epsilon(layer, gi):
    x = torch.randn(2, 3, 8, 8, dtype=f64) if layer == "conv2d" else torch.randn(4, 10, dtype=f64)
    w = torch.randn(5, 3, 3, 3, dtype=f64) if layer == "conv2d" else torch.randn(5, 10, dtype=f64)
    b = torch.randn(5, dtype=f64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if layer == "conv2d":
        ya = lf.conv2d_gamma(xa, w, b, 1, 1, 1, 1, 0.0, EPS, None, gi)
        yb = lf.conv2d_epsilon(xb, w, b, 1, 1, 1, 1, EPS)
    else:
        ya = lf.linear_gamma(xa, w, b, 0.0, EPS, None, gi)
        yb = lf.linear_epsilon(xb, w, b, EPS)
    R = torch.randn_like(ya)
    ya.backward(R / ya.detach() if gi else R)  # gradient form: g_y = R / y
    yb.backward(R)
    got = xa.grad * x if gi else xa.grad
    torch.testing.assert_close(got, xb.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_alpha1_beta0_equals_z_plus_on_non_negative_inputs(layer):
    x = torch.rand(2, 3, 7, 7, dtype=f64) if layer == "conv2d" else torch.rand(4, 9, dtype=f64)
    w = torch.randn(4, 3, 3, 3, dtype=f64) if layer == "conv2d" else torch.randn(6, 9, dtype=f64)
    b = torch.randn(w.shape[0], dtype=f64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if layer == "conv2d":
        ya = lf.conv2d_alpha_beta(xa, w, b, 1, 1, 1, 1, 1.0, 0.0)
        yb = lf.conv2d_z_plus(xb, w, b, 1, 1, 1, 1)
    else:
        ya = lf.linear_alpha_beta(xa, w, b, 1.0, 0.0)
        yb = lf.linear_z_plus(xb, w, b)
    R = torch.randn_like(ya)
    ya.backward(R)
    yb.backward(R)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)


def z_plus_before(x, w, R, eps):
    """The z-plus rule as lrpcpp computed it before it became alpha-beta(1, 0): numerator x_i w_ij+,
    which on inputs of both signs cancels in the denominator."""
    return (x.unsqueeze(-2) * w.clamp(min=0) * (R / ref.stab(x @ w.clamp(min=0).T, eps)).unsqueeze(-1)).sum(-2)


@pytest.mark.parametrize("gi", [False, True], ids=["explicit", "gradient"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_z_plus_on_signed_inputs_is_alpha1_beta0(layer, gi):
    # x = [1, -0.999] against a positive weight row: x W+ cancels to 0.001 and x W+ / stab(x W+) made
    # relevances of +-1000 R; the positive terms (x w)+ share R instead, so it stays bounded
    if layer == "conv2d":
        x = torch.tensor([1.0, -0.999], dtype=f64).reshape(1, 2, 1, 1).repeat(1, 1, 3, 3)
        w = torch.ones(1, 2, 1, 1, dtype=f64)
        x = torch.cat([x, torch.randn(2, 2, 3, 3, dtype=f64)])
        w = torch.cat([w, torch.randn(3, 2, 1, 1, dtype=f64)])
        op = lambda x_: lf.conv2d_z_plus(x_, w, None, 1, 0, 1, 1, EPS, None, gi)  # noqa: E731
    else:
        x = torch.cat([torch.tensor([[1.0, -0.999]], dtype=f64), torch.randn(5, 2, dtype=f64)])
        w = torch.cat([torch.ones(1, 2, dtype=f64), torch.randn(3, 2, dtype=f64)])
        op = lambda x_: lf.linear_z_plus(x_, w, None, EPS, None, gi)  # noqa: E731
    xa = x.clone().requires_grad_()
    y = op(xa)
    R = torch.rand_like(y) + 0.5
    y.backward(R / y.detach() if gi else R)  # gradient form: g_y = R / y
    got = xa.grad * x if gi else xa.grad
    if layer == "conv2d":
        expected = ref.conv2d_vision_rule("alpha_beta", x, w, None, R, 1, 0, 1, EPS, alpha=1.0, beta=0.0)
    else:
        expected = ref.vision_rule("alpha_beta", x, w, None, R, EPS, alpha=1.0, beta=0.0)
    assert_relevance_close(got, expected, f64)
    assert got.abs().max() <= R.sum()  # bounded: each output hands out at most its own R
    # on non-negative inputs z-plus is what it was: x (R / stab(x W+)) W+^T
    xp = x.abs().requires_grad_()
    yp = op(xp)
    yp.backward(R / yp.detach() if gi else R)
    got_p = xp.grad * xp.detach() if gi else xp.grad
    if layer == "linear":
        torch.testing.assert_close(got_p, z_plus_before(xp.detach(), w, R, EPS), rtol=1e-9, atol=1e-12)
    expected_p = (
        ref.conv2d_vision_rule("alpha_beta", xp.detach(), w, None, R, 1, 0, 1, EPS, alpha=1.0, beta=0.0)
        if layer == "conv2d"
        else ref.vision_rule("alpha_beta", xp.detach(), w, None, R, EPS, alpha=1.0, beta=0.0)
    )
    assert_relevance_close(got_p, expected_p, f64)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("rule", ["alpha_beta", "z_plus"])
def test_alpha_beta_relevance_takes_no_host_sync(rule, layer):
    # no branch on the values of x: the relevance op calls no aten::item / _local_scalar_dense (a
    # device-to-host sync on CUDA, which breaks CUDA-graph capture), on non-negative and on signed x
    w = torch.randn(4, 3, 3, 3, dtype=f64) if layer == "conv2d" else torch.randn(6, 9, dtype=f64)
    x = torch.rand(2, 3, 6, 6, dtype=f64) if layer == "conv2d" else torch.rand(4, 9, dtype=f64)
    for signed in (False, True):
        xs = (x - 0.5 if signed else x.clone()).requires_grad_()
        y = conv_op(rule, xs, w, None, 1, 1, 1) if layer == "conv2d" else linear_op(rule, xs, w, None)
        R = torch.randn_like(y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.backward(R)
        names = {e.name for e in prof.events()}
        assert any("relevance" in n for n in names), names
        assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}, names
        kw = {k: v for k, v in PARAMS.get(rule, {}).items()}
        expected = (
            ref.conv2d_vision_rule(rule, d64(xs), w, None, R, 1, 1, 1, EPS, **kw)
            if layer == "conv2d"
            else ref.vision_rule(rule, d64(xs), w, None, R, EPS, **kw)
        )
        assert_relevance_close(xs.grad, expected, f64)


@pytest.mark.parametrize("gi", [False, True], ids=["explicit", "gradient"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_gamma_on_non_negative_inputs_takes_no_abs(layer, gi):
    # x >= 0 everywhere (a layer after a ReLU; zeros included): |x| is x itself, so the rule makes no copy
    # of it (no aten::abs, the weight's |W| being given), and its gradient form sums the two products in
    # place (no split_times_input); the relevance is the formula's. Signed x takes the general path.
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=f64) if layer == "conv2d" else torch.randn(6, 9, dtype=f64)
    b = torch.randn(w.shape[0], dtype=f64)
    x = (torch.randn(2, 3, 6, 6, dtype=f64) if layer == "conv2d" else torch.randn(4, 9, dtype=f64)).clamp_min(0)
    assert (x == 0).any()
    for signed in (False, True):
        xs = (x - 0.5 if signed else x.clone()).requires_grad_()
        y = conv_op("gamma", xs, w, b, 1, 1, 1, transform=w.abs(), gi=gi) if layer == "conv2d" else None
        y = y if y is not None else linear_op("gamma", xs, w, b, transform=w.abs(), gi=gi)
        g = torch.randn_like(y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.backward(g)
        names = {e.name for e in prof.events()}
        assert ("aten::abs" in names) == signed, names
        assert ("lrpcpp::split_times_input" in names) == (signed or not gi), names
        R = y.detach() * g if gi else g  # gradient form: R = y g, and the relevance is x g_x
        got = xs.grad * xs.detach() if gi else xs.grad
        kw = PARAMS["gamma"]
        expected = (
            ref.conv2d_vision_rule("gamma", d64(xs), w, b, R, 1, 1, 1, EPS, **kw)
            if layer == "conv2d"
            else ref.vision_rule("gamma", d64(xs), w, b, R, EPS, **kw)
        )
        assert_relevance_close(got, expected, f64)


# ----------------------------------------------------------------------------- conservation
def conserved(rule, layer, eps=1e-12):
    torch.manual_seed(3)
    if layer == "conv2d":
        x = torch.randn(2, 3, 8, 8, dtype=f64)
        w, b = torch.randn(4, 3, 3, 3, dtype=f64), torch.randn(4, dtype=f64)
    else:
        x = torch.randn(3, 10, dtype=f64)
        w, b = torch.randn(6, 10, dtype=f64), torch.randn(6, dtype=f64)
    if rule == "z_plus":
        x = x.abs()
    x.requires_grad_()
    lo, hi = bounds(x)
    y = (
        conv_op(rule, x, w, b, 1, 1, 1, lo=lo, hi=hi, eps=eps)
        if layer == "conv2d"
        else linear_op(rule, x, w, b, lo, hi, eps=eps)
    )
    R = torch.rand_like(y) + 0.1
    y.backward(R)
    return x.grad.sum(), R.sum()


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("rule", ["flat", "w_square", "z_box", "alpha_beta", "z_plus"])
def test_bias_free_rules_conserve(rule, layer):
    # flat and w-square always; z-box with the bounds around the input; alpha-beta (alpha - beta = 1)
    # and z-plus because none of them gives the bias a share
    total, expected = conserved(rule, layer)
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_z_box_on_the_first_layer_conserves_with_per_channel_bounds(layer):
    # pixels in [0, 1], normalised per channel as an image model's input is: the bounds are the
    # normalised images of 0 and 1
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=f64)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=f64)
    if layer == "conv2d":
        pixels = torch.rand(2, 3, 10, 10, dtype=f64)
        x = ((pixels - mean[:, None, None]) / std[:, None, None]).requires_grad_()
        lo, hi = ((0 - mean) / std)[:, None, None], ((1 - mean) / std)[:, None, None]
        y = lf.conv2d_z_box(
            x, torch.randn(5, 3, 3, 3, dtype=f64), torch.randn(5, dtype=f64), lo, hi, 2, 1, epsilon=1e-12
        )
    else:
        pixels = torch.rand(4, 3, dtype=f64)
        x = ((pixels - mean) / std).requires_grad_()
        lo, hi = (0 - mean) / std, (1 - mean) / std
        y = lf.linear_z_box(x, torch.randn(6, 3, dtype=f64), torch.randn(6, dtype=f64), lo, hi, epsilon=1e-12)
    y.backward(y.detach().abs())
    torch.testing.assert_close(x.grad.sum(), y.detach().abs().sum(), rtol=1e-9, atol=0)


def test_gamma_conserves_without_bias():
    x = torch.randn(3, 10, dtype=f64, requires_grad=True)
    y = lf.linear_gamma(x, torch.randn(6, 10, dtype=f64), None, 0.5, 1e-12)
    R = torch.randn_like(y)
    y.backward(R)
    torch.testing.assert_close(x.grad.sum(), R.sum(), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- gradient-times-input form
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("rule", RULES)
def test_gi_form_times_input_is_the_relevance(rule, layer):
    # gi=True: the backward takes g_y with R_y = y * g_y and returns g_x with x * g_x = R_x
    x = input_for(rule, (2, 3, 7, 7) if layer == "conv2d" else (3, 11), f64).detach()
    w = torch.randn(4, 3, 3, 3, dtype=f64) if layer == "conv2d" else torch.randn(5, 11, dtype=f64)
    b = torch.randn(w.shape[0], dtype=f64)
    lo, hi = bounds(x)
    xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    run = (
        (lambda t, gi: conv_op(rule, t, w, b, 1, 1, 1, lo=lo, hi=hi, gi=gi))
        if layer == "conv2d"
        else (lambda t, gi: linear_op(rule, t, w, b, lo, hi, gi=gi))
    )
    ye, yg = run(xe, False), run(xg, True)
    g = torch.randn_like(yg)
    ye.backward(yg.detach() * g)
    yg.backward(g)
    # exact for the rules whose relevance is a multiple of x or |x|; R / stab(x) for the others
    expected = xe.grad if rule in ("gamma", "alpha_beta", "z_plus") else xe.grad * x / ref.stab(x, EPS)
    torch.testing.assert_close(xg.grad * x, expected, rtol=1e-10, atol=1e-12 * float(xe.grad.abs().max()))


# ----------------------------------------------------------------------------- weight transforms
@pytest.mark.parametrize(
    "rule,kind", [("gamma", "abs"), ("alpha_beta", "pos+neg"), ("z_plus", "pos"), ("z_box", "abs"), ("w_square", "sq")]
)
def test_passing_the_weight_transform_gives_the_same_relevance(rule, kind):
    x = input_for(rule, (2, 3, 6, 6), f64)
    w = torch.randn(4, 3, 3, 3, dtype=f64)
    lo, hi = bounds(x)
    x2 = x.detach().clone().requires_grad_()
    y1 = conv_op(rule, x, w, None, 1, 1, 1, lo=lo, hi=hi)
    kinds = [lm.weight_transform(w, k) for k in kind.split("+")]
    y2 = conv_op(rule, x2, w, None, 1, 1, 1, lo=lo, hi=hi, transform=kinds[0] if len(kinds) == 1 else tuple(kinds))
    y1.backward(y1.detach())
    y2.backward(y2.detach())
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_weight_transform_is_reused_and_rebuilt_after_an_update():
    w = nn.Parameter(torch.randn(5, 4, dtype=f64))
    first = lm.weight_transform(w, "abs")
    assert lm.weight_transform(w, "abs") is first  # reused: the same tensor
    assert not first.requires_grad
    torch.testing.assert_close(first, w.detach().abs(), rtol=0, atol=0)
    pos = lm.weight_transform(w, "pos")
    assert pos is not first and lm.weight_transform(w, "pos") is pos  # one entry per kind
    with torch.no_grad():
        w.mul_(-2.0)  # an in-place update bumps the version counter
    rebuilt = lm.weight_transform(w, "abs")
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt, w.detach().abs(), rtol=0, atol=0)
    assert lm.weight_transform(w, "abs") is rebuilt
    with torch.no_grad():
        w.data = w.data.float()  # another dtype (and storage): rebuilt again
    assert lm.weight_transform(w, "abs").dtype == torch.float32
    with pytest.raises(ValueError, match="kind must be one of"):
        lm.weight_transform(w, "negative")


def test_modules_use_the_cached_transform_across_calls(monkeypatch):
    layer = lm.Conv2dGamma.from_module(nn.Conv2d(3, 4, 3, padding=1).double(), gamma=0.1)
    calls = []
    real = lm._TRANSFORM_FUNCTIONS["abs"]
    monkeypatch.setitem(lm._TRANSFORM_FUNCTIONS, "abs", lambda w: calls.append(1) or real(w))
    lm.clear_weight_transforms()
    for _ in range(3):
        x = torch.randn(1, 3, 5, 5, dtype=f64, requires_grad=True)
        y = layer(x)
        y.backward(y.detach())
    assert len(calls) == 1  # built once, reused by the next two calls
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer(torch.randn(1, 3, 5, 5, dtype=f64))
    assert len(calls) == 2  # rebuilt after the in-place update


# ----------------------------------------------------------------------------- modules
MODULES = [
    (lm.LinearGamma, dict(gamma=0.2), "gamma"),
    (lm.LinearAlphaBeta, dict(alpha=1.5, beta=0.5), "alpha_beta"),
    (lm.LinearZPlus, {}, "z_plus"),
    (lm.LinearZBox, dict(lower=-4.0, upper=4.0), "z_box"),
    (lm.LinearFlat, {}, "flat"),
    (lm.LinearWSquare, {}, "w_square"),
    (lm.Conv2dGamma, dict(gamma=0.2), "gamma"),
    (lm.Conv2dAlphaBeta, dict(alpha=1.5, beta=0.5), "alpha_beta"),
    (lm.Conv2dZPlus, {}, "z_plus"),
    (lm.Conv2dZBox, dict(lower=-4.0, upper=4.0), "z_box"),
    (lm.Conv2dFlat, {}, "flat"),
    (lm.Conv2dWSquare, {}, "w_square"),
]


@pytest.mark.parametrize("cls,options,rule", MODULES, ids=[m[0].__name__ for m in MODULES])
def test_module_shares_parameters_and_matches_reference(cls, options, rule):
    conv = cls.__name__.startswith("Conv")
    torch.manual_seed(1)
    base = (nn.Conv2d(3, 4, 3, stride=2, padding=1) if conv else nn.Linear(6, 5)).double()
    layer = cls.from_module(base, **options)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert type(base).__name__ in repr(type(layer).__mro__) and "epsilon=1e-06" in repr(layer)
    x = torch.randn(2, 3, 7, 7, dtype=f64) if conv else torch.randn(3, 6, dtype=f64)
    if rule == "z_plus":
        x = x.abs()
    x.requires_grad_()
    y = layer(x)
    assert torch.equal(y, base(x.detach()))
    R = torch.randn_like(y)
    y.backward(R)
    params = {k: v for k, v in options.items() if k not in ("lower", "upper")}
    lo = torch.full(x.shape, -4.0, dtype=f64)
    hi = torch.full(x.shape, 4.0, dtype=f64)
    wd, bd = d64(base.weight), d64(base.bias)
    if conv:
        expected = ref.conv2d_vision_rule(rule, d64(x), wd, bd, R, 2, 1, 1, EPS, lower=lo, upper=hi, **params)
    else:
        expected = ref.vision_rule(rule, d64(x), wd, bd, R, EPS, lower=lo, upper=hi, **params)
    assert_relevance_close(x.grad, expected, f64)
    assert base.weight.grad is None  # parameters take no relevance


def test_module_constructors_and_option_checks():
    layer = lm.Conv2dZBox(3, 4, 3, padding="same", lower=torch.zeros(3, 1, 1), upper=torch.ones(3, 1, 1))
    assert layer.lower.shape == (3, 1, 1) and "lower" in dict(layer.named_buffers())
    x = torch.rand(1, 3, 5, 5, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.conv2d(x.detach(), layer.weight, layer.bias, padding=1))
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        lm.LinearAlphaBeta(3, 4, alpha=2.0, beta=2.0)
    with pytest.raises(ValueError, match="gamma >= 0"):
        lm.LinearGamma(3, 4, gamma=-0.1)
    with pytest.raises(ValueError, match="needs both bounds"):
        lm.LinearZBox(3, 4)
    with pytest.raises(TypeError, match="unknown options"):
        lm.LinearGamma.from_module(nn.Linear(2, 3), alpha=1.0)
    with pytest.raises(TypeError, match="expects a torch.nn.modules.conv.Conv2d"):
        lm.Conv2dGamma.from_module(nn.Linear(2, 3))


@pytest.mark.parametrize("cls", [lm.LinearGamma, lm.Conv2dZBox, lm.LinearFlat, lm.Conv2dAlphaBeta])
def test_modules_script(cls):
    conv = cls.__name__.startswith("Conv")
    options = dict(lower=-3.0, upper=3.0) if cls is lm.Conv2dZBox else {}
    layer = cls.from_module((nn.Conv2d(3, 2, 3, padding=1) if conv else nn.Linear(4, 3)).double(), **options)
    scripted = torch.jit.script(layer)
    x = torch.randn(1, 3, 5, 5, dtype=f64) if conv else torch.randn(2, 4, dtype=f64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), scripted(xb)
    assert torch.equal(ya, yb)
    ya.backward(ya.detach())
    yb.backward(yb.detach())
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- compile and export
@pytest.mark.compile
def test_compile_fullgraph_and_export_call_the_relevance_op():
    from conftest import recording_backend

    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    t = w.abs()

    def f(x):
        return lf.conv2d_gamma(x, w, b, 1, 1, 1, 1, 0.25, 1e-6, t, True)

    seen = []
    compiled = torch.compile(f, backend=recording_backend(seen), fullgraph=True)
    x1 = torch.randn(2, 3, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = f(x1), compiled(x2)
    y1.backward(torch.ones_like(y1))
    y2.backward(torch.ones_like(y2))
    torch.testing.assert_close(x1.grad, x2.grad)
    assert any("conv2d_gamma_relevance" in s for s in seen)

    class M(nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (torch.randn(2, 3, 6, 6),))
    assert any("conv2d_gamma" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x1.detach()), y1.detach())


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_alpha_beta_is_accurate_where_a_sum_of_terms_is_zero(layer):
    # after a ReLU many inputs are 0. An output whose remaining terms all have one sign has B = 0 (or
    # A = 0), and its share -beta R / stab(0) = -beta R / eps must meet only zero numerators: in
    # float32 a form that subtracts two large products would leave noise of order R * 1e-7 / eps
    torch.manual_seed(5)
    if layer == "conv2d":
        x = torch.rand(2, 3, 6, 6)
        x[:, 1:] = 0
        w = torch.randn(4, 3, 1, 1)
        w[0, 0], w[1, 0] = w[0, 0].abs(), -w[1, 0].abs()  # channel 0 alone: output 0 has B = 0, output 1 A = 0
        y = lf.conv2d_alpha_beta(x.requires_grad_(), w, None)
    else:
        x = torch.rand(4, 6)
        x[:, 3:] = 0
        w = torch.randn(5, 6)
        w[0, :3], w[1, :3] = w[0, :3].abs(), -w[1, :3].abs()
        y = lf.linear_alpha_beta(x.requires_grad_(), w, None)
    R = torch.rand_like(y) + 0.5
    y.backward(R)
    if layer == "conv2d":
        expected = ref.conv2d_vision_rule("alpha_beta", d64(x), w.double(), None, R.double(), 1, 0, 1, EPS)
    else:
        expected = ref.vision_rule("alpha_beta", d64(x), w.double(), None, R.double(), EPS)
    assert_relevance_close(x.grad, expected, torch.float32)
