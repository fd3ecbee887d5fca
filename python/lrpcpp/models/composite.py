"""Apply the explicit LRP rules to a whole model instance, and take them off again.

A :class:`Composite` swaps the layers of one model instance for their lrpcpp drop-ins (sharing
parameters and buffers, via ``from_module``) and runs that instance's ``forward`` inside
:class:`lrpcpp.models.explicit.ExplicitRules`, so the functions its code calls directly (``torch.matmul``,
``F.softmax``, residual additions, ...) follow the explicit rules too::

    composite = lrpcpp.Composite(epsilon=1e-6)
    with composite.context(model):
        x = x.detach().requires_grad_()
        y = model(x)
        y.backward(y)
    relevance = x.grad

``register(model)`` returns a :class:`CompositeHandle`; its ``remove()`` puts back exactly the
original module objects and ``forward``. Nothing outside the model instance is changed: no torch
class, no torch function, no other model.
"""

import contextlib
import functools
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from torch import nn

from .. import modules as lm
from ..rules import Rule
from .canonizers import MergedBatchNorm, conv_bn_pairs, mergeable, merged_conv_bn
from .explicit import ExplicitRules, identity_rule
from .presets import Preset, get_preset
from .state import ModelState, claim, release

__all__ = ["Composite", "CompositeHandle", "DEFAULT_MODULE_MAP", "identity_module"]

#: A drop-in class (with ``from_module``) or a callable ``(module) -> new module``; in ``name_map``
#: also ``None``, which leaves that module as it is.
Factory = Union[type, Callable[[nn.Module], nn.Module], None]

#: The module types a :class:`Composite` replaces by default, and their drop-ins.
DEFAULT_MODULE_MAP: Mapping[type, Factory] = MappingProxyType(
    {
        nn.Linear: lm.LinearEpsilon,
        nn.Conv2d: lm.Conv2dEpsilon,
        nn.LayerNorm: lm.LayerNormEpsilon,
        nn.RMSNorm: lm.RMSNormIdentity,
        nn.Softmax: lm.SoftmaxDT,
        nn.SiLU: lm.SiLUIdentity,
        nn.GELU: lm.GELUIdentity,
        nn.Tanh: lm.TanhIdentity,
        nn.ReLU: lm.ReLUIdentity,
        nn.Sigmoid: lm.SigmoidIdentity,
    }
)

# (parent, key in parent._modules, original module, replacement)
_Link = Tuple[nn.Module, str, nn.Module, nn.Module]


def identity_module(module: nn.Module) -> nn.Module:
    """A factory for a module that is one element-wise or normalising step (an RMSNorm class of a
    model library, an activation written as a formula): a shallow copy of ``module``, sharing its
    parameters and buffers, whose forward computes exactly ``module``'s output and passes the
    relevance unchanged to its relevance-carrying input (:func:`lrpcpp.models.explicit.identity_rule`)."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    forward = module.forward

    @functools.wraps(forward)
    def rule_forward(*args, **kwargs):
        return identity_rule(forward, *args, **kwargs)

    new.__dict__["forward"] = rule_forward
    return new


def _rule_module(rule: Rule, module: nn.Module) -> nn.Module:
    """The drop-in of ``module`` with ``rule``: the rule's module class for ``nn.Linear`` and
    ``nn.Conv2d``; for the other convolutions (1-D, 3-D, transposed) the drop-in of their kind that
    takes the rule (:data:`lrpcpp.modules.CONVOLUTION_RULE_MODULES`), sharing the layer's parameters."""
    for kind, drop_in in lm.CONVOLUTION_RULE_MODULES.items():
        if isinstance(module, kind):
            return drop_in.from_module(module, rule=rule)
    return rule.module(module)


def _merged_module(rule: Rule, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    new = rule.module(conv)
    weight, bias = merged_conv_bn(conv, bn)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    new._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return new


def composite_name_map(preset: Preset, model: nn.Module) -> Dict[str, Callable[[nn.Module], nn.Module]]:
    """The ``name_map`` of :class:`lrpcpp.Composite` for ``preset`` on ``model``: a drop-in with the
    layer's rule for each linear and convolution layer, and, where ``preset.merge_batch_norm``, the
    batch norm merged into the convolution before it (computed from its running statistics now)."""
    modules = dict(model.named_modules())
    # nn.MultiheadAttention reads its projections' weights itself: they keep the composite's treatment
    mha = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    assigned = {n: r for n, r in preset.assign(model).items() if n in modules and n.rpartition(".")[0] not in mha}
    out: Dict[str, Callable[[nn.Module], nn.Module]] = {
        name: (lambda r: lambda m: _rule_module(r, m))(rule) for name, rule in assigned.items()
    }
    if preset.merge_batch_norm:
        for conv_name, bn_name in conv_bn_pairs(model):
            bn = modules[bn_name]
            if conv_name in assigned and mergeable(bn) and not bn.training:
                out[conv_name] = (lambda r, b: lambda m: _merged_module(r, m, b))(assigned[conv_name], bn)
                out[bn_name] = (lambda c: lambda m: MergedBatchNorm(c))(conv_name)
    return out


def _build(factory: Factory, module: nn.Module, epsilon: float) -> nn.Module:
    if isinstance(factory, type):
        from_module = getattr(factory, "from_module", None)
        if from_module is None:
            raise TypeError(
                f"lrpcpp.Composite: {factory.__name__} has no from_module(); map {type(module).__name__} "
                "to a drop-in class with from_module or to a callable (module) -> new module"
            )
        options = {"epsilon": epsilon} if "epsilon" in getattr(factory, "_rule_defaults", {}) else {}
        new = from_module(module, **options)
    elif callable(factory):
        new = factory(module)
    else:
        raise TypeError(f"lrpcpp.Composite: no factory for {type(module).__name__}, got {factory!r}")
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"lrpcpp.Composite: the factory for {type(module).__name__} returned {type(new).__name__}, not an nn.Module"
        )
    return new


class CompositeHandle:
    """What one :meth:`Composite.register` changed on one model; :meth:`remove` undoes it.
    Also a context manager."""

    kind = "registered with a Composite"

    def __init__(self, composite: "Composite", model: nn.Module) -> None:
        self.composite = composite
        self.model = model
        #: ``{qualified name: (original module, replacement)}`` for every replaced module
        self.replaced: Dict[str, Tuple[nn.Module, nn.Module]] = {}
        self._links: List[Tuple[nn.Module, str, nn.Module]] = []  # (parent, key, original)
        self._forward: Optional[Tuple[bool, Any]] = None  # (had an instance forward, that forward)
        self._state = ModelState(model)  # eval mode while registered
        self._active = False

    @property
    def active(self) -> bool:
        """Whether the changes are in place."""
        return self._active

    def remove(self) -> None:
        """Restore the original module objects, ``forward`` and training flags (idempotent)."""
        if not self._active:
            return
        for parent, key, original in reversed(self._links):
            parent._modules[key] = original
        self._links.clear()
        if self._forward is not None:
            had, previous = self._forward
            if had:
                self.model.__dict__["forward"] = previous
            else:
                self.model.__dict__.pop("forward", None)
            self._forward = None
        self._state.__exit__()
        self._active = False
        release(self)
        if self in self.composite._handles:
            self.composite._handles.remove(self)

    def __enter__(self) -> "CompositeHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"CompositeHandle({type(self.model).__name__}, {len(self.replaced)} modules replaced, {state})"


class Composite:
    """Explicit LRP rules for whole models: module drop-ins plus :class:`ExplicitRules`.

    * ``module_map``: ``{module type: factory}``; a factory is a drop-in class with ``from_module``
      (``epsilon`` is passed on to classes that take it) or a callable ``(module) -> new module``.
      Types match exactly (a subclass is not replaced unless listed). Default:
      :data:`DEFAULT_MODULE_MAP`.
    * ``name_map``: ``{qualified module name: factory or None}``, taking priority over the type map;
      ``None`` leaves that module as it is. Every name must exist in the registered model.
    * ``functions``: run the model instance's ``forward`` inside ``ExplicitRules(epsilon)``.
    * ``epsilon``: the stabiliser of the epsilon rules, in the drop-ins and in the function rules.
    * ``preset``: a preset name or :class:`lrpcpp.Preset` (:mod:`lrpcpp.models.presets`): its rules replace
      the linear and convolution layers (by type, input layer and name, resolved for each registered
      model; ``name_map`` still takes priority), and batch norms are merged into the convolution
      before them (replaced by :class:`lrpcpp.models.canonizers.MergedBatchNorm`). Attention keeps the
      composite's own explicit treatment; ``nn.MultiheadAttention`` projections are not replaced.

    A replaced module's children are not visited: its replacement is responsible for them. The
    registered model itself is never replaced, only its submodules.
    """

    def __init__(
        self,
        module_map: Optional[Mapping[type, Factory]] = None,
        functions: bool = True,
        epsilon: float = 1e-6,
        name_map: Optional[Mapping[str, Factory]] = None,
        preset: Union[str, Preset, None] = None,
    ) -> None:
        if not epsilon >= 0:
            raise ValueError(f"lrpcpp.Composite: expected epsilon >= 0, got {epsilon}")
        self.module_map: Dict[type, Factory] = dict(DEFAULT_MODULE_MAP if module_map is None else module_map)
        self.name_map: Dict[str, Factory] = dict(name_map or {})
        self.functions = bool(functions)
        self.epsilon = float(epsilon)
        self.rules = ExplicitRules(epsilon=self.epsilon)
        self._handles: List[CompositeHandle] = []
        self.preset: Optional[Preset] = None
        if preset is not None:
            self.preset = get_preset(preset)

    def __repr__(self) -> str:
        return (
            f"Composite({len(self.module_map)} module types, {len(self.name_map)} names, "
            f"functions={self.functions}, epsilon={self.epsilon})"
        )

    # ------------------------------------------------------------------------- planning
    def _plan(self, model: nn.Module) -> Tuple[List[_Link], Dict[str, Tuple[nn.Module, nn.Module]]]:
        """Every (parent, key, original, replacement) link to change, built before anything changes."""
        all_names = {n for n, _ in model.named_modules(remove_duplicate=False) if n}
        name_map = self.name_map
        if self.preset is not None:
            name_map = {**composite_name_map(self.preset, model), **self.name_map}
        unknown = sorted(set(name_map) - all_names)
        if unknown:
            raise KeyError(f"lrpcpp.Composite: name_map names no submodule of this {type(model).__name__}: {unknown}")
        links: List[_Link] = []
        replaced: Dict[str, Tuple[nn.Module, nn.Module]] = {}
        built: Dict[int, nn.Module] = {}
        expanded = {id(model)}
        reached = set()
        todo: List[Tuple[str, nn.Module]] = [("", model)]
        while todo:
            prefix, parent = todo.pop()
            for key, child in list(parent._modules.items()):
                if child is None:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                reached.add(name)
                factory = name_map[name] if name in name_map else self.module_map.get(type(child))
                if factory is not None:
                    new = built.get(id(child))
                    if new is None:
                        new = built[id(child)] = _build(factory, child, self.epsilon)
                    links.append((parent, key, child, new))
                    replaced[name] = (child, new)
                elif id(child) not in expanded:
                    expanded.add(id(child))
                    todo.append((name, child))
                else:  # a module shared with an earlier parent: visited there
                    reached.update(f"{name}.{n}" for n, _ in child.named_modules(remove_duplicate=False) if n)
        inside = sorted(set(name_map) - reached)
        if inside:
            raise ValueError(
                f"lrpcpp.Composite: name_map names modules inside a module that is replaced as a whole: {inside}"
            )
        return links, replaced

    # ------------------------------------------------------------------------- public API
    def register(self, model: nn.Module) -> CompositeHandle:
        """Apply the composite to ``model`` (this instance only); returns the handle to remove it.

        The model runs in eval mode while registered (dropout off, batch norms on their running
        statistics); :meth:`CompositeHandle.remove` puts back every submodule's own training flag.
        Raises ``RuntimeError`` if ``model``, one of its submodules or a model it is part of is
        already registered with a composite (or patched by :func:`lrpcpp.patch`).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"lrpcpp.Composite.register expects an nn.Module, got {type(model).__name__}")
        links, replaced = self._plan(model)
        handle = CompositeHandle(self, model)
        handle.replaced = replaced
        claim(model, handle, "lrpcpp.Composite", also=[new for _, _, _, new in links])
        for parent, key, original, new in links:
            parent._modules[key] = new
            handle._links.append((parent, key, original))
        handle._state.__enter__()  # the replacements included
        if self.functions:
            had = "forward" in model.__dict__
            handle._forward = (had, model.__dict__.get("forward"))
            model.__dict__["forward"] = self._wrap(model.forward)
        handle._active = True
        self._handles.append(handle)
        return handle

    def _wrap(self, forward: Callable) -> Callable:
        rules = self.rules

        @functools.wraps(forward)
        def forward_with_rules(*args, **kwargs):
            with rules:
                return forward(*args, **kwargs)

        return forward_with_rules

    def remove(self) -> None:
        """Remove this composite from every model it is registered on."""
        for handle in list(self._handles):
            handle.remove()

    @contextlib.contextmanager
    def context(self, model: nn.Module) -> Iterator[CompositeHandle]:
        """``register(model)`` for the duration of a ``with`` block; removed on exit, also on an exception."""
        handle = self.register(model)
        try:
            yield handle
        finally:
            handle.remove()
