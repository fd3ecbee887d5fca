"""The nn.Module drop-ins: same constructor, same forward as torch's module, from_module shares
parameters, relevance equals the functional's, and each one scripts."""

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import pytest
import torch
from torch import nn

# (torch module, lrpcpp class, input shape)
PAIRS = [
    (lambda: nn.Linear(6, 4), lm.LinearEpsilon, (2, 3, 6)),
    (lambda: nn.Linear(6, 4, bias=False), lm.LinearEpsilon, (2, 6)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lm.Conv2dEpsilon, (2, 3, 8, 8)),
    (lambda: nn.Conv2d(3, 4, 3, padding="same"), lm.Conv2dEpsilon, (2, 3, 8, 8)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), lm.Conv2dEpsilon, (2, 3, 8, 8)),
    (lambda: nn.Softmax(dim=-1), lm.SoftmaxDT, (2, 3, 5)),
    (lambda: nn.Softmax(dim=1), lm.SoftmaxDT, (2, 3, 5)),
    (lambda: nn.RMSNorm(6, eps=1e-6), lm.RMSNormIdentity, (2, 3, 6)),
    (lambda: nn.LayerNorm(6), lm.LayerNormEpsilon, (2, 3, 6)),
    (lambda: nn.LayerNorm([3, 6], bias=False), lm.LayerNormEpsilon, (2, 3, 6)),
    (lambda: nn.LayerNorm(6), lm.LayerNormIdentity, (2, 3, 6)),
    (lambda: nn.SiLU(), lm.SiLUIdentity, (3, 6)),
    (lambda: nn.GELU(), lm.GELUIdentity, (3, 6)),
    (lambda: nn.GELU(approximate="tanh"), lm.GELUIdentity, (3, 6)),
    (lambda: nn.Tanh(), lm.TanhIdentity, (3, 6)),
    (lambda: nn.ReLU(), lm.ReLUIdentity, (3, 6)),
    (lambda: nn.Sigmoid(), lm.SigmoidIdentity, (3, 6)),
]
IDS = [
    "linear",
    "linear-nobias",
    "conv",
    "conv-same",
    "conv-reflect",
    "softmax",
    "softmax-dim1",
    "rmsnorm",
    "layernorm-eps",
    "layernorm-2d",
    "layernorm-id",
    "silu",
    "gelu",
    "gelu-tanh",
    "tanh",
    "relu",
    "sigmoid",
]


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("make,cls,shape", PAIRS, ids=IDS)
def test_from_module_shares_parameters_and_matches_forward(make, cls, shape):
    torch_module = randomize(make())
    ours = cls.from_module(torch_module)
    assert isinstance(ours, type(torch_module))
    for (n1, p1), (n2, p2) in zip(torch_module.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert list(ours.state_dict()) == list(torch_module.state_dict())
    x = torch.randn(shape)
    expected = torch_module(x)
    got = ours(x)
    if cls is lm.RMSNormIdentity:
        torch.testing.assert_close(got, expected)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("make,cls,shape", PAIRS, ids=IDS)
def test_modules_script(make, cls, shape):
    ours = cls.from_module(randomize(make()))
    scripted = torch.jit.script(ours)
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), scripted(x2)
    assert torch.equal(y, y2)
    y.backward(y)
    y2.backward(y2)
    assert torch.equal(x.grad, x2.grad)


def test_constructors_match_torch():
    torch.manual_seed(0)
    a = nn.Linear(5, 3)
    torch.manual_seed(0)
    b = lm.LinearEpsilon(5, 3, epsilon=1e-3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert b.epsilon == 1e-3
    assert "epsilon=0.001" in repr(b) and "in_features=5" in repr(b)
    assert lm.Conv2dEpsilon(3, 4, 3, padding=1).padding == (1, 1)
    assert lm.SoftmaxDT(-1, temperature=2.0).temperature == 2.0
    assert lm.LayerNormEpsilon(8, eps=1e-6).eps == 1e-6
    assert lm.GELUIdentity("tanh").approximate == "tanh"


def test_linear_epsilon_module_relevance_is_the_functional_one():
    layer = lm.LinearEpsilon(6, 4, epsilon=1e-4)
    x = torch.randn(3, 6, requires_grad=True)
    y = layer(x)
    y.backward(y)
    x2 = x.detach().clone().requires_grad_()
    y2 = lf.linear_epsilon(x2, layer.weight, layer.bias, 1e-4)
    y2.backward(y2)
    assert torch.equal(x.grad, x2.grad)
    assert layer.weight.grad is None  # parameters take no relevance


def test_from_module_options_and_errors():
    layer = lm.LinearEpsilon.from_module(nn.Linear(3, 2), epsilon=0.5)
    assert layer.epsilon == 0.5
    assert lm.SoftmaxDT.from_module(nn.Softmax(-1), temperature=2.0).temperature == 2.0
    with pytest.raises(TypeError, match="LinearEpsilon.from_module expects a torch.nn.modules.linear.Linear"):
        lm.LinearEpsilon.from_module(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match=r"unknown options \['gamma'\]"):
        lm.LinearEpsilon.from_module(nn.Linear(3, 2), gamma=0.1)
    with pytest.raises(ValueError, match="expected epsilon >= 0"):
        lm.LinearEpsilon(3, 2, epsilon=-1.0)
    with pytest.raises(ValueError, match="expected temperature > 0"):
        lm.SoftmaxDT(-1, temperature=0.0)


def test_softmax_without_dim_uses_torch_legacy_choice():
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning):
        expected = nn.Softmax()(x)
    assert torch.equal(lm.SoftmaxDT()(x), expected)
