"""Torch functions at the operation level of gradient mode, checked against float64 transcriptions of
RULES.md section 2: an element-wise function of one carrier takes the identity rule (``g_x = g_y f(x) /
stab(x)``); rearrangements and selections keep their own gradient; normalisers and step functions are
held constant; a product of carriers splits its relevance (evenly with AttnLRP)."""

import math
import types

import lrpcpp
import pytest
import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-10  # the operation level's default stabiliser of the identity rule


def _method(name):
    """``h.name()``."""
    return lambda h: getattr(h, name)()


def _times(step):
    """``h * step(h)``."""
    return lambda h: h * step(h)


# torch.X and Tensor.X, on inputs in (2, 4), where each is defined and not flat
_ELEMENTWISE = ["erf", "erfc", "expm1", "exp2", "log", "log1p", "log2", "log10", "sin", "cos", "atan", "sinh", "asinh"]
_ELEMENTWISE += ["tan", "cosh", "acosh", "sinc", "lgamma", "digamma", "frac"]
_SPECIAL = ["erf", "erfc", "expm1", "exp2", "log1p", "expit", "sinc", "psi", "gammaln"]  # (expit: the sigmoid)
# and on inputs in (0.3, 0.7)
_ON_THE_UNIT_INTERVAL = ["asin", "acos", "atanh", "logit", "erfinv"]
_SLOPE = torch.tensor([0.25], dtype=torch.float64)  # (a parameter of PReLU's)
# spelling -> (the function as the model calls it, the shift of its inputs, whether the identity rule
# differs from its own gradient: not for an activation of the form y = f'(x) x, as relu is)
_IDENTITY = {
    **{f"torch.{n}": (getattr(torch, n), 3.0, True) for n in _ELEMENTWISE},
    **{f"Tensor.{n}": (_method(n), 3.0, True) for n in _ELEMENTWISE},
    **{f"torch.special.{n}": (getattr(torch.special, n), 3.0, True) for n in _SPECIAL},
    **{f"torch.{n}": (getattr(torch, n), 0.5, True) for n in _ON_THE_UNIT_INTERVAL},
    **{f"torch.special.{n}": (getattr(torch.special, n), 0.5, True) for n in ("logit", "erfinv")},
    # remainders of a constant divisor, and a constant's power (an exponential)
    "torch.fmod": (lambda h: torch.fmod(h, 0.7), 3.0, True),
    "Tensor.remainder": (lambda h: h.remainder(0.7), 3.0, True),
    "Tensor.__mod__": (lambda h: h % 0.7, 3.0, True),
    "torch.pow of a constant base": (lambda h: torch.pow(1.5, h), 3.0, True),
    "F.prelu": (lambda h: F.prelu(h, _SLOPE), 0.0, False),
    "F.rrelu": (lambda h: F.rrelu(h, training=False), 0.0, False),
    "F.hardshrink": (lambda h: F.hardshrink(h, 0.3), 0.0, False),
    "F.threshold": (lambda h: F.threshold(h, 0.3, -1.0), 0.0, True),
    "F.softshrink": (lambda h: F.softshrink(h, 0.3), 0.0, True),
}


def _stab(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class _Stepped(nn.Module):
    """A linear map (into (2, 4) with ``shift`` 3, into (0.3, 0.7) with 0.5, around 0 with 0), a step,
    a linear map, summed over the sequence."""

    def __init__(self, step, shift=3.0):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.a.weight.mul_(2.0 if not shift else 0.2 if shift >= 1 else 0.04)
            self.a.bias.fill_(shift)
        self.step = step

    def forward(self, inputs_embeds):
        return self.b(self.step(self.a(inputs_embeds))).sum(1)


def _relevance(model, x, target, step):
    """x * the gradient of model's output at ``target`` where ``step`` (a function of the first linear
    map's output, returning a tensor of its value whose gradient is the rule's) replaces the model's step."""
    x = x.clone().requires_grad_()
    out = model.b(step(model.a(x))).sum(1)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return x * grad


def _identity_rule(f):
    """``f(h)`` (its value exactly) with the identity rule's gradient ``g f(h) / stab(h)``."""

    def step(h):
        y = f(h).detach()
        return y + (h - h.detach()) * (y / _stab(h)).detach()

    return step


@pytest.mark.parametrize("spelling", sorted(_IDENTITY))
def test_an_element_wise_function_takes_the_identity_rule(spelling):
    f, shift, differs = _IDENTITY[spelling]
    torch.manual_seed(0)
    model = _Stepped(f, shift).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled[_name(f, x)] == 1
    want = _relevance(model, x, got.target, _identity_rule(f))
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-14)
    plain = _relevance(model, x, got.target, f)
    scale = torch.maximum(got.relevance.abs().max(), plain.abs().max())
    assert ((got.relevance - plain).abs().max() > 1e-2 * scale) == differs  # the rule or the own gradient


@pytest.mark.parametrize("name", ["erfc", "log", "sin", "tanh", "exp", "frac", "abs"])
def test_an_element_wise_function_in_place_has_the_rule_of_its_out_of_place_spelling(name):
    torch.manual_seed(0)
    model = _Stepped(lambda h: getattr(h * 1, name + "_")()).double()
    reference = _Stepped(lambda h: getattr(h * 1, name)()).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations", strict=True)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-15)
    assert torch.equal(got.output, want.output)


def _name(f, x):
    """The coverage's name of the one function ``f`` calls (as the mode spells it)."""
    names = []

    class _Names(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(lrpcpp.models.tracking.op_name(func))
            return func(*args, **(kwargs or {}))

    with _Names():
        f(x)
    (name,) = names
    return name


def test_abs_keeps_its_own_gradient_which_is_the_identity_rule():
    torch.manual_seed(0)
    model = _Stepped(torch.abs).double()
    with torch.no_grad():
        model.a.bias.zero_()  # inputs of both signs
        model.a.weight.mul_(5.0)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.passed["torch.abs"] == 1
    torch.testing.assert_close(got.relevance, _relevance(model, x, got.target, torch.abs), rtol=1e-12, atol=0)
    want = _relevance(model, x, got.target, _identity_rule(torch.abs))
    torch.testing.assert_close(got.relevance, want, rtol=1e-6, atol=1e-14)  # (|h| / stab(h) from 1)


class _WrittenOutGelu(nn.Module):
    """An MLP whose GELU is written out with erf (ESM's ``gelu`` function)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, inputs_embeds):
        h = self.a(inputs_embeds)
        return self.b(h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))).sum(1)


def test_a_gelu_written_out_with_erf_splits_its_product_and_takes_the_identity_rule_on_erf():
    torch.manual_seed(0)
    model = _WrittenOutGelu().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.unruled == {}

    def rule(h):  # (h / 2) * (1 + erf(h / sqrt 2)): a product of two carriers, each with half its gradient
        p, w = h * 0.5, h / math.sqrt(2.0)
        u = 1.0 + _identity_rule(torch.erf)(w)
        return 0.5 * (p * u.detach() + p.detach() * u)

    want = _relevance(model, x, got.target, rule)
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-14)


def _windows_summed_back(h):
    """[N, C, L, 1]: the windows of two positions, each summed back where it came from."""
    return F.fold(F.unfold(h, (2, 1)), h.shape[2:], (2, 1))


# rearrangements and selections: the model is linear (piecewise, with selections), so the gradient-mode
# relevance is the input times the plain gradient, and it conserves the output without biases
_REARRANGED = {
    "Tensor.as_strided": lambda h: h.as_strided((h.shape[0], 3, 2, 6), (h.stride(0), 6, 6, 1)).sum(2),
    "Tensor.unfold": lambda h: h.unfold(1, 2, 1).sum(-1),
    "F.unfold and F.fold": lambda h: _windows_summed_back(h.transpose(1, 2)[..., None])[..., 0].transpose(1, 2),
    "Tensor.real of an FFT": lambda h: torch.fft.fft(h, dim=1).real,
    "Tensor.imag of an FFT": lambda h: torch.fft.fft(h, dim=1).imag,
    "torch.real of an FFT": lambda h: torch.real(torch.fft.fft(h, dim=1)),
    # the aten operators of Tensor.T, .mT, .H and .mH (torch.compile passes the attributes so to a torch
    # function mode from torch 2.14 on), each twice
    "the aten operators of Tensor.T, .mT, .H, .mH": lambda h: torch.stack(
        [
            torch.ops.aten.matrix_H(torch.ops.aten.matrix_H(torch.ops.aten.numpy_T(torch.ops.aten.numpy_T(t))))
            for t in torch.ops.aten.mH(torch.ops.aten.mH(torch.ops.aten.mT(torch.ops.aten.mT(h))))
        ]
    ),
    # selections and permutations (with max and min's rule: the selected value takes all)
    "Tensor.sort": lambda h: h.sort(-1).values,
    "torch.msort": lambda h: torch.msort(h.transpose(0, 1)).transpose(0, 1),  # (each item's rows sorted)
    "torch.kthvalue": lambda h: torch.kthvalue(h, 2, 1, keepdim=True).values,
    "Tensor.median": lambda h: h.median(1, keepdim=True).values,
    "torch.nanmedian": lambda h: torch.nanmedian(h, 1, keepdim=True).values,
    "torch.cummax": lambda h: torch.cummax(h, 1).values,
    "Tensor.cummin": lambda h: h.cummin(1).values,
    "torch.masked_select": lambda h: torch.masked_select(h, _EVERY_OTHER_ROW).reshape(h.shape[0], 2, 6),
    "Tensor.narrow_copy": lambda h: h.narrow_copy(1, 1, 2),
    "torch.nan_to_num": torch.nan_to_num,
    "F.pixel_shuffle and F.pixel_unshuffle": lambda h: F.pixel_unshuffle(F.pixel_shuffle(h[..., None], 2), 2)[..., 0],
    "torch.channel_shuffle": lambda h: torch.channel_shuffle(h, 2),
    "torch.diff": lambda h: torch.diff(h, dim=1, prepend=h[:, :1]),
    # (constant weights of the order statistics around a quantile; a sign copied onto a magnitude; sums)
    "torch.quantile": lambda h: torch.quantile(h, 0.3, dim=1, keepdim=True),
    "Tensor.nanquantile": lambda h: h.nanquantile(0.6, dim=1, keepdim=True),
    "torch.copysign": lambda h: torch.copysign(h, h.flip(1)),
    "torch.trapezoid": lambda h: torch.trapezoid(h, dim=1)[:, None],
    "torch.cumulative_trapezoid": lambda h: torch.cumulative_trapezoid(h, dim=1),
    "Tensor.nanmean": lambda h: h.nanmean(1, keepdim=True),
    "torch.aminmax": lambda h: torch.aminmax(h, dim=1, keepdim=True).max,
    "torch.complex": lambda h: torch.view_as_real(torch.complex(h, h.flip(1)))[..., 0],
    "Tensor.cumsum_": lambda h: (h * 1).cumsum_(1),
}
_EVERY_OTHER_ROW = torch.tensor([True, False, True, False])[None, :, None].expand(2, 4, 6)


# the same, where the rule depends on the arguments: scattered sums, means and maxima (a place's values
# reduced; their product has no rule), an interpolation at constant points (at carrying points, none)
_PLACES = torch.tensor([0, 1, 0, 1])[None, :, None].expand(2, 4, 6)
_BAGS = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
_BAGS = torch.cat([_BAGS, _BAGS + 4])  # (the rows of two items of 4 rows each)
_POINTS = torch.linspace(-0.9, 0.9, 2 * 4 * 6 * 2, dtype=torch.float64).reshape(2, 4, 6, 2)
_ARGUMENTS = {
    **{
        f"Tensor.scatter_reduce {r}": (lambda h, r=r: torch.zeros_like(h).scatter_reduce(1, _PLACES, h, r))
        for r in ("sum", "mean", "amax", "amin")
    },
    "torch.grid_sampler": lambda h: F.grid_sample(h[:, None], _POINTS, align_corners=False)[:, 0],
    # (the sums, means and maxima of bags of rows of a table that carries relevance, each item's rows
    # bagged apart: one call)
    **{
        f"torch.nn.functional.embedding_bag {m}": (
            lambda h, m=m: F.embedding_bag(_BAGS, h.flatten(0, 1), mode=m).view_as(h)
        )
        for m in ("sum", "mean", "max")
    },
    "torch.embedding_bag": (  # (ids in one row, each bag from its offset: 0, 2, 4, ...; 0 is the mode "sum")
        lambda h: torch.embedding_bag(h.flatten(0, 1), _BAGS.flatten(), torch.arange(0, 16, 2), False, 0)[0].view_as(h)
    ),
}


@pytest.mark.parametrize("spelling", sorted(_REARRANGED) + sorted(_ARGUMENTS))
def test_a_linear_rearrangement_keeps_its_own_gradient(spelling):
    torch.manual_seed(0)
    model = _Stepped({**_REARRANGED, **_ARGUMENTS}[spelling]).double()
    with torch.no_grad():
        model.a.bias.zero_()
        model.b.bias.zero_()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    # (passed as exact, or ruled by their arguments)
    assert got.coverage.unruled == {}
    assert got.coverage.ruled == ({spelling.split(" ")[0]: 1} if spelling in _ARGUMENTS else {})
    torch.testing.assert_close(got.relevance, _relevance(model, x, got.target, model.step), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)


_NO_RULE = {
    "Tensor.scatter_reduce": lambda h: torch.ones_like(h).scatter_reduce(1, _PLACES, h, "prod"),
    "torch.grid_sampler": lambda h: F.grid_sample(
        h[:, None], torch.tanh(h[..., None].expand(2, 4, 6, 2)), align_corners=False
    )[:, 0],
}


@pytest.mark.parametrize("name", sorted(_NO_RULE))
def test_a_call_whose_arguments_have_no_rule_is_unruled(name):
    # (a product of the scattered values; an interpolation at points that carry relevance)
    model = _Stepped(_NO_RULE[name]).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"{name} has no gradient-mode rule"):
        lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)


def test_no_rule_table_holds_an_attribute_descriptor():
    # torch.compile cannot compare an attribute's descriptor (Tensor.real) with another key of a table
    # that a traced forward looks a function up in: the tables hold its getter (Tensor.real.__get__)
    from lrpcpp.models.operations import handlers

    tables = (handlers.RULES, handlers.EXACT, handlers.GATES, handlers.ELEMENTWISE, handlers.KEEPS_GATE)
    assert not [f for table in tables for f in table if isinstance(f, types.GetSetDescriptorType)]
    assert torch.Tensor.real.__get__ in handlers.EXACT


class _Windowed(nn.Module):
    """Attention weights taken in overlapping windows of two rows, each window times the values."""

    def __init__(self, windows):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.windows = windows

    def forward(self, inputs_embeds):
        weights = torch.softmax(self.q(inputs_embeds) @ self.k(inputs_embeds).mT, -1)  # [B, 4, 4]
        windows = self.windows(weights)  # [B, 3, 2, 4]: rows i and i + 1
        return self.o((windows @ self.v(inputs_embeds)[:, None]).sum(2)).sum(1)


_WINDOWS = {
    "Tensor.as_strided": lambda a: a.as_strided((a.shape[0], 3, 2, 4), (a.stride(0), 4, 4, 1)),
    "Tensor.unfold": lambda a: a.unfold(1, 2, 1).transpose(-1, -2),
}


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("spelling", sorted(_WINDOWS))
def test_attention_weights_in_windows_stay_a_gate(spelling, method):
    # the same windows as narrow slices stacked (views, through which a gate stays one): CP-LRP holds
    # the weights constant in their product with the values either way
    torch.manual_seed(0)
    model = _Windowed(_WINDOWS[spelling]).double()
    sliced = _Windowed(lambda a: torch.stack([a.narrow(1, i, 2) for i in range(3)], 1)).double()
    sliced.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", method=method, strict=True)
    want = lrpcpp.attribute(sliced, inputs_embeds=x, level="operations", method=method, strict=True)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-15)
    if method == "cp-lrp":  # (the gate matters: AttnLRP splits the product's relevance instead)
        other = lrpcpp.attribute(sliced, inputs_embeds=x, level="operations", method="attnlrp")
        assert (want.relevance - other.relevance).abs().max() > 1e-3


# functions whose result is held constant: normalisers (distances, hypotenuses, running softmax
# denominators) and step functions (whose gradient is zero wherever it exists)
_HELD = {
    "torch.cdist": lambda h: h / (torch.cdist(h, h)[..., :1] + 1.0),
    "torch.hypot": lambda h: h / torch.hypot(h, 2 * h),
    "torch.logcumsumexp": lambda h: h - torch.logcumsumexp(h, -1),
    "torch.logaddexp": lambda h: h - torch.logaddexp(h, h.flip(-1)),
    "torch.dist": lambda h: h / (torch.dist(h, h.flip(-1)) + 1.0),
    "F.pairwise_distance": lambda h: h / (F.pairwise_distance(h, h.flip(-1), keepdim=True) + 1.0),
    "torch.angle": _times(torch.angle),
    **{f"torch.{n}": _times(getattr(torch, n)) for n in ("sign", "sgn", "round", "floor")},
    **{f"Tensor.{n}": _times(_method(n)) for n in ("ceil", "trunc", "fix")},
    "torch.heaviside": lambda h: h * torch.heaviside(h, _HALF),
}
_HALF = torch.tensor(0.5, dtype=torch.float64)


@pytest.mark.parametrize("spelling", sorted(_HELD))
def test_a_normaliser_or_a_step_function_is_held_constant(spelling):
    torch.manual_seed(0)
    f = _HELD[spelling]
    model = _Stepped(f, 0.0).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    held = _HeldConstant()
    with held:
        want = _relevance(model, x, got.target, f)
    assert held.calls == 1
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("spelling", ["torch.renorm", "Tensor.renorm"])
def test_renorm_holds_its_scale_constant(spelling):
    # each slice along dim 1 scaled by maxnorm / (norm + 1e-7) where its norm exceeds maxnorm: a
    # normaliser, its factor held constant (the slices' norms here lie on both sides of 4.5)
    torch.manual_seed(0)
    renorm = torch.renorm if spelling == "torch.renorm" else torch.Tensor.renorm
    model = _Stepped(lambda h: renorm(h, 2, 1, 4.5), 0.0).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled == {spelling: 1}

    def held(h):
        norm = h.detach().norm(2, dim=(0, 2), keepdim=True)
        assert (norm > 4.5).any() and (norm < 4.5).any()
        return h * torch.where(norm > 4.5, 4.5 / (norm + 1e-7), 1.0)

    with torch.no_grad():
        assert torch.equal(got.output, model(x).gather(1, got.target[:, None])[:, 0])  # torch's own value
    torch.testing.assert_close(got.relevance, _relevance(model, x, got.target, held), rtol=1e-10, atol=1e-14)


class _HeldConstant(torch.overrides.TorchFunctionMode):
    """Detaches the result of the one call of a held function (the reference's step)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = lrpcpp.models.tracking.op_name(func).rpartition(".")[2]
        if (
            name
            in ("cdist", "hypot", "logcumsumexp", "logaddexp", "dist", "pairwise_distance", "angle", "heaviside")
            + _STEPS
        ):
            self.calls += 1
            return out.detach()
        return out


_STEPS = ("sign", "sgn", "round", "floor", "ceil", "trunc", "fix")


class _Pair(nn.Module):
    """Two linear maps of the input (without biases), a function of both, summed to one value per item
    (its two classes: the value and twice it)."""

    def __init__(self, f, width=6):
        super().__init__()
        self.a, self.c = nn.Linear(3, width, bias=False), nn.Linear(3, width, bias=False)
        self.f = f

    def forward(self, inputs_embeds):
        z = self.f(self.a(inputs_embeds), self.c(inputs_embeds)).flatten(1).sum(1)
        return torch.stack([z, 2 * z], -1)


def _per_item(product):
    """``product`` of each item's h and g, stacked: a product of vectors keeps the batch."""
    return lambda h, g: torch.stack([product(a, b) for a, b in zip(h, g)])


def _halves(product):
    """``product(h, g)`` with each factor's gradient halved (AttnLRP's uniform rule), its value exactly."""
    return lambda h, g: 0.5 * (product(h, g.detach()) + product(h.detach(), g))


def _cosine(h, g):
    """The cosine similarity of the last dim with the norms held constant (factors split evenly)."""
    n1, n2 = (t.norm(dim=-1, keepdim=True).detach() for t in (h, g))
    return _halves(lambda a, b: ((a / n1) * (b / n2)).sum(-1))(h, g)


def _glu(h, g):
    """F.glu's rule: the identity rule on the sigmoid, the product split evenly."""
    a, b = h.chunk(2, -1)
    return _halves(torch.mul)(a, _identity_rule(torch.sigmoid)(b))


_W = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
# spelling -> (the function of two carriers as the model calls it, its rule as a reference)
_PRODUCTS = {
    "F.cosine_similarity": (lambda h, g: F.cosine_similarity(h, g, dim=-1), _cosine),
    "torch.tensordot": (
        lambda h, g: torch.tensordot(h, g, ([2], [2])),
        _halves(lambda h, g: torch.tensordot(h, g, ([2], [2]))),
    ),
    "F.bilinear": (lambda h, g: F.bilinear(h, g, _W), _halves(lambda h, g: F.bilinear(h, g, _W))),
    # (products of vectors, item by item: a row of h and a row of g; a matrix and a vector)
    "torch.outer": (
        _per_item(lambda h, g: torch.outer(h[0], g[1])),
        _halves(_per_item(lambda h, g: h[0, :, None] * g[1])),
    ),
    "Tensor.kron": (
        _per_item(lambda h, g: h[0].kron(g[1])),
        _halves(_per_item(lambda h, g: (h[0, :, None] * g[1]).flatten())),
    ),
    "torch.mv": (_per_item(lambda h, g: torch.mv(h, g[0])), _halves(_per_item(lambda h, g: h @ g[0]))),
    "Tensor.dot": (
        _per_item(lambda h, g: h[0].dot(g[1])[None]),
        _halves(_per_item(lambda h, g: (h[0] * g[1]).sum(0, True))),
    ),
    "torch.inner": (lambda h, g: torch.inner(h, g), _halves(lambda h, g: torch.einsum("ijd,kld->ijkl", h, g))),
    # (complex numbers made of both, as rotary embeddings written with complex numbers have them)
    "complex Tensor.__mul__": (
        lambda h, g: torch.view_as_real(torch.complex(h, g) * torch.complex(g, h)),
        lambda h, g: torch.view_as_real(_halves(torch.mul)(torch.complex(h, g), torch.complex(g, h))),
    ),
    "torch.linalg.vecdot": (lambda h, g: torch.linalg.vecdot(h, g), _halves(lambda h, g: (h * g).sum(-1))),
    "torch.linalg.cross": (
        lambda h, g: torch.linalg.cross(h[..., :3], g[..., :3]),
        _halves(lambda h, g: torch.linalg.cross(h[..., :3], g[..., :3])),
    ),
    "F.glu": (lambda h, g: F.glu(h * 0.1 + g, -1), lambda h, g: _glu(h * 0.1 + g, g)),
    "torch.lerp": (
        lambda h, g: torch.lerp(h, g, torch.sigmoid(h)),
        lambda h, g: h + _halves(torch.mul)(_identity_rule(torch.sigmoid)(h), g - h),
    ),
    "torch.addcdiv": (lambda h, g: torch.addcdiv(h, g, h.abs() + 1.0), lambda h, g: h + g / (h.abs() + 1.0).detach()),
    # (a table's rows summed with per-sample weights, both carrying relevance)
    "F.embedding_bag": (
        _per_item(lambda h, g: F.embedding_bag(_BAGS[:4], h, per_sample_weights=g[:4, :2], mode="sum")),
        _halves(_per_item(lambda h, g: F.embedding_bag(_BAGS[:4], h, per_sample_weights=g[:4, :2], mode="sum"))),
    ),
}


@pytest.mark.parametrize("spelling", sorted(_PRODUCTS))
def test_a_product_of_two_carriers_splits_its_relevance(spelling):
    f, rule = _PRODUCTS[spelling]
    torch.manual_seed(0)
    model, reference = _Pair(f).double(), _Pair(rule).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    with torch.no_grad():
        assert torch.equal(got.output, model(x).gather(1, got.target[:, None])[:, 0])  # torch's own value
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reference(x).gather(1, got.target[:, None]).sum(), x)
    torch.testing.assert_close(got.relevance, x.detach() * grad, rtol=1e-10, atol=1e-14)


def test_a_product_of_n_carriers_gives_each_a_share_of_one_nth():
    # bias-free, the product of the six features is homogeneous of degree 6 in the input: with each
    # factor's gradient scaled by 1/6 the relevance sums to the output
    torch.manual_seed(0)
    model = _Pair(lambda h, g: h.prod(-1) + torch.prod(g, -1)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled == {"Tensor.prod": 1, "torch.prod": 1}
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:torch.chain_matmul is deprecated")  # (still a spelling models use)
def test_a_chain_of_matrix_products_gives_each_carrying_factor_its_share():
    # h g^T h (item 0's first three rows) and h h^T h (item 1's): three carrying factors, a third of the
    # gradient each; a matrix's square: two factors of the same matrix, half each. Bias-free and
    # homogeneous, so each item's relevance sums to its output
    torch.manual_seed(0)
    model = _Pair(
        lambda h, g: (
            torch.stack(
                [
                    torch.linalg.multi_dot([h[0, :3], g[0, :3].mT, h[0, :3]]),
                    torch.chain_matmul(h[1, :3], h[1, :3].T, h[1, :3]),
                ]
            )[..., :3]
            + torch.linalg.matrix_power(h[:, :3, :3], 2)
        )
    ).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    ruled = {"torch._C._linalg.linalg_multi_dot": 1, "torch.functional.chain_matmul": 1}  # (as torch names them)
    assert got.coverage.ruled == {**ruled, "torch._C._linalg.linalg_matrix_power": 1}
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)


def test_a_cumulative_product_gives_each_factor_of_each_output_its_share():
    # y_j = x_0 ... x_j has j + 1 factors: with y_j's gradient scaled by 1 / (j + 1) each output's
    # relevance is split among its factors, so (bias-free, homogeneous) the relevance sums to the output
    torch.manual_seed(0)
    model = _Pair(lambda h, g: torch.cumprod(h, -1) + g.cumprod(dim=1) + h.cumprod(1, dtype=torch.float64)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled == {"torch.cumprod": 1, "Tensor.cumprod": 2}
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)

    def shared(y, dim):  # RULES.md section 2, a product's gradient divided by its number of factors
        n = y.shape[dim]
        scale = 1.0 / torch.arange(1, n + 1, dtype=y.dtype).reshape([n if d == dim % 3 else 1 for d in range(3)])
        return y * scale + (y - y * scale).detach()

    reference = _Pair(
        lambda h, g: shared(torch.cumprod(h, -1), -1) + shared(g.cumprod(1), 1) + shared(h.cumprod(1), 1)
    ).double()
    reference.load_state_dict(model.state_dict())
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reference(x).gather(1, got.target[:, None]).sum(), x)
    torch.testing.assert_close(got.relevance, x.detach() * grad, rtol=1e-10, atol=1e-14)


def test_an_output_that_no_relevance_reaches_has_zero_relevance_and_a_warning():
    # every path from the input passes a divisor, held constant: the explained value carries no relevance
    model = _Stepped(lambda h: torch.reciprocal(h.abs() + 1.0)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    for level, target in (("operations", None), ("operations", [0, 1])):
        with pytest.warns(UserWarning, match="the explained value carries no relevance from the inputs"):
            got = lrpcpp.attribute(model, inputs_embeds=x, level=level, target=target)
        assert got.relevance.shape == ((2,) if target else ()) + x.shape and not got.relevance.any()


class _Wrapped(nn.Module):
    """A linear map into 8 features, ``body`` (on [batch, seq, 8]), a linear map, summed over the sequence."""

    def __init__(self, body):
        super().__init__()
        self.a, self.body, self.b = nn.Linear(3, 8), body, nn.Linear(8, 2)

    def forward(self, inputs_embeds):
        y = self.body(self.a(inputs_embeds))
        return self.b(y[0] if isinstance(y, tuple) else y).sum(1)


class _Channels(nn.Module):
    """``m`` on [batch, 8, seq]."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.transpose(1, 2)).transpose(1, 2)


class _SelfAttending(nn.Module):
    """``m(x, x)``: a decoder layer or a whole nn.Transformer attending to its own input."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, x)


def _torch_nn_modules():
    layer = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return {
        "nn.TransformerEncoderLayer": nn.TransformerEncoderLayer(**layer),
        "nn.TransformerDecoderLayer": _SelfAttending(nn.TransformerDecoderLayer(**layer)),
        "nn.Transformer": _SelfAttending(nn.Transformer(num_encoder_layers=1, num_decoder_layers=1, **layer)),
        "nn.Bilinear": _SelfAttending(nn.Bilinear(8, 8, 8)),
        "nn.GLU": nn.Sequential(nn.GLU(), nn.Linear(4, 8)),
        "nn.PReLU, nn.Mish, nn.Hardswish": nn.Sequential(nn.PReLU(), nn.Mish(), nn.Hardswish()),
        "nn.RMSNorm": nn.RMSNorm(8),
        "nn.GroupNorm": _Channels(nn.GroupNorm(2, 8)),
        "nn.LocalResponseNorm": _Channels(nn.LocalResponseNorm(2)),
        "nn.Upsample": _Channels(nn.Upsample(scale_factor=2)),
        "nn.AdaptiveMaxPool1d": _Channels(nn.AdaptiveMaxPool1d(3)),
        "nn.EmbeddingBag": _PerSampleWeights(nn.EmbeddingBag(10, 8, mode="sum")),
    }


class _PerSampleWeights(nn.Module):
    """``bag`` (an nn.EmbeddingBag) of constant ids weighted per sample by the input's first feature."""

    def __init__(self, bag):
        super().__init__()
        self.bag = bag

    def forward(self, x):
        ids = torch.arange(x.shape[0] * x.shape[1]).view(x.shape[:2]) % self.bag.num_embeddings
        return x + self.bag(ids, per_sample_weights=x[..., 0])[:, None]


@pytest.mark.parametrize("name", sorted(_torch_nn_modules()))
def test_torch_nn_modules_are_ruled_call_by_call(name):
    torch.manual_seed(0)
    model = _Wrapped(_torch_nn_modules()[name]).double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.unruled == {} and got.coverage.seen > 0
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


class _Many(nn.Module):
    """Calls of several rules together: a renormalisation, bags of a carrying table with and without
    carrying per-sample weights (both spellings), a cumulative product, a clamp with carrying bounds,
    a chain of matrix products, a scattered maximum, a product of complex numbers."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(3, 6), nn.Linear(3, 6)

    def forward(self, x):
        h, g = self.a(x), self.c(x)
        bags = F.embedding_bag(_BAGS[:4], h[0], per_sample_weights=g[0, :4, :2], mode="sum").sum()
        bags = bags + torch.embedding_bag(h[1], _BAGS[:4].flatten(), torch.arange(0, 8, 2), False, 2)[0].sum()
        y = torch.renorm(h, 2, 1, 1.0) + torch.cumprod(torch.tanh(h), 1) + torch.clamp(h, min=-g.abs(), max=g.abs())
        w = torch.linalg.multi_dot([h[0, :3], g[0, :3].mT, h[0, :3]]).sum()
        w = w + torch.zeros_like(h).scatter_reduce(1, torch.zeros_like(h, dtype=torch.long), h, "amax").sum()
        c = torch.view_as_real(torch.complex(h, g) * torch.complex(g, h)).sum()
        return y.sum((1, 2)) + bags + w + c


def test_the_rules_compile_fullgraph_to_the_relevance_of_the_eager_forward():
    torch.manual_seed(0)
    model = _Many().double().requires_grad_(False).eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch._dynamo.reset()
    with lrpcpp.patch(model, level="operations", strict=True) as handle:
        leaf = x.clone().requires_grad_()
        (eager,) = torch.autograd.grad(model(leaf).sum(), leaf)
        assert handle.coverage.unruled == {} and len(handle.coverage.ruled) >= 8
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        leaf = x.clone().requires_grad_()
        (got,) = torch.autograd.grad(compiled(leaf).sum(), leaf)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(leaf).sum(), leaf)
    assert not torch.allclose(eager, plain)  # (the rules changed the gradient)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-14)
