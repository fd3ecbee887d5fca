"""Drop-in replacements for ``torch.nn.functional`` that carry LRP relevance.

Every function returns what its torch counterpart returns. Its backward pass
carries relevance instead of a gradient (explicit semantics, RULES.md section 1):
seed it with the value to explain and read the relevance of an input from
``x.grad``::

    import lrpcpp.functional as lf

    x.requires_grad_()
    y = lf.linear_epsilon(x, W, b)
    y.backward(y)
    relevance = x.grad

The ``gi_*`` functions are the exception: they serve the gradient-times-input
semantics (RULES.md section 2), where the backward carries ``R / x``, seeded
with 1, and the relevance of an input is ``x * x.grad``.

The native wrappers are typed and TorchScript-compatible. The generic rules at
the end (:func:`identity`, :func:`epsilon`, :func:`uniform_epsilon`,
:func:`uniform`) wrap arbitrary Python callables and therefore stay in Python.
"""

from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch._jit_internal import BroadcastingList2  # type: ignore[attr-defined]  # made at run time, absent from the stub

from . import _recipes

__all__ = [
    "linear_epsilon",
    "conv2d_epsilon",
    "add2",
    "mul2",
    "matmul",
    "softmax",
    "scaled_dot_product_attention",
    "rms_norm_identity",
    "layer_norm",
    "layer_norm_identity",
    "normalize_identity",
    "mean",
    "silu",
    "gelu",
    "tanh",
    "relu",
    "sigmoid",
    "stop_relevance",
    "gi_identity",
    "gi_grad_scale",
    "gi_layer_norm",
    "stab_div",
    "linear_gamma",
    "linear_alpha_beta",
    "linear_z_plus",
    "linear_z_box",
    "linear_flat",
    "linear_w_square",
    "conv2d_gamma",
    "conv2d_alpha_beta",
    "conv2d_z_plus",
    "conv2d_z_box",
    "conv2d_flat",
    "conv2d_w_square",
    "convolution_epsilon",
    "convolution_gamma",
    "convolution_alpha_beta",
    "convolution_z_plus",
    "convolution_z_box",
    "convolution_flat",
    "convolution_w_square",
    "avg_pool_epsilon",
    "adaptive_avg_pool_epsilon",
    "max_pool_wta",
    "identity",
    "epsilon",
    "uniform_epsilon",
    "uniform",
]


# ----------------------------------------------------------------------------- epsilon rule
def linear_epsilon(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, epsilon: float = 1e-6) -> Tensor:
    """``F.linear`` with the epsilon rule: ``R_x = x * ((R / stab(y)) @ W)`` (AttnLRP Eq. 8)."""
    if not torch.jit.is_scripting():  # keeps x's recipe where it has one (lrpcpp/_recipes.py)
        return _recipes.layer(torch.ops.lrpcpp.linear_epsilon, x, weight, bias, epsilon)
    return torch.ops.lrpcpp.linear_epsilon(x, weight, bias, epsilon)


def conv2d_epsilon(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    epsilon: float = 1e-6,
) -> Tensor:
    """``F.conv2d`` (numeric padding) with the epsilon rule, as :func:`linear_epsilon` over the convolution."""
    if not torch.jit.is_scripting():  # keeps x's recipe where it has one (lrpcpp/_recipes.py)
        return _recipes.layer(
            torch.ops.lrpcpp.conv2d_epsilon, x, weight, bias, stride, padding, dilation, groups, epsilon
        )
    return torch.ops.lrpcpp.conv2d_epsilon(x, weight, bias, stride, padding, dilation, groups, epsilon)


def stab_div(
    relevance: Tensor, z: Tensor, epsilon: float, scale: float = 1.0, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """``relevance / stab(scale * z)`` with the sign-aware stabiliser (no relevance flows through it)."""
    return torch.ops.lrpcpp.stab_div(relevance, z, epsilon, scale, dtype)


# ----------------------------------------------------------------------------- two operands
def add2(a: Tensor, b: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``a + b``; each summand takes relevance in proportion to its value (epsilon rule)."""
    return torch.ops.lrpcpp.add2(a, b, epsilon)


def mul2(a: Tensor, b: Tensor) -> Tensor:
    """``a * b``; relevance split evenly between the operands that require grad (uniform rule)."""
    out = torch.ops.lrpcpp.mul2(a, b)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.mul2, a, b)
    return out


def matmul(a: Tensor, b: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``a @ b`` (at least 2-D, batched, broadcasting); epsilon rule, then an even split (AttnLRP Prop. 3.3)."""
    return torch.ops.lrpcpp.matmul(a, b, epsilon)


# ----------------------------------------------------------------------------- softmax
def softmax(x: Tensor, dim: int, temperature: float = 1.0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.softmax(x / temperature, dim, dtype=dtype)``; Deep Taylor rule with bias (AttnLRP Prop. 3.1)."""
    return torch.ops.lrpcpp.softmax(x, dim, temperature, dtype)


# ----------------------------------------------------------------------------- attention
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    method: str = "attnlrp",
    epsilon: float = 1e-8,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (a drop-in, without dropout: ``dropout_p`` must be 0), fused,
    whose relevance is that of ``matmul(q, kᵀ)`` -> mask -> ``softmax`` -> ``matmul(p, v)`` with the
    explicit rules; the backward keeps only the row log-sum-exp of the softmax, not the ``[T_q, T_k]``
    weights. ``method="cp-lrp"`` holds the attention weights constant (only ``value`` takes relevance)."""
    if dropout_p != 0.0:
        raise ValueError(
            f"lrpcpp.functional.scaled_dot_product_attention: dropout is not supported (LRP explains the "
            f"eval-mode forward), expected dropout_p=0.0, got {dropout_p}"
        )
    return torch.ops.lrpcpp.scaled_dot_product_attention(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, method, epsilon
    )


# ----------------------------------------------------------------------------- normalisation
def rms_norm_identity(
    x: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None, eps: Optional[float] = None
) -> Tensor:
    """RMSNorm (``F.rms_norm``; fp32 arithmetic, cast back before the weight); identity rule (Prop. 3.4)."""
    out = torch.ops.lrpcpp.rms_norm_identity(x, normalized_shape, weight, eps)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.rms_norm_identity, x, normalized_shape, weight, eps)
    return out


def layer_norm(
    x: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    epsilon: float = 1e-6,
) -> Tensor:
    """``F.layer_norm`` with the epsilon rule, the standard deviation treated as a constant."""
    out = torch.ops.lrpcpp.layer_norm(x, normalized_shape, weight, bias, eps, epsilon)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.layer_norm, x, normalized_shape, weight, bias, eps, epsilon)
    return out


def layer_norm_identity(
    x: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` with the identity rule (Prop. 3.4)."""
    out = torch.ops.lrpcpp.layer_norm_identity(x, normalized_shape, weight, bias, eps)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.layer_norm_identity, x, normalized_shape, weight, bias, eps)
    return out


def normalize_identity(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """``F.normalize`` with the identity rule."""
    out = torch.ops.lrpcpp.normalize_identity(x, p, dim, eps)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.normalize_identity, x, p, dim, eps)
    return out


# ----------------------------------------------------------------------------- reductions
def mean(x: Tensor, dim: Optional[List[int]] = None, keepdim: bool = False, epsilon: float = 1e-6) -> Tensor:
    """``torch.mean(x, dim, keepdim)`` with the epsilon rule ``R_x = x * R / stab(sum_dim x)``."""
    return torch.ops.lrpcpp.mean(x, dim, keepdim, epsilon)


# ----------------------------------------------------------------------------- identity rule
def silu(x: Tensor) -> Tensor:
    """``F.silu``; identity rule."""
    out = torch.ops.lrpcpp.silu_identity(x)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.silu_identity, x)
    return out


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu`` (``approximate`` 'none' or 'tanh'); identity rule."""
    out = torch.ops.lrpcpp.gelu_identity(x, approximate)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.gelu_identity, x, approximate)
    return out


def tanh(x: Tensor) -> Tensor:
    """``torch.tanh``; identity rule."""
    out = torch.ops.lrpcpp.tanh_identity(x)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.tanh_identity, x)
    return out


def relu(x: Tensor) -> Tensor:
    """``F.relu`` (never in place); identity rule."""
    out = torch.ops.lrpcpp.relu_identity(x)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.relu_identity, x)
    return out


def sigmoid(x: Tensor) -> Tensor:
    """``torch.sigmoid``; identity rule."""
    out = torch.ops.lrpcpp.sigmoid_identity(x)
    if not torch.jit.is_scripting():  # a layer rule may keep its recipe (lrpcpp/_recipes.py)
        _recipes.leave(out, torch.ops.lrpcpp.sigmoid_identity, x)
    return out


def stop_relevance(x: Tensor) -> Tensor:
    """A copy of ``x`` through which no relevance flows back (the CP-LRP cut)."""
    return torch.ops.lrpcpp.stop_relevance(x)


# ----------------------------------------------------------------------------- gradient-times-input
# RULES.md section 2: here autograd carries the ordinary gradient g = R / x. Seed the
# backward with 1 (``logit.backward()``); the relevance of any x is ``x * x.grad``.


def gi_identity(x: Tensor, y: Tensor, epsilon: float = 1e-10, keep_inputs: bool = False) -> Tensor:
    """``y = f(x)`` itself (a view of it, no copy), any element-wise scaling of ``x`` computed by the
    caller (an activation, an RMSNorm, ``F.normalize`` with the norm held constant), with the identity
    rule in gradient-times-input form: ``g_x = g_y * y / stab(x)``, so that ``x * g_x = y * g_y``.

    ``x`` and ``y`` must have the same shape and device (their dtypes may differ); ``y`` takes no
    gradient, so compute it without one (under ``torch.no_grad()`` or from ``x.detach()``). The factor
    ``y / stab(x)`` is computed in float32 for float16/bfloat16, stored in ``x``'s dtype and clamped to
    its finite range (a float16 factor never becomes ``inf``); it is the only tensor kept for the
    backward pass. With ``keep_inputs=True`` ``x`` and ``y`` are kept instead and the factor is
    computed in the backward (the same values): that keeps no new tensor where the layers before and
    after keep ``x`` and ``y`` anyway (rule layers around an activation, as with a vision preset). The
    output cannot be modified in place (it is a view that a custom autograd function returns).
    """
    return torch.ops.lrpcpp.gi_identity(x, y, epsilon, keep_inputs)


def gi_grad_scale(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` itself (a view of it, no copy) with its gradient scaled: ``g_x = g * scale``.

    ``scale`` broadcasts to ``x`` (a 0-dim tensor, or a vector over the last dimension such as
    ``[0.25] * q + [0.25] * k + [0.5] * v`` for a fused qkv projection); a zero detaches. It
    takes no gradient itself. The output cannot be modified in place (it is a view that a custom
    autograd function returns).
    """
    return torch.ops.lrpcpp.gi_grad_scale(x, scale)


def gi_layer_norm(
    x: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` (bitwise) whose backward treats the standard deviation as a constant:
    ``g_x = rstd * (h - mean(h))`` with ``h = g * weight`` and the mean over the normalised
    dimensions. The weight and bias take no gradient.
    """
    return torch.ops.lrpcpp.gi_layer_norm(x, normalized_shape, weight, bias, eps)


# ----------------------------------------------------------------------------- vision rules
# RULES.md section 3, for z_j = sum_i x_i w_ij + b_j. Each function returns exactly F.linear /
# F.conv2d. ``weight_abs`` (|W|), ``weight_pos`` / ``weight_neg`` (max(W, 0), min(W, 0)) and
# ``weight_sq`` (W**2) are the weight
# transforms the rule multiplies by: pass them computed once (lrpcpp.modules does, cached per
# weight version), or leave them None to have them computed in each backward. ``gi=True`` gives the
# gradient-times-input form: the backward takes the gradient g_y (the relevance being y * g_y) and
# returns g_x with x * g_x the rule's relevance of x.


def linear_gamma(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``F.linear`` with the gamma rule: positive outputs take the numerators
    ``x+ (W + gamma W+) + x- (W + gamma W-)``, negative ones ``x+ (W + gamma W-) + x- (W + gamma W+)``;
    the bias counts as the weight of a constant input +1. ``gamma = 0`` is the epsilon rule."""
    return torch.ops.lrpcpp.linear_gamma(x, weight, bias, gamma, epsilon, weight_abs, gi)


def linear_alpha_beta(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    alpha: float = 2.0,
    beta: float = 1.0,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    weight_neg: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.linear`` with the alpha-beta rule (``alpha - beta = 1``): the positive terms ``(x_i w_ij)+``
    share ``alpha R_j``, the negative ones ``-beta R_j``. The bias takes no part, unless
    ``bias_in_denominator`` (zennit's convention): then ``b+`` joins the sum of the positive terms and
    ``b-`` that of the negative ones, and keeps its share. ``weight_pos`` and ``weight_neg`` are
    ``max(W, 0)`` and ``min(W, 0)``."""
    return torch.ops.lrpcpp.linear_alpha_beta(
        x, weight, bias, alpha, beta, epsilon, weight_pos, weight_neg, gi, bias_in_denominator
    )


def linear_z_plus(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.linear`` with the z-plus rule, the alpha-beta rule with alpha = 1, beta = 0: the positive
    terms ``(x_i w_ij)+`` share ``R_j``, so inputs of both signs stay bounded; for non-negative inputs
    the numerators are ``x_i w_ij+``. The bias takes no part, unless ``bias_in_denominator``
    (zennit's convention): then ``b+`` joins the denominator. ``weight_pos`` is ``max(W, 0)``."""
    return torch.ops.lrpcpp.linear_z_plus(x, weight, bias, epsilon, weight_pos, gi, bias_in_denominator)


def linear_z_box(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lower: Tensor,
    upper: Tensor,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``F.linear`` with the z-box rule for an input bounded by ``lower <= x <= upper`` (tensors
    broadcastable to ``x``): numerators ``x_i w_ij - l_i w_ij+ - h_i w_ij-``. The bias takes no part."""
    return torch.ops.lrpcpp.linear_z_box(x, weight, bias, lower, upper, epsilon, weight_abs, gi)


def linear_flat(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, epsilon: float = 1e-6, gi: bool = False
) -> Tensor:
    """``F.linear`` with the flat rule: every connected input takes an equal share (numerator 1)."""
    return torch.ops.lrpcpp.linear_flat(x, weight, bias, epsilon, gi)


def linear_w_square(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    epsilon: float = 1e-6,
    weight_sq: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.linear`` with the w-square rule: numerators ``w_ij**2``; with ``bias_in_denominator``
    (zennit's convention) ``b_j**2`` joins the denominator."""
    return torch.ops.lrpcpp.linear_w_square(x, weight, bias, epsilon, weight_sq, gi, bias_in_denominator)


def conv2d_gamma(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``F.conv2d`` (numeric padding) with the gamma rule, as :func:`linear_gamma` over the convolution."""
    return torch.ops.lrpcpp.conv2d_gamma(
        x, weight, bias, stride, padding, dilation, groups, gamma, epsilon, weight_abs, gi
    )


def conv2d_alpha_beta(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    alpha: float = 2.0,
    beta: float = 1.0,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    weight_neg: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.conv2d`` with the alpha-beta rule, as :func:`linear_alpha_beta` over the convolution."""
    return torch.ops.lrpcpp.conv2d_alpha_beta(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        alpha,
        beta,
        epsilon,
        weight_pos,
        weight_neg,
        gi,
        bias_in_denominator,
    )


def conv2d_z_plus(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.conv2d`` with the z-plus rule, as :func:`linear_z_plus` over the convolution."""
    return torch.ops.lrpcpp.conv2d_z_plus(
        x, weight, bias, stride, padding, dilation, groups, epsilon, weight_pos, gi, bias_in_denominator
    )


def conv2d_z_box(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lower: Tensor,
    upper: Tensor,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``F.conv2d`` with the z-box rule, as :func:`linear_z_box` over the convolution (padding is not
    an input and takes no relevance)."""
    return torch.ops.lrpcpp.conv2d_z_box(
        x, weight, bias, lower, upper, stride, padding, dilation, groups, epsilon, weight_abs, gi
    )


def conv2d_flat(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    epsilon: float = 1e-6,
    gi: bool = False,
) -> Tensor:
    """``F.conv2d`` with the flat rule, as :func:`linear_flat` over the convolution."""
    return torch.ops.lrpcpp.conv2d_flat(x, weight, bias, stride, padding, dilation, groups, epsilon, gi)


def conv2d_w_square(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: BroadcastingList2[int] = 1,
    padding: BroadcastingList2[int] = 0,
    dilation: BroadcastingList2[int] = 1,
    groups: int = 1,
    epsilon: float = 1e-6,
    weight_sq: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``F.conv2d`` with the w-square rule, as :func:`linear_w_square` over the convolution."""
    return torch.ops.lrpcpp.conv2d_w_square(
        x, weight, bias, stride, padding, dilation, groups, epsilon, weight_sq, gi, bias_in_denominator
    )


# ----------------------------------------------------------------------------- any convolution
# ``torch.convolution``'s arguments: 1 to 3 spatial dimensions (weight and x of 3 to 5 dimensions),
# transposed or not, with stride, padding, dilation and output_padding given per spatial dimension.
# Each returns exactly ``torch.convolution``; the relevance maps back through its transpose (the
# input-gradient of the convolution), with the rule of the conv2d function of the same name.


def convolution_epsilon(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    epsilon: float = 1e-6,
) -> Tensor:
    """``torch.convolution`` with the epsilon rule, as :func:`conv2d_epsilon`."""
    if not torch.jit.is_scripting():  # keeps x's recipe where it has one (lrpcpp/_recipes.py)
        op = torch.ops.lrpcpp.convolution_epsilon
        return _recipes.layer(
            op, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, epsilon
        )
    return torch.ops.lrpcpp.convolution_epsilon(
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, epsilon
    )


def convolution_gamma(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``torch.convolution`` with the gamma rule, as :func:`conv2d_gamma`."""
    return torch.ops.lrpcpp.convolution_gamma(
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, gamma, epsilon, weight_abs, gi
    )


def convolution_alpha_beta(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    alpha: float = 2.0,
    beta: float = 1.0,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    weight_neg: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``torch.convolution`` with the alpha-beta rule, as :func:`conv2d_alpha_beta`."""
    return torch.ops.lrpcpp.convolution_alpha_beta(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        alpha,
        beta,
        epsilon,
        weight_pos,
        weight_neg,
        gi,
        bias_in_denominator,
    )


def convolution_z_plus(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    epsilon: float = 1e-6,
    weight_pos: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``torch.convolution`` with the z-plus rule, as :func:`conv2d_z_plus`."""
    return torch.ops.lrpcpp.convolution_z_plus(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        epsilon,
        weight_pos,
        gi,
        bias_in_denominator,
    )


def convolution_z_box(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lower: Tensor,
    upper: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    epsilon: float = 1e-6,
    weight_abs: Optional[Tensor] = None,
    gi: bool = False,
) -> Tensor:
    """``torch.convolution`` with the z-box rule, as :func:`conv2d_z_box`."""
    return torch.ops.lrpcpp.convolution_z_box(
        x,
        weight,
        bias,
        lower,
        upper,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        epsilon,
        weight_abs,
        gi,
    )


def convolution_flat(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    epsilon: float = 1e-6,
    gi: bool = False,
) -> Tensor:
    """``torch.convolution`` with the flat rule, as :func:`conv2d_flat`."""
    return torch.ops.lrpcpp.convolution_flat(
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, epsilon, gi
    )


def convolution_w_square(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
    epsilon: float = 1e-6,
    weight_sq: Optional[Tensor] = None,
    gi: bool = False,
    bias_in_denominator: bool = False,
) -> Tensor:
    """``torch.convolution`` with the w-square rule, as :func:`conv2d_w_square`."""
    return torch.ops.lrpcpp.convolution_w_square(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        epsilon,
        weight_sq,
        gi,
        bias_in_denominator,
    )


def avg_pool_epsilon(
    x: Tensor,
    kernel_size: List[int],
    stride: Optional[List[int]] = None,
    padding: Optional[List[int]] = None,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
    epsilon: float = 1e-6,
    gi: bool = False,
) -> Tensor:
    """``F.avg_pool1d/2d/3d`` (by the length of ``kernel_size``; ``stride`` ``None`` is the kernel size,
    ``padding`` ``None`` is 0) with the epsilon rule: ``R_x = x * P^T (R / stab(y))``, ``P^T`` the
    pooling's input-gradient (zennit's Norm rule)."""
    return torch.ops.lrpcpp.avg_pool_epsilon(
        x,
        kernel_size,
        [] if stride is None else stride,
        [0] if padding is None else padding,
        ceil_mode,
        count_include_pad,
        divisor_override,
        epsilon,
        gi,
    )


def adaptive_avg_pool_epsilon(x: Tensor, output_size: List[int], epsilon: float = 1e-6, gi: bool = False) -> Tensor:
    """``F.adaptive_avg_pool1d/2d/3d`` (by the length of ``output_size``) with the epsilon rule, as
    :func:`avg_pool_epsilon`."""
    return torch.ops.lrpcpp.adaptive_avg_pool_epsilon(x, output_size, epsilon, gi)


def max_pool_wta(
    x: Tensor,
    kernel_size: List[int],
    stride: Optional[List[int]] = None,
    padding: Optional[List[int]] = None,
    dilation: Optional[List[int]] = None,
    ceil_mode: bool = False,
    gi: bool = False,
) -> Tensor:
    """``F.max_pool1d/2d/3d`` (by the length of ``kernel_size``) winner-takes-all: each window's relevance
    goes to its maximum (torch's choice among ties), as zennit's gradient does. In gradient form the
    result is the plain gradient (the winner's input is the window's output)."""
    return torch.ops.lrpcpp.max_pool_wta(
        x,
        kernel_size,
        [] if stride is None else stride,
        [0] if padding is None else padding,
        [1] if dilation is None else dilation,
        ceil_mode,
        gi,
    )


# ----------------------------------------------------------------------------- generic rules
# These wrap any callable ``fn`` of tensors (LXT's "super-functions"); they are
# Python-level because they must run arbitrary code, and are not scriptable.


def _tensor_positions(args: tuple) -> List[int]:
    return [i for i, a in enumerate(args) if isinstance(a, Tensor)]


class _GenericRule(torch.autograd.Function):
    """Runs ``fn(*args)`` and, backward, applies one of the generic rules to its tensor inputs."""

    @staticmethod
    def forward(ctx, rule: str, eps: float, fn: Callable, positions: List[int], *args):
        ctx.rule, ctx.eps, ctx.fn, ctx.positions = rule, eps, fn, positions
        ctx.save_for_backward(*[args[i] for i in positions])
        ctx.args = tuple(None if i in positions else a for i, a in enumerate(args))  # tensors are saved
        with torch.no_grad():
            out = fn(*args)
        if not isinstance(out, Tensor):
            raise TypeError(f"lrpcpp.functional.{rule}: fn must return one tensor, got {type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs = ctx.saved_tensors
        n = len(inputs)
        rel: List[Optional[Tensor]]
        if ctx.rule in ("identity", "uniform"):
            share = 1.0 if ctx.rule == "identity" else 1.0 / n
            rel = []
            for x in inputs:
                if grad.shape != x.shape:
                    raise RuntimeError(
                        f"lrpcpp.functional.{ctx.rule}: the output {tuple(grad.shape)} and each tensor input "
                        f"{tuple(x.shape)} must have the same shape"
                    )
                rel.append((grad * share).to(x.dtype))
        else:
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in inputs]
                args = list(ctx.args)
                for i, leaf in zip(ctx.positions, leaves):
                    args[i] = leaf
                out = ctx.fn(*args)
                rn = stab_div(grad, out.detach(), ctx.eps)
                vjps = torch.autograd.grad(out, leaves, rn, allow_unused=True)
            share = 1.0 / n if ctx.rule == "uniform_epsilon" else 1.0
            rel = [None if v is None else (x * v * share).to(x.dtype) for x, v in zip(inputs, vjps)]
        full: List[Optional[Tensor]] = [None] * len(ctx.args)
        for i, r in zip(ctx.positions, rel):
            full[i] = r
        return (None, None, None, None, *full)


def _apply_rule(rule: str, eps: float, fn: Callable, args: tuple) -> Tensor:
    if eps < 0:
        raise ValueError(f"lrpcpp.functional.{rule}: expected epsilon >= 0, got {eps}")
    positions = _tensor_positions(args)
    if not positions:
        raise TypeError(f"lrpcpp.functional.{rule}: expected at least one tensor argument")
    return _GenericRule.apply(rule, eps, fn, positions, *args)


def identity(fn: Callable, *args) -> Tensor:
    """``fn(*args)`` with the identity rule: every tensor input gets ``R`` (shapes must match)."""
    return _apply_rule("identity", 0.0, fn, args)


def epsilon(fn: Callable, *args, epsilon: float = 1e-6) -> Tensor:
    """``fn(*args)`` with the epsilon rule ``R_x = x * VJP_fn[R / stab(fn(x))]`` (exact when fn is linear)."""
    return _apply_rule("epsilon", epsilon, fn, args)


def uniform_epsilon(fn: Callable, *args, epsilon: float = 1e-6) -> Tensor:
    """The epsilon rule divided by the number of tensor inputs."""
    return _apply_rule("uniform_epsilon", epsilon, fn, args)


def uniform(fn: Callable, *args) -> Tensor:
    """``fn(*args)``; each of the ``n`` tensor inputs gets ``R / n`` (shapes must match)."""
    return _apply_rule("uniform", 0.0, fn, args)
