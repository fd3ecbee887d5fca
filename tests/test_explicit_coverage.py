"""Every op that ExplicitRules meets with relevance gets a rule, is known to pass relevance on
exactly as its gradient (PASS_THROUGH), or is named in an UnruledOperationWarning: never a silent
gradient. The transposed convolutions take the epsilon rule of a linear map (RULES.md section 1)."""

import warnings

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import assert_relevance_close, needs_redispatch
from lrpcpp.models.explicit import PASS_THROUGH, RULES, ExplicitRules, UnruledOperationWarning
from torch import nn

f64 = torch.float64
EPS = 1e-9


def epsilon_linear_map(f, x, R, eps, y=None):
    """RULES.md section 1 for ``y = f(x) + b`` with f linear: ``R_i = sum_j x_i M_ji R_j / stab(y_j)``,
    M the matrix of f, built column by column from the unit inputs (one item at a time); ``y``: the
    op's own output (with its bias), else ``f(x)``."""
    out = []
    for i, (xb, Rb) in enumerate(zip(x, R)):
        n = xb.numel()
        basis = torch.eye(n, dtype=xb.dtype).reshape(n, *xb.shape)
        M = torch.stack([f(e[None])[0].reshape(-1) for e in basis], dim=1)  # [outputs, inputs]
        yb = M @ xb.reshape(-1) if y is None else y[i].reshape(-1)
        z = xb.reshape(-1)[None, :] * M  # z_ji = M_ji x_i
        out.append((z * (Rb.reshape(-1) / ref.stab(yb, eps))[:, None]).sum(0).reshape(xb.shape))
    return torch.stack(out)


CONV_TRANSPOSE = {
    "1d": (F.conv_transpose1d, (2, 4, 5), (4, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    "2d": (F.conv_transpose2d, (2, 4, 3, 4), (4, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), groups=2)),
    "3d": (F.conv_transpose3d, (1, 2, 2, 3, 2), (2, 3, 2, 2, 2), dict(stride=2, dilation=1)),
}


@pytest.mark.parametrize("dims", sorted(CONV_TRANSPOSE))
def test_conv_transpose_takes_the_epsilon_rule(dims):
    conv, xs, ws, kw = CONV_TRANSPOSE[dims]
    torch.manual_seed(0)
    x, w = torch.randn(xs, dtype=f64), torch.randn(ws, dtype=f64)
    b = torch.randn(ws[1] * kw.get("groups", 1), dtype=f64)
    assert RULES[conv] is not None
    for bias in (None, b):
        leaf = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnruledOperationWarning)
            with ExplicitRules(epsilon=EPS):
                y = conv(leaf, nn.Parameter(w), None if bias is None else nn.Parameter(bias), **kw)
        assert torch.equal(y.detach(), conv(x, w, bias, **kw))
        R = torch.randn_like(y)
        y.backward(R)
        want = epsilon_linear_map(lambda t: conv(t, w, None, **kw), x, R, EPS, y=y.detach())
        assert_relevance_close(leaf.grad, want, f64)


@pytest.mark.parametrize("dims", sorted(CONV_TRANSPOSE))
def test_conv_transpose_without_bias_conserves(dims):
    conv, xs, ws, kw = CONV_TRANSPOSE[dims]
    torch.manual_seed(1)
    x = torch.randn(xs, dtype=f64).requires_grad_()
    w = nn.Parameter(torch.randn(ws, dtype=f64))
    with ExplicitRules(epsilon=1e-12):
        y = conv(x, w, None, **kw)
    y.backward(y.detach())
    torch.testing.assert_close(x.grad.flatten(1).sum(1), y.detach().flatten(1).sum(1), rtol=1e-8, atol=1e-10)


def test_a_module_with_conv_transpose_is_explained_without_a_warning():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2, bias=False),
    ).double()
    x = torch.randn(2, 3, 3, 3, dtype=f64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        with ExplicitRules(epsilon=1e-12):
            y = model(x)
    y.backward(y.detach())
    torch.testing.assert_close(x.grad.flatten(1).sum(1), y.detach().sum(1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("Tensor.exp", lambda x: x.exp()),
        ("torch.cumsum", lambda x: torch.cumsum(x, -1)),
        ("Tensor.pow", lambda x: x.pow(2)),
        pytest.param(
            "torch._C._nn.upsample_linear1d",
            lambda x: F.interpolate(x[None], scale_factor=2.0, mode="linear")[0],
            marks=needs_redispatch,
        ),
        ("Tensor.prod", lambda x: x.prod(-1)),
    ],
)
def test_an_op_without_a_rule_is_named_in_a_warning(name, fn):
    x = torch.randn(3, 4, dtype=f64).requires_grad_()
    with pytest.warns(UnruledOperationWarning, match=rf"{name} has no explicit LRP rule.*plain gradient"):
        with ExplicitRules():
            fn(x)


def test_no_warning_without_relevance():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        with ExplicitRules():
            torch.randn(3, 4).exp()  # no grad
            with torch.no_grad():
                torch.randn(3, 4, requires_grad=True).exp()
            nn.Parameter(torch.randn(3)).exp()  # parameters carry no relevance
            torch.randn(3, 4, requires_grad=True).argmax(-1)  # no relevance-carrying result


@needs_redispatch
def test_the_pass_through_ops_and_dropout_do_not_warn():
    x = torch.randn(2, 3, 4, dtype=f64).requires_grad_()

    def ops(t):
        parts = [
            t.view(6, 4),
            t.reshape(-1),
            t.transpose(0, 1),
            t.permute(2, 0, 1),
            t[0].T,
            t.mT,
            t[..., 1:],
            t.flatten(1),
            t.unsqueeze(0).squeeze(0),
            t.expand(2, 2, 3, 4),
            t.contiguous(),
            t.to(torch.float32),
            t.float(),
            torch.cat([t, t]),
            torch.stack([t, t]),
            *t.split(2, -1),
            *t.chunk(2, 0),
            t.masked_fill(t > 0, 0.0),
            torch.where(t > 0, t, 0.0),
            t.gather(-1, torch.zeros(2, 3, 1, dtype=torch.long)),
            F.pad(t, (1, 1)),
            F.max_pool1d(t, 2),
            t.topk(2, -1).values,
            t.repeat_interleave(2, 0),
            t.clone(),
            t.roll(1, -1),
            t.flip(-1),
            t.tril(),
            F.dropout(t, 0.5, training=True),
        ]
        return sum(p.sum() for p in parts)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        with ExplicitRules():
            ops(x).backward()
    assert len(PASS_THROUGH) > 50
