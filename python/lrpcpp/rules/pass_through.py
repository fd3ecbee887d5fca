"""The rule that leaves a layer as it is."""

from dataclasses import dataclass

from .base import Rule

__all__ = ["Pass"]


@dataclass(frozen=True)
class Pass(Rule):
    """Leaves the layer as it is (the patch's or composite's default treatment)."""

    name = "pass"
