"""The state a relevance computation puts a model in, and puts back: its eval mode and frozen
parameters (:class:`ModelState`), and the registry of the modules that take part in a patch or a
composite right now (:func:`claim`, :func:`release`)."""

import weakref
from typing import Optional, Protocol, Sequence, Tuple

from torch import nn

__all__ = ["ModelState", "claim", "release", "Owner"]


class Owner(Protocol):
    """What claims a model: a patch handle or a composite handle."""

    model: nn.Module
    kind: str  # what the model is while claimed: "patched", "registered with a Composite", ...


# every module of a model that is patched, or registered with a Composite, right now -> that
# handle. A module takes part in one of them at a time: a patch of a model and a patch of one of
# its submodules would each save the other's changes as the original to restore.
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, Owner]" = weakref.WeakKeyDictionary()


def claim(model: nn.Module, owner: Owner, caller: str, also: Sequence[nn.Module] = ()) -> None:
    """Records ``owner`` (a handle with ``model`` and ``kind``) for every module of ``model`` (and of
    the modules ``also``); raises ``RuntimeError`` naming the module if one of them is already
    patched or registered, before recording anything."""
    modules = list(model.named_modules())
    modules += [(f"<replacement {type(m).__name__}>", m) for extra in also for m in extra.modules()]
    for name, module in modules:
        other = _OWNERS.get(module)
        if other is None:
            continue
        what = f"this {type(model).__name__}" if not name else f"its submodule '{name}' ({type(module).__name__})"
        part = "" if other.model is module else f" as part of a {type(other.model).__name__}"
        raise RuntimeError(
            f"{caller}: {what} is already {other.kind}{part} ({other!r}); remove that first "
            "(a module takes part in one patch or composite at a time)"
        )
    for _, module in modules:
        _OWNERS[module] = owner


def release(owner: Owner) -> None:
    for module in [m for m, o in list(_OWNERS.items()) if o is owner]:
        del _OWNERS[module]


class ModelState:
    """A context manager that puts ``model`` in eval mode and, with ``freeze``, its parameters to
    ``requires_grad=False`` for the block; on leaving it (also by an exception) every sub-module's
    own ``training`` flag and every parameter's ``requires_grad`` are put back as they were."""

    def __init__(self, model: nn.Module, freeze: bool = False):
        self.model, self.freeze = model, freeze
        self._saved: Optional[Tuple[list, list]] = None

    def __enter__(self) -> "ModelState":
        self._saved = (
            [(m, m.training) for m in self.model.modules()],
            [(p, p.requires_grad) for p in self.model.parameters()],
        )
        self.model.eval()
        if self.freeze:
            for p, _ in self._saved[1]:
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            modules, params = self._saved
            self._saved = None
            for m, training in modules:
                m.training = training
            for p, requires_grad in params:
                p.requires_grad_(requires_grad)
