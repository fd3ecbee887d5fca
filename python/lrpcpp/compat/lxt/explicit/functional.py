"""LXT's ``lxt.explicit.functional`` (LXT 2.1): the same names and parameters, computed by
:mod:`lrpcpp.functional`. Seed the backward with the value to explain; relevance arrives in ``.grad``.

``inplace`` is accepted wherever LXT has it and changes nothing: lrpcpp never overwrites the
relevance arriving at an output. Where the rules deliberately differ from LXT's, see
:mod:`lrpcpp.compat.lxt`.
"""

from typing import List, Optional, Sequence, Union

import torch
import torch.fx
from torch import Tensor

from lrpcpp import functional as _lrp

__all__ = [
    "add2",
    "softmax",
    "linear_epsilon",
    "matmul",
    "rms_norm_identity",
    "mul2",
    "mean",
    "layer_norm",
    "normalize",
]


def _check_inplace(name: str, inplace: object) -> None:
    if not isinstance(inplace, bool):
        raise TypeError(f"lrpcpp.compat.lxt {name}: expected inplace to be a bool, got {type(inplace).__name__}")


@torch.fx.wrap
def add2(input_a: Tensor, input_b: Tensor, inplace: bool = False, epsilon: float = 1e-8) -> Tensor:
    """``input_a + input_b`` with the epsilon rule: :func:`lrpcpp.functional.add2`."""
    _check_inplace("add2", inplace)
    return _lrp.add2(input_a, input_b, epsilon)


@torch.fx.wrap
def softmax(
    input: Tensor, dim: int, dtype: Optional[torch.dtype] = None, temperature: float = 1.0, inplace: bool = False
) -> Tensor:
    """``F.softmax(input / temperature, dim, dtype=dtype)`` with the Deep Taylor rule:
    :func:`lrpcpp.functional.softmax` (which takes ``temperature`` before ``dtype``)."""
    _check_inplace("softmax", inplace)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"lrpcpp.compat.lxt softmax: expected temperature to be a number, got {type(temperature).__name__} "
            "(the signature is softmax(input, dim, dtype=None, temperature=1.0, inplace=False))"
        )
    return _lrp.softmax(input, dim, float(temperature), dtype)


@torch.fx.wrap
def linear_epsilon(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, epsilon: float = 1e-6) -> Tensor:
    """``F.linear`` with the epsilon rule: :func:`lrpcpp.functional.linear_epsilon`."""
    return _lrp.linear_epsilon(input, weight, bias, epsilon)


@torch.fx.wrap
def matmul(input_a: Tensor, input_b: Tensor, inplace: bool = False, epsilon: float = 1e-8) -> Tensor:
    """``input_a @ input_b``, the epsilon rule then an even split: :func:`lrpcpp.functional.matmul`."""
    _check_inplace("matmul", inplace)
    return _lrp.matmul(input_a, input_b, epsilon)


@torch.fx.wrap
def rms_norm_identity(hidden_states: Tensor, weight: Tensor, variance_epsilon: float) -> Tensor:
    """RMSNorm over the last dimension with the identity rule: :func:`lrpcpp.functional.rms_norm_identity`."""
    return _lrp.rms_norm_identity(hidden_states, [hidden_states.shape[-1]], weight, variance_epsilon)


@torch.fx.wrap
def mul2(input_a: Union[Tensor, float], input_b: Union[Tensor, float], inplace: bool = False) -> Tensor:
    """``input_a * input_b`` with the uniform rule: :func:`lrpcpp.functional.mul2`. As in LXT, either
    factor may be a Python number (a constant: the other factor gets all the relevance)."""
    _check_inplace("mul2", inplace)
    like = input_a if isinstance(input_a, Tensor) else input_b
    if not isinstance(like, Tensor):
        raise TypeError(
            f"lrpcpp.compat.lxt mul2: expected at least one tensor, got {type(input_a).__name__} "
            f"and {type(input_b).__name__}"
        )
    a, b = (
        t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=like.dtype, device=like.device)
        for t in (input_a, input_b)
    )
    return _lrp.mul2(a, b)


@torch.fx.wrap
def mean(x: Tensor, dim: Union[int, Sequence[int]], keep_dim: bool, epsilon: float = 1e-6) -> Tensor:
    """``x.mean(dim, keep_dim)`` with the epsilon rule: :func:`lrpcpp.functional.mean`."""
    dims: List[int] = [dim] if isinstance(dim, int) else list(dim)
    return _lrp.mean(x, dims, keep_dim, epsilon)


@torch.fx.wrap
def layer_norm(
    hidden_states: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], variance_epsilon: float
) -> Tensor:
    """LayerNorm over the last dimension with the epsilon rule (epsilon 1e-6, as LXT's), the standard
    deviation held constant: :func:`lrpcpp.functional.layer_norm`."""
    return _lrp.layer_norm(hidden_states, [hidden_states.shape[-1]], weight, bias, variance_epsilon, 1e-6)


@torch.fx.wrap
def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: None = None) -> Tensor:
    """``F.normalize`` with the identity rule: :func:`lrpcpp.functional.normalize_identity`. As in LXT,
    ``out`` is not supported."""
    if out is not None:
        raise ValueError("lrpcpp.compat.lxt normalize: the out argument is not supported; pass out=None")
    return _lrp.normalize_identity(input, p, dim, eps)
