"""lrpcpp.compat.lxt, LXT's signatures over lrpcpp's operators, against LXT itself (lxt==2.1,
requirements-nodeps.txt: a required test dependency, not a skip) and against the float64 transcription
of RULES.md.

LXT's own functional tests (its tests/test_functional.py) are ported below, in float64 and seeded,
with the ground truth of RULES.md (the sign-aware stabiliser). Where lrpcpp deliberately differs from
LXT, the tests show that the difference is exactly that: LXT given the relevance rescaled by
``(z + eps) / stab(z)`` (its denominator over ours) computes lrpcpp's relevance, and with every
denominator positive the two agree as they are.
"""

import importlib.util
import inspect
import pathlib

import lrpcpp.compat.lxt.efficient.rules as rules
import lrpcpp.compat.lxt.explicit.functional as lf
import lxt
import lxt.explicit.functional as lxt_f
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

D = torch.float64


def load_lxt_efficient_rules():
    """LXT's lxt/efficient/rules.py. Its package's __init__ imports LXT's model patches (for
    transformers 4.x and torchvision), which do not import here; the rules module imports only torch."""
    path = pathlib.Path(lxt.__file__).parent / "efficient" / "rules.py"
    spec = importlib.util.spec_from_file_location("lxt_efficient_rules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lxt_rules = load_lxt_efficient_rules()


def stab(z, eps):
    """RULES.md: z + eps * sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def as_lxt(relevance, z, eps):
    """The relevance that, divided by LXT's z + eps, gives relevance / stab(z)."""
    return relevance * (z + eps) / stab(z, eps)


def leaf(*shape, positive=False):
    x = torch.randn(*shape, dtype=D)
    return (x.abs() + 0.1 if positive else x).requires_grad_()


# ----------------------------------------------------------------------------- signatures
def public_functions(module):
    """The functions a module defines, without a leading underscore. LXT's conservation_check_wrap
    decorates the backward of LXT's own autograd Functions (a debugging switch); it is not a rule."""
    return {
        name: f
        for name, f in vars(module).items()
        if inspect.isfunction(f)
        and f.__module__ == module.__name__
        and not name.startswith("_")
        and name != "conservation_check_wrap"
    }


@pytest.mark.parametrize("theirs,ours", [(lxt_f, lf), (lxt_rules, rules)], ids=["explicit.functional", "rules"])
def test_every_lxt_function_with_its_signature(theirs, ours):
    names = public_functions(theirs)
    assert len(names) >= 3
    assert set(names) == set(public_functions(ours)) == set(ours.__all__)
    for name, f in names.items():
        expected = [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(ours, name)).parameters.values()]
        assert got == expected, name


# ----------------------------------------------------------------------------- LXT's tests/test_functional.py
def test_softmax():
    torch.manual_seed(0)
    x = leaf(16, 10, 32)
    init_relevance = torch.randn(16, 10, 32, dtype=D)
    y_gt = F.softmax(x, -1)
    relevance_gt = x * (init_relevance - y_gt * init_relevance.sum(-1, keepdim=True))  # Prop. 3.1
    for inplace in (False, True):
        y = lf.softmax(x, -1, D, inplace=inplace)
        (relevance,) = torch.autograd.grad(y, x, init_relevance)
        assert_close(relevance, relevance_gt.detach(), rtol=1e-10, atol=1e-12)
    (relevance_lxt,) = torch.autograd.grad(lxt_f.softmax(x, -1, D), x, init_relevance)
    assert_close(relevance, relevance_lxt, rtol=1e-10, atol=1e-12)


def test_softmax_temperature_in_place_of_inplace_is_an_error():
    # LXT's own test calls softmax(x, -1, torch.float32, False): False lands in temperature and LXT
    # returns nan everywhere; here it is a TypeError naming the argument.
    x = leaf(2, 5)
    assert lxt_f.softmax(x, -1, D, False).isnan().all()
    with pytest.raises(TypeError, match="softmax: expected temperature to be a number, got bool"):
        lf.softmax(x, -1, D, False)
    with pytest.raises(RuntimeError, match="temperature"):
        lf.softmax(x, -1, D, 0.0)


def test_softmax_temperature():
    torch.manual_seed(1)
    x = leaf(3, 7)
    relevance = torch.randn(3, 7, dtype=D)
    (ours,) = torch.autograd.grad(lf.softmax(x, -1, None, 0.5), x, relevance)
    (theirs,) = torch.autograd.grad(lxt_f.softmax(x, -1, None, 0.5), x, relevance)
    s = F.softmax(x / 0.5, -1)
    assert_close(ours, ((x / 0.5) * (relevance - s * relevance.sum(-1, keepdim=True))).detach())
    assert_close(ours, theirs)


def test_softmax_sums_over_dim():
    # Deliberate difference: RULES.md sums the relevance over dim; LXT always over the last dimension.
    # lrpcpp's result is LXT's with dim moved last.
    torch.manual_seed(2)
    x = leaf(4, 6, 5)
    relevance = torch.randn(4, 6, 5, dtype=D)
    (ours,) = torch.autograd.grad(lf.softmax(x, 1), x, relevance)
    s = F.softmax(x, 1)
    assert_close(ours, (x * (relevance - s * relevance.sum(1, keepdim=True))).detach())
    (lxt_moved,) = torch.autograd.grad(lxt_f.softmax(x.movedim(1, -1), -1), x, relevance.movedim(1, -1))
    assert_close(ours, lxt_moved)
    (lxt_plain,) = torch.autograd.grad(lxt_f.softmax(x, 1), x, relevance)
    assert not torch.allclose(ours, lxt_plain)


def test_matmul():
    torch.manual_seed(3)
    epsilon = 1e-9
    a, b = leaf(2, 10, 32), leaf(2, 32, 5)
    init_relevance = torch.randn(2, 10, 5, dtype=D)
    rn = (init_relevance / stab(2 * torch.matmul(a, b), epsilon)).detach()  # Prop. 3.3
    relevance_a_gt = torch.einsum("bji, bip, bjp -> bji", a, b, rn)
    relevance_b_gt = torch.einsum("bji, bip, bjp -> bip", a, b, rn)
    for inplace in (False, True):
        y = lf.matmul(a, b, inplace, epsilon)
        relevance_a, relevance_b = torch.autograd.grad(y, (a, b), init_relevance)
        assert_close(relevance_a, relevance_a_gt.detach())
        assert_close(relevance_b, relevance_b_gt.detach())


def test_matmul_with_a_constant():
    # Deliberate difference: with one operand constant, RULES.md gives the other all of R / stab(O);
    # LXT keeps R / (2 O + eps), half of it. LXT given R rescaled by (2 O + eps) / stab(O) gives ours.
    torch.manual_seed(4)
    epsilon = 1e-3
    a, b = leaf(3, 4), torch.randn(4, 5, dtype=D)
    relevance = torch.randn(3, 5, dtype=D)
    z = (a @ b).detach()
    (ours,) = torch.autograd.grad(lf.matmul(a, b, False, epsilon), a, relevance)
    assert_close(ours, a.detach() * ((relevance / stab(z, epsilon)) @ b.T))
    (theirs,) = torch.autograd.grad(
        lxt_f.matmul(a, b, False, epsilon), a, relevance * (2 * z + epsilon) / stab(z, epsilon)
    )
    assert_close(ours, theirs)


def test_linear():
    torch.manual_seed(5)
    epsilon = 1e-9
    x, weight, bias = leaf(16, 10), torch.randn(5, 10, dtype=D), torch.randn(5, dtype=D)
    init_relevance = torch.randn(16, 5, dtype=D)
    y_gt = F.linear(x, weight, bias).detach()
    relevance_gt = torch.einsum("ji, bi, bj -> bi", weight, x.detach(), init_relevance / stab(y_gt, epsilon))  # Eq. 8
    (relevance,) = torch.autograd.grad(lf.linear_epsilon(x, weight, bias, epsilon), x, init_relevance)
    assert_close(relevance, relevance_gt)


def test_sum():
    torch.manual_seed(6)
    epsilon = 1e-9
    a, b = leaf(16, 10, 32), leaf(16, 10, 32)
    init_relevance = torch.randn(16, 10, 32, dtype=D)
    rn = init_relevance / stab((a + b).detach(), epsilon)
    for inplace in (False, True):
        relevance_a, relevance_b = torch.autograd.grad(lf.add2(a, b, inplace, epsilon), (a, b), init_relevance)
        assert_close(relevance_a, a.detach() * rn)
        assert_close(relevance_b, b.detach() * rn)


def test_mean():
    torch.manual_seed(7)
    epsilon = 1e-9
    a = leaf(1, 8, 32)
    init_relevance = torch.randn(1, 8, dtype=D)
    relevance_gt = a.detach() * init_relevance.unsqueeze(-1) / stab(a.detach().sum(-1, keepdim=True), epsilon)
    (relevance,) = torch.autograd.grad(lf.mean(a, -1, True, epsilon), a, init_relevance.unsqueeze(-1))
    assert_close(relevance, relevance_gt)
    (relevance,) = torch.autograd.grad(lf.mean(a, -1, False, epsilon), a, init_relevance)
    assert_close(relevance, relevance_gt)


def _layer_norm_slower(hidden_states, weight, bias, variance_epsilon):
    """LXT's lxt.explicit.functional._layer_norm_slower, over the compat functions."""
    x_mean = lf.mean(hidden_states, -1, keep_dim=True)
    var = ((hidden_states - x_mean) ** 2).mean(dim=-1, keepdim=True)
    std = (var + variance_epsilon).sqrt().detach()
    y = lf.add2(hidden_states, lf.mul2(x_mean, -1))
    y = lf.mul2(y, 1 / std)
    y = lf.mul2(y, weight)
    return lf.add2(y, bias)


def test_layernorm():
    torch.manual_seed(8)
    x = leaf(1, 2, 8)
    init_relevance = torch.randn(1, 2, 8, dtype=D)
    weight, bias, eps = torch.randn(8, dtype=D), torch.randn(8, dtype=D), 1e-5
    y = lf.layer_norm(x, weight, bias, eps)
    (relevance,) = torch.autograd.grad(y, x, init_relevance)
    # RULES.md: sigma constant, epsilon rule (1e-6) on the rest
    xd = x.detach()
    sigma = (xd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    h = weight / sigma * (init_relevance / stab(y.detach(), 1e-6))
    assert_close(relevance, xd * (h - h.mean(-1, keepdim=True)))
    assert_close(y, F.layer_norm(xd, [8], weight, bias, eps))
    # LXT's comparison with its composition of mean, add2 and mul2
    (relevance_slower,) = torch.autograd.grad(_layer_norm_slower(x, weight, bias, eps), x, init_relevance)
    assert torch.allclose(relevance_slower, relevance, rtol=0, atol=1e-1)
    cos_sim = torch.dot(relevance.flatten(), relevance_slower.flatten()) / (relevance.norm() * relevance_slower.norm())
    assert cos_sim > 0.99


def test_normalize():
    torch.manual_seed(9)
    x = leaf(1, 4, 32)
    r_gt = torch.randn(1, 4, 32, dtype=D)
    weight, variance_epsilon = torch.randn(32, dtype=D), 1e-9
    y = lf.rms_norm_identity(x, weight, variance_epsilon)
    # both normalise in float32 (RULES.md), in their own order of operations
    assert_close(y, lxt_f.rms_norm_identity(x, weight, variance_epsilon), rtol=1e-6, atol=1e-6)
    y.backward(r_gt)
    assert_close(x.grad, r_gt, rtol=0, atol=0)
    x.grad = None
    y = lf.normalize(x, p=2, dim=1)
    assert_close(y, F.normalize(x, p=2, dim=1))
    y.backward(r_gt)
    assert_close(x.grad, r_gt, rtol=0, atol=0)


# ----------------------------------------------------------------------------- against LXT itself
def ln_inputs(positive):
    bias = torch.full((6,), 10.0, dtype=D) if positive else torch.randn(6, dtype=D)
    return (leaf(3, 6), torch.rand(6, dtype=D) + 0.5, bias, 1e-5)


# name: (inputs(positive), indices of the inputs carrying relevance, denominator z, epsilon)
CASES = {
    "linear_epsilon": (
        lambda p: (leaf(4, 6, positive=p), torch.rand(3, 6, dtype=D) if p else torch.randn(3, 6, dtype=D), None, 1e-3),
        [0],
        lambda x, w, b, e: F.linear(x, w, b),
        1e-3,
    ),
    "add2": (
        lambda p: (leaf(4, 5, positive=p), leaf(4, 5, positive=p), False, 1e-3),
        [0, 1],
        lambda a, b, *_: a + b,
        1e-3,
    ),
    "matmul": (
        lambda p: (leaf(2, 3, 4, positive=p), leaf(2, 4, 5, positive=p), False, 1e-3),
        [0, 1],
        lambda a, b, *_: 2 * (a @ b),
        1e-3,
    ),
    "mean_keep_dim": (lambda p: (leaf(3, 7, positive=p), -1, True, 1e-3), [0], lambda x, d, k, e: x.sum(d, k), 1e-3),
    "mean": (lambda p: (leaf(3, 7, positive=p), 0, False, 1e-3), [0], lambda x, d, k, e: x.sum(d, k), 1e-3),
    "layer_norm": (ln_inputs, [0], lambda x, w, b, e: F.layer_norm(x, [6], w, b, e), 1e-6),
}


def relevances(fn, inputs, carrying, relevance):
    y = fn(*inputs)
    return torch.autograd.grad(y, [inputs[i] for i in carrying], relevance)


@pytest.mark.parametrize("name", CASES)
def test_lxt_with_our_stabiliser_is_lrpcpp(name):
    make, carrying, denominator, eps = CASES[name]
    op = name.removesuffix("_keep_dim")
    torch.manual_seed(10)
    inputs = make(False)
    z = denominator(*[i.detach() if isinstance(i, torch.Tensor) else i for i in inputs])
    assert (z < 0).any() and (z > 0).any()
    relevance = torch.randn_like(z)
    ours = relevances(getattr(lf, op), inputs, carrying, relevance)
    theirs = relevances(getattr(lxt_f, op), inputs, carrying, as_lxt(relevance, z, eps))
    plain = relevances(getattr(lxt_f, op), inputs, carrying, relevance)
    for o, t, p in zip(ours, theirs, plain):
        assert_close(o, t, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(o, p, rtol=1e-10, atol=1e-12)  # the stabilisers do differ here


@pytest.mark.parametrize("name", CASES)
def test_equal_to_lxt_with_positive_denominators(name):
    make, carrying, denominator, _ = CASES[name]
    op = name.removesuffix("_keep_dim")
    torch.manual_seed(11)
    inputs = make(True)
    z = denominator(*[i.detach() if isinstance(i, torch.Tensor) else i for i in inputs])
    assert (z > 0).all()
    relevance = torch.randn_like(z)
    for o, t in zip(*(relevances(getattr(m, op), inputs, carrying, relevance) for m in (lf, lxt_f))):
        assert_close(o, t, rtol=1e-10, atol=1e-12)
    assert_close(getattr(lf, op)(*inputs), getattr(lxt_f, op)(*inputs))


def test_lxt_explodes_just_below_zero():
    eps = 1e-6
    a = torch.tensor([1.0], dtype=D, requires_grad=True)
    b = torch.tensor([-(1.0 + eps) + 1e-12], dtype=D, requires_grad=True)  # a + b = -eps + 1e-12
    relevance = torch.tensor([1.0], dtype=D)
    ours = torch.autograd.grad(lf.add2(a, b, False, eps), (a, b), relevance)
    theirs = torch.autograd.grad(lxt_f.add2(a, b, False, eps), (a, b), relevance)
    z = (a + b).detach()
    assert_close(ours[0], a.detach() / stab(z, eps))
    assert ours[0].abs().max() < 1e6 and theirs[0].abs().max() > 1e11


@pytest.mark.parametrize("constant", [None, "a", "b", "number"])
def test_mul2(constant):
    torch.manual_seed(12)
    a, b = leaf(3, 4), leaf(3, 4)
    if constant == "a":
        a = a.detach()
    elif constant == "b":
        b = b.detach()
    elif constant == "number":
        b = -1.5
    relevance = torch.randn(3, 4, dtype=D)
    carrying = [t for t in (a, b) if isinstance(t, torch.Tensor) and t.requires_grad]
    ours = torch.autograd.grad(lf.mul2(a, b, False), carrying, relevance)
    theirs = torch.autograd.grad(lxt_f.mul2(a, b, False), carrying, relevance)
    for o, t in zip(ours, theirs):
        assert_close(o, relevance / len(carrying), rtol=0, atol=0)
        assert_close(o, t, rtol=0, atol=0)
    assert_close(lf.mul2(a, b), a * b)


# ----------------------------------------------------------------------------- lxt.efficient.rules
def test_identity_rule_implicit():
    torch.manual_seed(13)
    x = leaf(5, 6)
    for fn in (F.silu, torch.tanh, F.gelu):
        (ours,) = torch.autograd.grad(rules.identity_rule_implicit(fn, x).sum(), x)
        (theirs,) = torch.autograd.grad(lxt_rules.identity_rule_implicit(fn, x).sum(), x)
        y = fn(x.detach())
        assert_close(x.detach() * ours, y)  # identity: R_x = R_y = y * 1
        assert_close(ours, y / stab(x.detach(), 1e-10))
        assert_close(ours, theirs)


def test_divide_gradient_and_stop_gradient():
    x = leaf(3, 4)
    for factor in (2, 4, 3):
        (ours,) = torch.autograd.grad(rules.divide_gradient(x, factor).sum(), x)
        (theirs,) = torch.autograd.grad(lxt_rules.divide_gradient(x, factor).sum(), x)
        assert_close(ours, torch.full_like(x, 1 / factor))
        assert_close(ours, theirs)
    assert not rules.stop_gradient(x).requires_grad


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error():
    x = leaf(2, 3)
    with pytest.raises(TypeError, match="add2: expected inplace to be a bool, got float"):
        lf.add2(x, x, 1e-6)
    with pytest.raises(TypeError, match="mul2: expected at least one tensor"):
        lf.mul2(2.0, 3.0)
    with pytest.raises(ValueError, match="normalize: the out argument is not supported"):
        lf.normalize(x, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="divide_gradient: expected factor to be a nonzero number"):
        rules.divide_gradient(x, 0)
    with pytest.raises(ValueError, match="identity_rule_implicit: fn must return one tensor of the input's shape"):
        rules.identity_rule_implicit(lambda t: t.sum(), x)
