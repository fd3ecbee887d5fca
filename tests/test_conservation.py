"""Conservation: sum of input relevance equals the relevance that arrived, where the rule conserves
(RULES.md section 1, last column); the softmax bias term where it does not."""

import lrpcpp.functional as lf
import pytest
import torch


def leaf(*shape, offset=0.0):
    return (torch.randn(*shape, dtype=torch.float64) + offset).requires_grad_()


def total(*tensors):
    return sum(float(t.grad.sum()) for t in tensors)


def close(a, b, rel=1e-6):
    a, b = (float(v.detach()) if isinstance(v, torch.Tensor) else v for v in (a, b))
    assert abs(a - b) <= rel * max(1.0, abs(b)), (a, b)


def test_linear_without_bias_conserves():
    x, w = leaf(4, 10), torch.randn(6, 10, dtype=torch.float64)
    y = lf.linear_epsilon(x, w, None, 1e-9)
    y.backward(y)
    close(total(x), y.sum())


def test_linear_bias_absorbs_its_share():
    x, w, b = leaf(4, 10), torch.randn(6, 10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = lf.linear_epsilon(x, w, b, 1e-9)
    y.backward(y)
    close(total(x), (y - b).sum())


def test_conv2d_without_bias_conserves():
    x, w = leaf(2, 3, 8, 8), torch.randn(5, 3, 3, 3, dtype=torch.float64)
    y = lf.conv2d_epsilon(x, w, None, 1, 1, 1, 1, 1e-9)
    y.backward(y)
    close(total(x), y.sum())


@pytest.mark.parametrize("b_shape", [(4, 5), (5,)])
def test_add2_conserves(b_shape):
    a, b = leaf(4, 5), leaf(*b_shape)
    y = lf.add2(a, b, 1e-12)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(a, b), R.sum())


@pytest.mark.parametrize("b_grad", [True, False])
def test_mul2_conserves(b_grad):
    a, b = leaf(4, 5), leaf(4, 5).requires_grad_(b_grad)
    y = lf.mul2(a, b)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(a, b) if b_grad else total(a), R.sum())


@pytest.mark.parametrize("b_grad", [True, False])
def test_matmul_conserves(b_grad):
    a, b = leaf(2, 3, 4, 6), leaf(6, 5).requires_grad_(b_grad)
    y = lf.matmul(a, b, 1e-12)
    y.backward(y)
    close(total(a, b) if b_grad else total(a), y.sum())


def test_layer_norm_without_bias_conserves():
    x, w = leaf(3, 16, offset=1.0), torch.randn(16, dtype=torch.float64)
    y = lf.layer_norm(x, [16], w, None, 1e-5, 1e-12)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(x), R.sum())


def test_layer_norm_with_bias_keeps_sum_y_minus_b_over_y():
    x, w, b = leaf(3, 16, offset=1.0), torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    y = lf.layer_norm(x, [16], w, b, 1e-5, 1e-12)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(x), ((y - b) * R / y).sum())


@pytest.mark.parametrize("dim", [None, [1], [0, 2]])
def test_mean_conserves(dim):
    x = leaf(3, 4, 5, offset=0.5)
    y = lf.mean(x, dim, epsilon=1e-12)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(x), R.sum())


@pytest.mark.parametrize(
    "op",
    [
        lf.silu,
        lf.gelu,
        lf.tanh,
        lf.relu,
        lf.sigmoid,
        lambda x: lf.rms_norm_identity(x, [6]),
        lambda x: lf.layer_norm_identity(x, [6]),
        lambda x: lf.normalize_identity(x, 2.0, -1),
    ],
)
def test_identity_rule_conserves(op):
    x = leaf(4, 6)
    y = op(x)
    R = torch.randn_like(y)
    y.backward(R)
    close(total(x), R.sum())


def test_softmax_seeded_with_its_output_puts_everything_in_the_bias():
    # R = s: R - s * sum(R) = s - s * 1 = 0, so all relevance goes to the bias term
    x = leaf(3, 7)
    s = lf.softmax(x, -1)
    s.backward(s)
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-12, rtol=0)


def test_softmax_bias_term():
    # sum R_x = sum x'R - sum_rows (sum x's) (sum R): the bias term absorbs the rest, and the
    # total relevance does not change when a constant is added to every logit of a row
    x, R = leaf(3, 7), torch.randn(3, 7, dtype=torch.float64)
    s = lf.softmax(x, -1)
    s.backward(R)
    expected = (x * R).sum() - ((x * s).sum(-1) * R.sum(-1)).sum()
    close(total(x), expected)
    shifted = (x.detach() + 5.0).requires_grad_()
    lf.softmax(shifted, -1).backward(R)
    close(float(shifted.grad.sum()), total(x))
    assert abs(total(x) - R.sum()) > 1e-3  # it does not conserve, by design
