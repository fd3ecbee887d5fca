"""LXT's ``lxt.efficient.rules`` (LXT 2.1), gradient times input: the backward carries ``R / x``,
seeded with 1, and the relevance of ``x`` is ``x * x.grad``. Computed by lrpcpp's ``gi_*`` operators
(:func:`lrpcpp.functional.gi_identity`, :func:`lrpcpp.functional.gi_grad_scale`)."""

from typing import Callable

import torch
from torch import Tensor

from lrpcpp import functional as _lrp

__all__ = ["identity_rule_implicit", "divide_gradient", "stop_gradient"]


def identity_rule_implicit(fn: Callable[[Tensor], Tensor], input: Tensor) -> Tensor:
    """``fn(input)`` for an element-wise ``fn`` (an activation), with the identity rule:
    ``g_input = g * fn(input) / stab(input)``."""
    with torch.no_grad():
        output = fn(input)
    if not isinstance(output, Tensor) or output.shape != input.shape:
        raise ValueError(
            "lrpcpp.compat.lxt identity_rule_implicit: fn must return one tensor of the input's shape "
            f"{tuple(input.shape)}, got {tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
        )
    return _lrp.gi_identity(input, output)


def divide_gradient(input: Tensor, factor: float = 2) -> Tensor:
    """A copy of ``input`` whose gradient is divided by ``factor`` (the uniform rule for a product of
    ``factor`` operands)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor == 0:
        raise ValueError(f"lrpcpp.compat.lxt divide_gradient: expected factor to be a nonzero number, got {factor!r}")
    return _lrp.gi_grad_scale(input, torch.tensor(1.0 / factor, dtype=input.dtype, device=input.device))


def stop_gradient(input: Tensor) -> Tensor:
    """``input.detach()``: no relevance flows back (the CP-LRP cut)."""
    return input.detach()
