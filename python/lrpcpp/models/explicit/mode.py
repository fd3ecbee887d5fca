"""The torch function mode :class:`ExplicitRules`, which runs torch calls through :data:`RULES`, and
the :class:`UnruledOperationWarning` it gives for a call it has no rule for."""

import contextlib
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from ..tracking import (
    RuleMode,
    UnruledOperationWarning,
    any_carrier,
    is_rule_mode,
    mark_from_parameters,
    marked_arguments,
    op_name,
    requires_grad,
    run_body,
    unmark_written,
    without,
)
from .handlers import RULES
from .pass_through import DROPOUT, PASS_THROUGH


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
class ExplicitRules(RuleMode):
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
        with without(is_rule_mode):
            yield

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DROPOUT:
            return args[0] if args else kwargs["input"]
        grad = torch.is_grad_enabled()
        carriers = grad and any_carrier(args, kwargs)
        if carriers:
            marked = marked_arguments(args, kwargs)
            out = self._with_relevance(func, types_, args, kwargs)
            unmark_written(marked, out)
            return out
        from_parameters = grad and requires_grad(args, kwargs)
        out = func(*args, **kwargs)
        if from_parameters:
            mark_from_parameters(out)
        return out

    def _with_relevance(self, func, types_, args, kwargs):
        """A call with at least one relevance-carrying argument."""
        handler = RULES.get(func)
        if handler is not None:
            if torch._C._len_torch_function_stack():
                with without(is_rule_mode):
                    out = handler(self, func, *args, **kwargs)
            else:
                out = handler(self, func, *args, **kwargs)
            if out is not NotImplemented:
                return out
        else:
            out = run_body(self, func, types_, args, kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if not _has_rule(func) and _carries_relevance(out):
            name = op_name(func)
            warnings.warn(
                f"lrpcpp.ExplicitRules: {name} has no explicit LRP rule (for these arguments); its "
                f"relevance-carrying input got the plain gradient of {name}, which is in general not a "
                "relevance rule. Give that step a rule (lrpcpp.models.explicit.identity_rule, "
                "lrpcpp.functional.epsilon, ...) or run it without the rules (lrpcpp.models.explicit.run_plain)",
                UnruledOperationWarning,
                stacklevel=3,
            )
        return out
