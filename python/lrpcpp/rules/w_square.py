"""The w-square rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import BiasConvention, Rule

__all__ = ["WSquare"]


@dataclass(frozen=True)
class WSquare(BiasConvention, Rule):
    """The w-square rule: numerators ``w_ij**2`` (RULES.md section 3). ``bias="ignore"`` leaves the
    layer's bias out of the denominator (conservative); ``bias="denominator"`` adds ``b**2`` to it, as
    zennit does."""

    epsilon: float = 1e-6
    bias: str = "ignore"
    name = "w_square"
    transform = "sq"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_w_square(x, weight, bias, self.epsilon, transform, gi, self.bias_in_denominator)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_w_square(
            x, weight, bias, stride, padding, dilation, groups, self.epsilon, transform, gi, self.bias_in_denominator
        )

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        return lf.convolution_w_square(
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
        cls = lm.LinearWSquare if isinstance(layer, nn.Linear) else lm.Conv2dWSquare
        return cls.from_module(layer, epsilon=self.epsilon, bias_in_denominator=self.bias_in_denominator)
