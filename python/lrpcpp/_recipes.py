"""Recipes: the epsilon rule of a layer keeps a cheap input by the way to compute it again.

The epsilon rule of a linear or convolution layer (``lf.linear_epsilon``, ``lf.conv2d_epsilon``,
``lf.convolution_epsilon``, and so ``lm.LinearEpsilon`` and ``lm.Conv2dEpsilon``) keeps its input ``x`` and its
output for the backward pass, where the relevance is ``x * ((R / stab(y)) W)``. An element-wise
explicit op (an identity-rule activation or normalisation, ``lf.layer_norm``, ``lf.mul2``) leaves
its recipe on its output: the op and its arguments, the tensors among them held weakly (or by the
recipes they carry themselves). A layer whose ``x`` carries a recipe keeps the recipe's tensors
instead of ``x``, and the backward pass computes ``x`` again with the same op, bitwise the same.

The recipe is kept only where it costs no memory: the tensors it holds that nothing else keeps take
no more memory than ``x``. Kept anyway are a layer's output (by that layer) and a parameter (by its
module); a constant smaller than ``x`` (a weight or a scale that the op broadcasts, a tensor that
carries no relevance) is held and not counted; one of ``x``'s size counts. So the normalised input of the
q, k and v projections costs nothing beyond the residual stream it is computed from, nor the gated
MLP's product ``mul2(silu(gate(h)), up(h))`` beyond the two projections' outputs.

Recipes are left in eager mode only (not while compiling, scripting or under autocast, nor on tensor
subclasses or inside torch.func transforms), and used only where no other saved-tensor hooks are
active (activation checkpointing, offloading); anywhere else the layer keeps ``x`` itself. ``x``
written in place before the layer leaves its recipe unused; a tensor of a recipe written in place
before the backward pass is an error, as autograd's own check of saved tensors is.
"""

import functools
import weakref
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

_RECIPE = "_lrpcpp_recipe"
_KEPT = "_lrpcpp_kept"  # the output of a layer rule, which keeps it for its backward pass


class _Recipe:
    """``op(*args)``: each tensor among ``args`` as the recipe it carries, held where it is kept anyway
    or small, else as a weak reference."""

    __slots__ = ("op", "args", "versions", "output_version", "costly", "shared")

    def __init__(self, op: Callable, args: tuple, output: Tensor):
        self.op = op
        self.args: List[Any] = []
        self.versions: List[int] = []  # of each tensor in args, in order
        # the tensors it would hold that nothing keeps anyway, as weak references: relevance-carrying
        # ones that no layer keeps, constants of the output's size (a weight or a scale broadcast onto
        # the output, and a parameter, are held)
        self.costly: List[weakref.ref] = []
        for a in args:
            if not isinstance(a, Tensor):
                self.args.append(a)
                continue
            inner = _usable(a)
            if inner is not None:
                self.args.append(inner)
                self.costly += inner.costly
                continue
            self.versions.append(a._version)
            if (
                getattr(a, _KEPT, False)  # a layer keeps its storage for its backward pass
                or isinstance(a, torch.nn.Parameter)  # its module holds it
                or (not a.requires_grad and a.numel() < output.numel())  # a weight, a scale: broadcast
            ):
                self.args.append(a)
                continue
            ref = weakref.ref(a)
            self.args.append(ref)
            self.costly.append(ref)
        self.output_version = output._version
        self.shared: Optional[weakref.ref] = None  # the _Held of the layers that read this output

    def cheap_for(self, x: Tensor) -> bool:
        """Whether keeping the recipe in place of ``x`` costs no memory: the tensors it holds that
        no layer keeps take no more than ``x``."""
        size = 0
        for ref in self.costly:
            t = ref()
            if t is None:
                return False
            size += t.untyped_storage().nbytes()
        return size <= x.untyped_storage().nbytes()

    def held(self) -> Optional["_Held"]:
        """The recipe with its tensors held, or None where one of them is gone or was written in place;
        one for all the layers that read the output (q, k and v read one normalised input), which
        compute it once in their backward passes."""
        shared = self.shared() if self.shared is not None else None
        if shared is not None and shared.unchanged():
            return shared
        args: List[Any] = []
        versions = iter(self.versions)
        for a in self.args:
            if isinstance(a, _Recipe):
                a = a.held()
                if a is None:
                    return None
            elif isinstance(a, (Tensor, weakref.ref)):
                t = a() if isinstance(a, weakref.ref) else a
                if t is None or t._version != next(versions):
                    return None
                a = t
            args.append(a)
        held = _Held(self.op, args)
        self.shared = weakref.ref(held)
        return held


class _Held:
    """A recipe whose tensors are held, for the backward passes of the layers that keep it (``users``):
    the first to need it computes it, the last of them drops it."""

    __slots__ = ("op", "args", "versions", "users", "served", "cache", "__weakref__")

    def __init__(self, op: Callable, args: List[Any]):
        self.op = op
        self.args = args
        self.versions = [a._version if isinstance(a, Tensor) else None for a in args]
        self.users = 0
        self.served = 0
        self.cache: Optional[Tensor] = None

    def unchanged(self) -> bool:
        return all(
            a.unchanged() if isinstance(a, _Held) else not isinstance(a, Tensor) or a._version == v
            for a, v in zip(self.args, self.versions)
        )

    def value(self) -> Tensor:
        out = self.cache if self.cache is not None else self.compute()
        self.served += 1
        self.cache = None if self.served % self.users == 0 else out
        return out

    def compute(self) -> Tensor:
        args = []
        for a, v in zip(self.args, self.versions):
            if isinstance(a, _Held):
                a = a.compute()
            elif isinstance(a, Tensor) and a._version != v:
                raise RuntimeError(
                    f"lrpcpp: an input of {self.op} in the forward pass, which a layer rule keeps to compute that "
                    f"op's output again in the backward pass, was modified by an in-place operation (version {v} "
                    f"then, {a._version} now): the relevance would be that of other values"
                )
            args.append(a)
        if self.op is torch.ops.lrpcpp.mul2 and isinstance(self.args[0], _Held):
            a, b = args
            if torch.result_type(a, b) == a.dtype and torch.broadcast_shapes(a.shape, b.shape) == a.shape:
                # into the first factor, computed just now (the gated MLP's silu(gate)): lrpcpp.mul2 is
                # torch.mul, and a fresh tensor of the gated product's size costs about as much again
                return a.mul_(b)
        return self.op(*args)


def _usable(t: Tensor) -> Optional[_Recipe]:
    recipe = getattr(t, _RECIPE, None)
    if recipe is None or recipe.output_version != t._version:  # written in place since
        return None
    return recipe


def _eager(t: Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and type(t) is Tensor
        and t.requires_grad
        and torch.is_grad_enabled()
        and not torch._C._is_any_autocast_enabled()
        and torch._C._autograd._saved_tensors_hooks_is_enabled()  # type: ignore[attr-defined]  # absent from the stub
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def leave(out: Tensor, op: Callable, *args: Any) -> Tensor:
    """Leave on ``out`` the recipe ``op(*args)`` (``out`` is what that call returned); ``out``."""
    if _eager(out):
        setattr(out, _RECIPE, _Recipe(op, args, out))
    return out


def layer(op: Callable, x: Tensor, *args: Any) -> Tensor:
    """``op(x, *args)``, a layer rule that keeps ``x``: keeping ``x``'s recipe where it has a usable
    one. Its output is marked as kept (the rule keeps it)."""
    recipe = _usable(x) if _eager(x) and torch._C._autograd._top_saved_tensors_default_hooks(False) is None else None
    held = recipe.held() if recipe is not None and recipe.cheap_for(x) else None
    if held is None:
        out = op(x, *args)
    else:
        # (the saved tensors keep their hooks: the pack hook must not hold x)
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, id(x), held), _unpack):
            out = op(x, *args)
    if _eager(out):
        setattr(out, _KEPT, True)
    return out


def _pack(x_id: int, held: _Held, t: Tensor) -> Any:
    if id(t) != x_id:
        return t
    held.users += 1
    return held


def _unpack(saved: Any) -> Any:
    if isinstance(saved, _Held):  # (in the backward's grad mode: a graph where create_graph asks for one)
        with torch._C.DisableTorchFunction():
            return saved.value()
    return saved
