"""lrpcpp._signatures.parameters: inspect.signature's parameters, read once per function, holding no
object a method is bound to."""

import functools
import gc
import inspect
import weakref

import pytest
from lrpcpp._signatures import parameters
from torch import nn


class _Net(nn.Module):
    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return input_ids


def _free(a, b=1, *rest, c, **kw):
    return a


@pytest.mark.parametrize(
    "fn",
    [_free, _Net().forward, _Net.forward, functools.partial(_free, 1), lambda x, y=2: x, print],
    ids=["function", "bound method", "class function", "partial", "lambda", "builtin"],
)
def test_the_parameters_are_inspects(fn):
    expected = list(inspect.signature(fn).parameters.items())
    assert list(parameters(fn).items()) == expected
    assert list(parameters(fn).items()) == expected  # read again (from the cache where cached)


def test_a_method_is_read_once_per_function_and_the_cache_holds_no_instance():
    a, b = _Net(), _Net()
    first = parameters(a.forward)
    assert parameters(b.forward) is first  # one entry for the function, whatever it is bound to
    assert "self" not in first and "self" in parameters(_Net.forward)  # the function itself has its own entry
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None, "the cache kept a module alive"


def test_errors_are_inspects():
    with pytest.raises((TypeError, ValueError)):
        parameters(1)  # type: ignore[arg-type]
