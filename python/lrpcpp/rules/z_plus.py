"""The z-plus rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import Rule

__all__ = ["ZPlus"]


@dataclass(frozen=True)
class ZPlus(Rule):
    """The z-plus rule: numerators ``x_i w_ij+`` (RULES.md section 3)."""

    epsilon: float = 1e-6
    name = "z_plus"
    transform = "pos"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_z_plus(x, weight, bias, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_z_plus(x, weight, bias, stride, padding, dilation, groups, self.epsilon, transform, gi)

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        return lf.convolution_z_plus(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, self.epsilon, transform, gi
        )

    def module(self, layer):
        cls = lm.LinearZPlus if isinstance(layer, nn.Linear) else lm.Conv2dZPlus
        return cls.from_module(layer, epsilon=self.epsilon)
