"""Explicit LRP rules for unmodified model code, through a ``torch.overrides.TorchFunctionMode``.

Inside ``with ExplicitRules():`` every torch function call that has a relevance-carrying tensor
argument is carried out by the explicit-rule op of :mod:`lrpcpp.functional` that matches it
(RULES.md sections 1 and 4), so a model's own forward code, a Hugging Face modeling file or a
``torch.nn`` module, computes the same values as before while its backward pass carries
relevance::

    from lrpcpp.models.explicit import ExplicitRules

    x = x.detach().requires_grad_()
    with ExplicitRules(epsilon=1e-6):
        y = model(x)
    y.backward(y)          # seed with the value to explain
    relevance = x.grad

A tensor *carries relevance* when it requires grad and is neither an ``nn.Parameter`` nor a
tensor the mode saw being computed from parameters alone (``weight.T``, ``1 + weight``, the
projection of a detached input): weights and biases take part in the computation as constants
(parameters get no relevance). Relevance starts at a leaf the caller creates, such as
``inputs_embeds.detach().requires_grad_()``. Calls in which
no argument carries relevance (mask and position construction, anything under ``torch.no_grad``)
run untouched. The functions of :data:`PASS_THROUGH` keep their ordinary gradient, which is the
exact relevance rule for them (views, reshapes, transposes, concatenation, slicing, expansion,
``torch.where`` selection, dtype casts, ...); any other function without an entry in
:data:`RULES` keeps its gradient with an :class:`UnruledOperationWarning` that names it. Dropout
is off, whatever the training flag. A Python-level torch function without an entry
(``F.multi_head_attention_forward``, for example) runs with the rules still active, so the calls
it makes are mapped in turn.

The mode is active only inside its ``with`` block, in the thread that entered it; nothing in
torch is changed.
"""

import contextlib
import functools
import inspect
import math
import threading
import types
import warnings
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode, redispatch_function
from torch.utils.weak import WeakIdKeyDictionary

from ... import functional as lf

__all__ = ["ExplicitRules", "RULES", "PASS_THROUGH", "UnruledOperationWarning", "identity_rule", "run_plain"]

_REDUCED = (torch.float16, torch.bfloat16)


class _InBody(threading.local):
    """The Python-level torch functions whose bodies this thread is running under the rules."""

    def __init__(self) -> None:
        self.funcs: set = set()


_IN_BODY = _InBody()


# ----------------------------------------------------------------------------- the mode stack
def _is_explicit(mode: Any) -> bool:
    return isinstance(mode, ExplicitRules)


@contextlib.contextmanager
def _without(select: Callable[[Any], bool]):
    """Take the torch function modes for which ``select`` is true off this thread's mode stack for
    the duration of the block; the other modes stay active, in their order."""
    n = torch._C._len_torch_function_stack()
    stack = [torch._C._get_function_stack_at(i) for i in range(n)]
    if not any(select(m) for m in stack):
        yield
        return
    kept = [m for m in stack if not select(m)]
    for _ in stack:
        torch._C._pop_torch_function_stack()
    for m in kept:
        torch._C._push_on_torch_function_stack(m)
    try:
        yield
    finally:
        for _ in kept:
            torch._C._pop_torch_function_stack()
        for m in stack:
            torch._C._push_on_torch_function_stack(m)


def run_plain(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every :class:`ExplicitRules` mode suspended: its torch calls
    are ordinary torch calls with their ordinary gradients."""
    with _without(_is_explicit):
        return fn(*args, **kwargs)


def _plain(func: Callable, args: Sequence, kwargs: Mapping):
    with _without(_is_explicit):
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- tensor helpers
# Tensors that require grad only because they were computed from parameters (a projection of a
# detached input, ``1 + weight``, ``weight.T``, an embedding lookup); recorded by the mode as they
# are created. Like parameters, they carry no relevance.
_FROM_PARAMETERS = WeakIdKeyDictionary()


def _carries(x: Any) -> bool:
    """A tensor that carries relevance: requires grad, and is neither a parameter nor computed from
    parameters alone (inside the mode)."""
    return isinstance(x, Tensor) and x.requires_grad and not isinstance(x, nn.Parameter) and x not in _FROM_PARAMETERS


def _requires_grad(args: Sequence, kwargs: Mapping) -> bool:
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                if a.requires_grad:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(b, Tensor) and b.requires_grad for b in a):
                    return True
    return False


def _tensor_args(args: Sequence, kwargs: Mapping) -> List[Tensor]:
    found: List[Tensor] = []
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                found.append(a)
            elif isinstance(a, (list, tuple)):
                found.extend(b for b in a if isinstance(b, Tensor))
    return found


def _mark_from_parameters(out: Any) -> None:
    if isinstance(out, Tensor):
        if out.requires_grad:
            _FROM_PARAMETERS[out] = True
    elif isinstance(out, (list, tuple)):
        for o in out:
            _mark_from_parameters(o)


def _any_carrier(args: Sequence, kwargs: Mapping) -> bool:
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                if _carries(a):
                    return True
            elif isinstance(a, (list, tuple)):
                if any(_carries(b) for b in a):
                    return True
    return False


def _const(x: Any) -> Any:
    """A tensor that does not carry relevance enters an op as a constant (a parameter is detached)."""
    if isinstance(x, Tensor) and x.requires_grad and not _carries(x):
        return x.detach()
    return x


def _operand(x: Any, dtype: torch.dtype, like: Tensor) -> Tensor:
    """``x`` (tensor or Python number) as a tensor of ``dtype`` on ``like``'s device."""
    if not isinstance(x, Tensor):
        return torch.tensor(x, dtype=dtype, device=like.device)
    x = _const(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.device != like.device:
        x = x.to(like.device)
    return x


class _PassRelevance(torch.autograd.Function):
    """Forward: ``compute()``, without grad, so exactly what torch computes. Backward: the relevance
    of the output goes unchanged to ``receiver`` (summed back over broadcast dimensions, cast to
    its dtype): the identity rule."""

    @staticmethod
    def forward(ctx, compute: Callable[[], Tensor], receiver: Tensor) -> Tensor:
        ctx.shape, ctx.dtype = receiver.shape, receiver.dtype
        out = compute()
        if out is receiver or out._is_view():
            out = out.clone()
        return out

    @staticmethod
    def backward(ctx, relevance: Tensor):
        if relevance.shape != ctx.shape:
            relevance = relevance.sum_to_size(ctx.shape)
        return None, relevance.to(ctx.dtype)


def _pass_to(receiver: Tensor, compute: Callable[[], Tensor]) -> Tensor:
    return _PassRelevance.apply(compute, receiver)


def identity_rule(fn: Callable, *args, **kwargs) -> Tensor:
    """``fn(*args, **kwargs)``, computed exactly (without grad, with the rules suspended), whose
    relevance goes unchanged to its relevance-carrying tensor argument (the identity rule, RULES.md
    section 1; AttnLRP Eq. 9 and Prop. 3.4).

    Meant for whole modules or formulas that are one element-wise or normalising step: an RMSNorm
    module, an activation written as a formula (GPT-2's ``NewGELU``), ``F.normalize``. Exactly one
    argument may carry relevance, or else exactly one of those that do must have the output's
    shape. If the receiving argument was broadcast, the relevance is summed back to its shape.
    With grad disabled, or no relevance-carrying argument, this is ``fn(*args, **kwargs)``.
    """
    carriers: List[Tensor] = []
    for a in list(args) + list(kwargs.values()):
        if _carries(a) and not any(a is c for c in carriers):
            carriers.append(a)
    if not carriers or not torch.is_grad_enabled():
        return run_plain(fn, *args, **kwargs)
    with torch.no_grad():
        out = run_plain(fn, *args, **kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(f"lrpcpp.models.explicit.identity_rule: fn must return one tensor, got {type(out).__name__}")
    if len(carriers) == 1:
        receiver = carriers[0]
    else:
        same = [c for c in carriers if c.shape == out.shape]
        if len(same) != 1:
            raise ValueError(
                "lrpcpp.models.explicit.identity_rule: expected one relevance-carrying argument, or exactly one "
                f"of them with the output's shape {tuple(out.shape)}; got shapes "
                f"{[tuple(c.shape) for c in carriers]}"
            )
        receiver = same[0]
    try:
        fits = torch.broadcast_shapes(receiver.shape, out.shape) == out.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"lrpcpp.models.explicit.identity_rule: the output {tuple(out.shape)} must have the shape of the "
            f"relevance-carrying argument {tuple(receiver.shape)} (or be a broadcast of it)"
        )
    return _pass_to(receiver, lambda: out)


def _epsilon_rule(
    rules: "ExplicitRules",
    func: Callable,
    args: Sequence,
    kwargs: Mapping,
    slots: Sequence[Union[int, str]],
    uniform: bool = False,
) -> Tensor:
    """``func(*args, **kwargs)`` with the epsilon rule over the arguments at ``slots`` that carry
    relevance (every other argument is a constant): ``R_x = x * VJP[R / stab(out)]``, divided by
    the number of those arguments when ``uniform`` (a product of several relevance carriers).
    The forward value is exactly torch's."""
    slots = [s for s in slots if _carries(args[s] if isinstance(s, int) else kwargs.get(s))]
    carriers = [args[s] if isinstance(s, int) else kwargs[s] for s in slots]
    base_args = [_const(a) for a in args]
    base_kwargs = {k: _const(v) for k, v in kwargs.items()}

    def fn(*xs: Tensor) -> Tensor:
        a, k = list(base_args), dict(base_kwargs)
        for s, x in zip(slots, xs):
            if isinstance(s, int):
                a[s] = x
            else:
                k[s] = x
        return _plain(func, a, k)

    if uniform and len(carriers) > 1:
        return lf.uniform_epsilon(fn, *carriers, epsilon=rules.epsilon)
    return lf.epsilon(fn, *carriers, epsilon=rules.epsilon)


# ----------------------------------------------------------------------------- handlers
# A handler is called as handler(rules, func, *args, **kwargs) with the arguments of the torch call
# (for a Tensor method, the tensor itself first), once at least one argument carries relevance.
# It returns the result, or NotImplemented to run the call unchanged (unsupported arguments).


def _sum2(rules: "ExplicitRules", a: Any, b: Any) -> Tensor:
    """``a + b``, tensors or numbers: add2's epsilon rule; a constant summand absorbs its share."""
    if not (_carries(a) or _carries(b)):
        return _const(a) + _const(b)
    like = a if _carries(a) else b
    dtype = torch.result_type(a, b)
    return lf.add2(_operand(a, dtype, like), _operand(b, dtype, like), rules.epsilon)


def _scaled(x: Any, c: Any) -> Any:
    """``x * c`` for a constant ``c``; the identity rule when ``x`` carries relevance."""
    if isinstance(c, (int, float)) and c == 1:
        return x
    if _carries(x):
        return _pass_to(x, lambda: torch.mul(x, c))
    return _const(x) * c


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
    if _carries(input) and _carries(other):
        dtype = torch.result_type(input, other)
        return lf.mul2(_operand(input, dtype, input), _operand(other, dtype, input))
    receiver = input if _carries(input) else other
    return _pass_to(receiver, lambda: func(input, other))


def _div(rules, func, input, other, *, rounding_mode=None, out=None):
    # the numerator takes the relevance; a relevance-carrying denominator is held constant (when
    # only the denominator carries relevance, the quotient is an element-wise function of it)
    if out is not None or rounding_mode is not None:
        return NotImplemented
    receiver = input if _carries(input) else other
    return _pass_to(receiver, lambda: func(input, other))


def _rdiv(rules, func, input, other):
    # Tensor.__rdiv__(self, other) is other / self
    receiver = other if _carries(other) else input
    return _pass_to(receiver, lambda: func(input, other))


def _neg(rules, func, input, *, out=None):
    if out is not None:
        return NotImplemented
    return _pass_to(input, lambda: func(input))


def _matmul(rules, func, input, other, *, out=None):
    if out is not None or not isinstance(input, Tensor) or not isinstance(other, Tensor):
        return NotImplemented
    a, b = _const(input), _const(other)
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
    n = sum(_carries(o) for o in operands)
    # einsum is linear in each operand: the epsilon rule, split evenly between the operands that
    # carry relevance when there are several (a product, as in lf.matmul)
    return _epsilon_rule(rules, torch.einsum, args, {}, slots, uniform=n > 1)


def _affine_mm(rules, func, input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """``beta * input + alpha * (mat1 @ mat2)`` (addmm, baddbmm)."""
    if out is not None:
        return NotImplemented
    args, kwargs = (input, mat1, mat2), {"beta": beta, "alpha": alpha}
    both = _carries(mat1) and _carries(mat2)
    if not (both and _carries(input)):
        # linear in the carriers jointly (or bilinear in the two factors): the epsilon rule over it
        return _epsilon_rule(rules, func, args, kwargs, [0, 1, 2], uniform=both)
    product = _scaled(_matmul(rules, torch.matmul, mat1, mat2), alpha)
    return _sum2(rules, _scaled(input, beta), product)


def _linear(rules, func, input, weight, bias=None):
    if _carries(input) and not _carries(weight):
        return lf.linear_epsilon(input, _const(weight), _const(bias), rules.epsilon)
    # a relevance-carrying weight: the epsilon rule over the product, split when both carry
    both = _carries(input) and _carries(weight)
    return _epsilon_rule(rules, func, (input, weight, bias), {}, [0, 1], uniform=both)


def _conv(rules, func, input, weight, bias=None, *args, **kwargs):
    return _epsilon_rule(
        rules, func, (input, weight, bias, *args), kwargs, [0, 1], uniform=_carries(input) and _carries(weight)
    )


def _conv2d(rules, func, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if _carries(input) and not _carries(weight) and not isinstance(padding, str) and input.dim() == 4:
        return lf.conv2d_epsilon(input, _const(weight), _const(bias), stride, padding, dilation, groups, rules.epsilon)
    return _conv(rules, func, input, weight, bias, stride, padding, dilation, groups)


def _linear_map(rules, func, input, *args, **kwargs):
    """A function linear (affine) in its first argument, the rest constant: the epsilon rule."""
    return _epsilon_rule(rules, func, (input, *args), kwargs, [0])


def _batch_norm(
    rules, func, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if training or running_mean is None or running_var is None:
        return NotImplemented  # batch statistics: not an affine map of the input
    return _epsilon_rule(rules, func, (input, running_mean, running_var, weight, bias, False, momentum, eps), {}, [0])


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
    if not _carries(input):
        return NotImplemented
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return lf.layer_norm(input, shape, _const(weight), _const(bias), eps, rules.epsilon)


def _rms_norm(rules, func, input, normalized_shape, weight=None, eps=None):
    if not _carries(input):
        return NotImplemented
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return lf.rms_norm_identity(input, shape, _const(weight), eps)


def _normalize(rules, func, input, p=2.0, dim=1, eps=1e-12, out=None):
    if out is not None or not _carries(input):
        return NotImplemented
    return lf.normalize_identity(input, float(p), dim, eps)


def _silu(rules, func, input, inplace=False):
    if not _carries(input):
        return NotImplemented
    y = lf.silu(input)
    return input.copy_(y) if inplace else y


def _relu(rules, func, input, inplace=False):
    if not _carries(input):
        return NotImplemented
    y = lf.relu(input)
    return input.copy_(y) if inplace else y


def _gelu(rules, func, input, approximate="none"):
    return lf.gelu(input, approximate) if _carries(input) else NotImplemented


def _tanh(rules, func, input, *, out=None):
    return lf.tanh(input) if _carries(input) and out is None else NotImplemented


def _sigmoid(rules, func, input, *, out=None):
    return lf.sigmoid(input) if _carries(input) and out is None else NotImplemented


@functools.lru_cache(maxsize=None)
def _inplace_index(func: Callable) -> Optional[int]:
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _activation(rules, func, input, *args, **kwargs):
    """Any other element-wise activation: the identity rule around torch's own function."""
    if not _carries(input):
        return NotImplemented
    args, kwargs = list(args), dict(kwargs)
    inplace = bool(kwargs.pop("inplace", False))
    pos = _inplace_index(func)
    if pos is not None and 0 < pos <= len(args):
        inplace = inplace or bool(args[pos - 1])
        args[pos - 1] = False
    y = _pass_to(input, lambda: func(input, *args, **kwargs))
    return input.copy_(y) if inplace else y


def _sum(rules, func, input, *args, **kwargs):
    if not _carries(input):
        return NotImplemented
    return _epsilon_rule(rules, func, (input, *args), kwargs, [0])


def _mean(rules, func, input, dim=None, keepdim=False, *, dtype=None, out=None):
    if out is not None or not _carries(input):
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
    return _epsilon_rule(rules, func, args, kwargs, [0])


def _sum_of_parts(rules, func, input, dim, index, source, *, alpha=None, out=None, reduce=None):
    """index_add / scatter_add: the epsilon rule over the sum (each summand takes its share)."""
    if out is not None or reduce is not None:
        return NotImplemented
    kwargs = {} if alpha is None else {"alpha": alpha}
    return _epsilon_rule(rules, func, (input, dim, index, source), kwargs, [0, 3])


def _mask_over_scale(mask: Tensor, scale: float) -> Tensor:
    """``mask / scale``, finite where the mask is finite (a large negative mask must not overflow)."""
    info = torch.finfo(mask.dtype)
    return torch.where(torch.isfinite(mask), (mask / scale).clamp(info.min, info.max), mask)


def _sdpa(rules, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` decomposed into explicit ops: ``lf.matmul(q, kᵀ)``, the
    mask added (a float mask through add2, as a bias), ``lf.softmax`` whose temperature ``1/scale``
    does the scaling, and ``lf.matmul(p, v)``. ``dropout_p`` is ignored: dropout is off, as for
    ``F.dropout`` (the attention weights of the eval-mode forward)."""
    if is_causal and attn_mask is not None:
        return NotImplemented  # torch reports the error
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return NotImplemented
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    q, k, v = _const(query), _const(key), _const(value)
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
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
            if _carries(mask):
                bias = _pass_to(mask, lambda: _mask_over_scale(mask, scale))
            else:
                bias = _mask_over_scale(_const(mask), scale)
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


def _inplace(handler: Callable, outofplace: Callable) -> Callable:
    """The in-place form of an out-of-place handler: computed out of place on a copy of the target,
    then written into it (``copy_``), so aliases and views see the change as with torch."""

    def run(rules, func, input, *args, **kwargs):
        if not isinstance(input, Tensor):
            return NotImplemented
        result = handler(rules, outofplace, input.clone(), *args, **kwargs)
        if result is NotImplemented:
            return result
        return input.copy_(result)

    return run


_T = Tensor

#: The mapping from torch functions to their explicit rules: ``{function: handler}``. Every
#: spelling of an operation (``torch.add``, ``Tensor.add``, ``Tensor.__add__``, ...) has its own
#: entry. A function that is not a key keeps its ordinary gradient.
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
        _T.add_: _inplace(_add, _T.add),
        _T.__iadd__: _inplace(_add, _T.add),
        _T.sub_: _inplace(_sub, _T.sub),
        _T.subtract_: _inplace(_sub, _T.sub),
        _T.__isub__: _inplace(_sub, _T.sub),
        # multiplication -> lf.mul2 (uniform) when both factors carry relevance; by a constant: the
        # identity rule with torch's own product (RoPE cos/sin, attention scaling, embedding scaling)
        torch.mul: _mul,
        torch.multiply: _mul,
        _T.mul: _mul,
        _T.multiply: _mul,
        _T.__mul__: _mul,
        _T.__rmul__: _mul,
        _T.mul_: _inplace(_mul, _T.mul),
        _T.multiply_: _inplace(_mul, _T.mul),
        _T.__imul__: _inplace(_mul, _T.mul),
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
        _T.div_: _inplace(_div, _T.div),
        _T.divide_: _inplace(_div, _T.div),
        _T.true_divide_: _inplace(_div, _T.div),
        _T.__itruediv__: _inplace(_div, _T.div),
        _T.__idiv__: _inplace(_div, _T.div),
        # negation: the identity rule
        torch.neg: _neg,
        torch.negative: _neg,
        _T.neg: _neg,
        _T.negative: _neg,
        _T.__neg__: _neg,
        _T.neg_: _inplace(_neg, _T.neg),
        _T.negative_: _inplace(_neg, _T.neg),
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
        F.avg_pool1d: _linear_map,
        F.avg_pool2d: _linear_map,
        F.avg_pool3d: _linear_map,
        F.adaptive_avg_pool1d: _linear_map,
        F.adaptive_avg_pool2d: _linear_map,
        F.adaptive_avg_pool3d: _linear_map,
        F.batch_norm: _batch_norm,
        # sums and means -> epsilon rule R_x = x * R / stab(sum x)
        torch.sum: _sum,
        _T.sum: _sum,
        torch.mean: _mean,
        _T.mean: _mean,
        torch.index_add: _sum_of_parts,
        _T.index_add: _sum_of_parts,
        _T.index_add_: _inplace(_sum_of_parts, _T.index_add),
        torch.scatter_add: _sum_of_parts,
        _T.scatter_add: _sum_of_parts,
        _T.scatter_add_: _inplace(_sum_of_parts, _T.scatter_add),
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
        F.relu_: _inplace(_relu, torch.relu),
        torch.relu_: _inplace(_relu, torch.relu),
        _T.relu_: _inplace(_relu, torch.relu),
        _T.tanh_: _inplace(_tanh, torch.tanh),
        _T.sigmoid_: _inplace(_sigmoid, torch.sigmoid),
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


# Dropout is off (RULES.md section 4), whatever the training flag: the input is returned unchanged,
# so the forward value is the eval-mode one and the relevance passes through as it is.
_DROPOUT = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.dropout,
        torch.dropout_,
        torch.feature_dropout,
        torch.feature_dropout_,
        torch.alpha_dropout,
        torch.alpha_dropout_,
        torch.feature_alpha_dropout,
        torch.feature_alpha_dropout_,
    }
)

_PASS_TENSOR_METHODS = (
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "expand",
    "expand_as",
    "broadcast_to",
    "contiguous",
    "clone",
    "to",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "__getitem__",
    "select",
    "narrow",
    "index_select",
    "gather",
    "take_along_dim",
    "masked_fill",
    "masked_fill_",
    "where",
    "split",
    "split_with_sizes",
    "tensor_split",
    "chunk",
    "unbind",
    "repeat",
    "repeat_interleave",
    "tile",
    "roll",
    "flip",
    "tril",
    "triu",
    "diagonal",
    "copy_",
    "requires_grad_",
    "topk",
)
_PASS_TORCH_FUNCTIONS = (
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "broadcast_to",
    "clone",
    "select",
    "narrow",
    "index_select",
    "gather",
    "take_along_dim",
    "masked_fill",
    "where",
    "split",
    "split_with_sizes",
    "tensor_split",
    "chunk",
    "unbind",
    "repeat_interleave",
    "tile",
    "roll",
    "flip",
    "tril",
    "triu",
    "diagonal",
    "cat",
    "concat",
    "concatenate",
    "stack",
    "hstack",
    "vstack",
    "topk",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool1d",
)
_PASS_NN_FUNCTIONS = (
    "pad",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
)

#: The torch functions whose ordinary gradient passes relevance on exactly, so that they need no
#: rule: views and reshapes, dtype casts and copies, indexing, slicing, gathering, masking and
#: ``torch.where`` selection, concatenation and splitting, expansion and repetition (the copies'
#: relevance is summed back), padding, and max pooling and ``topk`` (the selected elements take all
#: of it). A call with a relevance-carrying argument and a relevance-carrying result that has
#: neither a rule in :data:`RULES` nor an entry here keeps its gradient, with an
#: :class:`UnruledOperationWarning` that names it.
PASS_THROUGH = frozenset(
    [getattr(Tensor, n) for n in _PASS_TENSOR_METHODS]
    + [
        f
        for n in _PASS_TORCH_FUNCTIONS
        for f in (getattr(torch, n), getattr(torch._C._VariableFunctions, n, None))
        if f is not None
    ]
    + [getattr(torch._C._nn, n) for n in _PASS_NN_FUNCTIONS]
    + [getattr(Tensor, n).__get__ for n in ("T", "mT", "H", "mH")]
)


class UnruledOperationWarning(UserWarning):
    """A torch function in :class:`ExplicitRules` passed relevance on as its plain gradient: it has
    no explicit rule (for these arguments) and is not one of :data:`PASS_THROUGH`. Turn it into
    an error with ``warnings.simplefilter("error", UnruledOperationWarning)``."""


def _op_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    if isinstance(func, types.MethodWrapperType) and owner is not None and hasattr(owner, "__objclass__"):
        return f"Tensor.{owner.__name__}"  # an attribute such as Tensor.T
    if isinstance(func, torch._ops.OpOverloadPacket):
        return f"torch.ops.{func._qualified_op_name.replace('::', '.')}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    for prefix, spelled in (("TensorBase.", "Tensor."), ("_VariableFunctionsClass.", "torch.")):
        if name.startswith(prefix):
            return spelled + name[len(prefix) :]
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and "." not in name else name


def _has_rule(func: Callable) -> bool:
    """An lrpcpp operator (called directly, or by a drop-in module) is a rule itself."""
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func._qualified_op_name.startswith("lrpcpp::")
    if isinstance(func, torch._ops.OpOverload):
        return func.name().startswith("lrpcpp::")
    return func in PASS_THROUGH


def _carries_relevance(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(_carries_relevance(o) for o in out)
    return False


# ----------------------------------------------------------------------------- the mode
class ExplicitRules(TorchFunctionMode):
    """A torch function mode that runs torch calls through the explicit LRP rules (see :data:`RULES`).

    ``epsilon`` is the stabiliser of every epsilon rule the mode applies (linear maps, additions,
    matrix products, layer norms, sums and means). The mode holds no other state: one instance may
    be entered any number of times, nested or from several threads.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__()
        if not epsilon >= 0:
            raise ValueError(f"ExplicitRules: expected epsilon >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def __repr__(self) -> str:
        return f"ExplicitRules(epsilon={self.epsilon})"

    @classmethod
    @contextlib.contextmanager
    def suspended(cls):
        """A context in which no :class:`ExplicitRules` mode is active (torch calls are ordinary
        torch calls); for module-level rules whose internals must not be mapped."""
        with _without(_is_explicit):
            yield

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT:
            return args[0] if args else kwargs["input"]
        grad = torch.is_grad_enabled()
        carriers = grad and _any_carrier(args, kwargs)
        if carriers:
            if len(_FROM_PARAMETERS):
                return self._updating_marks(func, types_, args, kwargs)
            return self._with_relevance(func, types_, args, kwargs)
        from_parameters = grad and _requires_grad(args, kwargs)
        out = func(*args, **kwargs)
        if from_parameters:
            _mark_from_parameters(out)
        return out

    def _updating_marks(self, func, types_, args, kwargs):
        # a tensor computed from parameters that a call writes relevance-carrying values into (in
        # place) carries relevance from then on
        marked = [(t, t._version) for t in _tensor_args(args, kwargs) if t in _FROM_PARAMETERS]
        out = self._with_relevance(func, types_, args, kwargs)
        for t, version in marked:
            if t._version != version:
                _FROM_PARAMETERS.pop(t, None)
        return out

    def _with_relevance(self, func, types_, args, kwargs):
        """A call with at least one relevance-carrying argument."""
        handler = RULES.get(func)
        if handler is not None:
            if torch._C._len_torch_function_stack():
                with _without(_is_explicit):
                    out = handler(self, func, *args, **kwargs)
            else:
                out = handler(self, func, *args, **kwargs)
            if out is not NotImplemented:
                return out
        elif isinstance(func, types.FunctionType) and func not in _IN_BODY.funcs:
            # a torch function written in Python: run its body with the rules active. A function
            # whose body reaches torch's function handling under its own name again (a Python
            # Tensor method calling its C implementation) is not redispatched a second time.
            _IN_BODY.funcs.add(func)
            try:
                with self:
                    return redispatch_function(func, types_, args, kwargs)
            finally:
                _IN_BODY.funcs.discard(func)
        out = func(*args, **kwargs)
        if not _has_rule(func) and _carries_relevance(out):
            name = _op_name(func)
            warnings.warn(
                f"lrpcpp.ExplicitRules: {name} has no explicit LRP rule (for these arguments); its "
                f"relevance-carrying input got the plain gradient of {name}, which is in general not a "
                "relevance rule. Give that step a rule (lrpcpp.models.explicit.identity_rule, "
                "lrpcpp.functional.epsilon, ...) or run it without the rules (lrpcpp.models.explicit.run_plain)",
                UnruledOperationWarning,
                stacklevel=3,
            )
        return out
