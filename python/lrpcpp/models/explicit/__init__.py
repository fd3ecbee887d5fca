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
``torch.where`` selection, dtype casts, ``scatter`` placement, ``max``/``min`` as winner-takes-all,
...); any other function without an entry in :data:`RULES` keeps its gradient with an
:class:`UnruledOperationWarning` that names it. Dropout is off, whatever the training flag. A
Python-level torch function without an entry (``F.multi_head_attention_forward``, for example)
runs with the rules still active, so the calls it makes are mapped in turn.

The mode is active only inside its ``with`` block, in the thread that entered it; nothing in
torch is changed.
"""

from typing import Callable, Mapping

from ..tracking import identity_rule, run_plain
from . import handlers, pass_through
from .mode import ExplicitRules, UnruledOperationWarning

#: The mapping from torch functions to their explicit rules: ``{function: handler}``. Every
#: spelling of an operation (``torch.add``, ``Tensor.add``, ``Tensor.__add__``, ...) has its own
#: entry. A function that is not a key keeps its ordinary gradient.
RULES: Mapping[Callable, Callable] = handlers.RULES

#: The torch functions whose ordinary gradient passes relevance on exactly, so that they need no
#: rule: views and reshapes, dtype casts and copies, indexing, slicing, gathering, masking and
#: ``torch.where`` selection, concatenation and splitting, expansion and repetition (the copies'
#: relevance is summed back), padding, and max pooling and ``topk`` (the selected elements take all
#: of it). A call with a relevance-carrying argument and a relevance-carrying result that has
#: neither a rule in :data:`RULES` nor an entry here keeps its gradient, with an
#: :class:`UnruledOperationWarning` that names it.
PASS_THROUGH = pass_through.PASS_THROUGH

__all__ = ["ExplicitRules", "RULES", "PASS_THROUGH", "UnruledOperationWarning", "identity_rule", "run_plain"]
