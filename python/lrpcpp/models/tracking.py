"""Which tensors carry relevance, and the rules every handler builds on.

A tensor carries relevance when it requires grad and is neither an ``nn.Parameter`` nor a tensor
the mode saw being computed from parameters alone (marked by the attribute :data:`FROM_PARAMETERS`).
This module holds that bookkeeping, the suspension of the rule modes (:func:`run_plain`), the identity rule
(:func:`identity_rule`, :func:`pass_to`) and the epsilon-rule core (:func:`epsilon_rule`).
"""

import contextlib
import threading
import types
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import functional as lf

# skips one hop of torch function handling (newer torch releases only; None on an older torch, where the
# body of a torch function written in Python cannot be run under a mode)
redispatch_function: Optional[Callable[..., Any]] = getattr(torch.overrides, "redispatch_function", None)


class RuleMode(TorchFunctionMode):
    """The base of the operation-level rule modes (:class:`~lrpcpp.models.explicit.ExplicitRules`,
    :class:`~lrpcpp.models.operations.GradientRules`): a torch function mode whose calls follow
    relevance rules, with the stabiliser ``epsilon`` of its rules. :func:`run_plain` suspends
    every such mode."""

    epsilon: float


class UnruledOperationWarning(UserWarning):
    """A torch function under an operation-level rule mode passed relevance on as its plain
    gradient: it has no rule (for these arguments) and its gradient is not known to be exact. Turn
    it into an error with ``warnings.simplefilter("error", UnruledOperationWarning)`` (or, at the
    operation level of gradient mode, with ``strict=True``)."""


class UnruledOperationError(RuntimeError):
    """With ``strict=True``, a torch function under the operation level of gradient mode had no rule
    for its relevance-carrying arguments and its gradient is not known to be exact: the error that
    :class:`UnruledOperationWarning` is otherwise. ``names`` holds the functions' names."""

    def __init__(self, message: str, names: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.names = tuple(names)


def op_name(func: Callable) -> str:
    """A readable name of a torch function, as the coverage reports and warnings spell it."""
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


class _InBody(threading.local):
    """The Python-level torch functions whose bodies this thread is running under the rules
    (``funcs``), and those it ran within a :func:`bodies_run` block (``ran``)."""

    def __init__(self) -> None:
        self.funcs: set = set()
        self.ran: Optional[set] = None


_IN_BODY = _InBody()


def run_body(mode: TorchFunctionMode, func: Callable, types_, args: Sequence, kwargs: Mapping) -> Any:
    """A torch function written in Python (``F.multi_head_attention_forward``, ...): its body run
    with ``mode`` active, so that the calls it makes are mapped in turn; ``NotImplemented`` for any
    other function, and for a function whose body reaches torch's function handling under its own
    name again (a Python Tensor method calling its C implementation), which is not redispatched a
    second time. On a torch without ``torch.overrides.redispatch_function`` (older releases) no body is run:
    such a function is one call, counted as unruled where it carries relevance. A forward that
    torch.compile traces cannot run such a body: it records the function as one call, which would
    run without the rules, so it raises (with ``fullgraph=True``, an error, in whose context dynamo names
    the function; without, dynamo breaks the graph there and the call runs eagerly, under the rules)."""
    if redispatch_function is None or not isinstance(func, types.FunctionType) or func in _IN_BODY.funcs:
        return NotImplemented
    if torch.compiler.is_dynamo_compiling():  # (not torch.export's tracing, which runs the body as eager does)
        # (a constant message: dynamo cannot trace the spelling of the function's name)
        raise RuntimeError(
            "lrpcpp: torch.compile records a torch function written in Python whose body the rules run call by "
            "call (such as F.multi_head_attention_forward, in nn.MultiheadAttention) as one call, which would run "
            "without the rules and give a wrong relevance; compile without fullgraph=True (the call then runs "
            "eagerly, with its rules), or explain the model with lrpcpp.attribute"
        )
    _IN_BODY.funcs.add(func)
    if _IN_BODY.ran is not None:
        _IN_BODY.ran.add(func)
    try:
        with mode:
            return redispatch_function(func, types_, args, kwargs)
    finally:
        _IN_BODY.funcs.discard(func)


def ruled_in_place(name: str) -> None:
    """Records, in a :func:`bodies_run` block, a custom autograd.Function (by name) that the operation
    level ruled in place of its own backward."""
    if _IN_BODY.ran is not None:
        _IN_BODY.ran.add(name)


@contextlib.contextmanager
def bodies_run():
    """A block that collects (in the set it yields) the functions whose bodies :func:`run_body`
    ran in it, and the names of the custom autograd.Functions ruled in place of their own backward
    (:func:`ruled_in_place`). torch.compile can do neither: it records such a function
    (``F.multi_head_attention_forward``) as one call, which then runs without the rules, and keeps a
    custom Function's own backward."""
    outer, _IN_BODY.ran = _IN_BODY.ran, set()
    try:
        yield _IN_BODY.ran
    finally:
        if outer is not None:
            outer.update(_IN_BODY.ran)
        _IN_BODY.ran = outer


# ----------------------------------------------------------------------------- the mode stack
def is_rule_mode(mode: Any) -> bool:
    return isinstance(mode, RuleMode)


@contextlib.contextmanager
def without(select: Callable[[Any], bool]):
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
    with without(is_rule_mode):
        return fn(*args, **kwargs)


def _plain(func: Callable, args: Sequence, kwargs: Mapping):
    with without(is_rule_mode):
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- tensor helpers
# Tensors that require grad only because they were computed from parameters (a projection of a
# detached input, ``1 + weight``, ``weight.T``, an embedding lookup); marked by the mode as they are
# created, with this attribute set on the tensor (an attribute rather than a table keyed by tensors,
# so that torch.compile traces the mode). Like parameters, they carry no relevance.
FROM_PARAMETERS = "_lrpcpp_from_parameters"


def carries(x: Any) -> bool:
    """A tensor that carries relevance: requires grad, and is neither a parameter nor computed from
    parameters alone (inside the mode)."""
    return (
        isinstance(x, Tensor)
        and x.requires_grad
        and not getattr(x, FROM_PARAMETERS, False)
        # isinstance(x, nn.Parameter), without its Python instance check for a plain tensor (where that
        # check reads the flag a parameter of a tensor subclass has)
        and not (getattr(x, "_is_param", False) if type(x) is Tensor else isinstance(x, nn.Parameter))
    )


def requires_grad(args: Sequence, kwargs: Mapping) -> bool:
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                if a.requires_grad:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(b, Tensor) and b.requires_grad for b in a):
                    return True
    return False


def tensor_args(args: Sequence, kwargs: Mapping) -> List[Tensor]:
    found: List[Tensor] = []
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                found.append(a)
            elif isinstance(a, (list, tuple)):
                found.extend(b for b in a if isinstance(b, Tensor))
    return found


def mark_from_parameters(out: Any) -> None:
    if isinstance(out, Tensor):
        if out.requires_grad:
            setattr(out, FROM_PARAMETERS, True)
    elif isinstance(out, (list, tuple)):
        for o in out:
            mark_from_parameters(o)


def marked_arguments(args: Sequence, kwargs: Mapping) -> List[Tuple[Tensor, Optional[int]]]:
    """The arguments computed from parameters alone, each with its version counter (``None`` in a
    forward that torch.compile traces, where versions are not known), for :func:`unmark_written`."""
    return marked_tensors(tensor_args(args, kwargs), torch.compiler.is_compiling())


def marked_tensors(tensors: Sequence[Tensor], compiling: bool) -> List[Tuple[Tensor, Optional[int]]]:
    """:func:`marked_arguments` of a call whose tensor arguments are ``tensors`` (a caller that has
    them at hand: only a tensor that requires grad can be marked)."""
    return [(t, None if compiling else t._version) for t in tensors if getattr(t, FROM_PARAMETERS, False)]


def unmark_written(marked: Sequence[Tuple[Tensor, Optional[int]]], out: Any) -> None:
    """A tensor computed from parameters that a call wrote relevance-carrying values into (in place)
    carries relevance from then on. Written: its version counter moved; in a compiled forward, the
    call returned it (an in-place method, ``out=``) or nothing (``Tensor.__setitem__``)."""
    for t, version in marked:
        if (t._version != version) if version is not None else (out is t or out is None):
            setattr(t, FROM_PARAMETERS, False)


def any_carrier(args: Sequence, kwargs: Mapping) -> bool:
    for values in (args, kwargs.values()):
        for a in values:
            if isinstance(a, Tensor):
                if carries(a):
                    return True
            elif isinstance(a, (list, tuple)):
                if any(carries(b) for b in a):
                    return True
    return False


def const(x: Any) -> Any:
    """A tensor that does not carry relevance enters an op as a constant (a parameter is detached)."""
    if isinstance(x, Tensor) and x.requires_grad and not carries(x):
        return x.detach()
    return x


def operand(x: Any, dtype: torch.dtype, like: Tensor) -> Tensor:
    """``x`` (tensor or Python number) as a tensor of ``dtype`` on ``like``'s device."""
    if not isinstance(x, Tensor):
        return torch.tensor(x, dtype=dtype, device=like.device)
    x = const(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.device != like.device:
        x = x.to(like.device)
    return x


def with_gradient_of(value: Tensor, lin: Tensor) -> Tensor:
    """``value`` (torch's own, computed without grad) with the gradient of ``lin``, a formula of the
    same value whose gradient is the rule: the added term is an exact zero."""
    return value + (lin - lin.detach())


Shares = Union[float, Tuple[Tuple[int, float], ...]]


def share_scale(scales: dict, share: Shares, like: Tensor) -> Tensor:
    """The scale that ``gi_grad_scale`` multiplies ``like``'s gradient by: one ``share`` for all of it
    (a 0-dim tensor, so that the backward multiplies by a scalar), or one per consecutive slice of
    its last dim (``(width, share)`` pairs, a fused q/k/v projection's). Made once per share, device
    and dtype and kept in ``scales``; in float32 for half precision, in float64 for a float64 tensor
    (a share such as 1/3)."""
    key = (share, like.device, like.dtype)
    scale = scales.get(key)
    if scale is None:
        dtype = torch.promote_types(like.dtype, torch.float32)
        if isinstance(share, tuple):
            scale = torch.cat([torch.full((n,), s, dtype=dtype, device=like.device) for n, s in share])
        else:
            scale = torch.tensor(share, dtype=dtype, device=like.device)
        scales[key] = scale
    return scale


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


def inplace_form(handler: Callable, outofplace: Callable) -> Callable:
    """The in-place form of an out-of-place rule handler (of either mode's table): computed out of
    place on a copy of the target, then written into it (``copy_``), so aliases and views see the
    change as with torch."""

    def run(mode, func, input, *args, **kwargs):
        if not isinstance(input, Tensor):
            return NotImplemented
        result = handler(mode, outofplace, input.clone(), *args, **kwargs)
        return result if result is NotImplemented else input.copy_(result)

    return run


def pass_to(receiver: Tensor, compute: Callable[[], Tensor]) -> Tensor:
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
        if carries(a) and not any(a is c for c in carriers):
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
    return pass_to(receiver, lambda: out)


def epsilon_rule(
    rules: RuleMode,
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
    slots = [s for s in slots if carries(args[s] if isinstance(s, int) else kwargs.get(s))]
    carriers = [args[s] if isinstance(s, int) else kwargs[s] for s in slots]
    base_args = [const(a) for a in args]
    base_kwargs = {k: const(v) for k, v in kwargs.items()}

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
