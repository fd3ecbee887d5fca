"""The state a relevance computation puts a model in, and puts back: its eval mode and frozen
parameters (:class:`ModelState`), and the registry of the modules that take part in a patch or a
composite right now (:func:`claim`, :func:`release`)."""

from typing import Dict, Optional, Protocol, Sequence, Tuple

from torch import nn

__all__ = ["ModelState", "claim", "release", "Owner"]


class Owner(Protocol):
    """What claims a model: a patch handle or a composite handle."""

    model: nn.Module
    kind: str  # what the model is while claimed: "patched", "registered with a Composite", ...


# every module of a model that is patched, or registered with a Composite, right now: id(module) ->
# (the module, that handle). A module takes part in one of them at a time: a patch of a model and a
# patch of one of its submodules would each save the other's changes as the original to restore. The
# entry holds the module until the handle releases it (so that the id stays that module's), as the
# handle holds its model; a plain dict, where weak keys cost a weak reference per module and call.
_OWNERS: Dict[int, Tuple[nn.Module, Owner]] = {}


def claim(
    model: nn.Module,
    owner: Owner,
    caller: str,
    also: Sequence[nn.Module] = (),
    modules: Optional[Sequence[Tuple[str, nn.Module]]] = None,
) -> None:
    """Records ``owner`` (a handle with ``model`` and ``kind``) for every module of ``model`` (and of
    the modules ``also``); raises ``RuntimeError`` naming the module if one of them is already
    patched or registered, before recording anything. ``modules``: ``model.named_modules()``, where
    the caller has walked it already."""
    modules = list(model.named_modules() if modules is None else modules)
    modules += [(f"<replacement {type(m).__name__}>", m) for extra in also for m in extra.modules()]
    for name, module in modules:
        entry = _OWNERS.get(id(module))
        if entry is None:
            continue
        other = entry[1]
        what = f"this {type(model).__name__}" if not name else f"its submodule '{name}' ({type(module).__name__})"
        part = "" if other.model is module else f" as part of a {type(other.model).__name__}"
        raise RuntimeError(
            f"{caller}: {what} is already {other.kind}{part} ({other!r}); remove that first "
            "(a module takes part in one patch or composite at a time)"
        )
    for _, module in modules:
        _OWNERS[id(module)] = (module, owner)


def release(owner: Owner) -> None:
    for key in [k for k, (_, o) in _OWNERS.items() if o is owner]:
        del _OWNERS[key]


class ModelState:
    """A context manager that puts ``model`` in eval mode and, with ``freeze``, its parameters to
    ``requires_grad=False`` for the block; on leaving it (also by an exception) what it changed is put
    back: the ``training`` flag of each sub-module that was in training mode, the ``requires_grad`` of
    each parameter it froze. A Hugging Face layer with activation checkpointing enabled keeps its own
    ``training`` flag on, so that it checkpoints (it does in training mode only); everything in it is
    in eval mode. ``modules``: ``list(model.modules())``, where the caller has walked the tree already.
    A model in eval mode with frozen parameters is left as it is, and leaving the block touches nothing."""

    def __init__(self, model: nn.Module, freeze: bool = False, modules: Optional[Sequence[nn.Module]] = None):
        self.model, self.freeze, self._modules = model, freeze, modules
        self._saved: Optional[Tuple[list, list, list]] = None

    def __enter__(self) -> "ModelState":
        modules = list(self.model.modules()) if self._modules is None else self._modules
        # what the block changes: the modules in training mode, the layers that checkpoint (their own
        # flag on), the parameters that require grad (by module and name: accelerate's offloading hooks
        # replace the parameter objects in every forward, loading the weights, then leaving meta tensors)
        training = [m for m in modules if m.training]
        # a Hugging Face layer with activation checkpointing enabled checkpoints in training mode only;
        # its own flag goes on (its submodules, dropout and attention, are in eval mode)
        checkpointing = [
            m
            for m in modules
            if m.__dict__.get("_gradient_checkpointing_func") and getattr(m, "gradient_checkpointing", False) is True
        ]
        frozen = (
            [(m, n, p) for m in modules for n, p in m._parameters.items() if p is not None and p.requires_grad]
            if self.freeze
            else []
        )
        self._saved = (training, checkpointing, frozen)
        if training:
            self.model.eval()
        for m in checkpointing:
            m.training = True
        for _, _, p in frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            training, checkpointing, frozen = self._saved
            self._saved = None
            for m in checkpointing:
                m.training = False  # (back on below where it was on before)
            for m in training:
                m.training = True
            for m, n, _ in frozen:
                p = m._parameters.get(n)
                if p is not None and not p.requires_grad:
                    p.requires_grad_(True)
