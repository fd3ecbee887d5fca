"""The torch function mode :class:`GradientRules` (operation-level rules of gradient mode) and the
:class:`Coverage` report of what it saw."""

import collections
import contextlib
import warnings
from collections import abc
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..tracking import (
    RuleMode,
    UnruledOperationError,
    UnruledOperationWarning,
    carries,
    is_rule_mode,
    mark_from_parameters,
    marked_tensors,
    op_name,
    ruled_in_place,
    run_body,
    share_scale,
    tensor_args,
    unmark_written,
    with_gradient_of,
    without,
)
from .handlers import ELEMENTWISE, EXACT, GATES, KEEPS_GATE, RULES

__all__ = ["GradientRules", "Coverage"]

_GATE = "_lrpcpp_gate"  # the attribute that marks a gate (a tensor attribute, which torch.compile traces)
# plain dicts: torch.compile traces lookups in them (not in a mappingproxy or a frozenset of functions)
_RULES, _EXACT, _GATES = dict(RULES), dict.fromkeys(EXACT, True), dict.fromkeys(GATES, True)
_KEEPS_GATE = dict.fromkeys(KEEPS_GATE, True)
_ELEMENTWISE = dict.fromkeys(ELEMENTWISE, True)
# the attribute on the result of an element-wise function of one carrier computed without grad (inside
# a custom autograd.Function's forward): that input
_ELEMENTWISE_OF = "_lrpcpp_elementwise_of"
# what a tensor is (its shape, dtype, device, its place in the graph, ...), never a tensor: these calls
# pass straight through, as they would after the scan of their arguments (they return nothing to rule,
# mark or count; reading the grad_fn of a custom autograd.Function's output uses no function: torch
# before 2.13's checkpoint reads that of its own input saver); a model's forward asks them often (LLaMA:
# about one call in five of the mode's)
_METADATA = dict.fromkeys(
    [
        getattr(Tensor, name).__get__
        for name in ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "grad_fn", "requires_grad", "is_leaf")
    ]
    + [getattr(Tensor, name) for name in ("size", "dim", "numel", "stride", "is_contiguous", "is_floating_point")],
    True,
)


@dataclass(frozen=True)
class Coverage:
    """What the operation level saw: the calls with a relevance-carrying input, by function name,
    in three kinds. ``ruled``: given a rule of :data:`~lrpcpp.models.operations.RULES` (or an lrpcpp
    operator, such as the identity rule of an activation module). ``passed``: their ordinary
    gradient is the rule (:data:`~lrpcpp.models.operations.EXACT`). ``unruled``: neither (an unknown
    function, a custom ``torch.autograd.Function``): they kept their plain gradient, which is in
    general not a relevance rule. Calls returning no relevance-carrying tensor (shape and dtype
    queries) are not counted."""

    ruled: Mapping[str, int]
    passed: Mapping[str, int]
    unruled: Mapping[str, int]

    @property
    def seen(self) -> int:
        return sum(self.ruled.values()) + sum(self.passed.values()) + sum(self.unruled.values())

    def __repr__(self) -> str:
        unruled = ", ".join(f"{n} x{c}" for n, c in sorted(self.unruled.items())) or "none"
        return (
            f"Coverage(seen={self.seen}, ruled={sum(self.ruled.values())}, passed={sum(self.passed.values())}, "
            f"unruled: {unruled})"
        )


def _lrpcpp_ops() -> Dict[Callable, bool]:
    """Every ``torch.ops.lrpcpp`` operator, as packet and as overload (registered when the package
    is imported, before this module)."""
    ops: Dict[Callable, bool] = {}
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualified.partition("::")
        if namespace == "lrpcpp":
            packet = getattr(torch.ops.lrpcpp, name.split(".")[0])
            ops.update(dict.fromkeys([packet] + [getattr(packet, o) for o in packet.overloads()], True))
    return ops


_LRPCPP_OPS = _lrpcpp_ops()


def _is_lrpcpp_op(func: Callable) -> bool:
    return func in _LRPCPP_OPS  # a lookup, not a test of the name: torch.compile traces it


# What the mode does with a torch function, looked up once per function: its handler of RULES (or
# None), and the coverage kind of a call that keeps its ordinary gradient ("ruled" for an lrpcpp
# operator, "passed" for EXACT, None: unruled).
_KINDS: Dict[Callable, Tuple[Optional[Callable], Optional[str]]] = {}


def _kind(func: Callable, compiling: bool) -> Tuple[Optional[Callable], Optional[str]]:
    """``func``'s handler of RULES (or None) and the coverage kind of a call that keeps its ordinary
    gradient, cached per function in eager mode (a forward that torch.compile traces, ``compiling``,
    reads the rule tables directly: a cache filled while tracing would become a guard of the graph)."""
    kind = None if compiling else _KINDS.get(func)
    if kind is None:
        plain = "ruled" if _is_lrpcpp_op(func) else "passed" if func in _EXACT else None
        kind = (_RULES.get(func), plain)
        if not compiling:
            _KINDS[func] = kind
    return kind


# a torch function's readable name, spelled once per function (every attribute call names its coverage)
_NAMES: Dict[Any, str] = {}


def _names(counts: Mapping[Any, int]) -> Dict[str, int]:
    """Counts by torch function (or by name) as counts by readable name."""
    named: Dict[str, int] = collections.Counter()
    for key, n in counts.items():
        if isinstance(key, str):
            named[key] += n
            continue
        name = _NAMES.get(key)
        if name is None:
            name = _NAMES[key] = op_name(key)
        named[name] += n
    return dict(named)


def _tensors(out: Any):
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, abc.Mapping):
        for o in out.values():
            yield from _tensors(o)
    elif isinstance(out, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return  # a size (symbolic, when torch.compile traces with dynamic shapes)
    elif hasattr(out, "to_tuple"):  # a Hugging Face ModelOutput
        yield from _tensors(out.to_tuple())


_CUSTOM_FUNCTION_NODE = torch.autograd.function.BackwardCFunction  # the graph node of a custom Function
_IN_PLACE_OPERATORS = frozenset(
    ["__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ifloordiv__", "__imod__"]
    + ["__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"]
)


def _writes(func: Callable, kwargs: Mapping) -> bool:
    """Whether a call writes into its first argument (an in-place method such as ``add_``, an in-place
    operator, ``Tensor.__setitem__``) or into ``out=``."""
    name = getattr(func, "__name__", "")
    return "out" in kwargs or (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS


def _substituted(values: Any, by_id: Mapping[int, Tensor]) -> tuple:
    """``values`` (a call's arguments) with the tensors of ``by_id`` replaced, also in lists and tuples."""
    return tuple(
        by_id.get(id(v), v)
        if isinstance(v, Tensor)
        else type(v)(by_id.get(id(b), b) if isinstance(b, Tensor) else b for b in v)
        if type(v) in (list, tuple)
        else v
        for v in values
    )


def _requires_grad(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.requires_grad
    if out is None or isinstance(out, (torch.Size, int, float)):
        return False
    return any(t.requires_grad for t in _tensors(out))


class GradientRules(RuleMode):
    """A torch function mode that puts the gradient-mode rules (RULES.md section 2) on the torch
    calls of unmodified model code, operation by operation: ``method`` ``"attnlrp"`` (products split
    evenly) or ``"cp-lrp"`` (gates held constant); ``epsilon`` stabilises the identity rule. With
    ``strict``, a call without a rule whose gradient is not known to be exact raises
    :class:`~lrpcpp.models.operations.UnruledOperationError` (a ``RuntimeError``); otherwise it is
    counted (:meth:`coverage`). Activation and RMSNorm modules are
    patched as units by :func:`lrpcpp.patch`, which runs the model's forward in this mode."""

    def __init__(self, method: str = "attnlrp", epsilon: float = 1e-10, strict: bool = False) -> None:
        super().__init__()
        if method not in ("attnlrp", "cp-lrp"):
            raise ValueError(f"GradientRules: method must be 'attnlrp' or 'cp-lrp', got {method!r}")
        if not epsilon >= 0:
            raise ValueError(f"GradientRules: expected epsilon >= 0, got {epsilon}")
        self.method, self.uniform, self.epsilon, self.strict = method, method == "attnlrp", float(epsilon), strict
        # calls by torch function (a custom autograd.Function by name), named when read
        self._counts: Dict[str, collections.Counter] = {
            k: collections.Counter() for k in ("ruled", "passed", "unruled")
        }
        self._functions = WeakIdKeyDictionary()  # grad_fn of a custom autograd.Function -> already counted
        self._scales: Dict[Any, Tensor] = {}

    def __repr__(self) -> str:
        return f"GradientRules(method={self.method!r}, epsilon={self.epsilon}, strict={self.strict})"

    # --- what the handlers use
    def share(self, t: Tensor, share: float) -> Tensor:
        """``t`` with its gradient scaled by ``share`` (``gi_grad_scale``; 0 detaches)."""
        if share == 0.0:
            return t.detach()
        if share == 1.0:
            return t
        if t.is_complex():  # (a product of complex carriers; gi_grad_scale takes real tensors)
            return with_gradient_of(t.detach(), t * share)
        # a view of t (no copy): the ops after it see the layout the model made; gi_scale_backward keeps
        # the layout the gradient arrives in, as an element-wise product does (the gradients that
        # F.scaled_dot_product_attention returns for an attention's heads, a transposed view of their
        # projection, are in that projection's memory order: the views that made the heads pass them back
        # without a copy)
        return torch.ops.lrpcpp.gi_grad_scale(t, share_scale(self._scales, share, t))

    def is_gate(self, t: Any) -> bool:
        return isinstance(t, Tensor) and getattr(t, _GATE, False)

    def mark_gate(self, out: Any) -> None:
        if self.uniform:
            return  # only CP-LRP holds gates constant (handlers.py asks is_gate only then)
        for t in _tensors(out):
            if t.requires_grad:
                setattr(t, _GATE, True)

    # --- the report
    def coverage(self) -> Coverage:
        return Coverage(**{k: MappingProxyType(_names(c)) for k, c in self._counts.items()})

    def unruled_snapshot(self) -> Dict[Any, int]:
        """The unruled calls counted so far, by function (for :meth:`unruled_since`)."""
        return dict(self._counts["unruled"])

    def unruled_since(self, before: Mapping[Any, int]) -> Dict[str, int]:
        """The unruled calls counted since ``before`` (an :meth:`unruled_snapshot`), by name."""
        now = self._counts["unruled"]
        return _names({f: c - before.get(f, 0) for f, c in now.items() if c > before.get(f, 0)}) if now else {}

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """The calls of the block are ruled but not counted: a checkpointed layer's forward, which the
        backward pass recomputes, was counted when it ran in the forward pass."""
        saved = {k: c.copy() for k, c in self._counts.items()}
        try:
            yield
        finally:
            for k, c in saved.items():
                self._counts[k] = c

    def _count(self, kind: str, func: Any, compiling: Optional[bool] = None) -> None:
        """Counts a call (a torch function, or the name of a custom autograd.Function) as ``kind``;
        an unruled one raises with ``strict``. Counted by function, named when read. A compiled
        forward counts nothing: the counts would become constants of its graph
        (:func:`lrpcpp.deploy.compile_attribute` reports the coverage of an eager forward instead).
        ``compiling``: whether the forward is compiled, where the caller knows it already."""
        compiled = torch.compiler.is_compiling() if compiling is None else compiling
        if kind == "unruled" and self.strict and compiled:
            # strict holds in a forward compiled by hand too: dynamo stops there (with fullgraph=True, with this
            # error in its own; without, it runs the call eagerly, which raises the error below). (A RuntimeError
            # with a constant message: dynamo traces neither the spelling of a function's name nor the
            # construction of an exception class of this package.)
            raise RuntimeError(
                "lrpcpp (operation level, strict=True): a call of the compiled forward has no gradient-mode rule "
                "and its gradient is not known to be exact on the relevance-carrying path; run the forward without "
                "torch.compile for its name, or pass strict=False to count it in the coverage instead"
            )
        if compiled:
            return
        if kind == "unruled" and self.strict:
            name = func if isinstance(func, str) else op_name(func)
            raise UnruledOperationError(
                f"lrpcpp (operation level, strict=True): {name} has no gradient-mode rule and its gradient is not "
                "known to be exact on the relevance-carrying path; give that step a rule (an lrpcpp operator, "
                "or a module the patch treats), or pass strict=False to count it in the coverage instead",
                [name],
            )
        self._counts[kind][func] += 1

    def check_functions(self, values: Any) -> None:
        """Reports a custom ``torch.autograd.Function`` whose relevance-carrying output is among
        ``values``: the mode sees its forward's calls only without grad, so it finds the function
        by the node it left in the graph (in an eager forward: a compiled one has no such nodes).
        (Here, the output of the model, no rule can take the place of the function's backward.)"""
        if torch.compiler.is_compiling():
            return
        for t in _tensors(values):
            self._check_function(t, ruled=False)

    def _check_function(self, t: Tensor, ruled: bool = True) -> Optional[Tensor]:
        """For ``t``, a relevance-carrying argument of a call: where it is the output of a custom
        autograd.Function, the function is counted, once; the function is ruled when its forward
        returned an element-wise function of its relevance-carrying input (RecurrentGemma's square
        root with a clipped gradient): the identity rule's ``gi_identity`` of that input is returned,
        to take ``t``'s place in the call, so that the function's own backward is not used.
        ``ruled=False``: the call writes into ``t`` in place, or ``t`` is the model's output, where no
        substitute can take its place; a function ruled where it was read is then counted unruled too."""
        # (a tensor computed from parameters alone was the output of a call the mode saw, never
        # of a custom Function, so the calls check their relevance-carrying arguments only)
        if not t.requires_grad:
            return None
        node = t.grad_fn
        if not isinstance(node, _CUSTOM_FUNCTION_NODE):
            return None
        known = self._functions.get(node)  # True (counted), or the substitute of a ruled function
        if known is True:
            return None
        if known is not None and ruled:
            return known
        cls = node._forward_cls  # type: ignore[attr-defined]  # a custom Function's class, not in torch's stubs
        name = f"{cls.__module__}.{cls.__qualname__}.apply (a custom autograd.Function)"
        if known is not None:  # ruled where it was read, now written in place: its own backward is used too
            self._functions[node] = True
            self._count("unruled", name)
            return None
        of = getattr(t, _ELEMENTWISE_OF, None)
        if cls.__module__.startswith("lrpcpp"):
            self._functions[node] = True
        elif ruled and of is not None:
            substitute = torch.ops.lrpcpp.gi_identity(of, t.detach(), self.epsilon)
            self._functions[node] = substitute
            self._count("ruled", name)
            ruled_in_place(name)
            return substitute
        else:
            self._functions[node] = True
            self._count("unruled", name)
        return None

    # --- the calls of identity-rule units, made without torch's function dispatch
    def alone(self) -> bool:
        """Whether this mode is the one active torch function mode of an eager forward: then an
        identity-rule unit (:func:`lrpcpp.patch` at the operation level) may take it off the stack for
        its own calls (:meth:`suspended`), which are its rule, and count its rule itself."""
        return (
            not torch.compiler.is_compiling()
            and torch._C._is_torch_function_mode_enabled()  # (not in a torch._C.DisableTorchFunction block)
            and torch._C._len_torch_function_stack() == 1
            and torch._C._get_function_stack_at(0) is self
        )

    def suspended(self) -> "_Suspended":
        """The block runs with this mode off the stack (a unit whose calls are its own rule; it counts
        them itself with :meth:`count_ruled`)."""
        return _Suspended(self)

    def count_ruled(self, func: Callable) -> None:
        """Counts a call that a unit made with the mode :meth:`suspended` as ruled."""
        self._count("ruled", func)

    def count_unruled(self, name: str) -> None:
        """Counts a call that the mode cannot see (a TorchScript module's, by name) as unruled; with
        ``strict``, raises."""
        self._count("unruled", name)

    @staticmethod
    def plain_carrier(t: Any) -> bool:
        """A relevance-carrying tensor (of torch's own type) that no custom autograd.Function
        returned: a unit's input that the mode's checks of a call's arguments would leave as it is."""
        return type(t) is Tensor and _plain_carrier(t)

    # --- the mode
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        # (the hot path of every forward at the operation level: one pass over the arguments, the
        # common calls without helper functions; see benchmarks/bench_models.py for its cost per call)
        if func in _METADATA:
            return func(*args, **kwargs) if kwargs else func(*args)
        compiling = torch.compiler.is_compiling()
        if not compiling and args:
            carriers = _plain_carriers(args, kwargs)
            if carriers is False:  # most calls of a model with frozen parameters: shapes, masks, positions
                return func(*args, **kwargs) if kwargs else func(*args)
            if carriers:
                # the calls that most forwards make most (views, transposes, additions, linear maps, layer
                # norms, attention): every argument that requires grad carries relevance and needs no checks,
                # so the call goes to its rule at once (with AttnLRP, where its ordinary gradient is the rule,
                # it is made: CP-LRP asks such a call whether it passes a gate on)
                kind = _KINDS.get(func)
                if kind is not None:
                    if kind[0] is None and kind[1] is not None and self.uniform:
                        out = func(*args, **kwargs) if kwargs else func(*args)
                        if out.requires_grad if isinstance(out, Tensor) else _requires_grad(out):
                            self._counts[kind[1]][func] += 1
                        return out
                    return self._with_relevance(func, types_, args, kwargs or {}, compiling)
        if kwargs is None:
            kwargs = {}
        if not torch.is_grad_enabled():
            out = func(*args, **kwargs)
            if func in _ELEMENTWISE and isinstance(out, Tensor) and args and carries(args[0]):
                # maybe the result of a custom autograd.Function's forward: _check_function
                if not any(carries(t) for t in tensor_args(args[1:], kwargs)):
                    setattr(out, _ELEMENTWISE_OF, args[0])
            return out
        grads = [t for t in tensor_args(args, kwargs) if t.requires_grad]
        if not grads:  # (an eager forward's calls made above; a compiled one's and keyword-only calls)
            if not compiling and torch._C._are_functorch_transforms_active():
                return self._transformed(func, args, kwargs)
            return func(*args, **kwargs)
        carrying = [t for t in grads if carries(t)]
        if not carrying:
            out = func(*args, **kwargs)
            mark_from_parameters(out)
            return out
        if not compiling:  # a compiled forward leaves no custom Function's node
            ruled = {}
            for t in carrying:
                if isinstance(t.grad_fn, _CUSTOM_FUNCTION_NODE):
                    # (a tensor that the call writes into keeps its own tensor)
                    written = bool(args) and t is args[0] and _writes(func, kwargs)
                    substitute = self._check_function(t, ruled=not written)
                    if substitute is not None:
                        ruled[id(t)] = substitute
            if ruled:
                args, kwargs = _substituted(args, ruled), dict(zip(kwargs, _substituted(kwargs.values(), ruled)))
        marked = (
            marked_tensors([t for t in grads if not any(t is c for c in carrying)], compiling)
            if len(carrying) < len(grads)
            else None
        )
        out = self._with_relevance(func, types_, args, kwargs, compiling)
        if marked:
            unmark_written(marked, out)  # written into in place with relevance-carrying values
        return out

    def _transformed(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A call inside ``torch.vmap`` (or another ``torch.func`` transform), whose tensors are the
        transform's wrappers, which require no grad: the rules do not reach into it, so a call whose
        wrapped arguments and result carry relevance keeps its plain gradient and is counted as
        unruled, by name, with the transform named (a rule would have to hold inside the transform)."""
        out = func(*args, **kwargs)
        if any(_unwrapped(t) for t in _tensors(out)) and any(_unwrapped(t) for t in tensor_args(args, kwargs)):
            self._count("unruled", f"{op_name(func)} (inside a torch.func transform, such as torch.vmap)")
        return out

    def _with_relevance(self, func, types_, args, kwargs, compiling):
        handler, plain = (None if compiling else _KINDS.get(func)) or _kind(func, compiling)
        if handler is not None:
            if torch._C._len_torch_function_stack() == 0:  # no other mode active (nothing to suspend)
                out = handler(self, func, *args, **kwargs)
            else:
                with without(is_rule_mode):
                    out = handler(self, func, *args, **kwargs)
            if out is not NotImplemented:
                self._count("ruled", func, compiling)
                if func in _GATES:
                    self.mark_gate(out)
                return out
        if plain is not None:
            out = func(*args, **kwargs)
            if out.requires_grad if isinstance(out, Tensor) else _requires_grad(out):
                if not compiling:
                    self._counts[plain][func] += 1
                if not self.uniform and (
                    func in _GATES or (func in _KEEPS_GATE and any(self.is_gate(t) for t in tensor_args(args, kwargs)))
                ):
                    self.mark_gate(out)  # a gate stays one through casts, views and dropout
            return out
        out = run_body(self, func, types_, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
            if _requires_grad(out):
                self._count("unruled", func, compiling)
        return out


class _Suspended:
    """:meth:`GradientRules.suspended`'s block (a class rather than a generator: it is entered on every
    call of an identity-rule unit)."""

    __slots__ = ("mode",)

    def __init__(self, mode: GradientRules):
        self.mode = mode

    def __enter__(self) -> None:
        torch._C._pop_torch_function_stack()

    def __exit__(self, *exc: Any) -> None:
        torch._C._push_on_torch_function_stack(self.mode)


def _plain_carriers(args: tuple, kwargs: Optional[Mapping]) -> Optional[bool]:
    """What a call's arguments need, in a forward with grad, in one pass over them (also into lists
    and tuples, and over those given by keyword): ``False`` where no tensor among them requires grad
    (the mode makes the call as it is); ``True`` where every one that does is a relevance-carrying
    tensor of torch's own type that no custom autograd.Function returned (the checks of the whole mode
    would leave the call as it is: no substitute, nothing marked, so
    :meth:`GradientRules.__torch_function__` hands it to its rule at once); ``None`` otherwise, and in
    a forward without grad: the whole scan."""
    if not torch.is_grad_enabled():
        return None
    found = False
    for a in args + tuple(kwargs.values()) if kwargs else args:
        kind = type(a)
        if kind in _NO_TENSOR:
            continue
        if kind is Tensor:
            if a.requires_grad:
                if not _plain_carrier(a):
                    return None
                found = True
        elif isinstance(a, Tensor):  # (a subclass)
            if a.requires_grad:
                return None
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor) and b.requires_grad:
                    if type(b) is not Tensor or not _plain_carrier(b):
                        return None
                    found = True
    # (inside torch.vmap the tensors are wrappers that require no grad: the whole scan looks into them)
    return None if not found and torch._C._are_functorch_transforms_active() else found


def _unwrapped(t: Tensor) -> bool:
    """Whether the tensor that ``torch.vmap`` (or another ``torch.func`` transform) wraps as ``t``
    carries relevance."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return carries(t)


def _plain_carrier(t: Tensor) -> bool:
    """It :func:`carries` relevance, and no custom autograd.Function returned it."""
    return carries(t) and not isinstance(t.grad_fn, _CUSTOM_FUNCTION_NODE)


_NO_TENSOR = dict.fromkeys([int, float, bool, type(None), str, torch.dtype, torch.device, torch.Size], True)


def unruled_message(names: Mapping[str, int], where: str) -> Optional[str]:
    """The text of the one warning per forward pass that names the unruled functions."""
    if not names:
        return None
    listed = ", ".join(f"{n} (x{c})" for n, c in sorted(names.items()))
    return (
        f"lrpcpp: the operation-level rules of {where} have no rule for {listed}: their relevance-carrying "
        "inputs got the plain gradient, which is in general not a relevance rule, so the relevance may be wrong. "
        "Describe the architecture with lrpcpp.register_family, or pass strict=True to make this an error"
    )


def warn_unruled(names: Mapping[str, int], where: str) -> None:
    message = unruled_message(names, where)
    if message is not None:
        warnings.warn(message, UnruledOperationWarning, stacklevel=3)


__all__ += ["UnruledOperationError", "UnruledOperationWarning"]
