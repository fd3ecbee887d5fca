"""The z-plus rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import BiasConvention, Rule

__all__ = ["ZPlus"]


@dataclass(frozen=True)
class ZPlus(BiasConvention, Rule):
    """The z-plus rule: numerators ``x_i w_ij+`` (RULES.md section 3). ``bias="ignore"`` leaves the
    layer's bias out of the denominator (conservative); ``bias="denominator"`` adds ``b+`` to it, as
    zennit does."""

    epsilon: float = 1e-6
    bias: str = "ignore"
    name = "z_plus"
    transform = "pos"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_z_plus(x, weight, bias, self.epsilon, transform, gi, self.bias_in_denominator)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_z_plus(
            x, weight, bias, stride, padding, dilation, groups, self.epsilon, transform, gi, self.bias_in_denominator
        )

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        return lf.convolution_z_plus(
            x,
            weight,
            bias,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            self.epsilon,
            transform,
            gi,
            self.bias_in_denominator,
        )

    def module(self, layer):
        cls = lm.LinearZPlus if isinstance(layer, nn.Linear) else lm.Conv2dZPlus
        return cls.from_module(layer, epsilon=self.epsilon, bias_in_denominator=self.bias_in_denominator)
