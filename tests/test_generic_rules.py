"""The Python-level generic rules (identity, epsilon, uniform_epsilon, uniform) that wrap any function."""

import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F

f64 = torch.float64


def leaf(*shape):
    return torch.randn(*shape, dtype=f64, requires_grad=True)


def test_epsilon_on_a_linear_function_is_exact_epsilon_lrp():
    x, w, b = leaf(3, 6), torch.randn(4, 6, dtype=f64), torch.randn(4, dtype=f64)
    y = lf.epsilon(F.linear, x, w, b, epsilon=1e-6)
    assert torch.equal(y, F.linear(x.detach(), w, b))
    R = torch.randn_like(y)
    y.backward(R)
    torch.testing.assert_close(x.grad, ref.linear_epsilon(x.detach(), w, b, R, 1e-6))


def test_uniform_epsilon_divides_by_the_number_of_tensor_inputs():
    a, b = leaf(3, 4), leaf(4, 5)
    y = lf.uniform_epsilon(torch.matmul, a, b, epsilon=1e-9)
    R = torch.randn_like(y)
    y.backward(R)
    # for a bilinear f, x * VJP[R / f] of each operand is the full epsilon share; halved here
    rn = R / ref.stab(a.detach() @ b.detach(), 1e-9)
    torch.testing.assert_close(a.grad, a.detach() * (rn @ b.detach().T) / 2)
    torch.testing.assert_close(b.grad, b.detach() * (a.detach().T @ rn) / 2)


def test_identity_and_uniform():
    x = leaf(3, 4)
    y = lf.identity(torch.exp, x)
    R = torch.randn_like(y)
    y.backward(R)
    assert torch.equal(x.grad, R)
    a, b = leaf(3, 4), leaf(3, 4)
    y = lf.uniform(torch.maximum, a, b)
    y.backward(R)
    torch.testing.assert_close(a.grad, R / 2)
    torch.testing.assert_close(b.grad, R / 2)


def test_non_tensor_arguments_pass_through():
    x = leaf(2, 6)
    y = lf.epsilon(torch.sum, x, 1)
    y.backward(y)
    torch.testing.assert_close(x.grad.sum(-1), y.detach(), rtol=1e-5, atol=1e-8)


def test_generic_rule_errors():
    with pytest.raises(ValueError, match="expected epsilon >= 0"):
        lf.epsilon(torch.exp, leaf(2), epsilon=-1.0)
    with pytest.raises(TypeError, match="expected at least one tensor argument"):
        lf.identity(lambda: torch.ones(2))
    y = lf.identity(lambda t: t.sum(-1), leaf(2, 3))
    with pytest.raises(RuntimeError, match="must have the same shape"):
        y.backward(y)
