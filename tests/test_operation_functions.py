"""Element-wise functions and rearrangements at the operation level of gradient mode, checked against
float64 transcriptions of RULES.md section 2: an element-wise function of one carrier takes the
identity rule (``g_x = g_y f(x) / stab(x)``), a linear rearrangement keeps its own gradient."""

import math
import types

import lrpcpp
import pytest
import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-10  # the operation level's default stabiliser of the identity rule

# torch.X and Tensor.X, on inputs in (2, 4), where each is defined and not flat
_ELEMENTWISE = ["erf", "erfc", "expm1", "exp2", "log", "log1p", "log2", "log10", "sin", "cos", "atan", "sinh", "asinh"]


def _stab(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class _Stepped(nn.Module):
    """A linear map into (2, 4), a step, a linear map, summed over the sequence."""

    def __init__(self, step):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.a.weight.mul_(0.2)
            self.a.bias.fill_(3.0)
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


@pytest.mark.parametrize("owner", ["torch", "Tensor"])
@pytest.mark.parametrize("name", _ELEMENTWISE)
def test_an_element_wise_function_takes_the_identity_rule(name, owner):
    f = getattr(torch, name) if owner == "torch" else (lambda h: getattr(h, name)())
    torch.manual_seed(0)
    model = _Stepped(f).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.ruled[_name(f, x)] == 1
    want = _relevance(model, x, got.target, _identity_rule(getattr(torch, name)))
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-14)
    plain = _relevance(model, x, got.target, f)
    scale = torch.maximum(got.relevance.abs().max(), plain.abs().max())
    assert (got.relevance - plain).abs().max() > 1e-2 * scale  # the rule is not the function's own gradient


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


# linear rearrangements: the model is linear, so the gradient-mode relevance is the input times the
# plain gradient, and it conserves the output without biases
_REARRANGED = {
    "Tensor.as_strided": lambda h: h.as_strided((h.shape[0], 3, 2, 6), (h.stride(0), 6, 6, 1)).sum(2),
    "Tensor.unfold": lambda h: h.unfold(1, 2, 1).sum(-1),
    "F.unfold and F.fold": lambda h: _windows_summed_back(h.transpose(1, 2)[..., None])[..., 0].transpose(1, 2),
    "Tensor.real of an FFT": lambda h: torch.fft.fft(h, dim=1).real,
    "Tensor.imag of an FFT": lambda h: torch.fft.fft(h, dim=1).imag,
    "torch.real of an FFT": lambda h: torch.real(torch.fft.fft(h, dim=1)),
}


@pytest.mark.parametrize("spelling", sorted(_REARRANGED))
def test_a_linear_rearrangement_keeps_its_own_gradient(spelling):
    torch.manual_seed(0)
    model = _Stepped(_REARRANGED[spelling]).double()
    with torch.no_grad():
        model.a.bias.zero_()
        model.b.bias.zero_()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    assert got.coverage.unruled == {} and got.coverage.ruled == {}
    torch.testing.assert_close(got.relevance, _relevance(model, x, got.target, model.step), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-10, atol=1e-12)


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
