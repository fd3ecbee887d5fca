"""AttnLRP as a Captum attribution method: :class:`AttnLRP` computes what Captum's
``InputXGradient`` computes, inside :func:`lrpcpp.patch` of the model (gradient mode, whose
relevance is gradient times input), with Captum's calling conventions::

    from lrpcpp.interop.captum import AttnLRP

    relevance = AttnLRP(model).attribute(inputs_embeds, target=token_id)

It subclasses Captum's ``GradientAttribution`` when Captum is installed, so it goes wherever a
Captum method goes (``captum.attr.NoiseTunnel``, inseq, ...); without Captum it is a plain class
with the same ``attribute`` method.
"""

import functools
import inspect
import numbers
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..attribution import (
    check_finite,
    explaining,
    input_leaf,
    is_causal_decoder,
    last_positions,
    logits_of,
    model_kwargs,
    relevance_of,
)

try:  # Captum is optional: the base class where it is installed
    from captum.attr import GradientAttribution as _Base
except ImportError:  # pragma: no cover - tested where captum is absent
    _Base = object

__all__ = ["AttnLRP", "select_targets"]

_CALLER = "lrpcpp.interop.captum.AttnLRP"


def select_targets(output: Tensor, target: Any) -> Tensor:
    """Captum's target conventions: ``None`` (``output`` holds one value per example), an int (the
    same column of every example), a tuple (an index into the dims after the batch), a tensor of one
    index (or one per example), or a list of one int or tuple per example."""
    if not isinstance(output, Tensor):
        raise TypeError(f"{_CALLER}: the forward function must return a tensor, got {type(output).__name__}")
    batch = output.shape[0] if output.dim() else 1
    if target is None:
        return output
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return output[:, int(target)]
    if isinstance(target, tuple):
        return output[(slice(None),) + target]
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"{_CALLER}: a target tensor holds integer indices, got {target.dtype}")
        if target.numel() == 1:
            return output[:, int(target.item())]
        if target.dim() != 1 or target.shape[0] != batch:
            raise ValueError(
                f"{_CALLER}: a target tensor holds one index, or one per example (shape [{batch}]), got shape "
                f"{tuple(target.shape)}"
            )
        return output.gather(1, target.to(output.device, torch.long)[:, None])[:, 0]
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f"{_CALLER}: a list target holds one index per example ({batch}), got {len(target)}")
        rows = torch.arange(batch, device=output.device)
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            return output[rows, torch.tensor(target, device=output.device)]
        if all(isinstance(t, tuple) for t in target):
            return torch.stack([output[(i,) + t] for i, t in enumerate(target)])
    raise TypeError(
        f"{_CALLER}: target must be None, an int, a tuple, an integer tensor or a list of ints or tuples (one per "
        f"example), got {target!r}"
    )


def _takes_inputs_embeds(func: Callable) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(func.forward if isinstance(func, nn.Module) else func).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin
        return False


def _decorated(method: Callable) -> Callable:
    """``method`` as Captum decorates its methods' ``attribute``: wrapped, the function itself as
    ``__wrapped__``, which Captum's ``NoiseTunnel`` calls."""

    @functools.wraps(method)
    def attribute(*args, **kwargs):
        return method(*args, **kwargs)

    return attribute


class AttnLRP(_Base):  # type: ignore[misc,valid-type]
    """AttnLRP (or CP-LRP, ``method="cp-lrp"``) relevance with Captum's interface.

    ``forward_func``: the model, or a function of the inputs (and of ``additional_forward_args``)
    as Captum takes it. A model whose forward takes ``inputs_embeds`` (a Hugging Face model) is
    called as ``model(inputs_embeds=inputs, attention_mask=...)``, and what it explains is the
    output :func:`lrpcpp.attribute` explains: the logits of a classifier, or a language model's
    next-token logits after the last position (the last unmasked one with an attention mask);
    ``additional_forward_args`` is then the attention mask, if any. Any other callable is called as
    ``forward_func(*inputs, *additional_forward_args)`` and must return a tensor that ``target``
    indexes as in Captum.

    ``model``: the module to patch for the call; by default ``forward_func`` itself when it is a
    module, or the module of a bound method. ``method``, ``epsilon``, ``preset``, ``level``: as in
    :func:`lrpcpp.patch` (gradient mode). The parameters are frozen and the model in eval mode for
    the call only, as in :func:`lrpcpp.attribute`.
    """

    def __init__(
        self,
        forward_func: Callable,
        model: Optional[nn.Module] = None,
        method: Optional[str] = None,
        epsilon: Optional[float] = None,
        preset=None,
        level: str = "auto",
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"{_CALLER}: forward_func must be a model or a function, got {type(forward_func).__name__}")
        if model is None:
            model = forward_func if isinstance(forward_func, nn.Module) else getattr(forward_func, "__self__", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{_CALLER}: model= must be the torch.nn.Module that forward_func runs (the module to patch), got "
                f"{type(model).__name__}"
            )
        if _Base is object:
            self.forward_func = forward_func
        else:
            super().__init__(forward_func)
        self.model = model
        self.options = dict(method=method, epsilon=epsilon, preset=preset, level=level)
        self._embeds = forward_func is model and _takes_inputs_embeds(model)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return False

    def _explained_logits(self, embeds: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The logits :func:`lrpcpp.attribute` explains, of a model called with ``inputs_embeds``."""
        kwargs = model_kwargs(
            self.model, "inputs_embeds", embeds, attention_mask, is_causal_decoder(self.model), {}, _CALLER
        )
        logits = logits_of(self.model(inputs_embeds=embeds, **kwargs))
        if logits.dim() == 3:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, last_positions(attention_mask, logits.shape[0], logits.shape[1], logits.device)]
        return logits

    @_decorated
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        """The relevance of ``inputs`` (a tensor or a tuple of tensors; the same structure and
        shapes are returned) for the output ``target`` selects, as Captum's ``InputXGradient``."""
        single = not isinstance(inputs, tuple)
        given = (inputs,) if single else inputs
        leaves = tuple(input_leaf(x, f"inputs[{i}]", _CALLER) for i, x in enumerate(given))
        if additional_forward_args is None:
            extra: Tuple[Any, ...] = ()
        else:
            extra = (
                additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
            )
        if self._embeds and (len(leaves) != 1 or len(extra) > 1):
            raise ValueError(
                f"{_CALLER}: a model called with inputs_embeds takes one input tensor (the embeddings) and at most "
                f"one additional forward argument (the attention mask), got {len(leaves)} and {len(extra)}"
            )
        forward = self._explained_logits if self._embeds else self.forward_func
        with explaining(self.model, **self.options) as handle, torch.enable_grad(), handle.rules.context():
            explained = select_targets(forward(*leaves, *extra), target)
            if explained.dim() > 1 or (explained.dim() == 1 and explained.shape[0] != leaves[0].shape[0]):
                raise ValueError(
                    f"{_CALLER}: the selected output must hold one value per example, got shape "
                    f"{tuple(explained.shape)}; give target= (a class or token index)"
                )
            check_finite(explained, _CALLER)
            grads = torch.autograd.grad(explained, leaves, torch.ones_like(explained), allow_unused=True)
        relevance = tuple(relevance_of(x, g, False).detach() for x, g in zip(leaves, grads))
        return relevance[0] if single else relevance
