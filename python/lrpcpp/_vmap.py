"""Batching rules (``torch.vmap``) for the backward ops of gradient-times-input attribution.

``lrpcpp.attribute`` with K targets runs one backward pass over a [K]-batched seed
(``torch.autograd.grad(..., is_grads_batched=True)``). Without a batching rule, vmap would call
each backward op K times; with these, the gradient carries the K dim and the op runs once.
"""

import torch

_ops = torch.ops.lrpcpp


def _front(t, bdim):
    """``t`` with its batch dim first (``None`` when not batched)."""
    return t if bdim is None else t.movedim(bdim, 0)


@torch.library.register_vmap("lrpcpp::gi_scale_backward")
def _scale_backward(info, in_dims, grad, factor, dtype):
    grad_dim, factor_dim = in_dims[0], in_dims[1]
    grad, factor = _front(grad, grad_dim), _front(factor, factor_dim)
    if factor_dim is not None:
        if grad_dim is None:
            grad = grad.expand((factor.shape[0],) + tuple(grad.shape))
        # align the batch dims of both before broadcasting the rest from the right
        factor = factor.reshape((factor.shape[0],) + (1,) * (grad.dim() - factor.dim()) + tuple(factor.shape[1:]))
    # an unbatched factor broadcasts against the batched grad from the right
    return _ops.gi_scale_backward(grad, factor, dtype), 0


@torch.library.register_vmap("lrpcpp::gi_layer_norm_backward")
def _layer_norm_backward(info, in_dims, grad, rstd, normalized_shape, weight):
    if in_dims[3] is not None:
        raise NotImplementedError("lrpcpp: vmap over the weight of gi_layer_norm_backward is not supported")
    grad, rstd = _front(grad, in_dims[0]), _front(rstd, in_dims[1])
    size = info.batch_size
    if in_dims[0] is None:
        grad = grad.expand((size,) + tuple(grad.shape))
    if in_dims[1] is None:
        rstd = rstd.expand((size,) + tuple(rstd.shape))
    return _ops.gi_layer_norm_backward(grad, rstd, normalized_shape, weight), 0
