"""The parameters of a function or method, read once per function: ``inspect.signature`` takes tens of
microseconds, and every ``lrpcpp.attribute`` call asks about the model's forward and the presets."""

import inspect
import types
import weakref
from typing import Callable, Mapping

__all__ = ["parameters"]

# function -> its parameters, and function -> the parameters of a method of it (those of the function
# less the first, whatever the method is bound to). Weak keys: an entry goes with its function, and it
# holds nothing the function does not (defaults, annotations).
_FUNCTIONS: "weakref.WeakKeyDictionary[Callable, Mapping[str, inspect.Parameter]]" = weakref.WeakKeyDictionary()
_METHODS: "weakref.WeakKeyDictionary[Callable, Mapping[str, inspect.Parameter]]" = weakref.WeakKeyDictionary()


def parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    """``inspect.signature(fn).parameters`` (raising as it does), read once per Python function, and
    once per function for the methods bound to it."""
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType):
        cache, func = _METHODS, fn.__func__
    elif isinstance(fn, types.FunctionType):
        cache, func = _FUNCTIONS, fn
    else:  # a partial, a callable object, a builtin: read each time
        return inspect.signature(fn).parameters
    found = cache.get(func)
    if found is None:
        found = cache[func] = inspect.signature(fn).parameters
    return found
