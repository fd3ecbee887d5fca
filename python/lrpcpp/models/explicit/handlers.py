"""The per-operation handlers of the explicit rules, and :data:`RULES`, the table that maps each
torch function to its handler."""

import functools
import inspect
import math
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ... import functional as lf
from ..tracking import RuleMode, carries, const, epsilon_rule, inplace_form, operand, pass_to

_REDUCED = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- handlers
# A handler is called as handler(rules, func, *args, **kwargs) with the arguments of the torch call
# (for a Tensor method, the tensor itself first), once at least one argument carries relevance.
# It returns the result, or NotImplemented to run the call unchanged (unsupported arguments).


def _sum2(rules: RuleMode, a: Any, b: Any) -> Tensor:
    """``a + b``, tensors or numbers: add2's epsilon rule; a constant summand absorbs its share."""
    if not (carries(a) or carries(b)):
        return const(a) + const(b)
    like = a if carries(a) else b
    dtype = torch.result_type(a, b)
    return lf.add2(operand(a, dtype, like), operand(b, dtype, like), rules.epsilon)


def _scaled(x: Any, c: Any) -> Any:
    """``x * c`` for a constant ``c``; the identity rule when ``x`` carries relevance."""
    if isinstance(c, (int, float)) and c == 1:
        return x
    if carries(x):
        return pass_to(x, lambda: torch.mul(x, c))
    return const(x) * c


def _add(rules, func, input, other, *, alpha=1, out=None):
    if out is not None:
        return NotImplemented
    return _sum2(rules, input, _scaled(other, alpha))


def _sub(rules, func, input, other, *, alpha=1, out=None):
    if out is not None:
        return NotImplemented
    return _sum2(rules, input, _scaled(other, -alpha))


def _rsub(rules, func, input, other, *, alpha=1, out=None):
    # other - alpha * input
    if out is not None:
        return NotImplemented
    return _sum2(rules, other, _scaled(input, -alpha))


def _mul(rules, func, input, other, *, out=None):
    if out is not None:
        return NotImplemented
    if carries(input) and carries(other):
        dtype = torch.result_type(input, other)
        return lf.mul2(operand(input, dtype, input), operand(other, dtype, input))
    receiver = input if carries(input) else other
    return pass_to(receiver, lambda: func(input, other))


def _div(rules, func, input, other, *, rounding_mode=None, out=None):
    # the numerator takes the relevance; a relevance-carrying denominator is held constant (when
    # only the denominator carries relevance, the quotient is an element-wise function of it)
    if out is not None or rounding_mode is not None:
        return NotImplemented
    receiver = input if carries(input) else other
    return pass_to(receiver, lambda: func(input, other))


def _rdiv(rules, func, input, other):
    # Tensor.__rdiv__(self, other) is other / self
    receiver = other if carries(other) else input
    return pass_to(receiver, lambda: func(input, other))


def _neg(rules, func, input, *, out=None):
    if out is not None:
        return NotImplemented
    return pass_to(input, lambda: func(input))


def _matmul(rules, func, input, other, *, out=None):
    if out is not None or not isinstance(input, Tensor) or not isinstance(other, Tensor):
        return NotImplemented
    a, b = const(input), const(other)
    if a.dim() == 0 or b.dim() == 0:
        return NotImplemented
    a_vec, b_vec = a.dim() == 1, b.dim() == 1
    if a_vec:
        a = a.unsqueeze(0)
    if b_vec:
        b = b.unsqueeze(-1)
    y = lf.matmul(a, b, rules.epsilon)
    if b_vec:
        y = y.squeeze(-1)
    if a_vec:
        y = y.squeeze(-1 if b_vec else -2)
    return y


def _rmatmul(rules, func, input, other):
    return _matmul(rules, func, other, input)


def _mm(rules, func, input, mat2, *, out=None):
    return _matmul(rules, func, input, mat2, out=out)


def _einsum(rules, func, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        return NotImplemented
    args = (equation, *operands)
    slots = list(range(1, len(args)))
    n = sum(carries(o) for o in operands)
    # einsum is linear in each operand: the epsilon rule, split evenly between the operands that
    # carry relevance when there are several (a product, as in lf.matmul)
    return epsilon_rule(rules, torch.einsum, args, {}, slots, uniform=n > 1)


def _affine_mm(rules, func, input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """``beta * input + alpha * (mat1 @ mat2)`` (addmm, baddbmm)."""
    if out is not None:
        return NotImplemented
    args, kwargs = (input, mat1, mat2), {"beta": beta, "alpha": alpha}
    both = carries(mat1) and carries(mat2)
    if not (both and carries(input)):
        # linear in the carriers jointly (or bilinear in the two factors): the epsilon rule over it
        return epsilon_rule(rules, func, args, kwargs, [0, 1, 2], uniform=both)
    product = _scaled(_matmul(rules, torch.matmul, mat1, mat2), alpha)
    return _sum2(rules, _scaled(input, beta), product)


def _linear(rules, func, input, weight, bias=None):
    if carries(input) and not carries(weight):
        return lf.linear_epsilon(input, const(weight), const(bias), rules.epsilon)
    # a relevance-carrying weight: the epsilon rule over the product, split when both carry
    both = carries(input) and carries(weight)
    return epsilon_rule(rules, func, (input, weight, bias), {}, [0, 1], uniform=both)


def _conv(rules, func, input, weight, bias=None, *args, **kwargs):
    return epsilon_rule(
        rules, func, (input, weight, bias, *args), kwargs, [0, 1], uniform=carries(input) and carries(weight)
    )


def _conv2d(rules, func, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if carries(input) and not carries(weight) and not isinstance(padding, str) and input.dim() == 4:
        return lf.conv2d_epsilon(input, const(weight), const(bias), stride, padding, dilation, groups, rules.epsilon)
    return _conv(rules, func, input, weight, bias, stride, padding, dilation, groups)


def _linear_map(rules, func, input, *args, **kwargs):
    """A function linear (affine) in its first argument, the rest constant: the epsilon rule."""
    return epsilon_rule(rules, func, (input, *args), kwargs, [0])


def _ints(value: Any, n: int) -> list:
    """A pooling argument (an int or a sequence of ints) as n ints."""
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _avg_pool(n: int) -> Callable[..., Any]:
    """F.avg_pool{n}d: the native epsilon rule of the average pooling (lrpcpp.functional.avg_pool_epsilon)."""

    def handler(
        rules,
        func,
        input,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        if not carries(input):
            return NotImplemented
        strides = None if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _ints(stride, n)
        return lf.avg_pool_epsilon(
            input,
            _ints(kernel_size, n),
            strides,
            _ints(padding, n),
            bool(ceil_mode),
            bool(count_include_pad),
            divisor_override,
            rules.epsilon,
        )

    return handler


def _adaptive_avg_pool(n: int) -> Callable[..., Any]:
    """F.adaptive_avg_pool{n}d: the native epsilon rule (a None size keeps the input's)."""

    def handler(rules, func, input, output_size):
        if not carries(input):
            return NotImplemented
        sizes = [output_size] * n if isinstance(output_size, int) or output_size is None else list(output_size)
        spatial = input.shape[input.dim() - n :]
        return lf.adaptive_avg_pool_epsilon(
            input, [int(spatial[i]) if s is None else int(s) for i, s in enumerate(sizes)], rules.epsilon
        )

    return handler


def _max_pool(n: int) -> Callable[..., Any]:
    """F.max_pool{n}d: winner takes all (lrpcpp.functional.max_pool_wta); with return_indices the
    gradient, which is the same rule."""

    def handler(
        rules, func, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        if not carries(input) or return_indices:
            return NotImplemented
        strides = None if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _ints(stride, n)
        return lf.max_pool_wta(
            input, _ints(kernel_size, n), strides, _ints(padding, n), _ints(dilation, n), bool(ceil_mode)
        )

    return handler


def _batch_norm(
    rules, func, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if training or running_mean is None or running_var is None:
        return NotImplemented  # batch statistics: not an affine map of the input
    return epsilon_rule(rules, func, (input, running_mean, running_var, weight, bias, False, momentum, eps), {}, [0])


def _softmax_dim(ndim: int) -> int:
    # torch.nn.functional.softmax's choice when dim is None
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_fn(rules, func, input, dim=None, _stacklevel=3, dtype=None):
    if dim is None:
        dim = _softmax_dim(input.dim())
    return _softmax(rules, func, input, dim, dtype)


def _softmax(rules, func, input, dim, dtype=None, *, out=None):
    if out is not None or not isinstance(dim, int) or input.dim() == 0:
        return NotImplemented
    return lf.softmax(input, dim, 1.0, dtype)


def _layer_norm(rules, func, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if not carries(input):
        return NotImplemented
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return lf.layer_norm(input, shape, const(weight), const(bias), eps, rules.epsilon)


def _rms_norm(rules, func, input, normalized_shape, weight=None, eps=None):
    if not carries(input):
        return NotImplemented
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return lf.rms_norm_identity(input, shape, const(weight), eps)


def _normalize(rules, func, input, p=2.0, dim=1, eps=1e-12, out=None):
    if out is not None or not carries(input):
        return NotImplemented
    return lf.normalize_identity(input, float(p), dim, eps)


def _silu(rules, func, input, inplace=False):
    if not carries(input):
        return NotImplemented
    y = lf.silu(input)
    return input.copy_(y) if inplace else y


def _relu(rules, func, input, inplace=False):
    if not carries(input):
        return NotImplemented
    y = lf.relu(input)
    return input.copy_(y) if inplace else y


def _gelu(rules, func, input, approximate="none"):
    return lf.gelu(input, approximate) if carries(input) else NotImplemented


def _tanh(rules, func, input, *, out=None):
    return lf.tanh(input) if carries(input) and out is None else NotImplemented


def _sigmoid(rules, func, input, *, out=None):
    return lf.sigmoid(input) if carries(input) and out is None else NotImplemented


@functools.lru_cache(maxsize=None)
def _inplace_index(func: Callable) -> Optional[int]:
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _activation(rules, func, input, *args, **kwargs):
    """Any other element-wise activation: the identity rule around torch's own function."""
    if not carries(input):
        return NotImplemented
    args, kwargs = list(args), dict(kwargs)
    inplace = bool(kwargs.pop("inplace", False))
    pos = _inplace_index(func)
    if pos is not None and 0 < pos <= len(args):
        inplace = inplace or bool(args[pos - 1])
        args[pos - 1] = False
    y = pass_to(input, lambda: func(input, *args, **kwargs))
    return input.copy_(y) if inplace else y


def _sum(rules, func, input, *args, **kwargs):
    if not carries(input):
        return NotImplemented
    return epsilon_rule(rules, func, (input, *args), kwargs, [0])


def _mean(rules, func, input, dim=None, keepdim=False, *, dtype=None, out=None):
    if out is not None or not carries(input):
        return NotImplemented
    if dtype is None:
        if dim is None or isinstance(dim, int):
            return lf.mean(input, None if dim is None else [dim], keepdim, rules.epsilon)
        if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
            return lf.mean(input, list(dim), keepdim, rules.epsilon)
    kwargs: Dict[str, Any] = {"keepdim": keepdim}
    if dtype is not None:
        kwargs["dtype"] = dtype
    args = (input,) if dim is None else (input, dim)
    return epsilon_rule(rules, func, args, kwargs, [0])


def _sum_of_parts(rules, func, input, dim, index, source, *, alpha=None, out=None, reduce=None):
    """index_add / scatter_add: the epsilon rule over the sum (each summand takes its share)."""
    if out is not None or reduce is not None:
        return NotImplemented
    kwargs = {} if alpha is None else {"alpha": alpha}
    return epsilon_rule(rules, func, (input, dim, index, source), kwargs, [0, 3])


def _mask_over_scale(mask: Tensor, scale: float) -> Tensor:
    """``mask / scale``, finite where the mask is finite (a large negative mask must not overflow)."""
    info = torch.finfo(mask.dtype)
    return torch.where(torch.isfinite(mask), (mask / scale).clamp(info.min, info.max), mask)


def _fusable(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], enable_gqa: bool) -> bool:
    """Whether the fused op computes the decomposition's relevance: a mask that carries none (bool,
    or a constant in the query's dtype), and q, k, v of one dtype and rank with the same batch
    dimensions (key and value with a divisor of the query's heads under enable_gqa)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        if carries(attn_mask) or attn_mask.dtype != q.dtype or attn_mask.dim() > q.dim():
            return False
    if not (q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == v.dim()):
        return False
    if q.dim() < 3:
        return True
    hq, hk = q.size(-3), k.size(-3)
    heads = hq == hk or (enable_gqa and hk > 0 and hq % hk == 0)
    return heads and q.shape[:-3] == k.shape[:-3] == v.shape[:-3] and k.size(-3) == v.size(-3)


def _sdpa(rules, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` with the explicit rules of its decomposition:
    ``lf.matmul(q, kᵀ)``, the mask added (a float mask through add2, as a bias), ``lf.softmax``
    whose temperature ``1/scale`` does the scaling, and ``lf.matmul(p, v)``. The fused op
    (``lf.scaled_dot_product_attention``) computes that relevance without keeping the ``[T_q, T_k]``
    intermediates when the mask carries no relevance; else the decomposition runs, op by op.
    ``dropout_p`` is ignored: dropout is off, as for ``F.dropout`` (the attention weights of the
    eval-mode forward)."""
    if is_causal and attn_mask is not None:
        return NotImplemented  # torch reports the error
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return NotImplemented
    if scale is None:  # an empty head (E = 0) has scores 0 at any scale
        scale = 1.0 / math.sqrt(query.size(-1)) if query.size(-1) > 0 else 1.0
    scale = float(scale)
    q, k, v = const(query), const(key), const(value)
    if _fusable(q, k, v, attn_mask, enable_gqa):
        mask = None if attn_mask is None else const(attn_mask)
        return lf.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa, epsilon=rules.epsilon)
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        if k.size(-3) == 0 or q.size(-3) % k.size(-3):
            return NotImplemented  # torch reports the error
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scores = lf.matmul(q, k.transpose(-2, -1), rules.epsilon)
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            mask = attn_mask
            if carries(mask):
                bias = pass_to(mask, lambda: _mask_over_scale(mask, scale))
            else:
                bias = _mask_over_scale(const(mask), scale)
            scores = _sum2(rules, scores, bias)
    fully_masked = None
    if attn_mask is not None:
        # rows with no position left: torch's attention returns zeros there; keep them finite (masked
        # whether or not any row is: no device-to-host sync to find out)
        fully_masked = torch.isneginf(scores).all(-1, keepdim=True)
        scores = scores.masked_fill(fully_masked, 0.0)
    p = lf.softmax(scores, -1, 1.0 / scale, torch.float32 if scores.dtype in _REDUCED else None)
    if fully_masked is not None:
        p = p.masked_fill(fully_masked, 0.0)
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    return lf.matmul(p, v, rules.epsilon)


_T = Tensor

# The table of rules; described where it is public, as lrpcpp.models.explicit.RULES.
RULES: Mapping[Callable, Callable] = MappingProxyType(
    {
        # matrix products -> lf.matmul: epsilon rule, then an even split when both operands carry
        # relevance (AttnLRP Prop. 3.3); a constant operand leaves all of it to the other
        torch.matmul: _matmul,
        _T.matmul: _matmul,
        _T.__matmul__: _matmul,
        _T.__rmatmul__: _rmatmul,
        torch.bmm: _mm,
        _T.bmm: _mm,
        torch.mm: _mm,
        _T.mm: _mm,
        torch.einsum: _einsum,
        # addition and subtraction -> lf.add2 (epsilon rule; a constant summand, a number or a tensor
        # without grad such as an attention mask, is a bias that absorbs its share); b in a - b takes
        # the share of -b
        torch.add: _add,
        _T.add: _add,
        _T.__add__: _add,
        _T.__radd__: _add,
        torch.sub: _sub,
        torch.subtract: _sub,
        _T.sub: _sub,
        _T.subtract: _sub,
        _T.__sub__: _sub,
        torch.rsub: _rsub,
        _T.__rsub__: _rsub,
        _T.add_: inplace_form(_add, _T.add),
        _T.__iadd__: inplace_form(_add, _T.add),
        _T.sub_: inplace_form(_sub, _T.sub),
        _T.subtract_: inplace_form(_sub, _T.sub),
        _T.__isub__: inplace_form(_sub, _T.sub),
        # multiplication -> lf.mul2 (uniform) when both factors carry relevance; by a constant: the
        # identity rule with torch's own product (RoPE cos/sin, attention scaling, embedding scaling)
        torch.mul: _mul,
        torch.multiply: _mul,
        _T.mul: _mul,
        _T.multiply: _mul,
        _T.__mul__: _mul,
        _T.__rmul__: _mul,
        _T.mul_: inplace_form(_mul, _T.mul),
        _T.multiply_: inplace_form(_mul, _T.mul),
        _T.__imul__: inplace_form(_mul, _T.mul),
        # division: the identity rule to the numerator (the denominator is held constant)
        torch.div: _div,
        torch.divide: _div,
        torch.true_divide: _div,
        _T.div: _div,
        _T.divide: _div,
        _T.true_divide: _div,
        _T.__truediv__: _div,
        _T.__div__: _div,
        _T.__rdiv__: _rdiv,
        _T.__rtruediv__: _rdiv,
        _T.div_: inplace_form(_div, _T.div),
        _T.divide_: inplace_form(_div, _T.div),
        _T.true_divide_: inplace_form(_div, _T.div),
        _T.__itruediv__: inplace_form(_div, _T.div),
        _T.__idiv__: inplace_form(_div, _T.div),
        # negation: the identity rule
        torch.neg: _neg,
        torch.negative: _neg,
        _T.neg: _neg,
        _T.negative: _neg,
        _T.__neg__: _neg,
        _T.neg_: inplace_form(_neg, _T.neg),
        _T.negative_: inplace_form(_neg, _T.neg),
        # affine maps -> epsilon rule (AttnLRP Eq. 8); the bias absorbs its share
        F.linear: _linear,
        torch.addmm: _affine_mm,
        _T.addmm: _affine_mm,
        torch.baddbmm: _affine_mm,
        _T.baddbmm: _affine_mm,
        F.conv1d: _conv,
        F.conv2d: _conv2d,
        F.conv3d: _conv,
        F.conv_transpose1d: _conv,
        F.conv_transpose2d: _conv,
        F.conv_transpose3d: _conv,
        # pooling: the native ops, epsilon rule (average) and winner takes all (max), as zennit
        F.avg_pool1d: _avg_pool(1),
        F.avg_pool2d: _avg_pool(2),
        F.avg_pool3d: _avg_pool(3),
        F.adaptive_avg_pool1d: _adaptive_avg_pool(1),
        F.adaptive_avg_pool2d: _adaptive_avg_pool(2),
        F.adaptive_avg_pool3d: _adaptive_avg_pool(3),
        F.max_pool1d: _max_pool(1),
        F.max_pool2d: _max_pool(2),
        F.max_pool3d: _max_pool(3),
        F.batch_norm: _batch_norm,
        # sums and means -> epsilon rule R_x = x * R / stab(sum x)
        torch.sum: _sum,
        _T.sum: _sum,
        torch.mean: _mean,
        _T.mean: _mean,
        torch.index_add: _sum_of_parts,
        _T.index_add: _sum_of_parts,
        _T.index_add_: inplace_form(_sum_of_parts, _T.index_add),
        torch.scatter_add: _sum_of_parts,
        _T.scatter_add: _sum_of_parts,
        _T.scatter_add_: inplace_form(_sum_of_parts, _T.scatter_add),
        # softmax -> lf.softmax (Deep Taylor with bias, AttnLRP Prop. 3.1)
        F.softmax: _softmax_fn,
        torch.softmax: _softmax,
        _T.softmax: _softmax,
        F.scaled_dot_product_attention: _sdpa,
        # normalisation: layer norm -> epsilon rule with the standard deviation held constant;
        # RMSNorm and F.normalize -> identity rule (Prop. 3.4)
        F.layer_norm: _layer_norm,
        torch.layer_norm: _layer_norm,
        F.rms_norm: _rms_norm,
        torch.rms_norm: _rms_norm,
        F.normalize: _normalize,
        # element-wise activations -> identity rule (Eq. 9)
        F.silu: _silu,
        F.gelu: _gelu,
        F.relu: _relu,
        torch.relu: _relu,
        _T.relu: _relu,
        torch.tanh: _tanh,
        _T.tanh: _tanh,
        torch.sigmoid: _sigmoid,
        _T.sigmoid: _sigmoid,
        F.relu_: inplace_form(_relu, torch.relu),
        torch.relu_: inplace_form(_relu, torch.relu),
        _T.relu_: inplace_form(_relu, torch.relu),
        _T.tanh_: inplace_form(_tanh, torch.tanh),
        _T.sigmoid_: inplace_form(_sigmoid, torch.sigmoid),
        F.elu: _activation,
        F.celu: _activation,
        F.selu: _activation,
        F.leaky_relu: _activation,
        F.relu6: _activation,
        F.hardtanh: _activation,
        F.hardswish: _activation,
        F.hardsigmoid: _activation,
        F.softplus: _activation,
        F.mish: _activation,
    }
)
