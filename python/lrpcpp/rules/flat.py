"""The flat rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import Rule

__all__ = ["Flat"]


@dataclass(frozen=True)
class Flat(Rule):
    """The flat rule: every connected input takes an equal share (RULES.md section 3)."""

    epsilon: float = 1e-6
    name = "flat"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_flat(x, weight, bias, self.epsilon, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_flat(x, weight, bias, stride, padding, dilation, groups, self.epsilon, gi)

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        return lf.convolution_flat(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, self.epsilon, gi
        )

    def module(self, layer):
        cls = lm.LinearFlat if isinstance(layer, nn.Linear) else lm.Conv2dFlat
        return cls.from_module(layer, epsilon=self.epsilon)
