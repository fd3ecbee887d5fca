"""lrpcpp's walk of a model's module tree (every patch and attribute call starts with it) lists what
``list(model.named_modules())`` lists, in its order and under its names: shared submodules once,
empty child slots skipped, a class with its own ``named_modules`` asked."""

import pytest
from lrpcpp.models.tree import named_modules
from torch import nn

pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
from models import build  # noqa: E402


class Shared(nn.Module):
    """One linear reached by two names, an empty child slot, a nested container."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.gap = None
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.GELU()), nn.Identity()])
        self.again = self.first
        self.blocks.append(self.first)


class OwnWalk(nn.Module):
    """Lists only its first child (a wrapper that hides the rest, as some wrappers do)."""

    def __init__(self):
        super().__init__()
        self.shown, self.hidden = nn.Linear(3, 3), nn.Linear(3, 3)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield f"{prefix}.shown" if prefix else "shown", self.shown


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = OwnWalk()
        self.tail = nn.Linear(3, 3)


def _ids(pairs):
    return [(name, id(m)) for name, m in pairs]


@pytest.mark.parametrize(
    "make",
    [Shared, OwnWalk, Outer, lambda: build("bert"), lambda: build("llama")],
    ids=["shared", "own-walk", "own-walk-inside", "bert", "llama"],
)
def test_the_walk_lists_what_named_modules_lists(make):
    model = make()
    assert _ids(named_modules(model)) == _ids(model.named_modules())


def test_a_shared_module_is_listed_once_under_its_first_name():
    model = Shared()
    names = [n for n, m in named_modules(model) if m is model.first]
    assert names == ["first"]
