"""The operation level's quick path: a call that keeps its ordinary gradient (a view, a transpose,
an addition, a linear map) whose relevance-carrying arguments need no checks runs at once, without
the mode's whole scan of its arguments. The same relevance and coverage as through the whole scan,
on whole models and where an argument does need its checks: the output of a custom
autograd.Function, a tensor computed from parameters, a gate of CP-LRP."""

import functional_model
import lrpcpp
import pytest
import torch
from lrpcpp.models.operations import UnruledOperationWarning
from lrpcpp.models.operations import mode as mode_module
from models import build, inputs
from test_operation_level import _Twice  # (x * 2, gradient g * 2)
from torch import nn

f64 = torch.float64


@pytest.fixture
def quick(monkeypatch):
    """``quick.on``: whether the quick path may be taken; ``quick.taken``: each answer it got."""

    class State:
        on, taken = True, []

    answer = mode_module._plain_carriers

    def asked(args, kwargs):
        result = State.on and answer(args, kwargs)
        State.taken.append(result)
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
    # (CP-LRP marks gates, which every call is asked about: the whole scan)
    assert taken > 0 if method == "attnlrp" else taken == 0


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
