"""The operation level's quick path: a call whose arguments that require grad all carry relevance
and need no checks (a view, a transpose, an addition, a linear map, a layer norm, an attention, a
product of two carriers) goes to its rule at once, without the mode's whole scan of its arguments.
The same relevance and coverage as through the whole scan, on whole models with AttnLRP and CP-LRP
(whose rules ask each call about gates), and where an argument does need its checks: the output of a
custom autograd.Function (also in a list or given by keyword), a tensor computed from parameters."""

import functional_model
import lrpcpp
import pytest
import torch
import torch.nn.functional as F
from lrpcpp.models.operations import UnruledOperationWarning
from lrpcpp.models.operations import mode as mode_module
from models import build, inputs
from test_operation_level import _Twice  # (x * 2, gradient g * 2)
from torch import nn

f64 = torch.float64


@pytest.fixture
def quick(monkeypatch):
    """``quick.on``: whether the quick path may be taken (else every call takes the whole scan);
    ``quick.taken``: each answer that sent a call with relevance-carrying arguments on it."""

    class State:
        on, taken = True, []

    answer = mode_module._plain_carriers

    def asked(args, kwargs):
        result = answer(args, kwargs) if State.on else None
        State.taken.append(result is True)
        return result

    monkeypatch.setattr(mode_module, "_plain_carriers", asked)
    return State


def _both(quick, run):
    """``run()`` with the quick path and with every call through the whole scan (first: the quick path
    asks the kinds of the functions that the whole scan has seen)."""
    quick.on = False
    whole = run()
    quick.on, quick.taken = True, []
    fast = run()
    return fast, whole, sum(quick.taken)


def _same(fast, whole):
    assert torch.equal(fast.relevance, whole.relevance)
    assert torch.equal(fast.output, whole.output)
    assert fast.coverage == whole.coverage


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit", "functional"])
def test_the_quick_path_gives_what_the_whole_scan_gives(family, method, quick):
    if family == "functional":
        model, kw = functional_model.build(), {"input_ids": functional_model.inputs()[0]}
    else:
        model, kw = build(family), inputs(family)
    fast, whole, taken = _both(quick, lambda: lrpcpp.attribute(model, method=method, level="operations", **kw))
    _same(fast, whole)
    assert fast.coverage.unruled == {}
    assert taken > 0


class _Checked(nn.Module):
    """A custom Function's output, viewed and transposed before anything else reads it; another one
    added to a carrier; a tensor computed from a parameter that a relevance carrier is added to in
    place, then multiplied by one (the parameters left requiring grad: a patch, not an attribute
    call, which freezes them)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=f64)
        self.offset = nn.Parameter(torch.randn(4, dtype=f64))

    def forward(self, x):
        h = _Twice.apply(self.lin(x)).view(2, 3, 4).transpose(1, 2).transpose(1, 2)
        h = h + _Twice.apply(x)  # a custom Function's output as the second argument
        buf = self.offset * torch.ones(2, 3, 4, dtype=f64)  # computed from a parameter: no carrier
        buf.add_(h)  # now it carries relevance: a product of two carriers below
        return (buf * h).sum()


def test_arguments_that_need_their_checks_take_the_whole_scan(quick):
    torch.manual_seed(0)
    model = _Checked()
    x = torch.randn(2, 3, 4, dtype=f64)

    def run():
        leaf = x.clone().requires_grad_()
        with lrpcpp.patch(model, level="operations") as handle, pytest.warns(UnruledOperationWarning):
            out = model(leaf)
            (grad,) = torch.autograd.grad(out, leaf)
            return grad, handle.coverage

    (g_fast, c_fast), (g_whole, c_whole), taken = _both(quick, run)
    assert torch.equal(g_fast, g_whole) and c_fast == c_whole
    assert [n for n in c_fast.unruled if "_Twice" in n] == list(c_fast.unruled) and sum(c_fast.unruled.values()) == 2
    assert c_fast.ruled["Tensor.mul"] == 1  # the product of the two carriers
    assert taken > 0  # (the final sum)


class _Ruled(nn.Module):
    """Calls with a rule whose arguments need no checks: a layer norm given its shape as a tuple,
    an attention given its mask by keyword, concatenations of lists of carriers, a product of two
    carriers."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4, dtype=f64)
        self.mask = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])

    def forward(self, x):
        h = F.layer_norm(x, (4,), self.norm.weight, self.norm.bias)
        a = F.scaled_dot_product_attention(h[None], x[None], x[None], attn_mask=self.mask)[0]
        return (torch.cat([a, h], dim=-1) * torch.cat([x, x], dim=-1)).sum()


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_calls_with_a_rule_take_the_quick_path(method, quick):
    torch.manual_seed(0)
    model = _Ruled()
    x = torch.randn(3, 4, dtype=f64)

    def run():
        leaf = x.clone().requires_grad_()
        with lrpcpp.patch(model, level="operations", method=method) as handle:
            (grad,) = torch.autograd.grad(model(leaf), leaf)
            return grad, handle.coverage

    (g_fast, c_fast), (g_whole, c_whole), taken = _both(quick, run)
    assert torch.equal(g_fast, g_whole) and c_fast == c_whole
    assert {"torch.nn.functional.layer_norm", "torch._C._nn.scaled_dot_product_attention", "Tensor.mul"} <= set(
        c_fast.ruled
    )
    assert taken >= 5  # (the norm, the attention, the two concatenations and the product at least)


def test_the_quick_path_looks_into_lists_and_keywords():
    """Every tensor that requires grad must be a plain carrier, wherever it is among the arguments."""
    carrier = torch.randn(3, requires_grad=True) * 1
    custom = _Twice.apply(carrier)
    parameter = nn.Parameter(torch.randn(3))
    mask = torch.ones(3, dtype=torch.bool)
    ask = mode_module._plain_carriers
    assert ask((carrier, [carrier, 3], (4,)), {"attn_mask": mask, "scale": 0.5}) is True
    assert ask(([mask, carrier], 0), None) is True  # (a concatenation's list)
    assert ask((mask, [mask], (4,)), {"weight": mask}) is False  # nothing requires grad: made as it is
    assert ask((carrier, [carrier, custom]), None) is None  # in a list
    assert ask((carrier, (parameter,)), None) is None  # a parameter in a tuple
    assert ask((carrier,), {"weight": custom}) is None  # by keyword
    assert ask((carrier,), {"weight": parameter}) is None
    assert ask((custom, carrier), None) is None
    with torch.no_grad():
        assert ask((carrier,), None) is None  # (a forward without grad: the whole scan)
        assert ask((mask,), None) is None
