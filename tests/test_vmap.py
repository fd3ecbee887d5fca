"""Batching rules of the gradient-times-input backward ops (used for K targets in one pass)."""

import lrpcpp  # noqa: F401
import pytest
import torch

ops = torch.ops.lrpcpp


@pytest.mark.parametrize("factor_batched", [False, True])
@pytest.mark.parametrize("factor_shape", [(3, 4), (4,), ()])
def test_scale_backward_batched_equals_loop(factor_batched, factor_shape):
    grads = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    factors = torch.randn((5,) + factor_shape, dtype=torch.float64)
    if factor_batched:
        out = torch.vmap(lambda g, f: ops.gi_scale_backward(g, f, torch.float64))(grads, factors)
        expected = torch.stack([ops.gi_scale_backward(g, f, torch.float64) for g, f in zip(grads, factors)])
    else:
        out = torch.vmap(lambda g: ops.gi_scale_backward(g, factors[0], torch.float64))(grads)
        expected = torch.stack([ops.gi_scale_backward(g, factors[0], torch.float64) for g in grads])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("in_dims", [(0, None), (1, None), (0, 0)])
def test_layer_norm_backward_batched_equals_loop(in_dims):
    s = torch.rand(2, 3, 1, dtype=torch.float64) + 0.5  # the forward's 1 / sigma per row
    w = torch.randn(6, dtype=torch.float64)
    grads = torch.randn(4, 2, 3, 6, dtype=torch.float64)
    ss = torch.rand(4, 2, 3, 1, dtype=torch.float64) + 0.5 if in_dims[1] == 0 else s
    batched = grads.movedim(0, in_dims[0])
    out = torch.vmap(lambda g, r: ops.gi_layer_norm_backward(g, r, [6], w), in_dims=in_dims)(batched, ss)
    expected = torch.stack(
        [ops.gi_layer_norm_backward(g, ss[i] if in_dims[1] == 0 else s, [6], w) for i, g in enumerate(grads)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
