"""The gamma rule (RULES.md section 3)."""

from dataclasses import dataclass

from torch import nn

from .. import functional as lf
from .. import modules as lm
from .base import Rule

__all__ = ["Gamma"]


@dataclass(frozen=True)
class Gamma(Rule):
    """The gamma rule: ``W + gamma W+`` for the positive contributions (RULES.md section 3)."""

    gamma: float = 0.25
    epsilon: float = 1e-6
    name = "gamma"
    transform = "abs"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_gamma(x, weight, bias, self.gamma, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_gamma(
            x, weight, bias, stride, padding, dilation, groups, self.gamma, self.epsilon, transform, gi
        )

    def convolution(
        self, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, transform, gi
    ):
        return lf.convolution_gamma(
            x,
            weight,
            bias,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            self.gamma,
            self.epsilon,
            transform,
            gi,
        )

    def module(self, layer):
        cls = lm.LinearGamma if isinstance(layer, nn.Linear) else lm.Conv2dGamma
        return cls.from_module(layer, gamma=self.gamma, epsilon=self.epsilon)
